"""The server's commands: `serve` (the V2 server), `inspect` and `calibrate` (no torch needed).
The front door (`offramp/cli.py`) registers them beside the export and load-test commands.

Every `Settings` field has a `serve` flag, generated from the class so the two never drift apart:
the environment (`OFFRAMP_*`) is read first and explicit flags override it. SIGTERM drains:
uvicorn stops accepting, answers the requests in flight, then the lifespan stops the engine, and
the process exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import signal
import socket
import sys
import threading
import types
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn
from pydantic import SecretStr, ValidationError

from server import __version__
from server.control.calibrate_cli import register as register_calibrate
from server.errors import BundleError, StateError, validation_problems
from server.settings import Settings

if TYPE_CHECKING:
    from server.bundle import Bundle

log = logging.getLogger("offramp.cli")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# uvicorn may cancel requests still running this long after the longest allowed request.
SHUTDOWN_GRACE_S = 5
_METAVARS: dict[Any, str] = {int: "N", float: "NUM", Path: "DIR"}


def settings_docs() -> dict[str, str]:
    """Each Settings field's docstring, on one line (pydantic keeps them as descriptions)."""
    return {name: " ".join((field.description or "").split()) for name, field in Settings.model_fields.items()}


def _flag_type(annotation: Any) -> tuple[Callable[[str], Any], list[str] | None]:
    """argparse `type` and `choices` for a field annotation (`X | None` counts as X)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        choices = [str(c) for c in typing.get_args(annotation)]
        return str, choices
    if annotation is SecretStr:
        return str, None
    if annotation is bool:  # Settings parses the text (true / false, 1 / 0, yes / no, on / off)
        return str, ["true", "false"]
    if annotation in (int, float, str, Path):
        return annotation, None
    raise TypeError(f"no flag type for settings annotation {annotation!r}")


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field (`--max-batch-size` for `max_batch_size`); `--bundle` repeats."""
    docs = settings_docs()
    for name, field in Settings.model_fields.items():
        env = f"OFFRAMP_{name.upper()}"
        doc = docs.get(name, "").replace("%", "%%")
        if name == "bundles":
            parser.add_argument(
                "--bundle", dest="bundles", action="append", type=Path, metavar="DIR",
                default=argparse.SUPPRESS, help=f"{doc} Repeat to serve several models. [env {env}]",
            )
            continue
        kind, choices = _flag_type(field.annotation)
        default = "unset" if field.default is None else field.default
        if name == "admin_token":
            doc += " Prefer the environment variable: flags show up in the process list."
            default = "unset"
        parser.add_argument(
            "--" + name.replace("_", "-"), dest=name, type=kind, choices=choices, default=argparse.SUPPRESS,
            metavar=None if choices else _METAVARS.get(kind, name.split("_")[-1].upper()),
            help=f"{doc} [env {env}; default {default}]",
        )


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from the environment, overridden by the flags given explicitly."""
    overrides = {name: getattr(args, name) for name in Settings.model_fields if hasattr(args, name)}
    return Settings(**overrides)


def redacted(settings: Settings) -> dict[str, Any]:
    """Settings as logged: JSON-safe, the admin token reduced to whether it is set."""
    data = settings.model_dump(mode="json", exclude={"admin_token"})
    data["admin_token"] = "set" if settings.admin_token is not None else "unset"
    return data


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, stream=sys.stderr, force=True)


@contextmanager
def _signals_end_quietly() -> Iterator[None]:
    """uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown, with the handler that was in
    place before it started; with Python's defaults that would kill the drained process with the
    signal instead of letting it exit 0. Put no-op handlers there for the time it runs."""
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _DrainingServer(uvicorn.Server):
    """On the first SIGTERM/SIGINT: readiness turns 503 and requests on open connections get 503 with
    `Connection: close` (server.http.middleware) for `drain_grace_s`; then uvicorn stops accepting and
    finishes the requests in flight. A second signal skips the grace. `followers` (the admin
    listener) stop with it."""

    def __init__(self, config: uvicorn.Config, drain_grace_s: float, followers: list[uvicorn.Server]):
        super().__init__(config)
        self.drain_grace_s, self.followers = drain_grace_s, followers
        self._grace: threading.Timer | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        app: Any = self.config.app
        app.state.draining = True  # readiness turns 503 as soon as the signal arrives
        if self._grace is None and self.drain_grace_s > 0:
            self._grace = threading.Timer(self.drain_grace_s, self._stop, args=(sig,))
            self._grace.daemon = True
            self._grace.start()
            return
        self._stop(sig)

    def _stop(self, sig: int) -> None:
        super().handle_exit(sig, None)
        for follower in self.followers:
            follower.should_exit = True


class _Follower(uvicorn.Server):
    """A second listener in the same process: the main server handles the signals."""

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


PRESETS = ("demo", "sentiment", "heavy")
DefaultBundle = Callable[[Settings, str | None], Path]  # (settings, --preset)


def uvicorn_config(app: Any, settings: Settings, port: int, lifespan: str) -> uvicorn.Config:
    """uvicorn as offramp runs it: the guarded h11 protocol (header deadline, connection cap) and the
    keep-alive and shutdown timeouts from the settings."""
    from server.http.connections import guarded_protocol

    return uvicorn.Config(
        app, host=settings.host, port=port, log_config=None, log_level=settings.log_level,
        access_log=settings.log_level == "debug", lifespan=lifespan,
        http=guarded_protocol(settings.header_timeout_s, settings.max_connections, getattr(app, "lean", None)),
        timeout_keep_alive=max(1, math.ceil(settings.idle_timeout_s)),
        timeout_graceful_shutdown=math.ceil(settings.request_timeout_s + settings.body_timeout_s) + SHUTDOWN_GRACE_S,
    )


def serve(args: argparse.Namespace, default_bundle: DefaultBundle | None = None) -> int:
    """Run the server on the configured bundles; with none configured, on `default_bundle(settings)`."""
    from server.bundle import load_bundles
    from server.http.app import create_app

    try:
        settings = settings_from_args(args)
    except ValidationError as err:
        print(f"offramp serve: invalid settings: {validation_problems(err, 'settings')}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    log.info("offramp %s settings: %s", __version__, redacted(settings))
    try:
        paths = list(settings.bundles)
        preset = getattr(args, "preset", None)
        if preset is not None and paths:
            print("offramp serve: give --preset or bundles (--bundle / OFFRAMP_BUNDLES), not both", file=sys.stderr)
            return 2
        if not paths and default_bundle is not None:
            paths = [default_bundle(settings, preset)]
        bundles = load_bundles(paths, settings.model_name)
        app = create_app(settings, bundles=bundles)  # verifies everything, in the parent with --workers too
    except (BundleError, StateError) as err:
        print(f"offramp serve: {err}", file=sys.stderr)
        return 2
    if settings.workers > 1:
        return _serve_workers(settings, paths)
    return _serve_app(app, settings)


def _serve_app(app: Any, settings: Settings, sockets: dict[str, socket.socket] | None = None) -> int:
    """One server process: the app, and the admin app on its own listener when `admin_port` is set."""
    from server.http.app import create_admin_app

    sockets = sockets or {}
    followers: list[uvicorn.Server] = []
    admin: list[socket.socket] = [sockets["admin"]] if "admin" in sockets else []
    if settings.admin_port is not None:
        followers.append(_Follower(uvicorn_config(create_admin_app(app), settings, settings.admin_port, "off")))
    server = _DrainingServer(uvicorn_config(app, settings, settings.port, "on"), settings.drain_grace_s, followers)
    main: list[socket.socket] | None = [sockets["main"]] if "main" in sockets else None

    async def run_all() -> None:
        tasks = [asyncio.ensure_future(f.serve(sockets=admin or None)) for f in followers]
        try:
            await server.serve(sockets=main)
        finally:
            for follower in followers:
                follower.should_exit = True
            await asyncio.gather(*tasks, return_exceptions=True)

    with _signals_end_quietly():
        _run(run_all())
    if not server.started:
        log.error("the server did not start (see the errors above)")
        return 1
    return 0


def _listen(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _serve_workers(settings: Settings, paths: list[Path]) -> int:
    """`settings.workers` processes accepting on the same sockets, each with its own engine; the
    parent forwards SIGTERM/SIGINT to them and exits with the worst status."""
    from server.bundle import load_bundles
    from server.http.app import create_app

    sockets = {"main": _listen(settings.host, settings.port)}
    if settings.admin_port is not None:
        sockets["admin"] = _listen(settings.host, settings.admin_port)
    port = sockets["main"].getsockname()[1]
    log.info("offramp listening on http://%s:%d with %d worker processes", settings.host, port, settings.workers)
    children: list[int] = []
    for _ in range(settings.workers):
        pid = os.fork()
        if pid == 0:  # a worker: its own app, engine and sessions (onnxruntime starts after the fork)
            code = 1
            try:
                app = create_app(settings, bundles=load_bundles(paths, settings.model_name))
                code = _serve_app(app, settings, sockets)
            finally:
                os._exit(code)
        children.append(pid)

    def forward(sig: int, frame: FrameType | None) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, sig)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    worst = 0
    try:
        for child in children:
            _, status = os.waitpid(child, 0)
            code = os.waitstatus_to_exitcode(status)
            worst = max(worst, code if code >= 0 else 1)  # killed by a signal counts as a failure
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return worst


def _run(main: Any) -> None:
    """`asyncio.run`, on uvloop when it is installed (the `fast` extra)."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


