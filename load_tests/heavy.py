"""The heavy benchmark preset: a ViT-Small-sized multi-exit model whose compute clearly dominates HTTP.

The digits demo is so small that a request's cost is mostly HTTP and Python; a benchmark on it
measures the server, not early exit. This preset keeps the data (scikit-learn digits, clients
still send raw 8x8 pixels) but makes the model ViT-Small-like: width 384, depth 12, 6 heads,
an exit after every block (12 exits), on the digits upscaled to 32x32 and cut into 8x8 patches
(16 tokens + class token, about 0.5 GFLOPs per sample at full depth, ~50x the demo).

Why 8x8 patches and not 4x4: measured (torch, 2 threads of a Xeon) a 4x4-patch model costs
2.2 s per training step of 64 and needs ~570 steps to reach 95 % on the test split (21 min);
8x8 patches cost 0.57 s per step and reach 96-97 % in 760 steps (~7 min). `build_heavy_bundle(...,
patch_size=4)` builds the 4x4 variant where the time is there.

The upscaling is bilinear, done inside stage 0 (like the normalisation), so the bundle's input is
the same `pixels` FP32 [-1, 8, 8] as the demo's and the same load-test data works for both.
`model_export.vit.PatchEmbed` has no upscaling, so `UpsamplingPatchEmbed` adds it by subclassing.
`ViTConfig` cannot record it, so `checkpoint.pt` beside the bundle reloads only through
`build_heavy_model(...).load_state_dict(...)`, not `model_export.checkpoint.load_checkpoint`.

`ensure_heavy_bundle(cache_dir)` builds `<cache_dir>/heavy` on first use (train, export, check)
and reuses it afterwards; training is sized to finish in under 15 minutes on 2 CPU cores.

    python -m load_tests.heavy [--out DIR] [--max-steps N]   # build (or check a few steps)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path
from typing import Any

HEAVY_NAME = "digits-vit-heavy"
RAW_SIZE = (8, 8)
HEAVY_CONFIG: dict[str, Any] = {
    "img_size": 32,
    "patch_size": 8,
    "embed_dim": 384,
    "depth": 12,
    "num_heads": 6,
    "mlp_ratio": 2.0,
}
"""ViT-Small's width, depth and heads; MLP ratio 2 (not 4) keeps training within the time budget."""
HEAVY_TRAIN: dict[str, Any] = {
    "epochs": 40,
    "batch_size": 64,
    "lr": 5e-4,
    "label_smoothing": 0.1,
    "max_shift": 1,
    "threads": None,
}
"""760 optimiser steps. Higher learning rates (1e-3) or fewer steps leave this width at 40-85 %."""


def _upsampling_embed_class() -> type:
    """Defined lazily so that importing this module (the bench CLI) never imports torch."""
    import torch
    import torch.nn.functional as F

    from model_export.vit import PatchEmbed, ViTConfig

    class UpsamplingPatchEmbed(PatchEmbed):
        """`PatchEmbed` on raw images first upscaled bilinearly to the model's `img_size`.

        Upscaling commutes with the affine normalisation (bilinear weights sum to 1), so doing it
        first changes nothing else; it exports to one ONNX `Resize` with a dynamic batch axis.
        """

        def __init__(self, cfg: ViTConfig):
            super().__init__(cfg)
            self.img_size = tuple(cfg.img_size)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.dim() == 3 and self.in_chans == 1:
                x = x.unsqueeze(1)
            x = F.interpolate(x, size=self.img_size, mode="bilinear", align_corners=False)
            return super().forward(x)

    return UpsamplingPatchEmbed


def build_heavy_model(input_mean: float = 0.0, input_std: float = 1.0, **overrides: Any) -> Any:
    """The heavy multi-exit ViT (untrained): raw [N, 8, 8] in, 12 exits out."""
    from model_export.vit import MultiExitViT, ViTConfig

    cfg = ViTConfig(
        **{**HEAVY_CONFIG, **overrides},
        input_mean=input_mean,
        input_std=input_std,
    )
    model = MultiExitViT(cfg)
    model.embed = _upsampling_embed_class()(cfg)
    return model


def build_heavy_bundle(
    out: Path, *, seed: int = 0, progress: bool = True, max_steps: int | None = None, threads: int | None = None,
    **overrides: Any,
) -> Path:
    """Train and export the heavy preset into `out`. `max_steps` cuts training short (for checks);
    `threads` sets torch's intra-op threads (default 1, the 2-core budget; more on a bigger host)."""
    from model_export.demo import train_and_export
    from model_export.export import EXPORT_CONFIGS

    train_cfg = {**HEAVY_TRAIN, "max_steps": max_steps}
    if threads is not None:
        train_cfg["threads"] = threads
    side = {**HEAVY_CONFIG, **overrides}["img_size"]
    base = EXPORT_CONFIGS["vit-digits"]
    cfg = dataclasses.replace(
        base, preprocessing=base.preprocessing + f"; then upscaled bilinearly to {side}x{side} inside stage 0",
    )
    return train_and_export(
        Path(out), name=HEAVY_NAME, make_model=lambda mean, std: build_heavy_model(mean, std, **overrides),
        train_cfg=train_cfg, seed=seed, progress=progress, export_cfg=cfg, label="heavy preset",
    )


def ensure_heavy_bundle(cache_dir: Path, *, progress: bool = True) -> Path:
    """`<cache_dir>/heavy`, built on first use; a half-built bundle is never left in its place."""
    from model_export.demo import ensure_bundle

    return ensure_bundle(Path(cache_dir) / "heavy", lambda tmp: build_heavy_bundle(tmp, progress=progress))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the heavy benchmark bundle.")
    parser.add_argument("--out", type=Path, help="bundle directory (default: <cache_dir>/heavy, cached)")
    parser.add_argument("--max-steps", type=int, help="stop training after N steps (a quick check)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch intra-op threads for training (default 1)")
    args = parser.parse_args(argv)
    if args.out is None and args.max_steps is None and args.threads is None:
        from server.settings import Settings

        print(ensure_heavy_bundle(Settings().cache_dir))
        return 0
    out = args.out or Path(tempfile.mkdtemp(prefix="offramp-heavy-"))
    build_heavy_bundle(out, seed=args.seed, max_steps=args.max_steps, threads=args.threads)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
