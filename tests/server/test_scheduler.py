"""Scheduler behaviour with fake stage runners (numpy, no ONNX): batching, exits, merging, bounds."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.engine.direct import StageCosts
from server.engine.runtime import StageOutputs
from server.engine.scheduler import InferResult, ModelScheduler
from server.errors import BadRequest, NotReady, OfframpError, Overloaded, RequestTimeout
from server.exits import ExitState, decide, softmax
from server.metrics import Metrics
from server.policy import ExitPolicy
from server.settings import Settings

C = 4  # classes


class _NumpyRunner:
    """Common part of the fakes: numpy handles, a log of which sample ids each stage ran."""

    num_stages: int

    def __init__(self) -> None:
        self.calls: list[tuple[int, list[int]]] = []
        self.hook: Callable[[int, list[int]], None] | None = None
        self._lock = threading.Lock()

    def run(self, stage: int, x: np.ndarray) -> StageOutputs:
        uids = [int(u) for u in x[:, 0]]
        with self._lock:
            self.calls.append((stage, uids))
        if self.hook is not None:
            self.hook(stage, uids)
        return self.compute(stage, x)

    def compute(self, stage: int, x: np.ndarray) -> StageOutputs:
        raise NotImplementedError

    def take(self, hidden: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return hidden[rows]

    def concat(self, parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts)

    def rows(self, hidden: np.ndarray) -> int:
        return len(hidden)

    def close(self) -> None:
        pass

    def uids_at(self, stage: int) -> list[int]:
        return sorted(u for s, uids in self.calls if s == stage for u in uids)


class ArithmeticRunner(_NumpyRunner):
    """Stages of elementwise float64 arithmetic (exactly rounded, so a row's result never depends on
    the batch it ran in). Column 0 carries the sample id unchanged; logits and gate come from the rest."""

    def __init__(self, num_stages: int = 4, dim: int = 7, seed: int = 0):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.num_stages = num_stages
        self.a = rng.uniform(-1.6, 1.6, (num_stages, dim))
        self.b = rng.uniform(-1.0, 1.0, (num_stages, dim))
        self.a[:, 0], self.b[:, 0] = 1.0, 0.0

    def compute(self, stage: int, x: np.ndarray) -> StageOutputs:
        h = x * self.a[stage] + self.b[stage]
        gate = np.clip(0.25 * h[:, C + 1] + 0.5, 0.0, 1.0).astype(np.float32)
        return StageOutputs(h, (2.0 * h[:, 1:C + 1]).astype(np.float32), gate=gate)

    def reference(self, row: np.ndarray, policy: ExitPolicy, early_exit: bool) -> tuple[int, np.ndarray, int]:
        """One sample alone, stage after stage, at batch size 1: what the scheduler must return."""
        h, state = row[None, :], ExitState.initial(1)
        for k in range(self.num_stages):
            out = self.compute(k, h)
            if k == self.num_stages - 1:
                break
            mask, _, state = decide(policy.criterion, policy.threshold(k), out.logits, state, out.gate)
            if mask[0] and early_exit:
                break
            h = out.hidden
        probs = softmax(out.logits)[0]
        return int(probs.argmax()), probs, k


class ScriptedRunner(_NumpyRunner):
    """Sample `uid` is sure of label `label(uid, stage)` at stage `plan[uid]` and unsure elsewhere,
    so with a max_prob threshold of 0.9 it exits exactly at `plan[uid]`."""

    def __init__(self, num_stages: int, plan: dict[int, int], label: Callable[[int, int], int] | None = None,
                 poison: set[int] | None = None):
        super().__init__()
        self.num_stages = num_stages
        self.plan = plan
        self.label = label or (lambda uid, stage: uid % C)
        self.poison = poison or set()

    def compute(self, stage: int, x: np.ndarray) -> StageOutputs:
        logits = np.zeros((len(x), C), np.float32)
        for i, uid in enumerate(int(u) for u in x[:, 0]):
            if uid in self.poison and stage > 0:
                raise RuntimeError(f"onnxruntime exploded on sample {uid}")
            if self.plan.get(uid, -1) == stage or stage == self.num_stages - 1:
                logits[i, self.label(uid, stage)] = 20.0
        return StageOutputs(x.copy(), logits)


def ids(*uids: int) -> np.ndarray:
    x = np.zeros((len(uids), 2))
    x[:, 0] = uids
    return x


def make(runner: _NumpyRunner, policy: ExitPolicy | None = None, metrics: Metrics | None = None,
         **overrides: object) -> ModelScheduler:
    config: dict[str, object] = {"max_batch_size": 8, "max_queue_delay_ms": 0.0, **overrides}
    policy = policy or ExitPolicy("max_prob", (0.9,) * (runner.num_stages - 1), 1)
    return ModelScheduler("m", runner, flops=[100] * runner.num_stages, num_classes=C,
                          settings=Settings(**config), metrics=metrics or Metrics(), policy=policy, seed=0)


class Gate:
    """Holds the worker inside a stage run until the test lets it go."""

    def __init__(self, stage: int = 0):
        self.stage = stage
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, stage: int, uids: list[int]) -> None:
        if stage == self.stage and not self.entered.is_set():
            self.entered.set()
            assert self.release.wait(10), "test never released the worker"

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, 10)


def thresholds_for(criterion: str, num_stages: int) -> st.SearchStrategy[tuple[float | None, ...]]:
    if criterion == "patience":
        one = st.one_of(st.none(), st.integers(1, num_stages).map(float))
    elif criterion == "entropy":
        one = st.one_of(st.none(), st.floats(0.05, 1.0))
    else:
        one = st.one_of(st.none(), st.floats(0.0, 1.0))
    return st.tuples(*[one] * (num_stages - 1))


@st.composite
def scenarios(draw: st.DrawFn) -> dict:
    criterion = draw(st.sampled_from(["max_prob", "margin", "entropy", "patience", "gate", "q_exit"]))
    return {
        "criterion": criterion,
        "thresholds": draw(thresholds_for(criterion, 4)),
        "sizes": draw(st.lists(st.integers(1, 9), min_size=1, max_size=6)),
        "gaps_ms": draw(st.lists(st.sampled_from([0.0, 0.0, 0.5, 2.0]), min_size=6, max_size=6)),
        "early": draw(st.lists(st.booleans(), min_size=6, max_size=6)),
        "batch": draw(st.integers(1, 8)),
        "delay_ms": draw(st.sampled_from([0.0, 0.5, 3.0])),
        "seed": draw(st.integers(0, 3)),
    }


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_every_sample_answered_once_and_as_if_alone(sc: dict) -> None:
    runner = ArithmeticRunner(seed=sc["seed"])
    policy = ExitPolicy(sc["criterion"], sc["thresholds"], 1)
    sched = make(runner, policy, max_batch_size=sc["batch"], max_queue_delay_ms=sc["delay_ms"],
                 request_timeout_s=10.0)  # a lost sample fails the example instead of hanging
    rng = np.random.default_rng(sc["seed"])
    inputs, uid = [], 0
    for n in sc["sizes"]:
        x = rng.uniform(-1.0, 1.0, (n, 7))
        x[:, 0] = np.arange(uid, uid + n)
        uid += n
        inputs.append(x)

    async def scenario() -> list[InferResult]:
        sched.start()

        async def one(i: int) -> InferResult:
            await asyncio.sleep(sum(sc["gaps_ms"][:i]) / 1000)
            return await sched.submit(inputs[i], early_exit=sc["early"][i])

        try:
            return await asyncio.gather(*(one(i) for i in range(len(inputs))))
        finally:
            await sched.stop()

    results = asyncio.run(scenario())
    last = runner.num_stages - 1
    runs: dict[int, list[int]] = {}
    for stage, uids in runner.calls:
        for u in uids:
            runs.setdefault(u, []).append(stage)
    for x, early, res in zip(inputs, sc["early"], results, strict=False):
        assert res.labels.shape == (len(x),) and res.probabilities.shape == (len(x), C)
        for row, label, probs, stage in zip(x, res.labels, res.probabilities, res.exit_stage, strict=True):
            want_label, want_probs, want_stage = runner.reference(row, policy, early)
            assert (label, stage) == (want_label, want_stage)
            np.testing.assert_array_equal(probs, want_probs)
            # ran exactly stages 0..exit stage, each once: nothing lost, duplicated or run past its exit
            assert runs[int(row[0])] == list(range(stage + 1))
            if not early:
                assert stage == last
    assert sum(len(u) for _, u in runner.calls if _ == 0) == uid
    assert max(len(u) for _, u in runner.calls) <= sc["batch"]


def test_deeper_stages_run_before_new_requests() -> None:
    runner = ScriptedRunner(3, plan={})  # nobody exits early
    gate = Gate(stage=0)
    runner.hook = gate
    sched = make(runner)

    async def scenario() -> None:
        sched.start()
        first = asyncio.create_task(sched.submit(ids(1, 2)))
        await gate.wait_entered()
        second = asyncio.create_task(sched.submit(ids(3)))
        await asyncio.sleep(0.01)  # let it reach the queue while stage 0 of the first is running
        gate.release.set()
        await asyncio.gather(first, second)
        await sched.stop()

    asyncio.run(scenario())
    assert runner.calls == [(0, [1, 2]), (1, [1, 2]), (2, [1, 2]), (0, [3]), (1, [3]), (2, [3])]


def test_survivors_of_different_batches_merge() -> None:
    plan = {u: (0 if u % 2 == 0 else 2) for u in range(8)}  # odd samples need the full depth
    runner = ScriptedRunner(3, plan)
    # A long delay: a half-full stage-1 queue waits for the next stage-0 batch instead of running.
    sched = make(runner, max_batch_size=4, max_queue_delay_ms=60_000)

    async def scenario() -> InferResult:
        sched.start()
        try:
            return await sched.submit(ids(*range(8)))
        finally:
            await sched.stop()

    res = asyncio.run(scenario())
    assert res.exit_stage.tolist() == [0, 2, 0, 2, 0, 2, 0, 2]
    assert [c for c in runner.calls if c[0] == 0] == [(0, [0, 1, 2, 3]), (0, [4, 5, 6, 7])]
    assert [c for c in runner.calls if c[0] == 1] == [(1, [1, 3, 5, 7])]  # one merged batch
    assert res.labels.tolist() == [u % C for u in range(8)]


def test_early_exit_skips_later_stages_and_can_be_turned_off_per_request() -> None:
    plan = {u: 0 for u in range(10)} | {u: 1 for u in range(10, 20)}
    runner = ScriptedRunner(3, plan)
    sched = make(runner, max_batch_size=20, max_queue_delay_ms=60_000)

    async def scenario() -> tuple[InferResult, InferResult]:
        sched.start()
        try:  # both requests share stage 0's batches: the flag is per sample
            return await asyncio.gather(sched.submit(ids(*range(0, 20, 2))),
                                        sched.submit(ids(*range(1, 20, 2)), early_exit=False))
        finally:
            await sched.stop()

    fast, full = asyncio.run(scenario())
    assert fast.exit_stage.tolist() == [0] * 5 + [1] * 5
    assert full.exit_stage.tolist() == [2] * 10
    assert runner.uids_at(0) == list(range(20))
    assert runner.uids_at(1) == sorted([*range(10, 20, 2), *range(1, 20, 2)])
    assert runner.uids_at(2) == list(range(1, 20, 2))  # the early samples stopped at stages 0 and 1
    assert [len(uids) for s, uids in runner.calls if s == 0] == [20]  # both requests in one batch


def test_full_queue_answers_overloaded_at_once() -> None:
    runner = ScriptedRunner(2, plan={})
    gate = Gate(stage=0)
    runner.hook = gate
    sched = make(runner, max_queue_size=4)

    async def scenario() -> None:
        sched.start()
        held = asyncio.create_task(sched.submit(ids(1, 2, 3)))
        await gate.wait_entered()
        with pytest.raises(Overloaded) as err:
            await sched.submit(ids(4, 5))
        assert err.value.status_code == 503 and "Retry-After" in err.value.headers
        with pytest.raises(BadRequest):  # can never fit
            await sched.submit(ids(*range(10, 15)))
        gate.release.set()
        assert (await held).exit_stage.tolist() == [1, 1, 1]
        assert (await sched.submit(ids(6, 7, 8, 9))).exit_stage.tolist() == [1] * 4  # room again
        await sched.stop()

    asyncio.run(scenario())


def test_timeout_answers_504_and_drops_the_work() -> None:
    runner = ScriptedRunner(3, plan={})
    gate = Gate(stage=0)
    runner.hook = gate
    sched = make(runner, request_timeout_s=0.2, max_queue_size=8)

    async def scenario() -> None:
        sched.start()
        running = asyncio.create_task(sched.submit(ids(1, 2, 3, 4)))  # in stage 0 when it times out
        await gate.wait_entered()
        queued = asyncio.create_task(sched.submit(ids(5, 6, 7, 8)))  # still waiting in the queue
        for task in (running, queued):
            with pytest.raises(RequestTimeout) as err:
                await task
            assert err.value.status_code == 504
        gate.release.set()
        res = await sched.submit(ids(9, 10, 11, 12, 13, 14, 15, 16))  # the bound was given back
        assert res.exit_stage.tolist() == [2] * 8
        await sched.stop()

    asyncio.run(scenario())
    assert runner.uids_at(0) == [1, 2, 3, 4] + list(range(9, 17))
    assert runner.uids_at(1) == list(range(9, 17))  # nothing of the timed-out requests went on


def test_stage_failure_fails_its_requests_and_the_worker_keeps_serving() -> None:
    runner = ScriptedRunner(3, plan={1: 0}, poison={2})
    sched = make(runner)

    async def scenario() -> None:
        sched.start()
        with pytest.raises(OfframpError) as err:
            await sched.submit(ids(1, 2))
        assert err.value.status_code == 500 and "stage 1" in str(err.value)
        assert (await sched.submit(ids(3, 4))).exit_stage.tolist() == [2, 2]
        await sched.stop()

    asyncio.run(scenario())


def test_policy_swap_applies_to_the_next_batch_and_is_reported() -> None:
    runner = ScriptedRunner(3, plan={1: 0, 2: 1})
    metrics = Metrics()
    sched = make(runner, metrics=metrics)

    async def scenario() -> tuple[InferResult, InferResult]:
        sched.start()
        before = await sched.submit(ids(1, 2))
        sched.set_policy(ExitPolicy("max_prob", (None, 0.9), 7))
        after = await sched.submit(ids(1, 2))
        await sched.stop()
        return before, after

    before, after = asyncio.run(scenario())
    assert before.exit_stage.tolist() == [0, 1]
    assert after.exit_stage.tolist() == [2, 1]  # exit 0 disabled
    reg = metrics.registry
    assert reg.get_sample_value("offramp_exit_policy_version", {"model": "m"}) == 7
    assert np.isnan(reg.get_sample_value("offramp_exit_threshold", {"model": "m", "stage": "0"}))


def test_metrics_count_exits_and_compute_fraction() -> None:
    runner = ScriptedRunner(4, plan={0: 0, 1: 0, 2: 1, 3: 3})
    metrics = Metrics()
    sched = make(runner, metrics=metrics)

    async def scenario() -> None:
        sched.start()
        await sched.submit(ids(0, 1, 2, 3))
        await sched.stop()

    asyncio.run(scenario())
    value = metrics.registry.get_sample_value
    exited = [value("offramp_exit_stage_total", {"model": "m", "stage": str(k)}) for k in (0, 1, 3)]
    assert exited == [2, 1, 1]
    assert value("offramp_samples_total", {"model": "m"}) == 4
    # stages cost 100 FLOPs each: 2*100 + 200 + 400 executed of 4*400
    assert value("offramp_compute_fraction", {"model": "m"}) == pytest.approx(800 / 1600)
    assert value("offramp_batch_size_count", {"model": "m", "stage": "3"}) == 1
    assert value("offramp_queue_depth", {"model": "m", "stage": "0"}) == 0


def test_shadow_checks_early_exits_against_full_depth_off_the_request_path() -> None:
    plan = {u: 0 for u in range(6)}
    runner = ScriptedRunner(3, plan, label=lambda uid, stage: (uid + (stage == 2) * (uid % 2)) % C)
    metrics = Metrics()
    sched = make(runner, metrics=metrics, shadow_rate=1.0)
    value = metrics.registry.get_sample_value

    async def scenario() -> InferResult:
        sched.start()
        res = await sched.submit(ids(*range(6)))
        for _ in range(500):  # the shadow work finishes after the answer
            if value("offramp_shadow_checked_total", {"model": "m"}) == 6:
                break
            await asyncio.sleep(0.01)
        await sched.stop()
        return res

    res = asyncio.run(scenario())
    assert res.exit_stage.tolist() == [0] * 6 and res.labels.tolist() == [u % C for u in range(6)]
    assert value("offramp_shadow_checked_total", {"model": "m"}) == 6
    assert value("offramp_shadow_disagreements_total", {"model": "m"}) == 3  # the odd samples
    assert value("offramp_shadow_agreement", {"model": "m"}) == pytest.approx(0.5)
    assert runner.uids_at(2) == list(range(6))
    assert value("offramp_exit_stage_total", {"model": "m", "stage": "2"}) is None  # not answered twice


def test_stop_drains_requests_in_flight_then_refuses() -> None:
    runner = ScriptedRunner(3, plan={})
    gate = Gate(stage=1)
    runner.hook = gate
    sched = make(runner)

    async def scenario() -> None:
        sched.start()
        task = asyncio.create_task(sched.submit(ids(1, 2)))
        await gate.wait_entered()
        stopping = asyncio.create_task(sched.stop(drain=True))
        await asyncio.sleep(0.01)
        assert not sched.ready
        with pytest.raises(NotReady):
            await sched.submit(ids(3))
        gate.release.set()
        assert (await task).exit_stage.tolist() == [2, 2]
        await stopping

    asyncio.run(scenario())


def test_stop_without_drain_fails_what_is_pending() -> None:
    runner = ScriptedRunner(3, plan={})
    gate = Gate(stage=0)
    runner.hook = gate
    sched = make(runner)

    async def scenario() -> None:
        sched.start()
        running = asyncio.create_task(sched.submit(ids(1)))
        await gate.wait_entered()
        queued = asyncio.create_task(sched.submit(ids(2)))
        await asyncio.sleep(0.01)
        stopping = asyncio.create_task(sched.stop(drain=False))
        for task in (running, queued):
            with pytest.raises(NotReady):
                await task
        gate.release.set()
        await stopping

    asyncio.run(scenario())
    assert runner.uids_at(1) == []


# -- the direct path: a small request on an idle model runs on the caller's thread -----------------


class ThreadRecorder:
    """A stage hook noting on which thread each stage ran."""

    def __init__(self) -> None:
        self.threads: list[tuple[int, str]] = []

    def __call__(self, stage: int, uids: list[int]) -> None:
        self.threads.append((stage, threading.current_thread().name))


def test_an_idle_model_runs_small_requests_on_the_callers_thread_and_exits_for_real() -> None:
    runner = ScriptedRunner(4, plan={u: u % 4 for u in range(40)})
    runner.hook = recorder = ThreadRecorder()
    sched = make(runner)

    async def scenario() -> list[InferResult]:
        sched.start()
        try:
            return [await sched.submit(ids(u)) for u in range(40)]
        finally:
            await sched.stop()

    results = asyncio.run(scenario())
    assert [int(r.exit_stage[0]) for r in results] == [u % 4 for u in range(40)]
    assert [int(r.labels[0]) for r in results] == [u % C for u in range(40)]
    on_caller = [stage for stage, name in recorder.threads if name == threading.main_thread().name]
    assert len(on_caller) > len(recorder.threads) // 2  # after the first measurements, all of them
    for u in range(40):  # every sample ran its stages up to its exit, once each, and none after
        assert [s for s, uids in runner.calls if u in uids] == list(range(u % 4 + 1))


def test_without_a_budget_every_request_goes_through_the_worker() -> None:
    runner = ScriptedRunner(3, plan={0: 0, 1: 2})
    runner.hook = recorder = ThreadRecorder()
    sched = make(runner, inline_budget_ms=0.0)

    async def scenario() -> None:
        sched.start()
        for _ in range(5):
            await sched.submit(ids(0, 1))
        await sched.stop()

    asyncio.run(scenario())
    assert recorder.threads and all(name == "offramp-m" for _, name in recorder.threads)


def test_a_busy_model_queues_instead_of_running_direct() -> None:
    runner = ScriptedRunner(3, plan={u: 2 for u in range(8)})
    sched = make(runner)
    gate, threads = Gate(stage=1), []

    def hook(stage: int, uids: list[int]) -> None:
        if len(uids) > 4:
            gate(stage, uids)  # holds the worker inside stage 1 of the big request
        if 6 in uids:
            threads.append(threading.current_thread().name)

    async def scenario() -> tuple[InferResult, InferResult]:
        sched.start()
        for _ in range(3):  # the stages are measured: the direct path is open
            await sched.submit(ids(7))
        runner.hook = hook
        first = asyncio.ensure_future(sched.submit(ids(0, 1, 2, 3, 4, 5)))  # > 4 rows: the worker
        assert await asyncio.to_thread(gate.entered.wait, 5)
        second = asyncio.ensure_future(sched.submit(ids(6)))  # the model is busy: this one queues
        await asyncio.sleep(0.05)
        gate.release.set()
        results = await first, await second
        await sched.stop()
        return results

    first, second = asyncio.run(scenario())
    assert first.exit_stage.tolist() == [2] * 6 and second.exit_stage.tolist() == [2]
    assert threads == ["offramp-m"] * 3  # all three stages of the small request ran on the worker


@pytest.mark.parametrize("busy_budget_ms, on_caller", [(1000.0, True), (0.0, False)])
def test_a_caller_with_other_requests_runs_direct_only_within_the_busy_budget(busy_budget_ms: float,
                                                                               on_caller: bool) -> None:
    runner = ScriptedRunner(3, plan={u: u % 3 for u in range(20)})
    runner.hook = recorder = ThreadRecorder()
    sched = make(runner, inline_busy_budget_ms=busy_budget_ms)

    async def scenario() -> list[InferResult]:
        sched.start()
        try:
            for _ in range(3):  # alone: the stages are measured on the direct path
                await sched.submit(ids(19))
            recorder.threads.clear()
            return [await sched.submit(ids(u), busy=True) for u in range(12)]
        finally:
            await sched.stop()

    results = asyncio.run(scenario())
    assert [int(r.exit_stage[0]) for r in results] == [u % 3 for u in range(12)]
    names = {name for _, name in recorder.threads}
    assert names == ({threading.main_thread().name} if on_caller else {"offramp-m"})
    for u in range(12):  # either way, exits are real: no stage after a sample's exit ran for it
        assert [s for s, uids in runner.calls if u in uids] == list(range(u % 3 + 1))


def test_stage_costs_prefer_direct_runs_over_the_workers_inflated_ones() -> None:
    costs = StageCosts([100, 100, 100])
    assert costs.full_depth() is None
    for _ in range(5):
        costs.observe(0, 1, 0.004)  # worker runs that waited for the GIL
    assert costs.full_depth() == pytest.approx(3 * 0.004)  # unmeasured stages at the measured rate
    costs.observe(0, 1, 0.0001, direct=True)  # the first direct run replaces the worker's
    assert costs.full_depth() == pytest.approx(3 * 0.0001)
    for _ in range(20):
        costs.observe(0, 1, 0.004)  # later worker runs of that stage no longer count
    assert costs.full_depth() == pytest.approx(3 * 0.0001)
    for _ in range(20):
        costs.observe(1, 1, 0.0002)  # a stage with no direct run yet: its worker runs count
    assert costs.full_depth() == pytest.approx(0.0001 + 2 * 0.0002)
    for _ in range(20):
        costs.observe(0, 8, 1.0, direct=True)  # bigger than a direct request: never counted
    assert costs.full_depth() == pytest.approx(0.0001 + 2 * 0.0002) and 1.0 not in costs.recent[0]


def test_a_failing_stage_on_the_direct_path_is_a_500_and_the_model_keeps_serving() -> None:
    runner = ScriptedRunner(3, plan={1: 0, 9: 2}, poison={9})
    sched = make(runner)

    async def scenario() -> InferResult:
        sched.start()
        for _ in range(3):
            await sched.submit(ids(1))
        with pytest.raises(OfframpError) as err:
            await sched.submit(ids(9))
        assert err.value.status_code == 500 and "exploded" in err.value.message
        ok = await sched.submit(ids(1))
        await sched.stop()
        return ok

    assert asyncio.run(scenario()).exit_stage.tolist() == [0]