def inspect(args: argparse.Namespace) -> int:
    """Verify a bundle and print its stages (no torch needed)."""
    from server.bundle import load_bundle

    try:
        bundle = load_bundle(args.bundle)
    except BundleError as err:
        print(f"offramp inspect: {err}", file=sys.stderr)
        return 2
    print(inspect_table(bundle))
    return 0


def register(subparsers: argparse._SubParsersAction, *, default_bundle: DefaultBundle | None = None,
             default_help: str = "") -> None:
    """Add `serve`, `inspect` and `calibrate`; each sets `func(args) -> int`. `default_bundle` locates
    the bundle `serve` runs when none is configured (`default_help` says which, in `serve --help`)."""
    serve_parser = subparsers.add_parser(
        "serve", help="run the Open Inference Protocol (V2) server",
        description="Run the V2 server. Flags override OFFRAMP_* environment variables. " + default_help,
    )
    add_settings_flags(serve_parser)
    if default_bundle is not None:
        serve_parser.add_argument("--preset", default=None, choices=PRESETS,
                                  help="serve a preset bundle, built on first use under the cache dir [demo]")
    serve_parser.set_defaults(func=partial(serve, default_bundle=default_bundle))
    p = subparsers.add_parser(
        "inspect", help="verify a bundle and print its stages",
        description="Verify a bundle (hashes, ONNX inputs/outputs) and print a table of "
        "stages: FLOPs, cumulative FLOPs fraction, params, exit accuracy.",
    )
    p.add_argument("bundle", type=Path, metavar="DIR", help="bundle directory")
    p.set_defaults(func=inspect)
    register_calibrate(subparsers)


