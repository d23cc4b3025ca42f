"""Open Inference Protocol (KServe V2) REST routes: thin, over the engine.

Routes read the body (bounded), hand bytes to `server.http.codec` to decode, call the engine, and
encode. Every error a client can cause is an `OfframpError` carrying its status.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from server.bundle import Bundle
from server.errors import NotFound, OfframpError
from server.http import codec, describe
from server.http.bodies import asgi_chunks, read_body, read_limited
from server.interface import ServingEngine
from server.jsonio import dumps
from server.metrics import Metrics
from server.settings import Settings

log = logging.getLogger("offramp.app")
T = TypeVar("T")

# Bodies above this size are decoded/encoded in a worker thread so that parsing a large JSON
# request does not stall every other request on the event loop; small ones are cheaper inline.
THREAD_OFFLOAD_BYTES = 256 * 1024
JSON_BYTES_PER_FLOAT = 20  # rough size of one probability in a JSON response
UNKNOWN_MODEL = "_unknown"  # metrics label for requests naming no served model (bounded cardinality)


def outcome(status: int) -> str:
    """The `outcome` label of offramp_requests_total for an answer's status."""
    if status == 503:
        return "overloaded"
    if status == 504:
        return "timeout"
    return "bad_request" if 400 <= status < 500 else "error"


async def _maybe_offloaded(size: int, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run `fn` inline, or in a worker thread when `size` (bytes of work) would stall the loop."""
    if size > THREAD_OFFLOAD_BYTES:
        return await run_in_threadpool(fn, *args, **kwargs)
    return fn(*args, **kwargs)


def _state(request: Request) -> tuple[ServingEngine, Settings, Metrics]:
    s = request.app.state
    return s.engine, s.settings, s.metrics


def _serving(request: Request) -> bool:
    return request.app.state.engine.ready and not request.app.state.draining


def bundle_for(engine: ServingEngine, model: str, version: str | None) -> Bundle:
    """The model's bundle (NotFound naming the served models); a version, when one is named, must
    be the bundle's (REST and gRPC)."""
    bundle = engine.bundle(model)
    if version and version != bundle.manifest.version:
        raise NotFound(f"model {model!r} has no version {version!r} (served: {bundle.manifest.version!r})")
    return bundle


def _bundle_for(engine: ServingEngine, model: str, request: Request) -> Bundle:
    """`bundle_for` with the version of the path (`/versions/{version}`); a `version` query
    parameter is not part of the protocol and is ignored."""
    return bundle_for(engine, model, request.path_params.get("version"))


class ErrorBody(BaseModel):
    error: str


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    what = {400: "malformed request", 404: "unknown model or version", 408: "body too slow",
            409: "prediction sets asked while the live policy cannot be replayed on the calibration data",
            413: "body too large", 503: "not ready, shutting down or overloaded (Retry-After)",
            504: "not answered within request_timeout_s"}
    return {s: {"model": ErrorBody, "description": what[s]} for s in statuses}


v2 = APIRouter(prefix="/v2", tags=["v2"])
VERSIONED = _errors(404)
INFER_ERRORS = _errors(400, 404, 408, 409, 413, 503, 504)
INFER_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"type": "object", "description": "V2 inference request"}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary",
                                            "description": "binary tensor data extension"}}}}}


@v2.get("/health/live")
async def live() -> dict[str, bool]:
    return {"live": True}


@v2.get("/health/ready", responses=_errors(503))
async def ready(request: Request) -> JSONResponse:
    ok = _serving(request)
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


@v2.get("")
async def server_metadata() -> dict[str, Any]:
    return describe.server_metadata()


@v2.get("/models/{model}", responses=VERSIONED)
async def model_metadata(model: str, request: Request) -> dict[str, Any]:
    engine, _, _ = _state(request)
    return describe.model_metadata(_bundle_for(engine, model, request).manifest)


@v2.get("/models/{model}/versions/{version}", responses=VERSIONED)
async def model_version_metadata(model: str, version: str, request: Request) -> dict[str, Any]:
    return await model_metadata(model, request)


@v2.get("/models/{model}/versions/{version}/ready", responses=_errors(404, 503))
async def model_version_ready(model: str, version: str, request: Request) -> JSONResponse:
    return await model_ready(model, request)


@v2.post("/models/{model}/versions/{version}/infer", responses=INFER_ERRORS, openapi_extra=INFER_BODY)
async def infer_version(model: str, version: str, request: Request) -> Response:
    return await infer(model, request)


@v2.get("/models/{model}/ready", responses=_errors(404, 503))
async def model_ready(model: str, request: Request) -> JSONResponse:
    engine, _, _ = _state(request)
    bundle = _bundle_for(engine, model, request)
    ok = _serving(request)
    return JSONResponse({"name": bundle.name, "ready": ok}, status_code=200 if ok else 503)


@v2.post("/models/{model}/infer", responses=INFER_ERRORS, openapi_extra=INFER_BODY)
async def infer(model: str, request: Request) -> Response:
    """The route as FastAPI sees it (and documents it); requests are served by `infer_asgi` first."""
    _, settings, _ = _state(request)
    body = read_body(request, settings.max_request_bytes, settings.body_timeout_s)
    with in_progress(request.app.state):
        content, headers = await answer_infer(request.app.state, model, request.path_params.get("version"),
                                              request.headers.get(codec.INFER_HEADER), body)
    return Response(content, headers=headers)


