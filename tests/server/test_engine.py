"""The engine on real bundles: batched early exit answers exactly what batch-size-1 runs answer.

`tiny_bundle` (tests/conftest.py) is the real digits ViT; the onnx.helper bundle from
test_runtime covers the gate and similarity criteria and runs without torch. Tests marked
`cuda` run only where onnxruntime has the CUDA provider (see the runtime module docstring).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from server.bundle import Bundle, load_bundle
from server.engine.engine import Engine, InferResult
from server.engine.runtime import CPU_PROVIDER, CUDA_PROVIDER
from server.errors import BadRequest, NotFound, NotReady
from server.exits import softmax
from server.metrics import Metrics
from server.policy import ExitPolicy
from server.settings import Settings
from tests.fakes import build_onnx_bundle

HAS_CUDA = CUDA_PROVIDER in ort.get_available_providers()


def _settings(**overrides: object) -> Settings:
    config: dict[str, object] = {"device": "cpu", "intra_op_threads": 1, "max_batch_size": 32,
                                 "max_queue_delay_ms": 1.0, **overrides}
    return Settings(**config)


def _stage_logits(bundle: Bundle, x: np.ndarray) -> list[np.ndarray]:
    """Every stage's logits, running the stage files directly with onnxruntime (CPU)."""
    feed, out = {bundle.manifest.input.name: x}, []
    for i in range(bundle.manifest.num_stages):
        sess = ort.InferenceSession(str(bundle.stage_path(i)), providers=[CPU_PROVIDER])
        hidden, logits = sess.run(["hidden", "logits"], feed)
        out.append(logits)
        feed = {"hidden_in": hidden}
    return out


def _median_policy(bundle: Bundle, x: np.ndarray, criterion: str = "max_prob") -> ExitPolicy:
    """Thresholds halfway between two samples' scores near the median of those still running at each
    exit, so that a batch mixes exit stages and no sample sits on a threshold."""
    logits = _stage_logits(bundle, x)
    running = np.ones(len(x), bool)
    thresholds: list[float | None] = []
    for k in range(bundle.manifest.num_stages - 1):
        score = softmax(logits[k]).max(axis=-1)
        alive = np.sort(score[running])
        if len(alive) < 2:
            thresholds.append(None)
            continue
        mid = len(alive) // 2
        t = float((alive[mid - 1] + alive[mid]) / 2)
        thresholds.append(t)
        running &= score < t
    return ExitPolicy(criterion, tuple(thresholds), 2)


def _digits(n: int) -> np.ndarray:
    datasets = pytest.importorskip("sklearn.datasets")
    return datasets.load_digits().images[:n].astype(np.float32)


async def _batched_and_alone(engine: Engine, model: str, x: np.ndarray,
                             **kw: bool) -> tuple[InferResult, list[InferResult]]:
    batched = await engine.infer(model, x, **kw)
    alone = [await engine.infer(model, x[i:i + 1], **kw) for i in range(len(x))]
    return batched, alone


def _assert_same(batched: InferResult, alone: list[InferResult], atol: float = 1e-6) -> None:
    assert batched.labels.tolist() == [int(r.labels[0]) for r in alone]
    assert batched.exit_stage.tolist() == [int(r.exit_stage[0]) for r in alone]
    np.testing.assert_allclose(batched.probabilities, np.concatenate([r.probabilities for r in alone]),
                               rtol=1e-5, atol=atol)


@pytest.fixture(scope="module")
def helper_bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return load_bundle(build_onnx_bundle(tmp_path_factory.mktemp("engine") / "helper"))


