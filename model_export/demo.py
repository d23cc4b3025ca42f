"""The digits demo bundle, and the tiny bundle the test suites serve.

`build_demo_bundle` trains the demo ViT (an exit after each of its blocks) on scikit-learn's
digits and exports it; it is what `offramp demo` and `make serve` run, so it must finish in
under two minutes on two CPU cores. `build_tiny_bundle` makes a bundle of the same format in a few
seconds, for tests: its accuracy is only "clearly above chance".
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

DEMO_NAME = "digits-vit"
TINY_NAME = "digits-vit-tiny"


def train_and_export(
    out: Path, *, name: str, make_model: Callable[[float, float], object], train_cfg: dict, seed: int,
    progress: bool, export_cfg: object = None, label: str = "",
) -> Path:
    """Train `make_model(pixel_mean, pixel_std)` on the digits split and export it into `out`, with
    its checkpoint beside it; returns `out`. The demo, the tiny test bundle and the heavy benchmark
    preset are all built here."""
    from model_export.data import load_digits_splits
    from model_export.export import EXPORT_CONFIGS, export_bundle
    from model_export.train import TrainConfig, seed_everything, train

    splits = load_digits_splits(seed=0)  # the split is fixed; `seed` varies the model only
    mean, std = splits.pixel_stats()
    seed_everything(seed, train_cfg.get("threads"))
    model = make_model(mean, std)
    started = time.perf_counter()
    result = train(model, splits.train, TrainConfig(seed=seed, **train_cfg), progress=progress)
    export_started = time.perf_counter()
    export_bundle(
        model,
        out,
        splits,
        name=name,
        cfg=export_cfg or EXPORT_CONFIGS["vit-digits"],
        created_by=f"offramp {label or name} (seed {seed}): trained {result.steps} steps in {result.seconds:.1f} s",
    )
    save_checkpoint_for(model, out, name=name, seed=seed)
    if progress:
        exported = time.perf_counter() - export_started
        print(f"{name}: trained {result.steps} steps in {export_started - started:.1f} s, "
              f"exported in {exported:.1f} s")
    return out


def _build(out: Path, *, name: str, variant: str, train_cfg: dict, seed: int, progress: bool) -> Path:
    from model_export.vit import vit

    return train_and_export(out, name=name, make_model=lambda m, sd: vit(variant, input_mean=m, input_std=sd),
                            train_cfg=train_cfg, seed=seed, progress=progress, label=variant)


def save_checkpoint_for(model: object, out: Path, *, name: str, seed: int) -> None:
    """Keep the checkpoint beside the bundle (not in the manifest: the server ignores it)."""
    from model_export.checkpoint import save_checkpoint

    save_checkpoint(
        out / "checkpoint.pt", model, name=name, data={"dataset": "digits", "split_seed": 0, "seed": seed}
    )


# Tuned on the validation split: shifting 8x8 digits by a pixel hurts with 4x4 patches (96 % vs
# 98 % final-exit accuracy after 40 epochs), label smoothing keeps max-prob scores informative.
DEMO_TRAIN = {"epochs": 30, "batch_size": 64, "lr": 3e-3, "label_smoothing": 0.1, "max_shift": 0}
TINY_TRAIN = {
    "epochs": 100,
    "batch_size": 64,
    "lr": 5e-3,
    "label_smoothing": 0.0,
    "max_shift": 0,
    "max_steps": 150,
    "threads": 1,
}


def build_demo_bundle(out: Path, *, seed: int = 0, progress: bool = True) -> Path:
    """Train and export the digits demo into `out` (created if needed); returns `out`."""
    return _build(
        Path(out), name=DEMO_NAME, variant="demo", train_cfg=DEMO_TRAIN, seed=seed, progress=progress
    )


def build_tiny_bundle(out: Path, *, seed: int = 0) -> Path:
    """A 3-stage bundle of the demo's format in a few seconds (for tests); returns `out`."""
    return _build(Path(out), name=TINY_NAME, variant="tiny", train_cfg=TINY_TRAIN, seed=seed, progress=False)


def ensure_bundle(target: Path, build: Callable[[Path], object]) -> Path:
    """`target`, built with `build(tmp)` on first use. The build goes to a temporary sibling
    directory renamed into place when complete, so a half-built bundle is never served."""
    target = Path(target)
    if (target / "manifest.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-build-", dir=target.parent))
    try:
        build(tmp)
        if (target / "manifest.json").is_file():  # another process finished first: keep theirs
            shutil.rmtree(tmp)
            return target
        if target.exists():  # a leftover without a manifest is not a bundle: replace it
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def ensure_demo_bundle(cache_dir: Path, *, progress: bool = True) -> Path:
    """`<cache_dir>/demo`, built on first use (see `ensure_bundle`)."""
    return ensure_bundle(Path(cache_dir) / "demo", lambda tmp: build_demo_bundle(tmp, progress=progress))
