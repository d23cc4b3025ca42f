"""The CUDA-graph runner (server/engine/graphs.py) as far as a CPU goes: buckets, fixed buffers
written in place and reused, rows padded to the bucket and dropped again, outputs copied out of the
buffers, runs above the largest bucket split, and answers equal to the plain runner's. The capture
itself needs the CUDA provider (owed to a GPU run)."""

from __future__ import annotations

import asyncio
import logging
import threading

import numpy as np
import onnxruntime as ort
import pytest

from server.bundle import load_bundle
from server.engine.engine import Engine
from server.engine.graphs import GraphStageRunner, buckets, stage_runner
from server.engine.runtime import OrtStageRunner
from server.metrics import Metrics
from server.policy import ExitPolicy
from server.settings import Settings
from tests.fakes import build_onnx_bundle


@pytest.fixture(scope="module")
def onnx_bundle(tmp_path_factory: pytest.TempPathFactory):
    return load_bundle(build_onnx_bundle(tmp_path_factory.mktemp("graphs") / "bundle"))


def _pixels(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 16, (n, 8, 8)).astype(np.float32)


SETTINGS = Settings(device="cpu", intra_op_threads=1, max_batch_size=8)


def test_buckets_are_powers_of_two_up_to_the_batch_limit() -> None:
    assert buckets(1) == [1] and buckets(5) == [1, 2, 4, 8] and buckets(32) == [1, 2, 4, 8, 16, 32]


@pytest.mark.parametrize("n", [1, 3, 8, 13])  # 13: above the largest bucket (8), two runs
def test_padded_bucket_runs_answer_as_the_plain_runner(onnx_bundle, n: int) -> None:
    graphs = GraphStageRunner(onnx_bundle, SETTINGS, bind_device="cpu")
    plain = OrtStageRunner(onnx_bundle, SETTINGS)
    x = _pixels(n)
    h_graph, h_plain = x, x
    survivors = np.arange(n)[::2] if n > 1 else np.arange(1)  # exits between stages: only these go on
    for k in range(3):
        a, b = graphs.run(k, h_graph), plain.run(k, h_plain)
        assert len(a) == len(h_plain)  # the padding rows never come back
        np.testing.assert_allclose(a.logits, b.logits, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a.probs, b.probs, rtol=1e-5, atol=1e-6)
        assert (a.labels == b.labels).all()
        if k < 2:
            assert isinstance(a.hidden, ort.OrtValue) and a.hidden.shape()[0] == len(h_plain)
            np.testing.assert_allclose(a.hidden.numpy(), b.hidden, rtol=1e-5, atol=1e-6)
            h_graph, h_plain = graphs.take(a.hidden, survivors), plain.take(b.hidden, survivors)
            survivors = np.arange(len(survivors))[::2] if len(survivors) > 1 else np.arange(1)
        else:
            assert a.hidden is None


def test_buffers_are_fixed_and_what_leaves_a_run_is_a_copy(onnx_bundle) -> None:
    graphs = GraphStageRunner(onnx_bundle, SETTINGS, bind_device="cpu")
    # Built with every (stage, bucket) allocated and run (captured, on CUDA): no request pays for it.
    assert set(graphs._buffers) == {(s, b) for s in range(3) for b in (1, 2, 4, 8)}
    assert graphs.thread_bound  # the scheduler keeps it off the caller's thread
    before = {key: {n: v.data_ptr() for n, v in bufs.items()} for key, bufs in graphs._buffers.items()}
    graphs.run(0, _pixels(4, seed=3))  # fills every row of bucket 4's input buffer
    first = graphs.run(0, _pixels(3, seed=4))
    assert np.all(graphs._buffers[(0, 4)]["pixels"].numpy()[3] == 0)  # the 4th row of the 3-row run: padding
    kept = first.hidden.numpy().copy()
    buffers = graphs._buffers[(0, 4)]
    addresses = {name: value.data_ptr() for name, value in buffers.items()}
    assert first.hidden.data_ptr() != addresses["hidden"]
    second = graphs.run(0, _pixels(4, seed=5))  # the same bucket: replays into the same buffers
    assert {name: value.data_ptr() for name, value in graphs._buffers[(0, 4)].items()} == addresses
    np.testing.assert_array_equal(first.hidden.numpy(), kept)  # the earlier answer is untouched
    assert len(second) == 4
    assert {key: {n: v.data_ptr() for n, v in bufs.items()} for key, bufs in graphs._buffers.items()} == before
    assert not np.all(buffers["pixels"].numpy()[3] == 0)  # the 4-row run wrote over the padding


