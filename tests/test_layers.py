"""The layers, read from the imports (docs/engine.md, "Layout"): `server/` imports neither
`model_export/`, `load_tests/` nor the front door; `server/engine` and `server/control` never touch
HTTP; the base modules import no layer above them; no module of `server/` outgrows one concern."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SERVER = REPO / "server"
LAYERS = ("http", "engine", "control")
HTTP_LIBRARIES = ("fastapi", "starlette", "uvicorn", "httpx")
MAX_LINES = 400


def _modules() -> list[Path]:
    return sorted(SERVER.rglob("*.py"))


def imports(path: Path) -> set[str]:
    """Every module `path` imports, at any depth (lazy imports inside functions count too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _layer(path: Path) -> str:
    parts = path.relative_to(SERVER).parts
    return parts[0] if len(parts) > 1 else "base"


def _top(name: str) -> str:
    return name.split(".")[0]


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_server_imports_nothing_above_it(path: Path) -> None:
    above = sorted(n for n in imports(path) if _top(n) in {"model_export", "load_tests", "offramp", "torch"})
    assert not above, f"{path.relative_to(REPO)} imports {above}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_arrows_point_down(path: Path) -> None:
    layer = _layer(path)
    names = imports(path)
    if layer in ("engine", "control"):
        climbing = sorted(n for n in names if n.startswith("server.http") or _top(n) in HTTP_LIBRARIES)
        assert not climbing, f"{path.relative_to(REPO)} ({layer}) imports {climbing}"
    if layer == "engine":
        sideways = sorted(n for n in names if n.startswith("server.control"))
        assert not sideways, f"{path.relative_to(REPO)} (engine) imports {sideways}"
    if layer == "base" and path.name != "cli.py":  # cli.py composes the layers into commands
        up = sorted(n for n in names if any(n.startswith(f"server.{x}") for x in LAYERS))
        assert not up, f"{path.relative_to(REPO)} (base) imports {up}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_module_outgrows_one_concern(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(REPO)} has {lines} lines (> {MAX_LINES}): split it"


def test_the_reader_sees_the_imports_it_claims() -> None:
    # The checks above are only as good as the import reader: it must see lazy imports too.
    names = imports(SERVER / "http" / "app.py")
    assert "server.engine.engine" in names and "fastapi" in names
