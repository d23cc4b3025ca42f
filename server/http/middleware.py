"""Pure ASGI middleware of the app: draining on SIGTERM, and `Allow` that lists every method.

- Draining (`app.state.draining` set by the signal handler, server.cli): requests that arrive on
  open keep-alive connections get 503 with `Connection: close` and `Retry-After`, except the
  health routes; responses of requests already in flight carry `Connection: close`. Clients
  move to another replica instead of finding their connection closed under them.
- `OPTIONS` on a route answers 204 with `Allow` naming every method of that path, and a 405 lists
  them all too (Starlette's router names only the methods of the first route it tried).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server import jsonio

HEALTH_PREFIX = "/v2/health/"


def route_methods(routes: Iterable[Any]) -> list[tuple[re.Pattern[str], frozenset[str]]]:
    """(path pattern, methods) of every API route."""
    table: dict[str, tuple[re.Pattern[str], set[str]]] = {}
    for route in routes:
        if isinstance(route, APIRoute):
            pattern, methods = table.setdefault(route.path, (route.path_regex, set()))
            methods.update(route.methods or ())
    return [(pattern, frozenset(methods | {"OPTIONS"})) for pattern, methods in table.values()]


class ServingMiddleware:
    """See the module docstring. `draining()` says whether the server is draining."""

    def __init__(self, app: ASGIApp, *, draining: Callable[[], bool],
                 methods: list[tuple[re.Pattern[str], frozenset[str]]]):
        self.app, self.draining, self.methods = app, draining, methods

    def _allowed(self, path: str) -> frozenset[str] | None:
        found = [m for pattern, m in self.methods if pattern.match(path)]
        return frozenset().union(*found) if found else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        draining = self.draining()
        if draining and not path.startswith(HEALTH_PREFIX):
            await _answer(send, 503, {"error": "the server is shutting down: retry on another replica"},
                          [(b"retry-after", b"1"), (b"connection", b"close")])
            return

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                allowed = self._allowed(path) if message["status"] == 405 else None
                if allowed is not None:
                    headers = [h for h in headers if h[0].lower() != b"allow"]
                    headers.append((b"allow", ", ".join(sorted(allowed)).encode()))
                if draining or self.draining():
                    headers = closing(headers)
                message = {**message, "headers": headers}
            await send(message)

        allowed = self._allowed(path) if method == "OPTIONS" else None
        if allowed is not None:
            await _answer(send, 204, None, [(b"allow", ", ".join(sorted(allowed)).encode())])
            return
        await self.app(scope, receive, send_wrapper)


def closing(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Response headers telling the client to close the connection (the server is draining)."""
    return [h for h in headers if h[0].lower() != b"connection"] + [(b"connection", b"close")]


async def _answer(send: Send, status: int, doc: dict[str, str] | None, headers: list[tuple[bytes, bytes]]) -> None:
    body = b"" if doc is None else jsonio.dumps(doc)
    head = [(b"content-length", str(len(body)).encode()), *headers]
    if doc is not None:
        head.append((b"content-type", b"application/json"))
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})
