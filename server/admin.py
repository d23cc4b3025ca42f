"""Admin API (`/admin`): read, change and recalibrate a model's live exit policy.

Thin routes: decode and validate the request, then store -> engine -> metrics. A change is first
persisted by the store's compare-and-set (so `If-Match` is checked against the durable version),
then swapped into the engine; batches already running finish with the policy they started with.

Auth: `Authorization: Bearer <OFFRAMP_ADMIN_TOKEN>`, compared in constant time and never logged.
With no token configured the admin API is off (403), so it cannot be left open by accident.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
from typing import Any, Protocol

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, ValidationError
from starlette.concurrency import run_in_threadpool

from server.bundle import Bundle, Calibration, PolicySpec
from server.calibrate import TARGETS, available_criteria, calibrate
from server.errors import (
    BadRequest,
    BundleError,
    Forbidden,
    PayloadTooLarge,
    PreconditionFailed,
    Unauthorized,
    Unprocessable,
)
from server.metrics import Metrics
from server.policy import ExitPolicy
from server.settings import Settings
from server.store import SOURCE_CALIBRATE, SOURCE_PUT, PolicyRecord, PolicyStore

log = logging.getLogger("offramp.admin")

MAX_ADMIN_BODY = 64 * 1024
DISABLED = "admin API is disabled: set OFFRAMP_ADMIN_TOKEN"


class AdminEngine(Protocol):
    """What the admin routes need from the engine (server.engine.Engine implements it)."""

    def bundle(self, model: str) -> Bundle: ...
    def policy(self, model: str) -> ExitPolicy: ...
    def set_policy(self, model: str, policy: ExitPolicy) -> None: ...
    def model_names(self) -> list[str]: ...


Threshold = StrictFloat | StrictInt | None


class PolicyBody(BaseModel):
    """PUT body: one threshold per early exit; `null` disables that exit."""

    model_config = ConfigDict(extra="forbid")
    criterion: str | None = Field(None, description="Default: keep the current criterion.")
    thresholds: list[Threshold]


class CalibrateBody(BaseModel):
    """POST calibrate body: exactly one target."""

    model_config = ConfigDict(extra="forbid")
    target_agreement: StrictFloat | StrictInt | None = None
    target_accuracy: StrictFloat | StrictInt | None = None
    compute_budget: StrictFloat | StrictInt | None = None
    criterion: str | None = Field(None, description="Default: the current policy's criterion.")
    dry_run: StrictBool = False


def build_admin_router(
    engine: AdminEngine, settings: Settings, store: PolicyStore, metrics: Metrics | None = None
) -> APIRouter:
    """The `/admin` router. Pass `metrics` when `engine.set_policy` does not record the policy
    gauges itself."""
    token = settings.admin_token
    apply_lock = threading.Lock()  # store.update and engine.set_policy happen in version order
    calibrations: dict[str, Calibration] = {}

    def authorize(request: Request) -> None:
        if token is None:
            raise Forbidden(DISABLED)
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise Unauthorized("missing bearer token: send 'Authorization: Bearer <OFFRAMP_ADMIN_TOKEN>'")
        if not hmac.compare_digest(given.strip().encode(), token.get_secret_value().encode()):
            raise Unauthorized("invalid bearer token")

    router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(authorize)])

    def current(model: str) -> PolicyRecord:
        bundle = engine.bundle(model)  # NotFound for an unknown model
        record = store.get(model)
        return record if record is not None else store.load(model, bundle.manifest.default_policy)

    def describe(model: str, record: PolicyRecord) -> JSONResponse:
        manifest = engine.bundle(model).manifest
        body = {
            "model": model,
            **_render(record),
            "criteria": available_criteria(manifest),
            "default": manifest.default_policy.model_dump(),
        }
        return JSONResponse(body, headers={"ETag": f'"{record.version}"'})

    def apply(model: str, spec: PolicySpec, source: str, expected: int | None) -> PolicyRecord:
        manifest = engine.bundle(model).manifest
        with apply_lock:
            record = store.update(model, spec, source, expected)
            engine.set_policy(model, ExitPolicy.from_spec(spec, version=record.version,
                                                          num_stages=manifest.num_stages))
        if metrics is not None:
            metrics.policy(model, record.version, list(record.thresholds))
        return record

    def calibration(model: str) -> Calibration:
        bundle = engine.bundle(model)
        key = str(bundle.root)
        if key not in calibrations:
            try:
                calibrations[key] = bundle.calibration()
            except BundleError as err:
                raise Unprocessable(f"cannot calibrate {model}: {err}") from err
        return calibrations[key]

    @router.get("/models/{model}/exit-policy")
    async def get_policy(model: str) -> JSONResponse:
        record = await run_in_threadpool(current, model)
        return describe(model, record)

    @router.put("/models/{model}/exit-policy")
    async def put_policy(model: str, request: Request) -> JSONResponse:
        body = _parse(PolicyBody, await _read_json(request))
        expected = _if_match(request)

        def work() -> PolicyRecord:
            manifest = engine.bundle(model).manifest
            criterion = body.criterion if body.criterion is not None else current(model).criterion
            thresholds = [None if t is None else float(t) for t in body.thresholds]
            problems = ExitPolicy(criterion, tuple(thresholds), 0).problems_for(manifest)  # thresholds too
            if problems:
                raise Unprocessable(f"invalid exit policy for {model}: " + "; ".join(problems))
            spec = PolicySpec(criterion=criterion, thresholds=thresholds)  # type: ignore[arg-type]
            return apply(model, spec, SOURCE_PUT, expected)

        record = await run_in_threadpool(work)
        return describe(model, record)

    @router.post("/models/{model}/calibrate")
    async def calibrate_policy(model: str, request: Request) -> JSONResponse:
        body = _parse(CalibrateBody, await _read_json(request))
        targets = {k: getattr(body, k) for k in TARGETS if getattr(body, k) is not None}
        if len(targets) != 1:
            raise Unprocessable(f"give exactly one of {', '.join(TARGETS)}; got {sorted(targets) or 'none'}")
        expected = _if_match(request)

        def work() -> dict[str, Any]:
            manifest = engine.bundle(model).manifest
            live = current(model)
            calib = calibration(model)
            usable = available_criteria(manifest, calib)
            criterion = body.criterion or (live.criterion if live.criterion in usable else "max_prob")
            if criterion not in usable:
                raise Unprocessable(f"criterion {criterion!r} cannot be calibrated for {model}; "
                                    f"available: {usable}")
            try:
                result = calibrate(calib, manifest, criterion=criterion,
                                   **{k: float(v) for k, v in targets.items()})
            except ValueError as err:
                raise Unprocessable(str(err)) from err
            out: dict[str, Any] = {"model": model, "dry_run": body.dry_run, **result.to_dict()}
            if body.dry_run:
                out.update(applied=False, version=None, current_version=live.version)
            else:
                (name, value), = targets.items()
                spec = PolicySpec(criterion=criterion, thresholds=result.thresholds)  # type: ignore[arg-type]
                record = apply(model, spec, f"{SOURCE_CALIBRATE} ({name}={value:g})", expected)
                out.update(applied=True, version=record.version, current_version=record.version)
            return out

        out = await run_in_threadpool(work)
        headers = {"ETag": f'"{out["current_version"]}"'}
        return JSONResponse(out, headers=headers)

    @router.get("/models/{model}/exit-policy/history")
    async def get_history(model: str) -> dict[str, Any]:
        engine.bundle(model)
        records = await run_in_threadpool(store.history, model)
        return {"model": model, "history": [_render(r) for r in records]}

    return router


def _render(record: PolicyRecord) -> dict[str, Any]:
    """A record as JSON: patience thresholds as integers, the way operators write them."""
    data = record.to_dict()
    if record.criterion == "patience":
        data["thresholds"] = [None if t is None else int(t) for t in record.thresholds]
    return data


async def _read_json(request: Request) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_ADMIN_BODY:
        raise PayloadTooLarge(f"admin request body over {MAX_ADMIN_BODY} bytes")
    raw = await request.body()
    if len(raw) > MAX_ADMIN_BODY:
        raise PayloadTooLarge(f"admin request body over {MAX_ADMIN_BODY} bytes")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadRequest(f"request body is not valid JSON: {err}") from err


def _parse(model: type[BaseModel], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in err.errors(include_url=False)
        )
        raise Unprocessable(f"invalid request body: {problems}") from err


def _if_match(request: Request) -> int | None:
    """The version an `If-Match` header names (`5`, `"5"` or `W/"5"`); None when absent or `*`."""
    header = request.headers.get("if-match")
    if header is None or header.strip() == "*":
        return None
    tag = header.strip()
    tag = tag[2:] if tag.startswith("W/") else tag
    tag = tag.strip('"')
    if not tag.isdigit():
        raise PreconditionFailed(f"If-Match {header!r} names no policy version (expected e.g. \"5\")")
    return int(tag)