def test_mixed_exit_batch_answers_what_batch_size_one_answers(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    x = _digits(64)
    policy = _median_policy(bundle, x)
    engine = Engine([bundle], _settings(), Metrics(), {bundle.name: policy})

    async def scenario() -> tuple[InferResult, list]:
        await engine.start()
        try:
            return await _batched_and_alone(engine, bundle.name, x)
        finally:
            await engine.stop()

    batched, alone = asyncio.run(scenario())
    assert len(set(batched.exit_stage.tolist())) > 1
    _assert_same(batched, alone)
    assert batched.labels.dtype == np.int64 and batched.exit_stage.dtype == np.int32
    assert batched.probabilities.dtype == np.float32 and batched.probabilities.shape == (64, 10)


def test_full_depth_equals_running_the_stage_files_directly(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    x = _digits(100)
    metrics = Metrics()
    engine = Engine([bundle], _settings(max_batch_size=16), metrics)

    async def scenario() -> tuple[InferResult, InferResult]:
        await engine.start()
        try:
            return await asyncio.gather(engine.infer(bundle.name, x, early_exit=False),
                                        engine.infer(bundle.name, x[:10]))
        finally:
            await engine.stop()

    full, _ = asyncio.run(scenario())
    last = bundle.manifest.num_stages - 1
    logits = _stage_logits(bundle, x)[last]
    assert full.exit_stage.tolist() == [last] * 100
    assert full.labels.tolist() == logits.argmax(axis=-1).tolist()
    np.testing.assert_allclose(full.probabilities, softmax(logits), rtol=1e-5, atol=1e-6)
    assert metrics.registry.get_sample_value("offramp_samples_total", {"model": bundle.name}) == 110


@pytest.mark.parametrize("criterion", ["max_prob", "q_exit", "gate", "similarity", "patience", "entropy"])
def test_every_criterion_batches_like_batch_size_one(helper_bundle: Bundle, criterion: str) -> None:
    x = np.random.default_rng(5).uniform(0, 16, (40, 8, 8)).astype(np.float32)
    thresholds = {"max_prob": (0.98, 0.95), "q_exit": (0.2, 0.7), "gate": (0.15, 0.65),
                  "similarity": (0.9, 0.8), "patience": (None, 2.0), "entropy": (0.05, 0.1)}[criterion]
    policy = ExitPolicy(criterion, thresholds, 3)
    engine = Engine([helper_bundle], _settings(max_batch_size=8), Metrics(), {helper_bundle.name: policy})

    async def scenario() -> tuple[InferResult, list, list[InferResult]]:
        await engine.start()
        try:
            batched, alone = await _batched_and_alone(engine, helper_bundle.name, x)
            # concurrent single-sample clients: re-batched in the queues, same answers
            together = await asyncio.gather(*(engine.infer(helper_bundle.name, x[i:i + 1])
                                              for i in range(40)))
            return batched, alone, list(together)
        finally:
            await engine.stop()

    batched, alone, together = asyncio.run(scenario())
    assert len(set(batched.exit_stage.tolist())) > 1  # mixed exits, or the comparison proves little
    _assert_same(batched, alone)
    _assert_same(batched, together)


def test_engine_api_checks_and_policy_swap(helper_bundle: Bundle) -> None:
    with pytest.raises(ValueError, match="at least one"):
        Engine([], _settings(), Metrics())
    with pytest.raises(ValueError, match="unique"):
        Engine([helper_bundle, helper_bundle], _settings(), Metrics())
    with pytest.raises(ValueError, match="unknown models"):
        Engine([helper_bundle], _settings(), Metrics(), {"nope": ExitPolicy("max_prob", (None, None), 1)})
    metrics = Metrics()
    engine = Engine([helper_bundle], _settings(), metrics)
    name = helper_bundle.name
    assert engine.model_names() == [name] and engine.bundle(name) is helper_bundle
    assert engine.policy(name) == ExitPolicy("max_prob", (0.6, 0.6), 1)  # the manifest default
    assert engine.policy(name).same_as(helper_bundle.manifest.default_policy)
    with pytest.raises(NotFound):
        engine.bundle("nope")
    x = np.random.default_rng(0).uniform(0, 16, (4, 8, 8)).astype(np.float32)

    async def scenario() -> None:
        assert not engine.ready
        with pytest.raises(NotReady):
            await engine.infer(name, x)
        await engine.start()
        assert engine.ready and engine.device(name) == "cpu"
        with pytest.raises(BadRequest, match=r"\[-1, 8, 8\]"):
            await engine.infer(name, x.reshape(4, 64))
        with pytest.raises(ValueError, match="thresholds"):
            engine.set_policy(name, ExitPolicy("max_prob", (0.5,), 9))
        engine.set_policy(name, ExitPolicy("max_prob", (0.0, 0.0), 9))  # everyone leaves at stage 0
        assert (await engine.infer(name, x)).exit_stage.tolist() == [0] * 4
        engine.set_policy(name, ExitPolicy("max_prob", (None, None), 10))
        assert (await engine.infer(name, x)).exit_stage.tolist() == [2] * 4
        assert engine.policy(name).version == 10
        await engine.stop()
        assert not engine.ready

    asyncio.run(scenario())
    assert metrics.registry.get_sample_value("offramp_exit_policy_version", {"model": name}) == 10


def test_initial_policies_from_the_store_are_used_when_they_fit(helper_bundle: Bundle) -> None:
    policy = ExitPolicy(criterion="gate", thresholds=[0.5, None], version=4)
    engine = Engine([helper_bundle], _settings(), Metrics(), {helper_bundle.name: policy})
    assert engine.policy(helper_bundle.name) == policy
    with pytest.raises(ValueError, match="expected 2 thresholds"):
        Engine([helper_bundle], _settings(), Metrics(), {helper_bundle.name: ExitPolicy("gate", (0.5,), 5)})


@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and a GPU")
def test_cuda_engine_answers_like_the_cpu_engine(helper_bundle: Bundle) -> None:
    x = np.random.default_rng(7).uniform(0, 16, (64, 8, 8)).astype(np.float32)
    policy = _median_policy(helper_bundle, x)

    async def serve(device: str) -> tuple[InferResult, list[InferResult], str]:
        engine = Engine([helper_bundle], _settings(device=device, max_batch_size=8), Metrics(),
                        {helper_bundle.name: policy})
        await engine.start()
        try:
            batched = await engine.infer(helper_bundle.name, x)
            together = await asyncio.gather(*(engine.infer(helper_bundle.name, x[i:i + 1])
                                              for i in range(64)))
            return batched, list(together), engine.device(helper_bundle.name)
        finally:
            await engine.stop()

    gpu, gpu_together, device = asyncio.run(serve("cuda"))
    cpu, _, _ = asyncio.run(serve("cpu"))
    assert device == "cuda"
    assert len(set(gpu.exit_stage.tolist())) > 1
    assert gpu.exit_stage.tolist() == cpu.exit_stage.tolist()
    assert gpu.labels.tolist() == cpu.labels.tolist()
    # onnxruntime's CUDA provider uses TF32 matmuls on Ampere and later: up to ~5e-3 from the CPU's FP32.
    np.testing.assert_allclose(gpu.probabilities, cpu.probabilities, atol=1e-2)
    _assert_same(gpu, gpu_together, atol=1e-2)  # TF32 kernels differ with the batch size


@pytest.mark.parametrize("policy", [
    ExitPolicy("max_prob", (0.55, 0.6), 1),  # stateless, score in the graph: one comparison on the direct path
    ExitPolicy("patience", (2.0, 2.0), 1),  # needs the exit state
    ExitPolicy("margin", (0.3, None), 1),
])
def test_the_direct_path_answers_as_the_worker_does(helper_bundle: Bundle, policy: ExitPolicy) -> None:
    x = np.random.default_rng(7).uniform(0, 16, (40, 8, 8)).astype(np.float32)

    async def answers(budget_ms: float) -> list[InferResult]:
        engine = Engine([helper_bundle], _settings(inline_budget_ms=budget_ms), Metrics(),
                        {helper_bundle.name: policy})
        await engine.start()
        try:
            return [await engine.infer(helper_bundle.name, x[i:i + 1]) for i in range(len(x))]
        finally:
            await engine.stop()

    direct, worker = asyncio.run(answers(50.0)), asyncio.run(answers(0.0))
    for d, w in zip(direct, worker, strict=True):
        assert d.labels.tolist() == w.labels.tolist() and d.exit_stage.tolist() == w.exit_stage.tolist()
        np.testing.assert_allclose(d.probabilities, w.probabilities, rtol=1e-6)
    assert len({int(r.exit_stage[0]) for r in direct}) > 1  # the case exercises more than one exit
