"""The live calibration window (server/engine/window.py) and auto-recalibration (server/control/auto.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from server.bundle import Calibration, load_bundle
from server.control.auto import AutoCalibrator, AutoConfig, lower_bound
from server.control.policies import PolicyControl
from server.control.store import FilePolicyStore
from server.engine.engine import Engine
from server.engine.window import LiveWindow
from server.interface import WindowView
from server.metrics import Metrics
from server.policy import ExitPolicy
from server.settings import Settings
from tests.fakes import FakeEngine, RedisServer, build_onnx_bundle, fake_manifest

CLASSES = 10
MODEL = "digits"  # fake_manifest's name


def test_the_window_is_bounded_and_oldest_first() -> None:
    w = LiveWindow(num_stages=3, num_classes=2, capacity=5, rate=1.0, rng=np.random.default_rng(0))
    for k in range(8):
        trace = w.begin(1)
        for stage in range(3):
            w.record(stage, trace, np.array([[k, stage]], np.float32), None, None)
    calib = w.calibration()
    assert calib is not None and len(w) == 5 and w.total == 8
    assert calib.logits[0, :, 0].tolist() == [3, 4, 5, 6, 7]  # the last five, oldest first
    assert calib.gate is None and calib.similarity is None
    assert w._records.nbytes == 5 * 3 * 4 * 4  # memory: capacity x stages x (classes + 2) float32
    none = LiveWindow(3, 2, capacity=5, rate=0.0)
    assert not none.enabled and (none.begin(10) == -1).all()


def test_the_window_persists(tmp_path: Path) -> None:
    w = LiveWindow(2, 2, capacity=4, rate=1.0)
    for k in range(3):
        trace = w.begin(1)
        w.record(0, trace, np.array([[k, 0]], np.float32), None, None)
        w.record(1, trace, np.array([[0, k]], np.float32), None, None)
    w.save(tmp_path / "w.npz")
    again = LiveWindow(2, 2, capacity=4, rate=1.0)
    assert again.load(tmp_path / "w.npz") == 3
    assert np.array_equal(again.calibration().logits, w.calibration().logits)  # type: ignore[union-attr]
    assert LiveWindow(3, 2, capacity=4, rate=1.0).load(tmp_path / "w.npz") == 0  # another model's shape


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201 - Bundle
    return load_bundle(build_onnx_bundle(tmp_path_factory.mktemp("auto") / "bundle"))


def test_tracing_never_changes_an_answer_and_fills_the_window(dense) -> None:  # noqa: ANN001
    x = np.random.default_rng(3).uniform(0, 16, (60, 8, 8)).astype(np.float32)

    async def answers(rate: float) -> tuple[list, WindowView]:
        settings = Settings(shadow_rate=rate, window_size=500, intra_op_threads=1, max_queue_delay_ms=0)
        engine = Engine([dense], settings, Metrics())
        await engine.start()
        try:
            out = [await engine.infer(dense.name, x[i:i + 3]) for i in range(0, 60, 3)]
            for _ in range(200):  # shadow work runs when the queues are idle: bounded wait for it
                if engine.window(dense.name).samples == 60:
                    break
                await asyncio.sleep(0.01)
            return out, engine.window(dense.name)
        finally:
            await engine.stop()

    plain, empty = asyncio.run(answers(0.0))
    traced, view = asyncio.run(answers(1.0))
    for a, b in zip(plain, traced, strict=True):
        assert np.array_equal(a.labels, b.labels) and np.array_equal(a.exit_stage, b.exit_stage)
    assert empty.samples == 0 and view.samples == 60 and view.calibration is not None
    assert any(s < 2 for r in traced for s in r.exit_stage)  # some left early, and were still traced
    assert sum(view.shadow_stage_rows) > 0  # the window's compute: rows run on after their answer
    # Every record holds every stage: its full-depth label is the last stage's argmax.
    assert np.array_equal(view.calibration.labels, view.calibration.logits[-1].argmax(-1))


def population(n: int, seed: int, shift: float = 0.0) -> Calibration:
    """Three stages; the early exits' max-prob score p ~ U(0.5, 1) is calibrated until `shift` makes
    them over-confident (agree with probability p - shift)."""
    rng = np.random.default_rng(seed)
    final = rng.integers(0, CLASSES, n)
    logits = np.zeros((3, n, CLASSES), np.float32)
    logits[2, np.arange(n), final] = 8.0
    for s in range(2):
        p = rng.uniform(0.5, 1.0, n)
        agree = rng.random(n) < np.clip(p - shift, 0, 1)
        other = (final + rng.integers(1, CLASSES, n)) % CLASSES
        predicted = np.where(agree, final, other)
        logits[s] = np.log((1 - p[:, None]) / (CLASSES - 1))
        logits[s, np.arange(n), predicted] = np.log(p)
    return Calibration(labels=final.astype(np.int64), logits=logits)


def controller(tmp_path: Path, policy: ExitPolicy, store: object | None = None,
               seed: bool = True) -> tuple[AutoCalibrator, FakeEngine]:
    """A controller over a FakeEngine serving `policy` as version 1 of the store (seeded as a server's
    start does, unless another replica already did)."""
    from server.bundle import Bundle

    manifest = fake_manifest(classes=CLASSES, stages=3)
    store = store or FilePolicyStore(tmp_path / "state")
    if seed:
        policy = store.update(MODEL, policy, "bundle-default")  # type: ignore[attr-defined]
    engine = FakeEngine(Bundle(tmp_path, manifest), policy.with_version(1))
    control = PolicyControl(engine, store)  # type: ignore[arg-type]
    return AutoCalibrator(engine, control, Metrics()), engine


def with_window(engine: FakeEngine, calib: Calibration, total: int) -> None:
    engine.window_ = WindowView(calib, len(calib.labels), total, [0, 0, 0])


CONFIG = AutoConfig(enabled=True, target_agreement=0.95, confidence=0.9, min_samples=200)


def test_the_controller_tightens_on_drift_and_writes_history(tmp_path: Path) -> None:
    auto, engine = controller(tmp_path, ExitPolicy("max_prob", (0.55, 0.55), version=1))
    with_window(engine, population(3000, 1, shift=0.3), total=3000)
    out = auto.configure(MODEL, CONFIG)
    assert out["last_action"]["action"] == "tighten"
    live = engine.policy(MODEL)
    assert live.version == 2 and live.source.startswith("auto (tighten")
    # The new thresholds keep the target on the drifted population itself (fresh samples).
    from server.control.calibrate import simulate

    fresh = simulate(population(50_000, 99, shift=0.3), "max_prob", live.thresholds, [1, 1, 1])
    assert fresh.agreement >= 0.95
    history = auto.control.history(MODEL)
    assert history[-1].source.startswith("auto (tighten") and "lower bound" in history[-1].source


def test_the_controller_relaxes_with_slack_and_then_waits(tmp_path: Path) -> None:
    auto, engine = controller(tmp_path, ExitPolicy("max_prob", (None, None), version=1))  # full depth
    with_window(engine, population(3000, 2), total=3000)
    first = auto.configure(MODEL, CONFIG)
    assert first["last_action"]["action"] == "relax" and engine.policy(MODEL).version == 2
    assert first["live"]["agreement_lower"] > 0.95
    # Hysteresis: the same evidence, or too few new samples, changes nothing.
    with_window(engine, population(3000, 3, shift=0.3), total=3100)
    assert auto.step(MODEL)["last_action"]["version"] == 2 and engine.policy(MODEL).version == 2
    with_window(engine, population(3000, 3, shift=0.3), total=3300)  # 300 new samples: enough
    assert auto.step(MODEL)["last_action"]["action"] == "tighten" and engine.policy(MODEL).version == 3


def test_too_little_evidence_or_auto_off_changes_nothing(tmp_path: Path) -> None:
    auto, engine = controller(tmp_path, ExitPolicy("max_prob", (0.55, 0.55), version=1))
    with_window(engine, population(100, 4, shift=0.3), total=100)  # below min_samples
    assert auto.configure(MODEL, CONFIG)["last_action"] is None
    with_window(engine, population(3000, 4, shift=0.3), total=3000)
    assert auto.configure(MODEL, AutoConfig(enabled=False))["last_action"] is None
    assert engine.policy(MODEL).version == 1
    state = auto.describe(MODEL)
    assert state["live"]["window_samples"] == 3000 and state["live"]["agreement"] < 0.95


def test_an_operator_change_in_between_wins(tmp_path: Path) -> None:
    store = FilePolicyStore(tmp_path / "state")
    auto, engine = controller(tmp_path, ExitPolicy("max_prob", (0.55, 0.55), version=1), store)
    store.update(MODEL, ExitPolicy("max_prob", (0.95, 0.95)), "admin:PUT")  # version 2; the engine still serves 1
    with_window(engine, population(3000, 5, shift=0.3), total=3000)
    out = auto.configure(MODEL, CONFIG)
    assert out["last_action"] is None  # compare-and-set refused: expected 1, the store holds 2
    assert store.get(MODEL).source == "admin:PUT"


def test_lower_bound() -> None:
    assert lower_bound(990, 1000, 0.95) == pytest.approx(0.98300, abs=5e-4)  # one-sided 95 % Clopper-Pearson
    assert lower_bound(0, 0, 0.95) == 0.0


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    yield server
    server.stop()


def test_exactly_one_replica_writes_through_the_real_redis_store(tmp_path: Path, redis_server: RedisServer) -> None:
    from server.control.redis_store import RedisPolicyStore

    replicas = []
    for k in range(2):
        store = RedisPolicyStore(redis_server.url)
        auto, engine = controller(tmp_path / f"r{k}", ExitPolicy("max_prob", (0.55, 0.55), version=1), store,
                                  seed=k == 0)  # the first replica's start seeds the shared store
        with_window(engine, population(3000, 10 + k, shift=0.3), total=3000)  # both see the drift
        replicas.append((auto, engine, store))
    outs = [auto.configure(MODEL, CONFIG) for auto, _, _ in replicas]
    actions = [o["last_action"] for o in outs]
    assert sum(a is not None for a in actions) == 1  # one writer; the other's compare-and-set failed
    history = replicas[1][2].history(MODEL)
    assert [h.source.split(" ")[0] for h in history] == ["bundle-default", "auto"] and history[-1].version == 2


def test_the_window_survives_a_restart_when_persisted(dense, tmp_path: Path) -> None:  # noqa: ANN001
    x = np.random.default_rng(4).uniform(0, 16, (30, 8, 8)).astype(np.float32)
    settings = Settings(shadow_rate=1.0, window_size=100, persist_window=True, state_dir=tmp_path,
                        intra_op_threads=1, max_queue_delay_ms=0)

    async def serve(send: bool) -> int:
        engine = Engine([dense], settings, Metrics())
        await engine.start()
        try:
            if send:
                for i in range(0, 30, 3):
                    await engine.infer(dense.name, x[i:i + 3])
                for _ in range(200):  # bounded wait for the shadow work
                    if engine.window(dense.name).samples == 30:
                        break
                    await asyncio.sleep(0.01)
            return engine.window(dense.name).samples
        finally:
            await engine.stop()

    assert asyncio.run(serve(True)) == 30
    assert (tmp_path / f"{dense.name}.window.npz").is_file()
    assert asyncio.run(serve(False)) == 30  # read back at start


def test_a_two_stage_window_keeps_its_similarity() -> None:
    """The similarity criterion replays on the window of a 2-stage model too (it used to be dropped,
    and the admin GET of such a model then failed)."""
    w = LiveWindow(num_stages=2, num_classes=2, capacity=4, rate=1.0)
    trace = w.begin(1)
    for stage in range(2):
        w.record(stage, trace, np.array([[1.0, 0.0]], np.float32), None, np.array([0.9], np.float32))
    calib = w.calibration()
    assert calib is not None and calib.similarity is not None and calib.similarity[0, 0] == pytest.approx(0.9)


@pytest.mark.parametrize("rate, size, min_samples, refused", [
    (0.0, 500, 200, "needs the live window"),      # no tracing: the window never fills
    (0.1, 0, 200, "needs the live window"),        # no window
    (0.1, 100, 200, "exceeds the window's 100"),   # the window can never hold min_samples
    (0.1, 500, 200, None),
])
def test_a_controller_that_could_never_act_is_refused(dense, tmp_path: Path, rate: float, size: int,  # noqa: ANN001
                                                      min_samples: int, refused: str | None) -> None:
    from server.errors import Conflict

    async def configure() -> dict:
        engine = Engine([dense], Settings(shadow_rate=rate, window_size=size, intra_op_threads=1), Metrics())
        await engine.start()
        try:
            auto = AutoCalibrator(engine, PolicyControl(engine, FilePolicyStore(tmp_path / "s")), Metrics())
            return auto.configure(dense.name, AutoConfig(enabled=True, min_samples=min_samples))
        finally:
            await engine.stop()

    if refused is None:
        assert asyncio.run(configure())["enabled"] is True
    else:
        with pytest.raises(Conflict, match=refused) as err:
            asyncio.run(configure())
        assert err.value.status_code == 409
