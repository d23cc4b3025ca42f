"""`offramp demo | export | inspect`: the model-side commands, registered into server/cli.py.

This module imports neither torch nor onnxruntime at import time: `offramp serve` and
`offramp inspect` must work on a server-only install; `demo` and `export` import the training
stack inside their handlers and say which extra to install when it is missing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

EXPORT_HINT = "this command needs the export extra: pip install -c constraints.txt 'offramp[export,cpu]'"


def _needs_torch(command: str) -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        print(f"offramp {command}: {EXPORT_HINT}", file=sys.stderr)
        return False
    return True


def demo(args: argparse.Namespace) -> int:
    """Train and export the digits demo bundle, then print its table."""
    if not _needs_torch("demo"):
        return 2
    from model_export.demo import build_demo_bundle

    started = time.perf_counter()
    out = build_demo_bundle(args.out, seed=args.seed, progress=not args.quiet)
    print(f"wrote {out} in {time.perf_counter() - started:.1f} s")
    return inspect(argparse.Namespace(bundle=out))


def export(args: argparse.Namespace) -> int:
    """Export a checkpoint saved by `offramp demo` (or `model_export.checkpoint.save_checkpoint`)."""
    if not _needs_torch("export"):
        return 2
    from model_export.checkpoint import load_checkpoint
    from model_export.data import load_digits_splits
    from model_export.export import EXPORT_CONFIGS, ExportCheckError, export_bundle

    try:
        model, meta = load_checkpoint(args.checkpoint)
    except (FileNotFoundError, ValueError) as err:
        print(f"offramp export: {err}", file=sys.stderr)
        return 2
    data = meta.get("data", {})
    if data.get("dataset", "digits") != "digits":
        print(f"offramp export: {args.checkpoint}: unknown data set {data.get('dataset')!r}", file=sys.stderr)
        return 2
    splits = load_digits_splits(seed=int(data.get("split_seed", 0)))
    try:
        out = export_bundle(
            model, args.out, splits, name=args.name or meta["name"], cfg=EXPORT_CONFIGS[args.config]
        )
    except ExportCheckError as err:
        print(f"offramp export: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return inspect(argparse.Namespace(bundle=out))


def inspect(args: argparse.Namespace) -> int:
    """Verify a bundle and print its stages (no torch needed)."""
    from server.bundle import inspect_table, load_bundle
    from server.errors import BundleError

    try:
        bundle = load_bundle(args.bundle)
    except BundleError as err:
        print(f"offramp inspect: {err}", file=sys.stderr)
        return 2
    print(inspect_table(bundle))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `demo`, `export` and `inspect` to the `offramp` parser; each sets `func(args) -> int`."""
    p = subparsers.add_parser(
        "demo",
        help="train and export the digits demo bundle (export extra)",
        description="Train the multi-exit ViT on scikit-learn's digits and export a bundle.",
    )
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="bundle directory to write")
    p.add_argument("--seed", type=int, default=0, help="training seed (the data split is fixed)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=demo)

    p = subparsers.add_parser(
        "export",
        help="export a saved checkpoint to a bundle (export extra)",
        description="Export a checkpoint (config + weights) to a checked bundle.",
    )
    p.add_argument(
        "checkpoint", type=Path, metavar="CHECKPOINT", help="checkpoint file (e.g. DIR/checkpoint.pt)"
    )
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="bundle directory to write")
    p.add_argument("--name", default=None, help="model name in the manifest (default: the checkpoint's)")
    p.add_argument("--config", default="vit-digits", choices=["vit-digits"], help="export config")
    p.set_defaults(func=export)

    p = subparsers.add_parser(
        "inspect",
        help="verify a bundle and print its stages",
        description="Verify a bundle (hashes, ONNX inputs/outputs) and print a table of "
        "stages: FLOPs, cumulative FLOPs fraction, params, exit accuracy.",
    )
    p.add_argument("bundle", type=Path, metavar="DIR", help="bundle directory")
    p.set_defaults(func=inspect)
