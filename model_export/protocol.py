"""Bring your own model: what `export_bundle`, the recipes and `offramp export` need of a multi-exit model.

Any `torch.nn.Module` with these members exports into a bundle (docs/usage.md has a worked
example wrapping a small model of one's own). The two built-in families implement it:
`model_export.vit.MultiExitViT` (images) and `model_export.text.MultiExitEncoder` (Hugging Face
BERT-family encoders, token ids and an attention mask).

A model is cut into stages; stage i runs some backbone blocks and then exit head i. Inputs and
outputs are dicts of tensors keyed by the fixed names of server/bundle.py:

- stage 0 takes the model inputs (`input_specs()`, e.g. `pixels`, or `input_ids` and
  `attention_mask`); stage i > 0 takes `hidden_in` (stage i-1's `hidden`) plus every model input
  after the first (e.g. `attention_mask`), passed unchanged from stage to stage;
- every stage outputs `hidden` and `logits`, optionally `gate` and (i > 0) `similarity`.

The data a model trains and exports on provides `features(idx) -> {input name: numpy array}` and
`y` (model_export/data.py `Split`, model_export/text.py `TextSplit`).
"""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from server.bundle import GATE, HIDDEN, LOGITS, SIMILARITY, TensorSpec


@runtime_checkable
class MultiExitModel(Protocol):
    family: str
    """A short name of the model family, recorded in checkpoints ("vit", "encoder", ...)."""
    stage_blocks: list[list[int]]
    """Backbone blocks each stage runs, in order (recorded in the manifest)."""

    @property
    def num_stages(self) -> int: ...

    @property
    def head_kind(self) -> str:
        """The exit head kind (model_export/heads.py), recorded in the manifest."""
        ...

    @property
    def has_gate(self) -> bool: ...

    def input_specs(self) -> list[TensorSpec]:
        """The model inputs, first the one clients send; -1 marks dynamic axes (batch first)."""
        ...

    def stage_input_names(self, i: int) -> list[str]:
        """What stage i takes, in order: stage 0 the model inputs, later stages `hidden_in` first."""
        ...

    def output_names(self, i: int) -> list[str]:
        """What stage i outputs, in order: `hidden`, `logits`, then optional `gate`, `similarity`."""
        ...

    def dynamic_axes(self, name: str) -> dict[int, str]:
        """The dynamic axes of a stage input or output (batch always; sequence for text)."""
        ...

    def segment(self, i: int, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Everything exported stage i outputs, keyed and ordered as `output_names(i)`."""
        ...

    def exits(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Every exit's logits at full depth, the final exit last (the reference graph)."""
        ...

    def forward_all(self, x: Any) -> list[dict[str, torch.Tensor]]:
        """Every stage's outputs (`features` included) on a training batch, for recipes' losses."""
        ...

    def stage_modules(self, i: int) -> list[nn.Module]:
        """Modules whose parameters belong to stage i (for its parameter count)."""
        ...

    def backbone_modules(self) -> list[nn.Module]:
        """The pretrained part that frozen-backbone recipes (MET, LGViT stage 2) freeze."""
        ...


class ExitConfig:
    """What the built-in families' configs share (frozen dataclasses with `exits` and a `depth`):
    the exits normalised and checked, the exit blocks, and the plain-dict round trip checkpoints
    store (tuples as JSON lists; `from_dict` refuses unknown keys)."""

    exits: tuple[int, ...] | None
    depth: int

    def _check_exits(self, what: str = "layer") -> list[str]:
        """Sort and deduplicate `exits` (frozen: set in place); the problems with them, if any."""
        if self.exits is None:
            return []
        object.__setattr__(self, "exits", tuple(sorted(set(int(b) for b in self.exits))))
        if not self.exits or self.exits[0] < 0 or self.exits[-1] >= self.depth:
            return [f"exits {self.exits} must be {what} indices in [0, {self.depth - 1}]"]
        return []

    @property
    def exit_blocks(self) -> tuple[int, ...]:
        """Layers followed by an exit head, the last layer always among them."""
        chosen = set(range(self.depth)) if self.exits is None else set(self.exits)
        return tuple(sorted(chosen | {self.depth - 1}))

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        unknown = set(d) - {f.name for f in fields(cls)}  # type: ignore[arg-type]
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys {sorted(unknown)}")
        return cls(**d)  # __post_init__ turns JSON lists back into tuples


class ExitStages:
    """What the built-in families share of the protocol: stages from `stage_blocks`, the head kind
    from `cfg.head`, gates from the heads (a mixin for `nn.Module`s with those attributes)."""

    stage_blocks: list[list[int]]
    cfg: Any
    heads: Any

    @property
    def num_stages(self) -> int:
        return len(self.stage_blocks)

    @property
    def head_kind(self) -> str:
        return str(self.cfg.head)

    @property
    def has_gate(self) -> bool:
        return bool(self.heads[0].has_gate)

    def output_names(self, i: int) -> list[str]:
        """What stage i outputs, in order (server/bundle.py's fixed names): every stage has MuE's similarity."""
        return [HIDDEN, LOGITS, *([GATE] if self.has_gate else []), SIMILARITY]

    def forward_all(self, x: Any) -> list[dict[str, Any]]:
        """Every stage's outputs, `features` included, for the recipes' losses: stage 0 on the model
        input, each next stage on the hidden state before it (families with a `_run(i, x)`)."""
        outs = []
        for i in range(self.num_stages):
            out = self._run(i, x)  # type: ignore[attr-defined]
            outs.append(out)
            x = out[HIDDEN]
        return outs

    def forward(self, x: Any) -> list[Any]:
        """Every exit's logits, in stage order (the final exit last)."""
        return [o[LOGITS] for o in self.forward_all(x)]


def next_stage_inputs(model: MultiExitModel, i: int, inputs: dict[str, Any], hidden: Any) -> dict[str, Any]:
    """Stage i+1's inputs: `hidden_in` = stage i's `hidden`, the carried model inputs unchanged."""
    from server.bundle import HIDDEN_IN

    return {name: hidden if name == HIDDEN_IN else inputs[name] for name in model.stage_input_names(i + 1)}


def check_model(model: object) -> None:
    """TypeError naming what `model` lacks of the protocol (before an export starts)."""
    missing = [name for name in ("family", "stage_blocks", "num_stages", "head_kind", "has_gate", "input_specs",
                                 "stage_input_names", "output_names", "dynamic_axes", "segment", "exits",
                                 "stage_modules", "backbone_modules") if not hasattr(model, name)]
    if missing:
        raise TypeError(f"{type(model).__name__} does not implement model_export.protocol.MultiExitModel: "
                        f"missing {missing}")
