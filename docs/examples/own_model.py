"""Bring your own model: a two-stage multi-exit MLP on the digits, exported into a bundle.

Run it from the repository root:

    python docs/examples/own_model.py /tmp/own-bundle
    offramp serve --bundle /tmp/own-bundle

or from the command line, exporting through the factory function below:

    offramp export --factory docs.examples.own_model:factory --out /tmp/own-bundle

The model implements `model_export.protocol.MultiExitModel`: it says what each stage takes and
outputs (the fixed names of server/bundle.py), and `segment(i, inputs)` computes exactly that.
`tests/model_export/test_text.py` runs this file, so it stays true.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from model_export.data import load_digits_splits
from model_export.export import EXPORT_CONFIGS, export_bundle
from model_export.train import TrainConfig, train
from server.bundle import HIDDEN, HIDDEN_IN, LOGITS, TensorSpec


class TwoExitMLP(nn.Module):
    """pixels [N, 8, 8] -> stage 0 (MLP block + exit) -> stage 1 (MLP block + exit)."""

    family = "mlp"  # anything but the built-in "vit" and "encoder": save it with torch.save
    stage_blocks = [[0], [1]]
    head_kind = "mine"
    has_gate = False

    def __init__(self, width: int = 64, classes: int = 10):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.GELU()),
                                     nn.Sequential(nn.Linear(width, width), nn.GELU())])
        self.exit_heads = nn.ModuleList([nn.Linear(width, classes), nn.Linear(width, classes)])

    # -- the protocol ------------------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        return 2

    def input_specs(self) -> list[TensorSpec]:
        return [TensorSpec(name="pixels", shape=[-1, 8, 8], dtype="FP32")]

    def stage_input_names(self, i: int) -> list[str]:
        return ["pixels" if i == 0 else HIDDEN_IN]

    def output_names(self, i: int) -> list[str]:
        return [HIDDEN, LOGITS]

    def dynamic_axes(self, name: str) -> dict[int, str]:
        return {0: "batch"}

    def segment(self, i: int, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = inputs["pixels" if i == 0 else HIDDEN_IN]
        hidden = self.blocks[i](x / 16.0 if i == 0 else x)
        return {HIDDEN: hidden, LOGITS: self.exit_heads[i](hidden)}

    def exits(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        first = self.segment(0, inputs)
        return [first[LOGITS], self.segment(1, {HIDDEN_IN: first[HIDDEN]})[LOGITS]]

    def forward_all(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        first = self.segment(0, {"pixels": x})
        return [first, self.segment(1, {HIDDEN_IN: first[HIDDEN]})]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # what `train` and the recipes call
        return [o[LOGITS] for o in self.forward_all(x)]

    def stage_modules(self, i: int) -> list[nn.Module]:
        return [self.blocks[i], self.exit_heads[i]]

    def backbone_modules(self) -> list[nn.Module]:
        return list(self.blocks)


def factory() -> dict:
    """What `offramp export --factory` calls: the trained model, its data and its name."""
    torch.manual_seed(0)
    splits = load_digits_splits()
    model = TwoExitMLP()
    train(model, splits.train, TrainConfig(epochs=5, max_steps=60, lr=3e-3), progress=False)
    return {"model": model.eval(), "splits": splits, "name": "digits-mlp", "config": "vit-digits"}


def main(out: Path) -> Path:
    made = factory()
    return export_bundle(made["model"], Path(out), made["splits"], name=made["name"],
                         cfg=EXPORT_CONFIGS["vit-digits"])


if __name__ == "__main__":
    print(main(Path(sys.argv[1] if len(sys.argv) > 1 else "own-bundle")))
