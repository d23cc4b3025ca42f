"""Hardening: what an attacker or an unlucky operator tries, each case reproduced first.

Slow and idle connections are closed within their (small, here) timeouts; numbers and nesting that
break a JSON parser are 400s; admin bodies are capped while they are read; weak tokens and broken
state paths stop start-up in one line; OpenAPI says what the routes do; SIGTERM tells keep-alive
clients to go; the admin API can have its own port; an emptied policy store is seeded with the
running policy, never the bundle default.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from server.control.policies import PolicyControl
from server.control.store import FilePolicyStore
from server.http.app import create_app
from server.metrics import Metrics
from server.policy import ExitPolicy
from server.settings import Settings
from tests.fakes import REPO, FakeEngine, ServerProcess, build_onnx_bundle, fake_manifest, free_port

TOKEN = "hardening-token-8a7c1f"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MODEL = "helper-dense"
SHORT = ("--header-timeout-s", "0.5", "--body-timeout-s", "0.5", "--idle-timeout-s", "1",
         "--max-connections", "8", "--drain-grace-s", "1.5", "--admin-token", TOKEN)
CLOSE_BOUND_S = 5.0  # a closed connection shows within this; only turns a hang into a failure


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_onnx_bundle(tmp_path_factory.mktemp("hardening") / "bundle")


@pytest.fixture(scope="module")
def server(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(bundle, tmp_path_factory.mktemp("cache"), *SHORT)
    yield proc
    proc.stop()


def _closed_within(sock: socket.socket, bound_s: float) -> tuple[bool, bytes]:
    """Whether the server closed `sock` within `bound_s`, and what it sent before closing."""
    sock.settimeout(0.1)
    got = b""
    deadline = time.monotonic() + bound_s
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            return True, got
        if not chunk:
            return True, got
        got += chunk
    return False, got


def _connect(server: ServerProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=2)


def _infer_body() -> bytes:
    return json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 8, 8],
                                   "data": [1.0] * 64}]}).encode()


# -- slow and idle connections --------------------------------------------------------------------


def test_an_idle_connection_is_closed_after_the_header_timeout(server: ServerProcess) -> None:
    with _connect(server) as sock:
        closed, _ = _closed_within(sock, CLOSE_BOUND_S)
    assert closed


def test_slowloris_headers_are_cut_off(server: ServerProcess) -> None:
    request = f"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Slow: {'a' * 40}\r\n\r\n".encode()
    started = time.monotonic()
    with _connect(server) as sock:
        closed = False
        for byte in request:  # one byte every 50 ms: the whole request would take > 3 s
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            done, _ = _closed_within(sock, 0.05)
            if done:
                closed = True
                break
    assert closed and time.monotonic() - started < CLOSE_BOUND_S


@pytest.mark.parametrize("sent", [0, 10])
def test_a_body_shorter_than_its_content_length_gets_408_and_a_close(server: ServerProcess, sent: int) -> None:
    head = (f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: 100\r\n\r\n").encode()
    with _connect(server) as sock:
        sock.sendall(head + b"{" * sent)
        closed, answer = _closed_within(sock, CLOSE_BOUND_S)
    assert closed and answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"error"' in answer and b"did not arrive within" in answer
    assert httpx.get(server.url + "/v2/health/ready").status_code == 200


def test_a_keep_alive_connection_without_a_next_request_is_closed(server: ServerProcess) -> None:
    with _connect(server) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        closed, answer = _closed_within(sock, CLOSE_BOUND_S)
    assert answer.startswith(b"HTTP/1.1 200") and closed


def test_connections_past_the_limit_are_refused_with_a_json_503(server: ServerProcess) -> None:
    held = [_connect(server) for _ in range(8)]
    try:
        with _connect(server) as extra:
            closed, answer = _closed_within(extra, CLOSE_BOUND_S)
        assert closed and answer.startswith(b"HTTP/1.1 503"), answer[:200]
        assert b"too many open connections" in answer
    finally:
        for sock in held:
            sock.close()
    for _ in range(100):  # bounded: the server notices the closed sockets at once
        if httpx.get(server.url + "/v2/health/ready").status_code == 200:
            break
        time.sleep(0.05)
    assert httpx.post(f"{server.url}/v2/models/{MODEL}/infer", content=_infer_body()).status_code == 200


def test_accept_errors_are_logged_once_per_outage(caplog: pytest.LogCaptureFixture) -> None:
    from server.http.connections import ACCEPT_ERROR, quiet_accept_errors

    loop = asyncio.new_event_loop()
    try:
        quiet_accept_errors(loop)
        with caplog.at_level(logging.ERROR, logger="offramp.connections"):
            for _ in range(1000):
                loop.call_exception_handler({"message": ACCEPT_ERROR, "exception": OSError(24, "Too many")})
    finally:
        loop.close()
    assert sum(ACCEPT_ERROR in r.getMessage() for r in caplog.records) == 1


# -- numbers and nesting that break a JSON parser -------------------------------------------------


BIG = "9" * 5000


@pytest.mark.parametrize("body", [
    '{"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [' + BIG + ', 8, 8], "data": []}]}',
    '{"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 8, 8], "data": [' + BIG + "]}]}",
    '{"id": ' + BIG + ', "inputs": []}',
    '{"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1], "data": [1e400]}]}',
    "[" * 20000 + "]" * 20000,
], ids=["shape", "data", "id", "1e400", "nesting"])
def test_hostile_json_is_a_400_not_a_500(body: str) -> None:
    metrics = Metrics()
    with TestClient(create_app(Settings(), engine=FakeEngine(), metrics=metrics)) as client:
        response = client.post("/v2/models/digits/infer", content=body.encode())
    assert response.status_code == 400 and "JSON" in response.json()["error"], response.text
    assert metrics.registry.get_sample_value("offramp_requests_total",
                                             {"model": "digits", "outcome": "error"}) is None


@pytest.fixture
def admin(tmp_path: Path) -> Iterator[TestClient]:
    engine = FakeEngine()
    app = create_app(Settings(admin_token=TOKEN, state_dir=tmp_path / "state"), engine=engine)
    with TestClient(app) as client:
        yield client


@pytest.mark.parametrize("body", [
    '{"thresholds": [1' + "0" * 400 + ", 0.5]}",
    '{"thresholds": [' + BIG + ", 0.5]}",
    '{"thresholds": ' + "[" * 20000 + "]" * 20000 + "}",
], ids=["10^400", "5000 digits", "nesting"])
def test_hostile_json_on_the_admin_api_is_a_400(admin: TestClient, body: str) -> None:
    response = admin.put("/admin/models/digits/exit-policy", content=body.encode(), headers=AUTH)
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"], response.text


def test_admin_bodies_are_capped_while_they_are_read(tmp_path: Path) -> None:
    app = create_app(Settings(admin_token=TOKEN, state_dir=tmp_path / "state"), engine=FakeEngine())
    consumed = 0

    async def chunks() -> AsyncIterator[bytes]:  # 50 MB, chunked: no Content-Length to refuse up front
        nonlocal consumed
        for _ in range(50):
            consumed += 1
            yield b" " * (1024 * 1024)

    async def put() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await client.put("/admin/models/digits/exit-policy", content=chunks(), headers=AUTH)

    response = asyncio.run(put())
    assert response.status_code == 413
    assert consumed <= 2  # refused after the first chunk past 64 KiB, the rest never read


# -- start-up refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize("token", ["a", "12345678", "aaaaaaaaaaaaaaaaaaaa", "abcdefghijklmnop"])
def test_weak_admin_tokens_are_refused(token: str) -> None:
    with pytest.raises(ValueError, match="too weak|placeholder"):
        Settings(admin_token=token)


def test_strong_admin_tokens_are_accepted() -> None:
    assert Settings(admin_token="9f86d081884c7d659a2feaa0c55ad015").admin_token is not None


def _serve(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "offramp.cli", "serve", "--host", "127.0.0.1", "--port", "0",
                           *argv], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_a_weak_token_stops_start_up_in_one_line(bundle: Path) -> None:
    result = _serve("--bundle", str(bundle), "--admin-token", "12345678")
    assert result.returncode == 2 and "too weak" in result.stderr and "Traceback" not in result.stderr


def test_a_state_dir_that_is_a_file_stops_start_up_in_one_line(bundle: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.write_text("not a directory")
    result = _serve("--bundle", str(bundle), "--state-dir", str(state))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert str(state) in result.stderr and "--state-dir" in result.stderr


def test_a_policy_path_that_is_a_directory_stops_start_up_in_one_line(bundle: Path, tmp_path: Path) -> None:
    (tmp_path / "state" / f"{MODEL}.policy.json").mkdir(parents=True)
    result = _serve("--bundle", str(bundle), "--state-dir", str(tmp_path / "state"))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"{MODEL}.policy.json is a directory" in result.stderr


# -- OpenAPI as the routes are ------------------------------------------------------------------------


def test_openapi_describes_the_routes_as_they_are() -> None:
    client = TestClient(create_app(Settings(admin_token=TOKEN), engine=FakeEngine()))
    spec = client.get("/openapi.json").json()
    infer = spec["paths"]["/v2/models/{model}/infer"]["post"]
    assert [p["name"] for p in infer.get("parameters", [])] == ["model"]  # no `version` query parameter
    assert {"400", "404", "503"} <= set(infer["responses"]) and "422" not in infer["responses"]
    admin = spec["paths"]["/admin/models/{model}/exit-policy"]
    assert admin["get"]["security"] and admin["put"]["security"]
    assert "bearer" in json.dumps(spec["components"]["securitySchemes"]).lower()
    assert client.get("/docs").status_code == 404  # its page would load scripts from a public CDN


def test_a_version_query_parameter_is_not_a_version() -> None:
    client = TestClient(create_app(Settings(), engine=FakeEngine()))
    response = client.post("/v2/models/digits/infer?version=7", content=_infer_body())
    assert response.status_code == 200, response.text


def test_options_and_405_name_every_method_of_the_path() -> None:
    client = TestClient(create_app(Settings(admin_token=TOKEN), engine=FakeEngine()))
    options = client.options("/admin/models/digits/exit-policy")
    assert options.status_code == 204 and options.headers["allow"] == "GET, OPTIONS, PUT"
    wrong = client.delete("/admin/models/digits/exit-policy")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "GET, OPTIONS, PUT"


# -- SIGTERM with keep-alive clients, and the admin port ------------------------------------------


def test_sigterm_tells_keep_alive_clients_to_go(bundle: Path, tmp_path: Path) -> None:
    proc = ServerProcess(bundle, tmp_path, *SHORT)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", proc.port, timeout=10)
        conn.request("POST", f"/v2/models/{MODEL}/infer", body=_infer_body())
        first = conn.getresponse()
        first.read()
        assert first.status == 200 and first.getheader("connection") != "close"
        proc.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)  # the signal has arrived; the grace period (1.5 s) is running
        conn.request("POST", f"/v2/models/{MODEL}/infer", body=_infer_body())
        second = conn.getresponse()  # an answer, not a reset connection
        assert second.status == 503 and second.getheader("connection") == "close"
        assert "shutting down" in json.loads(second.read())["error"]
        assert proc.proc.wait(30) == 0
    finally:
        proc.stop()


def test_the_admin_api_can_have_its_own_port(bundle: Path, tmp_path: Path) -> None:
    inference, admin_port = free_port(), free_port()
    proc = ServerProcess(bundle, tmp_path, "--admin-token", TOKEN, "--admin-port", str(admin_port), port=inference)
    try:
        path = f"/admin/models/{MODEL}/exit-policy"
        assert httpx.get(f"http://127.0.0.1:{admin_port}{path}", headers=AUTH).json()["model"] == MODEL
        assert httpx.get(f"{proc.url}{path}", headers=AUTH).status_code == 404
        assert httpx.post(f"{proc.url}/v2/models/{MODEL}/infer", content=_infer_body()).status_code == 200
        assert proc.terminate() == 0
    finally:
        proc.stop()


# -- an empty store is seeded with the running policy ----------------------------------------------


@pytest.mark.parametrize("call", ["get", "put-without-criterion", "calibrate"])
def test_an_empty_store_is_seeded_with_the_running_policy(tmp_path: Path, call: str) -> None:
    manifest = fake_manifest()
    running = ExitPolicy("margin", (0.25, 0.5), 4)  # what operators set; the bundle default is max_prob 0.9
    engine = FakeEngine(policy_=running)
    store = FilePolicyStore(tmp_path / "emptied")  # e.g. Redis restarted without its data
    control = PolicyControl(engine, store)
    if call == "get":
        seen = control.current(manifest.name)
        assert seen.same_as(running)
    elif call == "put-without-criterion":
        changed = control.put(manifest.name, None, [0.3, None], None)
        assert changed.criterion == "margin"  # the running criterion, not the default's
    else:
        with pytest.raises(Exception, match="calibrat"):  # the fake bundle has no calibration data
            control.calibrate(manifest.name, {"target_agreement": 0.9}, None, True, None)
    assert store.history(manifest.name)[0].same_as(running)
    assert not any(h.same_as(manifest.default_policy) for h in store.history(manifest.name))


# -- several worker processes on one port -----------------------------------------------------------


def test_workers_share_one_port_and_a_policy_change_reaches_all(bundle: Path, tmp_path: Path) -> None:
    proc = ServerProcess(bundle, tmp_path, "--workers", "2", "--admin-token", TOKEN, "--drain-grace-s", "0")
    try:
        body = _infer_body()

        def stages_seen() -> set[int]:
            seen = set()
            for _ in range(30):  # new connections: the kernel spreads them over both workers
                r = httpx.post(f"{proc.url}/v2/models/{MODEL}/infer", content=body)
                assert r.status_code == 200, r.text
                seen |= set(next(o["data"] for o in r.json()["outputs"] if o["name"] == "exit_stage"))
            return seen

        for thresholds, want in (([None, None], {2}), ([0.0, 0.0], {0})):  # all at full depth, then none
            r = httpx.put(f"{proc.url}/admin/models/{MODEL}/exit-policy", json={"thresholds": thresholds},
                          headers=AUTH)
            assert r.status_code == 200, r.text
            deadline = time.monotonic() + CLOSE_BOUND_S
            while stages_seen() != want:  # every worker answers so once it has read the change
                assert time.monotonic() < deadline, f"a worker never picked up {thresholds}"
                time.sleep(0.2)
        pids = {line.split("[")[1].split("]")[0] for line in proc.lines if "Started server process" in line}
        assert len(pids) == 2  # two processes served
        # the worker that did not take a PUT applied it from the state directory
        assert sum("from the policy store" in line for line in proc.lines) >= 2, proc.log
        assert proc.terminate() == 0
    finally:
        proc.stop()


# -- the guarded protocol on both of uvicorn's HTTP/1.1 parsers ------------------------------------


@pytest.mark.parametrize("parser", ["h11", "httptools"])
def test_both_parsers_cut_off_silent_and_slow_clients(parser: str) -> None:
    import threading

    import uvicorn

    from server.http import connections

    if parser == "httptools" and not connections.HAVE_HTTPTOOLS:
        pytest.skip("httptools (the fast extra) is not installed")
    base = connections.GuardedHttpToolsProtocol if parser == "httptools" else connections.GuardedH11Protocol
    protocol = type(base.__name__, (base,), {"header_timeout_s": 0.3, "max_connections": 2})

    async def app(scope: dict, receive: object, send: object) -> None:  # type: ignore[type-arg]
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": b"ok"})  # type: ignore[operator]

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http=protocol, lifespan="off",
                                           log_level="warning", timeout_keep_alive=1))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(200):  # bounded: the server binds within milliseconds
            if server.started:
                break
            time.sleep(0.02)
        with socket.create_connection(("127.0.0.1", port)) as silent:
            assert _closed_within(silent, CLOSE_BOUND_S)[0]  # no bytes at all: closed at the header deadline
        with socket.create_connection(("127.0.0.1", port)) as slow:
            slow.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # headers never finish
            assert _closed_within(slow, CLOSE_BOUND_S)[0]
        with socket.create_connection(("127.0.0.1", port)) as ok:
            ok.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _closed_within(ok, CLOSE_BOUND_S)[1].startswith(b"HTTP/1.1 200")
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        try:
            with socket.create_connection(("127.0.0.1", port)) as extra:
                assert _closed_within(extra, CLOSE_BOUND_S)[1].startswith(b"HTTP/1.1 503")
        finally:
            for sock in held:
                sock.close()
    finally:
        server.should_exit = True
        thread.join(10)
