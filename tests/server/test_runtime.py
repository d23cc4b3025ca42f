"""Stage runtime: sessions per stage, the device strategy (numpy / OrtValue + IO binding), helper graphs.

The CUDA path is the OrtValue path with device "cuda"; here it runs with device "cpu", which
executes the same binding, gather and concat code with the CPU provider.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from server.bundle import (
    load_bundle,
)
from server.engine.device import OrtValueOps, concat_model, gather_model
from server.engine.runtime import (
    CPU_PROVIDER,
    CUDA_PROVIDER,
    DeviceError,
    NumpyOps,
    OrtStageRunner,
    resolve_device,
    session_options,
)
from server.settings import Settings
from tests.fakes import HIDDEN_DIM, build_onnx_bundle


@pytest.fixture(scope="module")
def onnx_bundle(tmp_path_factory: pytest.TempPathFactory):
    return load_bundle(build_onnx_bundle(tmp_path_factory.mktemp("helper") / "bundle"))


def _direct(bundle, x: np.ndarray) -> list[dict[str, np.ndarray]]:
    """Every stage's outputs, running the stage files directly with onnxruntime."""
    outs, feed = [], {"pixels": x}
    for i in range(bundle.manifest.num_stages):
        sess = ort.InferenceSession(str(bundle.stage_path(i)), providers=[CPU_PROVIDER])
        names = [o.name for o in sess.get_outputs()]
        values = dict(zip(names, sess.run(names, feed), strict=True))
        outs.append(values)
        feed = {"hidden_in": values["hidden"]}
    return outs


def _pixels(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 16, (n, 8, 8)).astype(np.float32)


@pytest.mark.parametrize("bind_device", [None, "cpu"], ids=["numpy", "iobinding"])
def test_runner_reproduces_the_stage_files(onnx_bundle, bind_device: str | None) -> None:
    runner = OrtStageRunner(onnx_bundle, Settings(device="cpu", intra_op_threads=1), bind_device=bind_device)
    x = _pixels(5)
    want = _direct(onnx_bundle, x)
    h = x
    for k in range(3):
        out = runner.run(k, h)
        np.testing.assert_allclose(out.logits, want[k]["logits"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out.gate, want[k]["gate"], rtol=1e-5, atol=1e-6)
        if k > 0:
            np.testing.assert_allclose(out.similarity, want[k]["similarity"], rtol=1e-5, atol=1e-6)
        else:
            assert out.similarity is None
        if k < 2:
            assert runner.rows(out.hidden) == 5
            assert isinstance(out.hidden, ort.OrtValue if bind_device else np.ndarray)
        else:
            assert out.hidden is None  # nobody reads the last hidden state: never fetched
        h = out.hidden
    assert runner.device == "cpu" and runner.providers == [CPU_PROVIDER]


def test_survivor_selection_and_merge_on_the_device_path_match_numpy(onnx_bundle) -> None:
    settings = Settings(device="cpu", intra_op_threads=1)
    plain = OrtStageRunner(onnx_bundle, settings)
    bound = OrtStageRunner(onnx_bundle, settings, bind_device="cpu")
    a, b = _pixels(6, seed=2), _pixels(3, seed=3)
    rows_a, rows_b = np.array([5, 0, 3]), np.array([1])
    def merged(runner: OrtStageRunner):  # survivors of two batches, merged
        return runner.concat([runner.take(runner.run(0, a).hidden, rows_a),
                              runner.take(runner.run(0, b).hidden, rows_b)])

    merged_plain, merged_bound = merged(plain), merged(bound)
    assert isinstance(merged_bound, ort.OrtValue) and merged_bound.shape() == [4, HIDDEN_DIM]
    np.testing.assert_allclose(merged_bound.numpy(), merged_plain, rtol=1e-6)
    np.testing.assert_allclose(bound.run(1, merged_bound).logits, plain.run(1, merged_plain).logits,
                               rtol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int64])
