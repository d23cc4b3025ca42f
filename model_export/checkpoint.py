"""Checkpoints: a model's config and weights, so `offramp export` can export it again later.

Plain types only (config dict, state_dict, metadata), loaded with `weights_only=True`, so opening
a checkpoint never runs pickled code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from model_export.vit import MultiExitViT, ViTConfig

CHECKPOINT_FORMAT = "offramp-multi-exit-vit/1"
"""The format name; it predates the encoder family and stays, so older checkpoints still load."""
FAMILIES = ("vit", "encoder", "dinov2")


def save_checkpoint(path: Path, model: Any, *, name: str, data: dict[str, Any] | None = None) -> Path:
    """Write `model` (a MultiExitViT, MultiExitEncoder or MultiExitDinov2) to `path`; `data` says which data set and
    split it was trained on."""
    if getattr(model, "family", None) not in FAMILIES:
        raise ValueError(f"checkpoints hold the built-in families {FAMILIES}; save your own model with torch.save")
    payload = {
        "format": CHECKPOINT_FORMAT,
        "name": name,
        "family": model.family,
        "config": model.cfg.to_dict(),
        "data": dict(data or {}),
        "state_dict": model.state_dict(),
    }
    torch.save(payload, Path(path))
    return Path(path)


def load_checkpoint(path: Path) -> tuple[Any, dict[str, Any]]:
    """The model (eval mode) and the checkpoint's metadata (name, family, data)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling raises many kinds for a damaged file
        raise ValueError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not an offramp checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    if payload.get("family", "vit") == "encoder":
        from model_export.text import EncoderConfig, MultiExitEncoder

        model: Any = MultiExitEncoder(EncoderConfig.from_dict(payload["config"]))
    elif payload.get("family") == "dinov2":
        from model_export.vision import Dinov2ExitConfig, MultiExitDinov2

        model = MultiExitDinov2(Dinov2ExitConfig.from_dict(payload["config"]))
    else:
        model = MultiExitViT(ViTConfig.from_dict(payload["config"]))
    model.load_state_dict(payload["state_dict"])
    model.eval()
    meta = {k: payload[k] for k in ("name", "family", "data")}
    return model, meta
