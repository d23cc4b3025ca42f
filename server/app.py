"""The FastAPI app: thin V2 routes over the engine, `/metrics`, one error format.

Routes read the body (bounded), hand bytes to `server.protocol` to decode, call the engine, and
encode. Every error a client can cause is an `OfframpError` carrying its status, turned into
`{"error": "..."}` by one handler. Bundles are loaded and verified in `create_app` (a broken
bundle stops the server before it binds); the engine's sessions start in the lifespan and the
engine drains there on shutdown.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from server import __version__, protocol
from server.admin import build_admin_router
from server.bundle import Bundle, load_bundle
from server.errors import BadRequest, BundleError, NotFound, OfframpError, PayloadTooLarge
from server.metrics import Metrics
from server.redis_store import PolicySync, RedisPolicyStore
from server.settings import Settings
from server.store import FilePolicyStore, PolicyStore

log = logging.getLogger("offramp.app")
T = TypeVar("T")

# Bodies above this size are decoded/encoded in a worker thread so that parsing a large JSON
# request does not stall every other request on the event loop; small ones are cheaper inline.
THREAD_OFFLOAD_BYTES = 256 * 1024
JSON_BYTES_PER_FLOAT = 20  # rough size of one probability in a JSON response
UNKNOWN_MODEL = "_unknown"  # metrics label for requests naming no served model (bounded cardinality)


class EngineLike(Protocol):
    """The engine interface the routes use (server.engine.Engine implements it)."""

    @property
    def ready(self) -> bool: ...
    def model_names(self) -> list[str]: ...
    def bundle(self, model: str) -> Bundle: ...
    async def start(self) -> None: ...
    async def stop(self, drain: bool = True) -> None: ...
    async def infer(self, model: str, x: np.ndarray, *, early_exit: bool = True) -> Any: ...


def load_bundles(settings: Settings) -> list[Bundle]:
    """The configured bundles, or the demo bundle (built on first use) when none is configured."""
    if settings.bundles:
        return [load_bundle(path) for path in settings.bundles]
    return [load_bundle(_demo_bundle_dir(settings))]


def _demo_bundle_dir(settings: Settings) -> Path:
    """Build (first time) and locate the demo bundle; torch is only needed for the build."""
    try:
        from model_export.demo import ensure_demo_bundle

        log.info("no bundle configured: serving the demo bundle (cache %s)", settings.cache_dir)
        return Path(ensure_demo_bundle(settings.cache_dir))
    except ModuleNotFoundError as err:
        if err.name and err.name.split(".")[0] in {"torch", "model_export", "sklearn"}:
            raise BundleError(
                "serving the demo bundle needs the export extra: pip install 'offramp[export]' "
                f"(or pass --bundle DIR / set OFFRAMP_BUNDLES); {err.name} is not installed"
            ) from err
        raise


def _outcome(status: int) -> str:
    if status == 503:
        return "overloaded"
    if status == 504:
        return "timeout"
    return "bad_request" if 400 <= status < 500 else "error"


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refusing more than `limit` bytes: by Content-Length up front, by counting when chunked."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    if request.headers.get("content-encoding", "identity").lower() != "identity":
        raise BadRequest(f"Content-Encoding {request.headers['content-encoding']!r} is not supported")
    chunks: list[bytes] = []
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise BadRequest("client disconnected before sending the whole body") from None
    return b"".join(chunks)


async def _maybe_offloaded(size: int, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run `fn` inline, or in a worker thread when `size` (bytes of work) would stall the loop."""
    if size > THREAD_OFFLOAD_BYTES:
        return await run_in_threadpool(fn, *args, **kwargs)
    return fn(*args, **kwargs)


def _state(request: Request) -> tuple[EngineLike, Settings, Metrics]:
    s = request.app.state
    return s.engine, s.settings, s.metrics


def _bundle_for(engine: EngineLike, model: str, version: str | None) -> Bundle:
    bundle = engine.bundle(model)  # raises NotFound naming the served models
    if version is not None and version != bundle.manifest.version:
        raise NotFound(f"model {model!r} has no version {version!r} (served: {bundle.manifest.version!r})")
    return bundle


v2 = APIRouter(prefix="/v2", tags=["v2"])


@v2.get("/health/live")
async def live() -> dict[str, bool]:
    return {"live": True}


@v2.get("/health/ready")
async def ready(request: Request) -> JSONResponse:
    engine, _, _ = _state(request)
    ok = engine.ready and not request.app.state.draining
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


@v2.get("")
async def server_metadata() -> dict[str, Any]:
    return protocol.server_metadata()


@v2.get("/models/{model}")
@v2.get("/models/{model}/versions/{version}")
async def model_metadata(model: str, request: Request, version: str | None = None) -> dict[str, Any]:
    engine, _, _ = _state(request)
    return protocol.model_metadata(_bundle_for(engine, model, version).manifest)


