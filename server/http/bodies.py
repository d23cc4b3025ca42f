"""Request bodies: read with a size limit, decode JSON, validate against a schema, one error format.

Shared by the V2 routes and the admin routes. Every problem a client can cause is an
`OfframpError` carrying its status (413, 400, 422), which the app's handler turns into
`{"error": "..."}`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from server import jsonio
from server.errors import BadRequest, BodyTimeout, OfframpError, PayloadTooLarge, Unprocessable, validation_problems

M = TypeVar("M", bound=BaseModel)
_timeout = getattr(asyncio, "timeout", None)


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body, refusing more than `limit` bytes (by Content-Length up front, by counting while it
    arrives: nothing past the limit is buffered) and a body that takes longer than `timeout_s` (408,
    also when Content-Length promises more than is sent)."""
    try:
        return await read_limited(request.headers.get("content-length"), request.headers.get("content-encoding"),
                                  request.stream(), limit, timeout_s)
    except ClientDisconnect:
        raise BadRequest("client disconnected before sending the whole body") from None


async def asgi_chunks(receive: Any) -> AsyncIterator[bytes]:
    """The body chunks of a raw ASGI request; BadRequest when the client goes away first."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise BadRequest("client disconnected before sending the whole body")
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return


async def read_limited(declared: str | None, encoding: str | None, chunks: AsyncIterator[bytes], limit: int,
                       timeout_s: float) -> bytes:
    """`read_body` over any stream of chunks (the FastAPI route and the raw ASGI infer path)."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    if (encoding or "identity").lower() != "identity":
        raise BadRequest(f"Content-Encoding {encoding!r} is not supported")
    parts: list[bytes] = []

    async def collect() -> None:
        received = 0
        async for chunk in chunks:
            received += len(chunk)
            if received > limit:
                raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
            parts.append(chunk)

    try:
        if _timeout is not None:  # Python 3.11+: no task per request
            async with _timeout(timeout_s):
                await collect()
        else:
            await asyncio.wait_for(collect(), timeout_s)
    except (asyncio.TimeoutError, TimeoutError):
        raise BodyTimeout(f"the request body did not arrive within {timeout_s:g} s "
                          f"({sum(map(len, parts))} bytes received)") from None
    return parts[0] if len(parts) == 1 else b"".join(parts)


def parse_json(raw: bytes) -> Any:
    try:
        return jsonio.loads(raw)
    except jsonio.JSONError as err:  # also numbers out of range and nesting past 1024 levels
        raise BadRequest(f"request body is not valid JSON: {err}") from None


def parse_model(model: type[M], data: Any) -> M:
    """`data` validated against a request schema; 422 naming every problem."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise Unprocessable(f"invalid request body: {validation_problems(err)}") from err


async def offramp_error(request: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, OfframpError)
    return JSONResponse({"error": err.message}, status_code=err.status_code, headers=err.headers)


async def http_error(request: Request, err: Exception) -> JSONResponse:
    """Framework errors (unknown route, wrong method) in the same `{"error": ...}` format."""
    assert isinstance(err, StarletteHTTPException)
    return JSONResponse({"error": str(err.detail)}, status_code=err.status_code, headers=err.headers)


def install_error_handlers(app: Any) -> None:
    """The one error format on a FastAPI app: `{"error": "..."}` with the error's status."""
    app.add_exception_handler(OfframpError, offramp_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