@pytest.mark.parametrize("shape", [(7, 5), (7, 3, 4)])
def test_gather_and_concat_graphs_equal_numpy(dtype: type, shape: tuple[int, ...]) -> None:
    ops, ref = OrtValueOps("cpu", 0, session_options(Settings(intra_op_threads=1))), NumpyOps()
    rng = np.random.default_rng(0)
    data = (rng.normal(size=shape) * 10).astype(dtype)
    value = ops.to_device(data)
    for rows in (np.array([3]), np.array([6, 0, 2]), np.arange(7), np.array([1, 1, 4])):
        got = ops.take(value, rows)
        assert isinstance(got, ort.OrtValue)
        np.testing.assert_array_equal(got.numpy(), ref.take(data, rows))
    for count in (2, 3, 5):
        parts = [(rng.normal(size=(i + 1, *shape[1:])) * 10).astype(dtype) for i in range(count)]
        got = ops.concat([ops.to_device(p) for p in parts])
        np.testing.assert_array_equal(got.numpy(), ref.concat(parts))
        assert ops.rows(got) == sum(len(p) for p in parts)
    assert len(ops._concat) == 3  # one cached graph per input count (and element type)
    # host arrays (stage 0 inputs) stay on the host
    assert isinstance(ops.take(data, np.array([0])), np.ndarray)
    assert isinstance(ops.concat([data, data]), np.ndarray)


def test_helper_graphs_are_valid_onnx_for_old_runtimes() -> None:
    for model in (gather_model(TensorProto.FLOAT, 2), concat_model(4, TensorProto.FLOAT16, 3)):
        onnx.checker.check_model(model)
        assert model.ir_version <= 8 and model.opset_import[0].version <= 13


def test_device_resolution() -> None:
    assert resolve_device("auto", [CPU_PROVIDER]) == "cpu"
    assert resolve_device("auto", [CUDA_PROVIDER, CPU_PROVIDER]) == "cuda"
    assert resolve_device("cpu", [CUDA_PROVIDER, CPU_PROVIDER]) == "cpu"
    assert resolve_device("cuda", [CUDA_PROVIDER, CPU_PROVIDER]) == "cuda"
    with pytest.raises(DeviceError, match="onnxruntime-gpu"):
        resolve_device("cuda", [CPU_PROVIDER])


def test_cuda_requested_without_cuda_is_a_clear_error(onnx_bundle) -> None:
    if CUDA_PROVIDER in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    with pytest.raises(DeviceError, match="device=cuda"):
        OrtStageRunner(onnx_bundle, Settings(device="cuda"))


def test_session_options_never_spin_and_take_thread_counts_from_settings() -> None:
    so = session_options(Settings(intra_op_threads=3, inter_op_threads=2))
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert so.get_session_config_entry("session.inter_op.allow_spinning") == "0"
    assert (so.intra_op_num_threads, so.inter_op_num_threads) == (3, 2)


@pytest.mark.skipif(CUDA_PROVIDER not in ort.get_available_providers(),
                    reason="needs onnxruntime-gpu and a GPU")
