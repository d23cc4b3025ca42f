"""The bundle loader: a damaged bundle is refused with an error naming the file and the problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from server.bundle import load_bundle, sha256_file
from server.errors import BundleError
from tests.fakes import build_onnx_bundle


@pytest.fixture
def bundle_copy(tmp_path: Path) -> Path:
    return build_onnx_bundle(tmp_path / "bundle")


def test_a_sound_bundle_loads(bundle_copy: Path) -> None:
    bundle = load_bundle(bundle_copy)
    assert bundle.manifest.num_stages == 3 and bundle.stage_path(0).name == "stage_00.onnx"


def test_tampered_stage_is_refused_naming_the_file(bundle_copy: Path) -> None:
    path = bundle_copy / "stage_01.onnx"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"stage_01\.onnx: sha256 does not match") as err:
        load_bundle(bundle_copy)
    assert "stage_00" not in str(err.value) and "stage_02" not in str(err.value)


def test_missing_stage_file_is_named(bundle_copy: Path) -> None:
    (bundle_copy / "stage_02.onnx").unlink()
    with pytest.raises(BundleError, match=r"stage_02\.onnx: file is missing"):
        load_bundle(bundle_copy)


def test_malformed_manifest_is_named(bundle_copy: Path) -> None:
    manifest = bundle_copy / "manifest.json"
    manifest.write_text(manifest.read_text()[:-20])
    with pytest.raises(BundleError, match=r"manifest\.json: malformed JSON"):
        load_bundle(bundle_copy)


def test_manifest_with_wrong_schema_is_named(bundle_copy: Path) -> None:
    manifest = bundle_copy / "manifest.json"
    raw = json.loads(manifest.read_text())
    raw["default_policy"]["thresholds"] = [0.5]
    manifest.write_text(json.dumps(raw))
    with pytest.raises(BundleError, match=r"manifest\.json: malformed manifest.*thresholds"):
        load_bundle(bundle_copy)


def test_onnx_io_mismatch_is_named(bundle_copy: Path) -> None:
    """stage_00's file in stage_01's place, hash updated: the inputs no longer match."""
    shutil.copy(bundle_copy / "stage_00.onnx", bundle_copy / "stage_01.onnx")
    manifest = bundle_copy / "manifest.json"
    raw = json.loads(manifest.read_text())
    raw["stages"][1]["sha256"] = sha256_file(bundle_copy / "stage_01.onnx")
    manifest.write_text(json.dumps(raw))
    with pytest.raises(BundleError, match=r"stage_01\.onnx: inputs are \['pixels'\]"):
        load_bundle(bundle_copy)
