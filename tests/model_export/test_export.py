"""The exported bundle: ONNX segments reproduce PyTorch (the loader's checks: tests/server/test_bundle.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from model_export.checkpoint import load_checkpoint  # noqa: E402
from model_export.data import load_digits_splits  # noqa: E402
from model_export.export import (  # noqa: E402
    EXPORT_CONFIGS,
    ExportCheckError,
    check_export,
)
from server.bundle import load_bundle  # noqa: E402


def _session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@pytest.fixture
def bundle_copy(tiny_bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))


@pytest.mark.parametrize("batch", [1, 37])
def test_stage_files_in_sequence_reproduce_every_exit(tiny_bundle: Path, batch: int) -> None:
    bundle = load_bundle(tiny_bundle)
    model, _ = load_checkpoint(tiny_bundle / "checkpoint.pt")
    x = load_digits_splits().test.x[:batch]
    with torch.no_grad():
        want = [z.numpy() for z in model(torch.from_numpy(x))]
    h = x
    for i, stage in enumerate(bundle.manifest.stages):
        sess = _session(bundle.stage_path(i))
        outs = dict(
            zip(stage.output_names(), sess.run(stage.output_names(), {stage.inputs[0].name: h}), strict=True)
        )
        np.testing.assert_allclose(outs["logits"], want[i], atol=1e-4, rtol=0)
        assert outs["logits"].shape == (batch, 10)
        h = outs["hidden"]
    ref = bundle.manifest.reference
    got = _session(bundle.reference_path()).run(ref.outputs, {"pixels": x})
    for i, logits in enumerate(got):
        np.testing.assert_allclose(logits, want[i], atol=1e-4, rtol=0)


def test_manifest_describes_the_model(tiny_bundle: Path) -> None:
    m = load_bundle(tiny_bundle).manifest
    assert m.input.name == "pixels" and m.input.shape == [-1, 8, 8] and m.input.dtype == "FP32"
    assert [s.inputs[0].name for s in m.stages] == ["pixels", "hidden_in", "hidden_in"]
    assert [s.output_names() for s in m.stages] == [["hidden", "logits", "similarity"]] * 3
    assert all(s.flops > 0 and s.params > 0 for s in m.stages)
    cumulative = m.cumulative_flops()
    assert all(a < b for a, b in zip(cumulative, cumulative[1:], strict=False))
    assert len(m.default_policy.thresholds) == m.num_stages - 1
    assert m.accuracy.samples == 360 and min(m.accuracy.per_stage) > 0.2  # chance is 0.1


def test_calibration_holds_every_exit_on_validation(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    calib = bundle.calibration()
    assert calib.logits.shape == (3, 270, 10) and calib.labels.shape == (270,)
    assert calib.similarity is not None and np.isfinite(calib.similarity).all()  # stage 0 included (MuE)
    # ... so the similarity criterion can answer at stage 0, as MuE's does (it could not before).
    from server.control.calibrate import simulate

    report = simulate(calib, "similarity", [-1.0, None], bundle.manifest)
    assert report.exit_counts[0] == 270


def test_export_check_reports_every_mismatch(bundle_copy: Path) -> None:
    """A model that drifted from its ONNX files fails every check, all listed in one error."""
    model, _ = load_checkpoint(bundle_copy / "checkpoint.pt")
    with torch.no_grad():
        model.heads[2].fc.bias += 1.0  # only the last exit's logits change
    with pytest.raises(ExportCheckError) as err:
        check_export(model, bundle_copy, load_digits_splits().test.subset(np.arange(4)), EXPORT_CONFIGS["vit-digits"])
    failures = err.value.mismatches
    # segment check + chain check per batch size, plus the reference, for the last exit only
    assert len(failures) == 6
    assert all("stage_02.onnx" in f or "logits_02" in f for f in failures)
    assert any("batch 1" in f for f in failures) and any("batch 37" in f for f in failures)