def test_cuda_keeps_the_hidden_state_on_the_gpu(onnx_bundle) -> None:
    gpu = OrtStageRunner(onnx_bundle, Settings(device="cuda"))
    cpu = OrtStageRunner(onnx_bundle, Settings(device="cpu"))
    assert gpu.device == "cuda" and gpu.providers[0] == CUDA_PROVIDER
    a, b = _pixels(6, seed=2), _pixels(3, seed=3)
    out_a, out_b = gpu.run(0, a), gpu.run(0, b)
    assert isinstance(out_a.hidden, ort.OrtValue) and out_a.hidden.device_name().lower() == "cuda"
    assert isinstance(out_a.logits, np.ndarray)
    merged = gpu.concat([gpu.take(out_a.hidden, np.array([5, 0, 3])), gpu.take(out_b.hidden, np.array([1]))])
    assert merged.device_name().lower() == "cuda" and merged.shape() == [4, HIDDEN_DIM]
    want = cpu.concat([cpu.take(cpu.run(0, a).hidden, np.array([5, 0, 3])),
                       cpu.take(cpu.run(0, b).hidden, np.array([1]))])
    # TF32 matmuls on the GPU (onnxruntime's CUDA default on Ampere+) differ from FP32 by ~1e-3.
    np.testing.assert_allclose(merged.numpy(), want, atol=2e-3)
    last = gpu.run(2, gpu.run(1, merged).hidden)
    want_last = cpu.run(2, cpu.run(1, want).hidden)
    assert last.hidden is None
    np.testing.assert_allclose(last.logits, want_last.logits, rtol=1e-2, atol=2e-2)  # TF32, see above
    np.testing.assert_allclose(last.similarity, want_last.similarity, atol=1e-2)


def test_in_graph_exit_scores_equal_the_numpy_criteria_on_the_same_logits(onnx_bundle) -> None:
    from server.exits import ExitState, decide, softmax

    runner = OrtStageRunner(onnx_bundle, Settings(device="cpu", intra_op_threads=1))
    assert runner.in_graph == [True, True, True]
    h = _pixels(64, seed=5)
    for k in range(3):
        out = runner.run(k, h)
        np.testing.assert_allclose(out.probs, softmax(out.logits), rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(out.labels, out.logits.argmax(axis=-1))
        np.testing.assert_allclose(out.max_prob, softmax(out.logits).max(axis=-1), rtol=1e-5, atol=1e-7)
        for criterion in ("max_prob", "margin", "entropy", "patience", "gate"):
            t = 2.0 if criterion == "patience" else 0.4
            state = ExitState.initial(len(h))
            host = decide(criterion, t, out.logits, state, out.gate)
            graph = decide(criterion, t, None, state, out.gate, None, out.probs, k, out.labels, out.max_prob)
            np.testing.assert_array_equal(graph[0], host[0])
            np.testing.assert_array_equal(graph[1], host[1])
        h = out.hidden


def test_a_stage_the_scores_cannot_be_added_to_is_served_as_it_is(onnx_bundle, monkeypatch) -> None:
    from server.engine import runtime

    plain = OrtStageRunner(onnx_bundle, Settings(device="cpu", intra_op_threads=1))

    def refuse(model: onnx.ModelProto) -> onnx.ModelProto:
        raise ValueError("unusual graph")

    monkeypatch.setattr(runtime, "with_exit_scores", refuse)
    old = OrtStageRunner(onnx_bundle, Settings(device="cpu", intra_op_threads=1))
    assert old.in_graph == [False, False, False]
    out_old, out_new = old.run(0, _pixels(3)), plain.run(0, _pixels(3))
    assert out_old.probs is None and out_old.labels is None
    np.testing.assert_allclose(out_old.logits, out_new.logits, rtol=1e-6)
    np.testing.assert_allclose(out_old.probabilities(), out_new.probabilities(), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(out_old.predicted(), out_new.predicted())


def test_exit_scores_fit_graphs_of_any_opset() -> None:
    from server.engine.runtime import LABEL, MAX_PROB, PROBS, with_exit_scores

    for opset in (13, 17, 18, 20):
        graph = helper.make_graph(
            [helper.make_node("Identity", ["x"], ["logits"])], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3])],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
        scored = with_exit_scores(model)
        onnx.checker.check_model(scored)
        sess = ort.InferenceSession(scored.SerializeToString(), providers=[CPU_PROVIDER])
        x = np.array([[1.0, 3.0, 2.0], [0.0, 0.0, 5.0]], np.float32)
        probs, label, top = sess.run([PROBS, LABEL, MAX_PROB], {"x": x})
        np.testing.assert_array_equal(label, [1, 2])
        np.testing.assert_allclose(top, probs.max(axis=-1), rtol=1e-6)