def inspect_table(bundle: Bundle) -> str:
    """A text table of stages: FLOPs, cumulative FLOPs fraction, params, exit accuracy."""
    m = bundle.manifest
    total = max(1, sum(s.flops for s in m.stages))
    cumulative = m.cumulative_flops()
    lines = [
        f"{m.name} v{m.version}: {m.num_stages} stages, {m.num_classes} classes, input {m.input.name} "
        f"{m.input.shape} {m.input.dtype}",
        f"default policy: {m.default_policy.criterion} {m.default_policy.thresholds}",
        "",
        f"{'stage':>5} {'blocks':>10} {'head':>8} {'MFLOPs':>10} {'cum. frac':>9} {'params':>10} "
        f"{'exit acc':>9}",
    ]
    for stage, cum, acc in zip(m.stages, cumulative, m.accuracy.per_stage, strict=True):
        blocks = ",".join(map(str, stage.blocks)) or "-"
        lines.append(
            f"{stage.index:>5} {blocks:>10} {stage.head:>8} {stage.flops / 1e6:>10.3f} {cum / total:>9.3f} "
            f"{stage.params:>10,} {acc:>9.4f}"
        )
    lines.append(f"total {total / 1e6:.3f} MFLOPs per sample; accuracy on {m.accuracy.split} split "
                 f"({m.accuracy.samples} samples)")
    return "\n".join(lines)