@v2.get("/models/{model}/ready")
@v2.get("/models/{model}/versions/{version}/ready")
async def model_ready(model: str, request: Request, version: str | None = None) -> JSONResponse:
    engine, _, _ = _state(request)
    bundle = _bundle_for(engine, model, version)
    ok = engine.ready and not request.app.state.draining
    return JSONResponse({"name": bundle.name, "ready": ok}, status_code=200 if ok else 503)


@v2.post("/models/{model}/infer")
@v2.post("/models/{model}/versions/{version}/infer")
async def infer(model: str, request: Request, version: str | None = None) -> Response:
    engine, settings, metrics = _state(request)
    started = time.perf_counter()
    label = model if model in engine.model_names() else UNKNOWN_MODEL
    try:
        bundle = _bundle_for(engine, model, version)
        body = await _read_body(request, settings.max_request_bytes)
        req = await _maybe_offloaded(
            len(body), protocol.decode_infer_request, body, request.headers.get(protocol.INFER_HEADER),
            bundle.manifest.input, max_samples=settings.max_samples_per_request,
        )
        result = await engine.infer(model, req.x, early_exit=req.early_exit)
        content, headers = await _maybe_offloaded(
            len(req.x) * bundle.manifest.num_classes * JSON_BYTES_PER_FLOAT,
            protocol.encode_infer_response, bundle.manifest, req, result,
        )
    except OfframpError as err:
        metrics.request_done(label, _outcome(err.status_code))
        raise
    except Exception as err:  # a bug, not the client's fault: log it, answer 500 in the usual format
        log.exception("infer on model %r failed", model)
        metrics.request_done(label, "error")
        raise OfframpError(f"internal error: {type(err).__name__}") from err
    metrics.request_done(label, "ok", time.perf_counter() - started)
    return Response(content, headers=headers)


async def metrics_endpoint(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def _offramp_error(request: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, OfframpError)
    return JSONResponse({"error": err.message}, status_code=err.status_code, headers=err.headers)


async def _http_error(request: Request, err: Exception) -> JSONResponse:
    """Framework errors (unknown route, wrong method) in the same `{"error": ...}` format."""
    assert isinstance(err, StarletteHTTPException)
    return JSONResponse({"error": str(err.detail)}, status_code=err.status_code, headers=err.headers)


def build_store(settings: Settings, metrics: Metrics) -> PolicyStore:
    """The policy store: Redis, shared by a replica set, when `store_url` is set; else the state
    directory. The Redis store keeps a copy of the last policy seen in the state directory."""
    if settings.store_url is None:
        metrics.store_up("file", True)
        return FilePolicyStore(settings.resolved_state_dir)
    store = RedisPolicyStore(  # imports redis-py, the optional `redis` extra
        settings.store_url.get_secret_value(), metrics=metrics, last_known_dir=settings.resolved_state_dir,
    )
    log.info("exit policies live in the shared store %s", store.where)
    return store


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    engine: EngineLike = app.state.engine
    await engine.start()
    log.info("serving models %s", engine.model_names())
    sync = app.state.policy_sync
    if sync is not None:
        sync.start()  # from now on, changes made through other replicas apply here too
    try:
        yield
    finally:
        # uvicorn runs this after the connections with requests in flight have been answered.
        app.state.draining = True
        if sync is not None:
            await run_in_threadpool(sync.stop)
        await engine.stop(drain=True)
        log.info("engine stopped")


def create_app(
    settings: Settings, *, engine: EngineLike | None = None, metrics: Metrics | None = None
) -> FastAPI:
    """Build the app. Without `engine`, load and verify the configured bundles (or the demo
    bundle) and build the engine; its sessions start when the app starts."""
    metrics = metrics if metrics is not None else Metrics()
    store = build_store(settings, metrics)
    if engine is None:
        from server.engine import Engine  # onnxruntime loads here, not when the CLI parses flags

        bundles = load_bundles(settings)
        # The live policy survives restarts: start from what operators last set, else the bundle default.
        # With Redis down that is this replica's last known policy (server.redis_store).
        policies = {b.name: store.startup_policy(b.manifest) for b in bundles}
        engine = Engine(bundles, settings, metrics, policies)
    # Several replicas, one store: changes made through the others apply here too.
    policy_sync = PolicySync(store, engine) if isinstance(store, RedisPolicyStore) else None

    app = FastAPI(title="offramp", version=__version__, lifespan=_lifespan)
    app.state.engine = engine
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.draining = False  # set on SIGTERM (server.cli) so /v2/health/ready turns 503 at once
    app.state.policy_sync = policy_sync

    app.include_router(v2)
    app.add_api_route("/metrics", metrics_endpoint, methods=["GET"], include_in_schema=False)

    app.include_router(build_admin_router(engine, settings, store))

    app.add_exception_handler(OfframpError, _offramp_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    return app
