"""`ensure_demo_bundle`: built once, never half-built."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from model_export import demo
from server.bundle import load_bundle


def test_ensure_builds_once_then_reuses(
    tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []

    def fake_build(out: Path, *, seed: int = 0, progress: bool = True) -> Path:
        calls.append(out)
        shutil.copytree(tiny_bundle, out, dirs_exist_ok=True)
        return out

    monkeypatch.setattr(demo, "build_demo_bundle", fake_build)
    first = demo.ensure_demo_bundle(tmp_path / "cache", progress=False)
    second = demo.ensure_demo_bundle(tmp_path / "cache", progress=False)
    assert first == second == tmp_path / "cache" / "demo"
    assert len(calls) == 1 and calls[0] != first  # built elsewhere, then moved into place
    load_bundle(first)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["demo"]


def test_a_failed_build_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_build(out: Path, *, seed: int = 0, progress: bool = True) -> Path:
        (out / "stage_00.onnx").write_bytes(b"half")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(demo, "build_demo_bundle", failing_build)
    with pytest.raises(RuntimeError, match="interrupted"):
        demo.ensure_demo_bundle(tmp_path / "cache", progress=False)
    assert list((tmp_path / "cache").iterdir()) == []
