"""Requests that arrive in one turn of the event loop run as one batch on the direct path
(server.engine.inline.TurnBatcher), for a model within `inline_busy_budget_ms`: one run per stage
for all of them, exits real, each request answered with its own rows exactly as alone."""

from __future__ import annotations

import asyncio
import threading

import numpy as np

from server.errors import OfframpError
from server.interface import InferResult
from server.policy import ExitPolicy
from tests.server.test_scheduler import ArithmeticRunner, ScriptedRunner, ThreadRecorder, ids, make


async def _warm(sched, uid: int) -> None:  # noqa: ANN001
    """Three lone requests: the stages are measured on the direct path, which is then open."""
    for _ in range(3):
        await sched.submit(ids(uid))


def test_requests_of_one_turn_run_as_one_batch_and_exit_for_real() -> None:
    plan = {u: u % 3 for u in range(12)}
    runner = ScriptedRunner(3, plan=plan)
    runner.hook = recorder = ThreadRecorder()
    sched = make(runner)

    async def scenario() -> list[InferResult]:
        sched.start()
        try:
            await _warm(sched, 11)
            runner.calls.clear()
            recorder.threads.clear()
            return await asyncio.gather(*(sched.submit(ids(u), busy=True) for u in range(8)))  # max_batch_size
        finally:
            await sched.stop()

    results = asyncio.run(scenario())
    assert [r.exit_stage.tolist() for r in results] == [[u % 3] for u in range(8)]
    assert [r.labels.tolist() for r in results] == [[u % 4] for u in range(8)]
    # one run per stage for all eight; the rows that left never ran again
    assert runner.calls == [(0, list(range(8))), (1, [1, 2, 4, 5, 7]), (2, [2, 5])]
    assert {name for _, name in recorder.threads} == {threading.main_thread().name}


def test_batched_answers_equal_answers_alone() -> None:
    runner = ArithmeticRunner(num_stages=4)
    policy = ExitPolicy("max_prob", (0.6, 0.7, 0.8), 1)
    runner.hook = recorder = ThreadRecorder()
    sched = make(runner, policy=policy)
    rng = np.random.default_rng(3)
    rows = [np.concatenate([[u], rng.normal(0, 1, 6)])[None, :] for u in range(10)]

    async def scenario() -> list[InferResult]:
        sched.start()
        try:
            await sched.submit(rows[0])
            await sched.submit(rows[0])
            runner.calls.clear()
            recorder.threads.clear()
            return await asyncio.gather(*(sched.submit(r, busy=True, early_exit=u % 4 != 0)
                                          for u, r in enumerate(rows)))
        finally:
            await sched.stop()

    for u, (r, result) in enumerate(zip(rows, asyncio.run(scenario()), strict=True)):
        label, probs, stage = runner.reference(r[0], policy, early_exit=u % 4 != 0)
        assert result.labels.tolist() == [label] and result.exit_stage.tolist() == [stage]
        np.testing.assert_allclose(result.probabilities[0], probs, rtol=1e-6)
    # two batches on the direct path, one per early_exit flag
    assert sorted(uids for stage, uids in runner.calls if stage == 0) == [[0, 4, 8], [1, 2, 3, 5, 6, 7, 9]]
    assert {name for _, name in recorder.threads} == {threading.main_thread().name}


def test_a_turn_batch_respects_max_batch_size() -> None:
    runner = ScriptedRunner(2, plan={u: 0 for u in range(10)})
    runner.hook = recorder = ThreadRecorder()
    sched = make(runner, max_batch_size=4)

    async def scenario() -> None:
        sched.start()
        await _warm(sched, 9)
        runner.calls.clear()
        recorder.threads.clear()
        await asyncio.gather(*(sched.submit(ids(u, u + 100), busy=True) for u in range(5)))
        await sched.stop()

    asyncio.run(scenario())
    assert [len(uids) for stage, uids in runner.calls if stage == 0] == [4, 4, 2]
    assert {name for _, name in recorder.threads} == {threading.main_thread().name}  # on the direct path


