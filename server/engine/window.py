"""The live calibration window: every stage's exit outputs and the full-depth label of a random
share of the traffic, kept per model in a bounded ring buffer.

With `shadow_rate` > 0, each request row is *traced* with that probability when it is submitted.
A traced row records its logits (and gate / similarity) at every stage it runs; if it exits early
its answer goes out as usual and the row keeps going to the last stage as shadow work, which runs
only when no request work waits (answers never change, server/engine/scheduler.py). When a traced
row reaches the last stage its record, with the full-depth label, enters the window; the oldest
record leaves once `window_size` are held. The window is independent of the policy (every record
has every stage), so control/ can recalibrate from it (`calibration()`, server/control/auto.py).

Memory: `window_size` x stages x (classes + 2) float32 (the demo at 2000: 0.58 MB), plus the rows
in flight. Optionally persisted beside the policy (`save` / `load`, an .npz).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from server.bundle import Calibration


class LiveWindow:
    """Traced rows' records; thread-safe (the worker writes, control reads)."""

    def __init__(self, num_stages: int, num_classes: int, capacity: int, rate: float,
                 rng: np.random.Generator | None = None):
        self.num_stages, self.num_classes, self.capacity, self.rate = num_stages, num_classes, capacity, rate
        self._rng = rng or np.random.default_rng()
        self._lock = threading.Lock()
        self._next = 0
        self._pending: dict[int, np.ndarray] = {}  # trace id -> [S, C + 2] (logits, gate, similarity)
        self._records = np.zeros((capacity, num_stages, num_classes + 2), np.float32)
        self._count = 0  # records held
        self._head = 0  # where the next record goes
        self.total = 0  # records ever completed
        self.shadow_stage_rows = np.zeros(num_stages, np.int64)  # rows run only because traced (its compute)

    @property
    def enabled(self) -> bool:
        return self.rate > 0 and self.capacity > 0

    def begin(self, n: int) -> np.ndarray:
        """Trace ids for `n` new rows: -1 for untraced rows."""
        ids = np.full(n, -1, np.int64)
        if not self.enabled or n == 0:
            return ids
        picked = np.flatnonzero(self._rng.random(n) < self.rate)
        if len(picked):
            with self._lock:
                if len(self._pending) + len(picked) > 4 * self.capacity:  # rows that never finished
                    for old in sorted(self._pending)[: len(picked)]:
                        del self._pending[old]
                ids[picked] = np.arange(self._next, self._next + len(picked))
                self._next += len(picked)
                for i in ids[picked]:
                    self._pending[int(i)] = np.full((self.num_stages, self.num_classes + 2), np.nan, np.float32)
        return ids

    def record(self, stage: int, trace: np.ndarray, logits: np.ndarray | None, gate: np.ndarray | None,
               similarity: np.ndarray | None, *, shadow: bool = False) -> None:
        """A stage's outputs for the traced rows of a batch (`trace` aligned with the batch's rows)."""
        rows = np.flatnonzero(trace >= 0)
        if not len(rows) or logits is None:
            return
        last = stage == self.num_stages - 1
        with self._lock:
            if shadow:
                self.shadow_stage_rows[stage] += len(rows)
            for r in rows:
                buf = self._pending.get(int(trace[r]))
                if buf is None:
                    continue
                buf[stage, : self.num_classes] = logits[r]
                if gate is not None:
                    buf[stage, self.num_classes] = gate[r]
                if similarity is not None:
                    buf[stage, self.num_classes + 1] = similarity[r]
                if last:
                    del self._pending[int(trace[r])]
                    self._records[self._head] = buf
                    self._head = (self._head + 1) % self.capacity
                    self._count = min(self._count + 1, self.capacity)
                    self.total += 1

    def __len__(self) -> int:
        return self._count

    def _snapshot(self) -> np.ndarray:
        with self._lock:
            if self._count < self.capacity:
                return self._records[: self._count].copy()
            return np.roll(self._records, -self._head, axis=0).copy()  # oldest first

    def calibration(self) -> Calibration | None:
        """The window as calibration data (labels: the full-depth labels), oldest record first."""
        rec = self._snapshot()
        if not len(rec):
            return None
        logits = np.transpose(rec[:, :, : self.num_classes], (1, 0, 2))
        gate, sim = rec[:, :, self.num_classes].T, rec[:, :, self.num_classes + 1].T
        return Calibration(labels=logits[-1].argmax(-1).astype(np.int64), logits=np.ascontiguousarray(logits),
                           gate=None if np.isnan(gate[:-1]).all() else np.ascontiguousarray(gate),
                           similarity=None if np.isnan(sim[:-1]).all() else np.ascontiguousarray(sim))

    def save(self, path: Path) -> None:
        import io

        from server.files import atomic_write

        buf = io.BytesIO()
        np.savez_compressed(buf, records=self._snapshot())
        atomic_write(Path(path), buf.getvalue())

    def load(self, path: Path) -> int:
        """Records of an earlier run (same model shape), oldest first; returns how many were read."""
        try:
            with np.load(path) as data:
                rec: Any = data["records"]
        except (OSError, KeyError, ValueError):
            return 0
        if rec.ndim != 3 or rec.shape[1:] != self._records.shape[1:]:
            return 0
        rec = rec[-self.capacity:]
        with self._lock:
            self._records[: len(rec)] = rec
            self._count, self._head = len(rec), len(rec) % self.capacity
        return len(rec)
