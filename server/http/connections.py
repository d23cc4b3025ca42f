"""Connection hygiene under uvicorn: slow or silent clients cannot hold sockets, and the number of
open connections is bounded with a clear refusal.

uvicorn arms its keep-alive timer only after a response, so a client that opens a connection and
then sends nothing, or sends its headers a byte a second (slowloris), keeps the socket forever.
`GuardedH11Protocol` adds:

- a header deadline: from the moment a connection opens, or the first byte of the next request on
  a keep-alive connection, the request line and headers must arrive within `header_timeout_s`;
- a cap on open connections: past `max_connections`, a new connection gets a JSON 503 with
  `Connection: close` at once and is closed (it never holds a file descriptor for long).

Body deadlines are enforced where the body is read (`server.http.bodies.read_body`: 408), and the
idle keep-alive timeout is uvicorn's own `timeout_keep_alive` (`idle_timeout_s`).

`quiet_accept_errors` keeps asyncio from logging "socket.accept() out of system resource" once per
attempt (tens of thousands of lines a second when file descriptors run out): once per outage.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("offramp.connections")

ACCEPT_ERROR = "socket.accept() out of system resource"
ACCEPT_LOG_EVERY_S = 60.0


class _OncePerWhile:
    """Calls its log function at most once per `every_s`, telling it how many calls it skipped."""

    def __init__(self, every_s: float):
        self.every_s, self.last, self.skipped = every_s, -every_s, 0

    def note(self, emit: Callable[[int], None]) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s:
            self.skipped += 1
            return
        emit(self.skipped)
        self.last, self.skipped = now, 0


_REFUSALS = _OncePerWhile(ACCEPT_LOG_EVERY_S)


class _Guard:
    """The header deadline and the connection cap, over either of uvicorn's HTTP/1.1 protocols
    (`_awaiting_headers` says whether the connection is between requests or inside headers)."""

    header_timeout_s: float = 10.0
    max_connections: int = 1000
    connections: set[Any]
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_deadline: asyncio.TimerHandle | None = None

    def _awaiting_headers(self) -> bool:
        raise NotImplementedError

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        if len(self.connections) > self.max_connections:
            self._refuse(transport)
            return
        self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)  # type: ignore[misc]

    def data_received(self, data: bytes) -> None:
        if self._header_deadline is None and self._awaiting_headers():
            self._arm_header_deadline()  # the next request on a keep-alive connection starts
        super().data_received(data)  # type: ignore[misc]
        if not self._awaiting_headers():
            self._disarm_header_deadline()  # headers complete (or the connection is done)

    def _arm_header_deadline(self) -> None:
        self._disarm_header_deadline()
        self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing() and self._awaiting_headers():
            self.transport.close()

    def _refuse(self, transport: asyncio.Transport) -> None:
        body = json.dumps({"error": f"too many open connections (limit {self.max_connections}); retry later"})
        head = (f"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
                f"connection: close\r\ncontent-length: {len(body)}\r\n\r\n")
        transport.write(head.encode() + body.encode())
        transport.close()
        _REFUSALS.note(lambda skipped: log.warning(
            "refusing connections: %d open, limit %d (max_connections); %d more refusals in the last %.0f s "
            "were not logged", len(self.connections), self.max_connections, skipped, ACCEPT_LOG_EVERY_S))


class GuardedH11Protocol(_Guard, H11Protocol):
    """uvicorn's h11 protocol (pure Python), guarded."""

    def _awaiting_headers(self) -> bool:
        return self.conn.their_state is h11.IDLE


try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    HAVE_HTTPTOOLS = True
except ImportError:  # httptools is the optional `fast` extra
    HAVE_HTTPTOOLS = False

# The lean infer path hooks uvicorn's protocol where it starts a request's task (`_start_asgi_task`)
# and writes the response as its cycle would: a uvicorn without that hook serves every request
# through ASGI instead.
LEAN_SUPPORTED = HAVE_HTTPTOOLS and hasattr(HttpToolsProtocol, "_start_asgi_task")

