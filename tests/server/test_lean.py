"""The lean infer path below ASGI (server.http.connections, server.http.v2.LeanInfer): uvicorn's
httptools protocol over a recording transport, so every write is seen. Infer requests are answered
by the lean handler in one write with uvicorn's keep-alive, pipelining and close rules; everything
else, and infer while draining, still reaches the ASGI app. The real server runs this path in every
test that starts `offramp serve` (tests/fakes.py ServerProcess) when httptools is installed."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

pytest.importorskip("httptools")

from uvicorn.config import Config  # noqa: E402
from uvicorn.server import ServerState  # noqa: E402

from server.http.connections import LEAN_SUPPORTED, guarded_protocol  # noqa: E402
from server.http.v2 import infer_target  # noqa: E402

BODY = b'{"inputs": []}'


class RecordingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = self.closed_by_server = False

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 40000)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class FakeLean:
    """What LeanInfer answers, scripted: the body it read is echoed back."""

    def __init__(self, fail: bool = False, headers: list[tuple[bytes, bytes]] | None = None):
        self.fail, self.headers, self.draining_now, self.seen = fail, headers or [], False, []
        self.in_progress, self.most = 0, 0

    def target(self, method: str, path: str) -> Any:
        return None if self.draining_now else infer_target(method, path)

    def draining(self) -> bool:
        return self.draining_now

    def arrived(self) -> None:
        self.in_progress += 1

    def finished(self, _: Any = None) -> None:
        self.in_progress -= 1

    async def answer(self, target: Any, headers: list[tuple[bytes, bytes]], receive: Any) -> Any:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.seen.append((target, body))
        self.most = max(self.most, self.in_progress)
        if self.fail:
            raise RuntimeError("boom")
        return 200, [(b"content-type", b"application/json"), *self.headers,
                     (b"content-length", str(len(body)).encode())], body


async def asgi_app(scope: Any, receive: Any, send: Any) -> None:
    """The framework path: anything the lean handler does not take."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 299, "headers": [(b"content-length", b"3")]})
    await send({"type": "http.response.body", "body": b"app"})


def request(path: str = "/v2/models/m/infer", body: bytes = BODY, method: str = "POST", extra: str = "") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-length: {len(body)}\r\n{extra}\r\n").encode() + body


def exchange(lean: FakeLean, *chunks: bytes, settle: int = 20) -> RecordingTransport:
    async def run() -> RecordingTransport:
        config = Config(app=asgi_app, lifespan="off", log_config=None, access_log=False)
        config.load()
        cls = guarded_protocol(10.0, 100, lean)
        state = ServerState()
        state.default_headers = [(b"server", b"uvicorn"), (b"date", b"today")]  # as uvicorn.Server sets
        protocol = cls(config=config, server_state=state, app_state={})  # type: ignore[call-arg]
        transport = RecordingTransport()
        protocol.connection_made(transport)  # type: ignore[attr-defined]
        for chunk in chunks:
            protocol.data_received(chunk)  # type: ignore[attr-defined]
            for _ in range(settle):  # let the request's task run to its answer
                await asyncio.sleep(0)
        transport.closed_by_server = transport.closed
        protocol.connection_lost(None)  # type: ignore[attr-defined]
        return transport

    return asyncio.run(run())


def test_the_installed_uvicorn_has_the_hook_the_lean_path_needs() -> None:
    assert LEAN_SUPPORTED  # else every request would quietly take the slower ASGI path