def test_the_engine_answers_the_same_through_the_graph_runner(onnx_bundle) -> None:
    x = _pixels(11, seed=6)

    async def answers(factory):  # noqa: ANN001
        policy = {onnx_bundle.name: ExitPolicy("max_prob", (0.99, 0.99), 1)}
        engine = Engine([onnx_bundle], SETTINGS, Metrics(), policy, runner_factory=factory)
        await engine.start()
        try:
            return await engine.infer(onnx_bundle.name, x, direct=False)
        finally:
            await engine.stop()

    plain = asyncio.run(answers(None))
    graphs = asyncio.run(answers(lambda b, s: GraphStageRunner(b, s, bind_device="cpu")))
    assert (plain.labels == graphs.labels).all() and (plain.exit_stage == graphs.exit_stage).all()
    assert len(set(plain.exit_stage.tolist())) > 1  # some rows exited early, others went on
    np.testing.assert_allclose(plain.probabilities, graphs.probabilities, rtol=1e-5, atol=1e-6)


def test_cuda_graphs_on_cpu_warn_and_run_without(onnx_bundle, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="offramp.runtime"):
        runner = stage_runner(onnx_bundle, Settings(device="cpu", cuda_graphs=True))
    assert type(runner) is OrtStageRunner
    assert "cuda_graphs applies to array models on CUDA only" in caplog.text


def _recording(base: type) -> type:
    class Recording(base):  # type: ignore[misc, valid-type]
        threads: set[int]

        def run(self, stage, x):  # noqa: ANN001, ANN201
            self.threads.add(threading.get_ident())
            return super().run(stage, x)
    return Recording


@pytest.mark.parametrize("thread_bound", [False, True])
def test_a_thread_bound_runner_never_runs_on_the_callers_thread(onnx_bundle, thread_bound: bool) -> None:
    """The direct path runs small requests on the caller's thread once the model is measured fast;
    a CUDA-graph runner (thread_bound) must stay on the worker thread, where its graphs were captured."""
    runners: list = []

    def factory(b, s):  # noqa: ANN001, ANN202
        cls = _recording(GraphStageRunner if thread_bound else OrtStageRunner)
        runner = cls(b, s, bind_device="cpu") if thread_bound else cls(b, s)
        runner.threads = set()
        runners.append(runner)
        return runner

    async def go() -> set[int]:
        engine = Engine([onnx_bundle], SETTINGS.model_copy(update={"inline_budget_ms": 1000.0}), Metrics(),
                        runner_factory=factory)
        await engine.start()
        try:
            for i in range(20):  # the first ones measure the stages; then the direct path may run
                await engine.infer(onnx_bundle.name, _pixels(1, seed=i), direct=True)
        finally:
            await engine.stop()
        return {threading.get_ident()}

    caller = asyncio.run(go())
    ran_on_caller = bool(runners[0].threads & caller)
    assert ran_on_caller is not thread_bound  # the plain runner does take the direct path here


def test_a_runner_that_cannot_capture_falls_back_with_a_warning(onnx_bundle, monkeypatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    import server.engine.graphs as graphs

    def refuse(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("This session cannot use the CUDA Graph feature")

    monkeypatch.setattr(graphs, "resolve_device", lambda requested: "cuda")
    monkeypatch.setattr(graphs, "GraphStageRunner", refuse)
    with caplog.at_level(logging.WARNING, logger="offramp.runtime"):
        runner = stage_runner(onnx_bundle, Settings(device="cpu", cuda_graphs=True))
    assert type(runner) is OrtStageRunner
    assert "CUDA graphs unavailable (RuntimeError: This session cannot use the CUDA Graph feature)" in caplog.text
