"""Exit heads: what turns a stage's hidden state into a prediction (and optionally an exit gate).

Heads live in a registry by name so that a model config names its head kind as a string, the
manifest records it (`StageSpec.head`) and later recipes add kinds without touching the backbone:
LGViT's local/global heads, a DMPO predictor, learned gates (PALBERT / JEI-DNN). A head sees the
whole token tensor [N, T, D] (class token first), so local heads can pool patch tokens.

A head returns a dict with `logits` [N, C] and, when `has_gate` is true, `gate` [N] in [0, 1];
the export turns those keys into the ONNX output names of server/bundle.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from server.bundle import LOGITS


class ExitHead(nn.Module):
    """Base class of exit heads. Subclasses set `kind` and implement `forward`."""

    kind: ClassVar[str] = ""
    has_gate: ClassVar[bool] = False

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        if dim <= 0 or num_classes <= 1:
            raise ValueError(f"an exit head needs dim > 0 and at least 2 classes, got {dim=}, {num_classes=}")
        self.dim = dim
        self.num_classes = num_classes

    def forward(self, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError


HEADS: dict[str, type[ExitHead]] = {}


def register_head(kind: str) -> Callable[[type[ExitHead]], type[ExitHead]]:
    """Class decorator: make a head kind available to model configs by name."""

    def add(cls: type[ExitHead]) -> type[ExitHead]:
        if kind in HEADS:
            raise ValueError(f"exit head {kind!r} is already registered ({HEADS[kind].__name__})")
        cls.kind = kind
        HEADS[kind] = cls
        return cls

    return add


def build_head(kind: str, dim: int, num_classes: int) -> ExitHead:
    """Instantiate a registered head kind; unknown kinds fail with the list of known ones."""
    try:
        cls = HEADS[kind]
    except KeyError:
        raise ValueError(f"unknown exit head {kind!r}; registered: {sorted(HEADS)}") from None
    return cls(dim, num_classes)


@register_head("linear")
class LinearHead(ExitHead):
    """LayerNorm + Linear on the class token (DeeBERT / MET style): the cheapest useful exit."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__(dim, num_classes)
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        return {LOGITS: self.fc(self.norm(hidden[:, 0]))}
