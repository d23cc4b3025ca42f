"""The FastAPI app: the V2 routes, `/metrics` and the admin API over one engine, one error format.

`create_app` serves what it is given: an engine, or bundles (loaded and verified, so a broken
bundle stops the server before it binds), or the bundles the settings name. The engine's sessions
start in the lifespan and the engine drains there on shutdown. Which bundle to serve when none is
configured (the demo) is the front door's business (`offramp.cli`), not the server's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from server import __version__
from server.bundle import Bundle, load_bundles
from server.control.auto import AutoCalibrator
from server.control.policies import PolicyControl
from server.control.stores import build_store, build_sync
from server.errors import BundleError
from server.http.admin import build_admin_router
from server.http.bodies import install_error_handlers
from server.http.connections import quiet_accept_errors
from server.http.middleware import ServingMiddleware, closing, route_methods
from server.http.v2 import LeanInfer, infer_asgi, v2
from server.interface import ServingEngine
from server.metrics import Metrics
from server.settings import Settings

log = logging.getLogger("offramp.app")


async def metrics_endpoint(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    engine: ServingEngine = app.state.engine
    settings: Settings = app.state.settings
    quiet_accept_errors(asyncio.get_running_loop())
    await engine.start()
    log.info("serving models %s", engine.model_names())
    grpc_server = None
    if settings.grpc_port is not None:
        from server.http.grpc_v2 import build_grpc_server  # grpcio: the `grpc` extra

        grpc_server, app.state.grpc_port = build_grpc_server(app.state, settings)
        await grpc_server.start()
        log.info("offramp gRPC on %s:%d", settings.host, app.state.grpc_port)
    sync = app.state.policy_sync
    if sync is not None:
        sync.start()  # from now on, changes made through other replicas apply here too
    auto_task = asyncio.create_task(app.state.auto.run())  # idle until a model opts in
    try:
        yield
    finally:
        # uvicorn runs this after the connections with requests in flight have been answered.
        app.state.draining = True
        auto_task.cancel()
        if grpc_server is not None:
            await grpc_server.stop(grace=settings.request_timeout_s)  # answers the calls in flight
        if sync is not None:
            await run_in_threadpool(sync.stop)
        await engine.stop(drain=True)
        log.info("engine stopped")


def create_app(settings: Settings, *, engine: ServingEngine | None = None, metrics: Metrics | None = None,
               bundles: list[Bundle] | None = None) -> FastAPI:
    """Build the app. Without `engine`, build one over `bundles` (default: load and verify the
    bundles `settings` names); its sessions start when the app starts."""
    metrics = metrics if metrics is not None else Metrics()
    store = build_store(settings, metrics)
    if engine is None:
        from server.engine.engine import Engine  # onnxruntime loads here, not when the CLI parses flags

        if bundles is None:
            bundles = load_bundles(settings.bundles, settings.model_name)
        if not bundles:
            raise BundleError("no bundle to serve: pass --bundle DIR or set OFFRAMP_BUNDLES")
        # The live policy survives restarts: start from what operators last set, else the bundle default.
        # With Redis down that is this replica's last known policy (server.control.redis_store).
        policies = {b.name: store.startup_policy(b.manifest) for b in bundles}
        engine = Engine(bundles, settings, metrics, policies)

    control = PolicyControl(engine, store)
    auto = AutoCalibrator(engine, control, metrics, settings.auto_interval_s)
    app = _app("offramp", lifespan=_lifespan)
    app.state.auto = auto
    app.state.engine = engine
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.control = control
    app.state.draining = False  # set on SIGTERM (server.cli) so /v2/health/ready turns 503 at once
    app.state.in_progress = 0  # infer requests being answered (server.http.v2.in_progress, LeanInfer)
    app.state.policy_sync = build_sync(store, engine, settings)  # several replicas or workers, one store

    app.include_router(v2)
    app.add_api_route("/metrics", metrics_endpoint, methods=["GET"], include_in_schema=False)
    routes = list(v2.routes)
    if settings.admin_port is None:  # else create_admin_app serves it on its own listener
        admin = build_admin_router(control, settings, auto)
        app.include_router(admin)
        routes += admin.routes
    _finish(app, routes, lambda: bool(app.state.draining))
    app.fast = lambda scope, receive, send: infer_asgi(app.state, scope, receive, send)
    app.lean = LeanInfer(app.state)  # the same route below ASGI, for uvicorn's httptools protocol
    return app


def create_admin_app(app: FastAPI) -> FastAPI:
    """The admin API of `app` (`settings.admin_port`) as an app of its own, over the same engine and
    store; it has no lifespan: `app`'s starts and stops the engine."""
    admin_app = _app("offramp admin")
    admin_app.state.draining = False
    router = build_admin_router(app.state.control, app.state.settings, app.state.auto)
    admin_app.include_router(router)
    _finish(admin_app, router.routes, lambda: bool(app.state.draining))
    return admin_app


class OfframpApp(FastAPI):
    """FastAPI with a door in front: infer requests go straight to `server.http.v2.infer_asgi`, past
    Starlette's middleware stack (error middleware, body-limit wrapper, routing), which costs more
    server CPU per request than the engine on a small model. Everything else, and every request
    while the server drains, goes through the framework as usual."""

    fast: Any = None
    lean: Any = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self.fast is not None and scope["type"] == "http" and scope["method"] == "POST" \
                and not self.state.draining and await self.fast(scope, receive, self._closing(send)):
            return
        await super().__call__(scope, receive, send)

    def _closing(self, send: Any) -> Any:
        """`send`, adding `Connection: close` when draining started while the request ran."""
        async def wrapped(message: Any) -> None:
            if message["type"] == "http.response.start" and self.state.draining:
                message = {**message, "headers": closing(list(message.get("headers", [])))}
            await send(message)
        return wrapped


def _app(title: str, **kwargs: Any) -> OfframpApp:
    # No /docs or /redoc: their pages load scripts from a public CDN. /openapi.json describes the routes.
    return OfframpApp(title=title, version=__version__, docs_url=None, redoc_url=None, **kwargs)


def _finish(app: FastAPI, routes: list[Any], draining: Any) -> None:
    """Error format, the serving middleware, and an OpenAPI document true to the routes."""
    install_error_handlers(app)
    app.add_middleware(ServingMiddleware, draining=draining, methods=route_methods(routes))
    plain = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = plain()
            # Our routes read their own bodies and parameters: FastAPI's generic 422 never happens
            # (admin changes document their own 422).
            for operations in schema.get("paths", {}).values():
                for op in operations.values():
                    responses = op.get("responses", {})
                    if responses.get("422", {}).get("description") == "Validation Error":
                        del responses["422"]
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
