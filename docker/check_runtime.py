"""Check an offramp runtime environment: run while building each image, and by tests/test_deploy.py
in a fresh virtual environment.

Why: `onnxruntime` and `onnxruntime-gpu` install the same `onnxruntime` module, so with both present
the one installed last silently wins (typically leaving a GPU image on the CPU build). And the
server must run without torch, which only the export side needs: every `server` module is imported
here with torch absent, so an import of torch that crept into the server fails the image build.

Usage: python check_runtime.py {onnxruntime|onnxruntime-gpu} [BUNDLE_DIR ...]
Exit status 0 when all holds; 1 with one line per problem otherwise.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import pkgutil
import sys

ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu")


def _normalise(name: str) -> str:
    return name.lower().replace("_", "-")


def ort_distributions() -> list[str]:
    """Every installed distribution that provides the top-level `onnxruntime` module."""
    providers = importlib.metadata.packages_distributions().get("onnxruntime", [])
    return sorted({_normalise(d) for d in providers})


def server_modules() -> list[str]:
    """Every module of the installed `server` package."""
    import server

    return ["server"] + [m.name for m in pkgutil.walk_packages(server.__path__, "server.")]


def check(expected: str, bundles: list[str]) -> list[str]:
    problems: list[str] = []
    found = ort_distributions()
    if found != [expected]:
        problems.append(f"expected exactly one onnxruntime distribution, {expected}; found {found or 'none'}")
    if importlib.util.find_spec("torch") is not None:
        problems.append("torch is importable: the runtime image must not contain it")
    try:
        modules = server_modules()
    except ImportError as err:
        modules = []
        problems.append(f"the offramp server package is not installed: {err}")
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as err:  # report every failing module, not just the first
            problems.append(f"import {name} failed: {type(err).__name__}: {err}")
    try:  # the image's entrypoint: `offramp serve` must parse without the export side's torch
        from offramp.cli import build_parser

        build_parser().parse_args(["serve"])
    except (Exception, SystemExit) as err:
        problems.append(f"`offramp serve` does not parse: {type(err).__name__}: {err}")
    if "torch" in sys.modules:
        problems.append("importing the server imported torch")
    try:
        import onnxruntime

        providers = onnxruntime.get_available_providers()
        if expected == "onnxruntime-gpu" and "CUDAExecutionProvider" not in providers:
            problems.append(f"onnxruntime-gpu offers no CUDAExecutionProvider: {providers}")
    except Exception as err:
        problems.append(f"import onnxruntime failed: {type(err).__name__}: {err}")
    for path in bundles:
        try:
            from server.bundle import load_bundle

            bundle = load_bundle(path)
            print(f"bundle {path}: {bundle.manifest.name} with {len(bundle.manifest.stages)} stages")
        except Exception as err:
            problems.append(f"bundle {path} does not load: {type(err).__name__}: {err}")
    return problems


def main(argv: list[str]) -> int:
    if not argv or _normalise(argv[0]) not in ORT_DISTRIBUTIONS:
        print(__doc__, file=sys.stderr)
        return 2
    expected, bundles = _normalise(argv[0]), argv[1:]
    problems = check(expected, bundles)
    for problem in problems:
        print(f"check_runtime: {problem}", file=sys.stderr)
    if not problems:
        print(f"check_runtime: ok ({expected} {importlib.metadata.version(expected)}, no torch)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
