"""`offramp demo | export | inspect` as a user runs them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from offramp.cli import build_parser


def _run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


def test_importing_the_cli_does_not_import_torch() -> None:
    code = "import sys, model_export.cli; sys.exit('torch' in sys.modules or 'onnxruntime' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_inspect_prints_the_stage_table(tiny_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(["inspect", str(tiny_bundle)]) == 0
    out = capsys.readouterr().out
    assert "digits-vit-tiny" in out and "MFLOPs" in out and "cum. frac" in out
    assert len([line for line in out.splitlines() if line.strip()[:1].isdigit()]) == 3  # one row per stage


def test_inspect_refuses_a_damaged_bundle(
    tiny_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = Path(shutil.copytree(tiny_bundle, tmp_path / "b"))
    (broken / "stage_00.onnx").write_bytes(b"not onnx")
    assert _run(["inspect", str(broken)]) == 2
    assert "stage_00.onnx" in capsys.readouterr().err


def test_export_rebuilds_a_bundle_from_its_checkpoint(tiny_bundle: Path, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from server.bundle import load_bundle

    out = tmp_path / "again"
    assert _run(["export", str(tiny_bundle / "checkpoint.pt"), "--out", str(out)]) == 0
    before, after = load_bundle(tiny_bundle).manifest, load_bundle(out).manifest
    assert after.accuracy == before.accuracy
    assert [s.flops for s in after.stages] == [s.flops for s in before.stages]


def test_export_of_a_missing_checkpoint_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch")
    assert _run(["export", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "out")]) == 2
    assert "nope.pt: checkpoint does not exist" in capsys.readouterr().err
