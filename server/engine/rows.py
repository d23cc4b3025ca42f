"""Rows in flight: the requests waiting for answers and the chunks of their rows at each stage.

A *chunk* is rows waiting together for one stage, with their hidden state, owners and exit state;
a *batch* is the rows of one stage run: merged metadata, and the chunks whose hidden states make
its input. Selecting rows is deferred to index arrays, so that filtering and splitting under the
scheduler's lock stay cheap; the worker gathers on the device when it runs the batch.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from server.exits import ExitState
from server.interface import InferResult


@dataclass(eq=False)
class PendingRequest:
    n: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[InferResult]
    labels: np.ndarray
    probs: np.ndarray
    exit_stage: np.ndarray
    remaining: int
    done: bool = False  # answered, failed or timed out: its rows are dropped wherever they are


@dataclass(eq=False)
class Chunk:
    """Rows waiting together for one stage. Shadow rows have no owner (`owners[i] is None`).
    `hidden[rows]` (all of `hidden` when `rows` is None) is the chunk's input."""

    hidden: Any
    owners: np.ndarray  # object [n]
    sample: np.ndarray  # int64 [n], row index inside the owner request
    full: np.ndarray  # bool [n], early_exit disabled for this row
    early_label: np.ndarray  # int64 [n], shadow rows: the label answered early; else -1
    trace: np.ndarray  # int64 [n], the live window's trace id (server/engine/window.py); -1: untraced
    state: ExitState
    rows: np.ndarray | None = None
    since: float = field(default_factory=time.monotonic)

    def __len__(self) -> int:
        return len(self.sample)

    def select(self, sel: np.ndarray) -> Chunk:
        rows = sel if self.rows is None else self.rows[sel]
        return Chunk(self.hidden, self.owners[sel], self.sample[sel], self.full[sel], self.early_label[sel],
                     self.trace[sel], self.state.take(sel), rows, self.since)

    def alive(self) -> np.ndarray:
        return np.fromiter((o is None or not o.done for o in self.owners), dtype=bool, count=len(self))


@dataclass(eq=False)
class Batch:
    """Rows of one stage run: merged metadata, and the chunks whose hidden states make its input."""

    meta: Chunk  # hidden is None until materialised
    parts: list[Chunk]

    def __len__(self) -> int:
        return len(self.meta)


def merge(parts: list[Chunk]) -> Batch:
    if len(parts) == 1:  # the common case: no copies
        p = parts[0]
        return Batch(Chunk(None, p.owners, p.sample, p.full, p.early_label, p.trace, p.state), parts)
    meta = Chunk(
        None,
        np.concatenate([p.owners for p in parts]),
        np.concatenate([p.sample for p in parts]),
        np.concatenate([p.full for p in parts]),
        np.concatenate([p.early_label for p in parts]),
        np.concatenate([p.trace for p in parts]),
        ExitState.concat([p.state for p in parts]),
    )
    return Batch(meta, parts)


def by_request(owners: np.ndarray, rows: np.ndarray) -> list[tuple[PendingRequest, np.ndarray]]:
    """The rows of a batch grouped by the request that owns them (most batches have one owner)."""
    if len(rows) == 0:
        return []
    picked = owners[rows]
    first = picked[0]
    if all(o is first for o in picked):
        return [(first, rows)]
    groups: dict[int, tuple[PendingRequest, list[int]]] = {}
    for row, owner in zip(rows.tolist(), picked, strict=True):
        groups.setdefault(id(owner), (owner, []))[1].append(row)
    return [(owner, np.asarray(r, dtype=np.int64)) for owner, r in groups.values()]


def post_result(loop: asyncio.AbstractEventLoop, *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(_resolve, *args)
    except RuntimeError:  # the loop is closed: nobody is waiting any more
        pass


def _resolve(future: asyncio.Future[InferResult], result: InferResult | None,
             error: Exception | None) -> None:
    if future.done():  # timed out or cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)  # type: ignore[arg-type]