def test_an_infer_request_is_answered_by_the_lean_handler_in_one_write() -> None:
    lean = FakeLean()
    transport = exchange(lean, request(body=b'{"a": 1}'))
    assert lean.seen == [(("m", None), b'{"a": 1}')]
    assert len(transport.writes) == 1
    head, _, body = transport.writes[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"content-length: 8" in head
    assert b"server: uvicorn" in head and b"date: " in head  # uvicorn's default headers too
    assert b"connection" not in head and body == b'{"a": 1}' and not transport.closed_by_server
    assert lean.most == 1 and lean.in_progress == 0  # counted in progress while it ran, and no longer


def test_requests_read_in_one_turn_count_each_other_as_in_progress() -> None:
    lean = FakeLean()

    async def run() -> None:
        config = Config(app=asgi_app, lifespan="off", log_config=None, access_log=False)
        config.load()
        cls = guarded_protocol(10.0, 100, lean)
        protocols = [cls(config=config, server_state=ServerState(), app_state={})  # type: ignore[call-arg]
                     for _ in range(3)]
        for p in protocols:  # three connections readable in the same turn of the loop
            p.connection_made(RecordingTransport())  # type: ignore[attr-defined]
            p.data_received(request())  # type: ignore[attr-defined]
        for _ in range(20):
            await asyncio.sleep(0)

    asyncio.run(run())
    assert len(lean.seen) == 3 and lean.most == 3 and lean.in_progress == 0


def test_the_versioned_path_names_its_version_and_other_routes_reach_the_app() -> None:
    lean = FakeLean()
    transport = exchange(lean, request("/v2/models/m/versions/3/infer"), request("/v2/health/live", b"", "GET"))
    assert lean.seen == [(("m", "3"), BODY)]
    assert transport.writes[0].startswith(b"HTTP/1.1 200 OK")
    assert b"".join(transport.writes[1:]).startswith(b"HTTP/1.1 299 ")  # the ASGI app answered


def test_pipelined_requests_are_answered_in_order_on_one_connection() -> None:
    lean = FakeLean()
    transport = exchange(lean, request(body=b"[1]") + request(body=b"[2]") + request(body=b"[3]"))
    assert [body for _, body in lean.seen] == [b"[1]", b"[2]", b"[3]"]
    assert [w.partition(b"\r\n\r\n")[2] for w in transport.writes] == [b"[1]", b"[2]", b"[3]"]
    assert not transport.closed_by_server


def test_a_body_in_several_packets_is_read_whole() -> None:
    lean = FakeLean()
    whole = request(body=b'{"inputs": [1, 2, 3]}')
    transport = exchange(lean, whole[:30], whole[30:45], whole[45:])
    assert lean.seen == [(("m", None), b'{"inputs": [1, 2, 3]}')] and len(transport.writes) == 1


@pytest.mark.parametrize("how", ["error header", "http/1.0", "client asks"])
def test_connection_close_is_honoured(how: str) -> None:
    lean = FakeLean(headers=[(b"connection", b"close")] if how == "error header" else [])
    raw = request(extra="connection: close\r\n" if how == "client asks" else "")
    if how == "http/1.0":
        raw = raw.replace(b"HTTP/1.1", b"HTTP/1.0")
    transport = exchange(lean, raw)
    head = transport.writes[0].partition(b"\r\n\r\n")[0]
    assert head.count(b"connection: close") == 1 and transport.closed_by_server


def test_infer_while_draining_goes_to_the_app_and_a_request_that_sees_draining_start_closes() -> None:
    lean = FakeLean()
    lean.draining_now = True
    transport = exchange(lean, request())
    assert lean.seen == [] and b"".join(transport.writes).startswith(b"HTTP/1.1 299 ")

    class DrainsMidway(FakeLean):
        async def answer(self, *args: Any) -> Any:
            self.draining_now = True  # SIGTERM arrives while the request runs
            return await super().answer(*args)

    late = DrainsMidway()
    transport = exchange(late, request())
    assert b"connection: close" in transport.writes[0] and transport.closed_by_server


def test_a_failing_handler_is_a_500_and_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    transport = exchange(FakeLean(fail=True), request())
    assert b"".join(transport.writes).startswith(b"HTTP/1.1 500 ")
    assert "infer request failed" in caplog.text


def test_without_a_lean_handler_infer_reaches_the_app() -> None:
    async def run() -> bytes:
        config = Config(app=asgi_app, lifespan="off", log_config=None, access_log=False)
        config.load()
        protocol = guarded_protocol(10.0, 100)(config=config, server_state=ServerState(),  # type: ignore[call-arg]
                                               app_state={})
        transport = RecordingTransport()
        protocol.connection_made(transport)  # type: ignore[attr-defined]
        protocol.data_received(request())  # type: ignore[attr-defined]
        for _ in range(20):
            await asyncio.sleep(0)
        return b"".join(transport.writes)

    assert asyncio.run(run()).startswith(b"HTTP/1.1 299 ")


def test_the_served_app_answers_infer_through_its_lean_route_in_one_write() -> None:
    """What `offramp serve` builds: the app's own LeanInfer wired into uvicorn's protocol class."""
    from server.cli import uvicorn_config
    from server.http.app import create_app
    from server.settings import Settings
    from tests.fakes import FakeEngine

    app = create_app(Settings(), engine=FakeEngine())
    config = uvicorn_config(app, Settings(), 8000, "off")
    assert config.http.lean is app.lean  # type: ignore[union-attr]
    doc = json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [2, 8, 8],
                                  "data": [0.0] * 128}]}).encode()
    bad = b'{"inputs": [1,'

    async def run() -> RecordingTransport:
        config.load()
        protocol = config.http(config=config, server_state=ServerState(), app_state={})  # type: ignore[operator]
        transport = RecordingTransport()
        protocol.connection_made(transport)
        protocol.data_received(request("/v2/models/digits/infer", doc) + request("/v2/models/digits/infer", bad))
        for _ in range(40):
            await asyncio.sleep(0)
        return transport

    transport = asyncio.run(run())
    assert len(transport.writes) == 2  # one write per response
    ok_head, _, ok_body = transport.writes[0].partition(b"\r\n\r\n")
    assert ok_head.startswith(b"HTTP/1.1 200 OK") and json.loads(ok_body)["outputs"][0]["data"] == [0, 1]
    bad_head, _, bad_body = transport.writes[1].partition(b"\r\n\r\n")
    assert bad_head.startswith(b"HTTP/1.1 400 ") and "malformed JSON" in json.loads(bad_body)["error"]
    assert app.state.in_progress == 0