@contextmanager
def in_progress(state: Any) -> Iterator[None]:
    """Count one infer request in `state.in_progress` while it is answered. REST and gRPC share the
    count: a request that finds no other in progress may run its stages right here
    (server.engine.direct). The lean path counts from arrival instead (`LeanInfer`)."""
    state.in_progress += 1
    try:
        yield
    finally:
        state.in_progress -= 1


async def answer_infer(state: Any, model: str, version: str | None, header_length: str | None,
                       body: Coroutine[Any, Any, bytes]) -> tuple[bytes, dict[str, str]]:
    """Decode, infer, encode one request; every failure an OfframpError; metrics counted. The caller
    counts it in `state.in_progress` (`in_progress`, or `LeanInfer` from its arrival)."""
    engine: ServingEngine = state.engine
    settings: Settings = state.settings
    metrics: Metrics = state.metrics
    started = time.perf_counter()
    label = model if model in engine.model_names() else UNKNOWN_MODEL
    # With other requests in progress on this event loop, the stages run on the worker thread so
    # that the loop's own work (other requests' bodies, decoding, encoding) overlaps with compute
    # on another core, unless the model is so fast that the hand-off costs more
    # (`inline_busy_budget_ms`); alone, the request may run them right here (server.engine.direct).
    try:
        bundle = bundle_for(engine, model, version)
        raw = await body
        req = await _maybe_offloaded(
            len(raw), codec.decode_request, raw, header_length, bundle,
            max_samples=settings.max_samples_per_request,
        )
        result = await describe.infer(engine, model, bundle, req.x, early_exit=req.early_exit,
                                      outputs=[o.name for o in req.outputs], busy=state.in_progress > 1)
        content, headers = await _maybe_offloaded(
            len(req.x) * bundle.manifest.num_classes * JSON_BYTES_PER_FLOAT,
            codec.encode_infer_response, bundle.manifest, req, result,
        )
    except OfframpError as err:
        metrics.request_done(label, outcome(err.status_code))
        raise
    except Exception as err:  # a bug, not the client's fault: log it, answer 500 in the usual format
        log.exception("infer on model %r failed", model)
        metrics.request_done(label, "error")
        raise OfframpError(f"internal error: {type(err).__name__}") from err
    finally:
        body.close()  # the body is not read when the model or version is unknown
    metrics.request_done(label, "ok", time.perf_counter() - started)
    return content, headers


INFER_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?/infer$")
INFER_HEADER = codec.INFER_HEADER.lower().encode("latin-1")
Target = tuple[str, str | None]  # (model, version) of an infer path


def infer_target(method: str, path: str) -> Target | None:
    """(model, version) when this is an infer request, else None."""
    match = INFER_PATH.match(path) if method == "POST" else None
    return None if match is None else (match.group(1), match.group(2))


async def infer_answer(state: Any, target: Target, headers: list[tuple[bytes, bytes]],
                       receive: Any) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """(status, raw headers with content-length, body) of one infer request, errors included,
    from its raw request headers and an ASGI `receive` for its body (counted by the caller)."""
    settings: Settings = state.settings
    length = encoding = header_length = None
    for key, value in headers:  # only three headers matter here: no dict of all of them
        key = key.lower()
        if key == b"content-length":
            length = value.decode("latin-1")
        elif key == b"content-encoding":
            encoding = value.decode("latin-1")
        elif key == INFER_HEADER:
            header_length = value.decode("latin-1")
    body = read_limited(length, encoding, asgi_chunks(receive), settings.max_request_bytes, settings.body_timeout_s)
    try:
        content, out = await answer_infer(state, target[0], target[1], header_length, body)
        status = 200
    except OfframpError as err:
        status, content = err.status_code, dumps({"error": err.message})
        out = {**err.headers, "content-type": "application/json"}
    raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in out.items()]
    raw.append((b"content-length", str(len(content)).encode()))
    return status, raw, content


async def infer_asgi(state: Any, scope: dict[str, Any], receive: Any, send: Any) -> bool:
    """The infer route without the framework: a raw ASGI handler that the app (`OfframpApp`) tries
    first (FastAPI's routing, request object and response classes cost more server CPU per request
    than the engine does on a small model). Same decoding, engine, errors and metrics as `infer`.
    False when the request is not an infer request."""
    target = infer_target(scope["method"], scope["path"])
    if target is None:
        return False
    with in_progress(state):
        status, raw, content = await infer_answer(state, target, scope["headers"], receive)
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": content})
    return True


class LeanInfer:
    """The infer route for uvicorn's httptools protocol, below ASGI (`server.http.connections`):
    the protocol asks `target` for each request and answers the infer ones with `answer` in a
    single write, past uvicorn's ASGI cycle, its middleware and the app's door. While the server
    drains, every request takes the usual path (whose middleware answers 503).

    A request counts as in progress from its arrival (`arrived`, when the protocol has its
    headers) to its task's end (`finished`), not only while its task runs: requests read in the
    same turn of the loop then see each other, and a small model batches them (server.engine.inline)."""

    def __init__(self, state: Any):
        self.state = state

    def target(self, method: str, path: str) -> Target | None:
        return None if self.state.draining else infer_target(method, path)

    def draining(self) -> bool:
        return bool(self.state.draining)

    def arrived(self) -> None:
        self.state.in_progress += 1

    def finished(self, _: Any = None) -> None:
        self.state.in_progress -= 1

    async def answer(self, target: Target, headers: list[tuple[bytes, bytes]],
                     receive: Any) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        return await infer_answer(self.state, target, headers, receive)  # counted since `arrived`
