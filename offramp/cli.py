"""`offramp`: the command line. It sits above the three packages and registers their commands:

- `serve`, `inspect`, `calibrate` from `server.cli` (no torch);
- `demo`, `train`, `compare`, `export` from `model_export.cli` (the `export` extra, imported when run);
- `bench`, `loadtest` from `load_tests.bench`.

With no bundle configured, `serve` serves the digits demo bundle, building it on first use: that
needs torch, so it lives here and not in the server, which serves what it is given.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from load_tests.bench import register as register_bench
from model_export.cli import register as register_export
from server import __version__
from server.cli import register as register_server
from server.errors import BundleError
from server.settings import Settings

log = logging.getLogger("offramp.cli")

DEMO_HELP = "With no bundle, serve the demo bundle, building it on first use (needs the export extra)."


def demo_bundle(settings: Settings, preset: str | None = None) -> Path:
    """Build (first time) and locate a preset bundle (`demo` unless `preset` says otherwise) under
    `settings.cache_dir`; torch is only needed for the build."""
    preset = preset or "demo"
    try:
        from load_tests.bench import resolve_bundle

        log.info("serving the %s preset (cache %s)", preset, settings.cache_dir)
        return resolve_bundle(preset, settings.cache_dir)
    except FileNotFoundError as err:  # the sentiment preset's wheels are not installed
        raise BundleError(f"the {preset} preset: {err}") from err
    except ModuleNotFoundError as err:
        if err.name and err.name.split(".")[0] in {"torch", "model_export", "sklearn", "transformers"}:
            raise BundleError(
                "serving the demo bundle needs the export extra: pip install 'offramp[export]' "
                f"(or pass --bundle DIR / set OFFRAMP_BUNDLES); {err.name} is not installed"
            ) from err
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="offramp", description="Serve early-exit neural networks.")
    parser.add_argument("--version", action="version", version=f"offramp {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register_server(subparsers, default_bundle=demo_bundle, default_help=DEMO_HELP)
    register_export(subparsers)
    register_bench(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `offramp` console script. Subcommands set `func(args) -> int | None`."""
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