def test_a_caller_that_left_is_not_run_and_a_failure_reaches_every_request_of_the_batch() -> None:
    runner = ScriptedRunner(3, plan={0: 0, 1: 0, 2: 2, 3: 2}, poison={3})
    sched = make(runner)

    async def scenario() -> list[object]:
        sched.start()
        try:
            await _warm(sched, 0)
            runner.calls.clear()
            gone = asyncio.ensure_future(sched.submit(ids(1), busy=True))
            others = [asyncio.ensure_future(sched.submit(ids(u), busy=True)) for u in (2, 3)]
            await asyncio.sleep(0)  # both submitted; the batch runs at the next turn
            gone.cancel()
            results = await asyncio.gather(*others, return_exceptions=True)
            return [*results, await sched.submit(ids(0))]  # the model serves on
        finally:
            await sched.stop()

    failed_2, failed_3, ok = asyncio.run(scenario())
    assert 1 not in runner.uids_at(0)
    for err in (failed_2, failed_3):  # sample 3 broke stage 1 of the batch both were in
        assert isinstance(err, OfframpError) and err.status_code == 500
    assert isinstance(ok, InferResult) and ok.exit_stage.tolist() == [0]


def test_when_the_worker_has_work_the_turn_joins_its_queues() -> None:
    runner = ScriptedRunner(3, plan={u: 2 for u in range(10)})
    runner.hook = recorder = ThreadRecorder()
    sched = make(runner)

    async def scenario() -> list[InferResult]:
        sched.start()
        try:
            await _warm(sched, 9)
            recorder.threads.clear()
            turn = [asyncio.ensure_future(sched.submit(ids(u), busy=True)) for u in (0, 1, 2)]
            await asyncio.sleep(0)  # all three wait for their turn's batch
            assert len(sched._turn._waiting) == 3
            assert sched._claim_direct(1)  # another caller takes the model before the batch runs
            try:
                for _ in range(3):  # the batch finds it claimed: its requests go to the worker's queues
                    await asyncio.sleep(0)
                assert sched._load == 1 + 3 and not sched._turn._waiting
                turn[2].cancel()  # a caller that leaves while queued takes its rows out of the queues
                await asyncio.sleep(0.01)
                assert sched._load == 1 + 2
            finally:
                with sched._cond:  # ... the other caller gives the model back
                    sched._direct, sched._load = False, sched._load - 1
                    sched._cond.notify_all()
            results = list(await asyncio.gather(*turn[:2]))
            assert sched._load == 0
            return results
        finally:
            await sched.stop()

    results = asyncio.run(scenario())
    assert [r.exit_stage.tolist() for r in results] == [[2], [2]]
    assert {name for _, name in recorder.threads} == {"offramp-m"}  # all their stages ran on the worker
    assert 2 not in runner.uids_at(0)  # the one that left never ran


def test_without_a_busy_budget_nothing_is_gathered() -> None:
    runner = ScriptedRunner(2, plan={u: 0 for u in range(6)})
    runner.hook = recorder = ThreadRecorder()
    sched = make(runner, inline_busy_budget_ms=0.0)

    async def scenario() -> None:
        sched.start()
        await _warm(sched, 5)
        recorder.threads.clear()
        await asyncio.gather(*(sched.submit(ids(u), busy=True) for u in range(4)))
        await sched.stop()

    asyncio.run(scenario())
    assert {name for _, name in recorder.threads} == {"offramp-m"}


def test_rows_of_different_sample_shapes_batch_apart() -> None:
    """An input spec with a -1 in the sample shape lets requests differ: each shape its own batch."""
    runner = ScriptedRunner(2, plan={u: 0 for u in range(8)})
    sched = make(runner)

    def wide(*uids: int) -> np.ndarray:
        x = np.zeros((len(uids), 5))
        x[:, 0] = uids
        return x

    async def scenario() -> list[InferResult]:
        sched.start()
        try:
            await _warm(sched, 7)
            runner.calls.clear()
            return list(await asyncio.gather(sched.submit(ids(0), busy=True), sched.submit(wide(1), busy=True),
                                             sched.submit(ids(2), busy=True), sched.submit(wide(3), busy=True)))
        finally:
            await sched.stop()

    results = asyncio.run(scenario())
    assert [r.exit_stage.tolist() for r in results] == [[0]] * 4
    assert sorted(uids for _, uids in runner.calls) == [[0, 2], [1, 3]]


def test_a_model_that_stops_fails_the_gathered_requests_instead_of_leaving_them_waiting() -> None:
    runner = ScriptedRunner(2, plan={u: 0 for u in range(4)})
    sched = make(runner)

    async def scenario() -> list[object]:
        sched.start()
        await _warm(sched, 3)
        turn = [asyncio.ensure_future(sched.submit(ids(u), busy=True)) for u in (0, 1)]
        await asyncio.sleep(0)  # both wait for the next turn
        sched._accepting = False  # the model stops accepting before their batch runs
        results = await asyncio.wait_for(asyncio.gather(*turn, return_exceptions=True), 5)
        sched._accepting = True
        await sched.stop()
        return list(results)

    for err in asyncio.run(scenario()):
        assert isinstance(err, OfframpError) and err.status_code == 503