if HAVE_HTTPTOOLS:
    from uvicorn.protocols.http.httptools_impl import STATUS_LINE, RequestResponseCycle

    class GuardedHttpToolsProtocol(_Guard, HttpToolsProtocol):
        """uvicorn's httptools protocol (the C parser of Node.js), guarded; infer requests answered
        by `lean` (`server.http.v2.LeanInfer`) when the app has one."""

        _headers_done = False
        lean: Any = None

        def _awaiting_headers(self) -> bool:
            return not self._headers_done and not self.transport.is_closing()

        def on_headers_complete(self) -> None:
            self._headers_done = True
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._headers_done = False
            super().on_message_complete()

        def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
            lean = self.lean
            # Not for uvicorn's own apps (its 503 past limit_concurrency) nor with the access log on.
            target = None if lean is None or app is not self.app or cycle.access_log else lean.target(
                cycle.scope["method"], cycle.scope["path"])
            if target is None:
                super()._start_asgi_task(cycle, app)
                return
            task = self.loop.create_task(_answer_lean(lean, target, cycle))
            lean.arrived()
            task.add_done_callback(lean.finished)
            task.add_done_callback(self.tasks.discard)
            self.tasks.add(task)

    async def _answer_lean(lean: Any, target: Any, cycle: RequestResponseCycle) -> None:
        """One infer request, answered in one write with what uvicorn's `cycle.send` does around it
        (flow control, keep-alive, `Connection: close`, the next pipelined request)."""
        try:
            status, headers, content = await lean.answer(target, cycle.scope["headers"], cycle.receive)
            if cycle.flow.write_paused and not cycle.disconnected:
                await cycle.flow.drain()
            if cycle.disconnected:
                return
            cycle.response_started, cycle.waiting_for_100_continue = True, False
            if lean.draining() or any(k == b"connection" and b"close" in v.lower() for k, v in headers):
                cycle.keep_alive = False
            parts = [STATUS_LINE[status]]
            for name, value in (*cycle.default_headers, *headers):
                if name != b"connection":
                    parts += [name, b": ", value, b"\r\n"]
            if not cycle.keep_alive:
                parts.append(b"connection: close\r\n")
            parts += [b"\r\n", content]
            cycle.transport.write(b"".join(parts))
            cycle.response_complete = True
            cycle.message_event.set()
            if not cycle.keep_alive:
                cycle.transport.close()
            cycle.on_response()
        except BaseException as exc:  # as uvicorn's run_asgi: a 500 if nothing was sent, else close
            log.error("infer request failed", exc_info=exc)
            if not cycle.response_started:
                await cycle.send_500_response()
            else:
                cycle.transport.close()
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            cycle.on_response = lambda: None


def guarded_protocol(header_timeout_s: float, max_connections: int, lean: Any = None) -> type[_Guard]:
    """The protocol class for `uvicorn.Config(http=...)` with these limits: httptools when it is
    installed (the `fast` extra), answering infer requests through `lean` when given, else h11."""
    base: type[_Guard] = GuardedHttpToolsProtocol if HAVE_HTTPTOOLS else GuardedH11Protocol
    return type(base.__name__, (base,), {"header_timeout_s": header_timeout_s, "max_connections": max_connections,
                                         "lean": lean if LEAN_SUPPORTED else None})


def quiet_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """Log asyncio's accept failures (out of file descriptors) once per outage instead of per attempt."""
    previous = loop.get_exception_handler()
    once = _OncePerWhile(ACCEPT_LOG_EVERY_S)

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if not str(context.get("message", "")).startswith(ACCEPT_ERROR):
            if previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        err = context.get("exception")
        once.note(lambda skipped: log.error(
            "cannot accept connections: %s (%s); %d more such failures in the last %.0f s were not logged; "
            "lower max_connections or raise the open-file limit", ACCEPT_ERROR, err, skipped, ACCEPT_LOG_EVERY_S))

    loop.set_exception_handler(handler)
