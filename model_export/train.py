"""Joint training of every exit of a multi-exit model.

The loss is a weighted sum of every exit's cross-entropy (MSDNet / MET style), so early exits
learn to be useful on their own while sharing the backbone. Training is deterministic for a seed:
one seeded generator drives initialisation, shuffling and augmentation, the thread count is fixed,
and torch's deterministic algorithms are switched on (cheap on CPU).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model_export.data import Split
from model_export.text import TextSplit, length_batches


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 60
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    label_smoothing: float = 0.1
    exit_weights: tuple[float, ...] | None = None
    """Per-exit loss weights (normalised to sum 1); None = equal weights."""
    max_shift: int = 0
    """Random translation by up to this many pixels (zero padded); 0 disables augmentation."""
    max_steps: int | None = None
    """Stop after this many optimiser steps (the tiny test bundle); None = run every epoch."""
    seed: int = 0
    threads: int | None = None
    """torch intra-op threads; None = 1. These models gain nothing from more (measured: 150 demo
    steps in 4.8 s on 1 thread, 6.0 s on 2), and on a busy machine two threads stall each other."""


@dataclass
class TrainResult:
    seconds: float
    steps: int
    losses: list[float] = field(default_factory=list)  # mean loss per epoch

    def then(self, other: TrainResult) -> TrainResult:
        """This phase followed by `other` (multi-phase recipes)."""
        return TrainResult(self.seconds + other.seconds, self.steps + other.steps, self.losses + other.losses)


Objective = Callable[[nn.Module, torch.Tensor, torch.Tensor, float], torch.Tensor]
"""`objective(model, x, y, progress)` -> scalar loss; `progress` is the share of steps done, in [0, 1)."""


def seed_everything(seed: int, threads: int | None = None) -> torch.Generator:
    """Fix every source of randomness this package uses; returns the generator for data order."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.set_num_threads(threads or 1)
    torch.use_deterministic_algorithms(True, warn_only=True)
    return torch.Generator().manual_seed(seed)


def random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image [N, H, W] by its own integer offset, filling with zeros (blank paper)."""
    if max_shift <= 0:
        return x
    n, h, w = x.shape
    padded = F.pad(x, (max_shift, max_shift, max_shift, max_shift))
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, :, None].expand(n, h, w)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, :].expand(n, h, w)
    return padded[torch.arange(n)[:, None, None], rows, cols]


def epoch_batches(data: Split | TextSplit, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """One epoch's batches of row indices: shuffled; for text, of similar lengths (less padding)."""
    if isinstance(data, TextSplit):
        return length_batches(data.lengths, batch_size, gen)
    order = torch.randperm(len(data), generator=gen)
    return [order[first : first + batch_size] for first in range(0, len(data), batch_size)]


def _batcher(data: Split | TextSplit, cfg: TrainConfig, gen: torch.Generator) -> Callable[[torch.Tensor], Any]:
    """Row indices -> the model's input: a tensor of images (shifted when augmenting) or token inputs."""
    if isinstance(data, TextSplit):
        return data.batch
    x_all = torch.from_numpy(data.x)
    return lambda idx: random_shift(x_all[idx], cfg.max_shift, gen)


def _exit_weights(cfg: TrainConfig, num_exits: int) -> torch.Tensor:
    if cfg.exit_weights is None:
        w = torch.ones(num_exits)
    else:
        if len(cfg.exit_weights) != num_exits:
            raise ValueError(f"exit_weights has {len(cfg.exit_weights)} entries for {num_exits} exits")
        w = torch.tensor(cfg.exit_weights, dtype=torch.float32)
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"exit_weights must be >= 0 with a positive sum, got {cfg.exit_weights}")
    return w / w.sum()


def total_steps(cfg: TrainConfig, n: int) -> int:
    """The optimiser steps `train` takes on `n` samples: the epochs' steps, capped by `max_steps`."""
    per_epoch = math.ceil(n / cfg.batch_size)
    return per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, per_epoch * cfg.epochs)


def train(
    model: nn.Module,
    data: Split | TextSplit,
    cfg: TrainConfig,
    *,
    progress: bool = True,
    objective: Objective | None = None,
    parameters: Iterable[nn.Parameter] | None = None,
) -> TrainResult:
    """Train every exit of `model` (whose forward returns a list of logits) on `data`, in place.

    The loss is the weighted cross-entropy of every exit unless a recipe passes its own
    `objective`; `parameters` restricts what the optimiser updates (frozen backbones), the rest
    keeps its values. The caller seeds before building the model (`seed_everything`) so
    initialisation is covered too; this function reseeds its own generator for shuffling and
    augmentation.
    """
    from tqdm.auto import tqdm

    gen = seed_everything(cfg.seed, cfg.threads)
    y_all = torch.from_numpy(data.y)
    n = len(y_all)
    batch_of = _batcher(data, cfg, gen)
    total = total_steps(cfg, n)
    warmup = max(1, int(total * cfg.warmup_fraction))
    params = list(model.parameters() if parameters is None else parameters)
    if not params:
        raise ValueError("nothing to train: the parameter list is empty")
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            (s + 1) / warmup
            if s < warmup
            else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup)))
        ),
    )
    weights: torch.Tensor | None = None
    result = TrainResult(seconds=0.0, steps=0)
    start = time.perf_counter()
    model.train()
    bar = tqdm(total=total, desc="training", unit="step", disable=not progress, leave=False)
    try:
        while result.steps < total:
            epoch_loss, batches = 0.0, 0
            for idx in epoch_batches(data, cfg.batch_size, gen):
                if result.steps >= total:
                    break
                x = batch_of(idx)
                if objective is None:
                    logits = model(x)
                    if weights is None:
                        weights = _exit_weights(cfg, len(logits))
                    losses = torch.stack(
                        [F.cross_entropy(z, y_all[idx], label_smoothing=cfg.label_smoothing) for z in logits]
                    )
                    loss = (weights * losses).sum()
                else:
                    loss = objective(model, x, y_all[idx], result.steps / total)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                result.steps += 1
                epoch_loss += loss.item()
                batches += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
            result.losses.append(epoch_loss / max(1, batches))
    finally:
        bar.close()
    model.eval()
    result.seconds = time.perf_counter() - start
    return result


@torch.no_grad()
def exit_accuracy(model: nn.Module, data: Split | TextSplit) -> list[float]:
    """Accuracy of every exit on `data` (eval mode, full depth)."""
    model.eval()
    y = torch.from_numpy(data.y)
    if isinstance(data, TextSplit):
        parts = [model(data.batch(torch.arange(i, min(i + 256, len(data))))) for i in range(0, len(data), 256)]
        logits = [torch.cat(z) for z in zip(*parts, strict=True)]
    else:
        logits = model(torch.from_numpy(data.x))
    return [float((z.argmax(-1) == y).float().mean()) for z in logits]
