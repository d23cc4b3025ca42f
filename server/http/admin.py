"""Admin API (`/admin`): read, change and recalibrate a model's live exit policy.

Thin routes: authorize, decode and validate the request, call `server.control.policies`, encode.
Auth: `Authorization: Bearer <OFFRAMP_ADMIN_TOKEN>`, compared in constant time and never logged.
With no token configured the admin API is off (403), so it cannot be left open by accident.
"""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt
from starlette.concurrency import run_in_threadpool

from server.control.auto import AutoCalibrator, AutoConfig
from server.control.calibrate import TARGETS
from server.control.policies import PolicyControl
from server.errors import Forbidden, PreconditionFailed, Unauthorized
from server.http.bodies import parse_json, parse_model, read_body
from server.policy import ExitPolicy
from server.settings import Settings

MAX_ADMIN_BODY = 64 * 1024
DISABLED = "admin API is disabled: set OFFRAMP_ADMIN_TOKEN"

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
    confidence: StrictFloat | None = Field(
        0.95, ge=0.5, lt=1.0,
        description="Agreement / accuracy targets: the thresholds meet the target with at least this probability "
        "(Learn then Test, docs/admin.md); null: the cheapest thresholds meeting it on the calibration samples.")
    dry_run: StrictBool = False


class AutoBody(BaseModel):
    """PUT auto-calibration body (server/control/auto.py)."""

    model_config = ConfigDict(extra="forbid")
    enabled: StrictBool
    target_agreement: float = Field(AutoConfig.target_agreement, gt=0.5, lt=1.0)  # defaults: AutoConfig's
    confidence: float = Field(AutoConfig.confidence, ge=0.5, lt=1.0)
    min_samples: int = Field(AutoConfig.min_samples, ge=20)
    hysteresis: float = Field(AutoConfig.hysteresis, ge=0.0, lt=0.5)
    min_saving: float = Field(AutoConfig.min_saving, ge=0.0, lt=1.0)


def build_admin_router(control: PolicyControl, settings: Settings, auto: AutoCalibrator | None = None) -> APIRouter:
    """The `/admin` router over the live policies `control` manages (and `auto`'s controller)."""
    token = settings.admin_token

    def authorize(request: Request) -> None:
        if token is None:
            raise Forbidden(DISABLED)
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise Unauthorized("missing bearer token: send 'Authorization: Bearer <OFFRAMP_ADMIN_TOKEN>'")
        if not hmac.compare_digest(given.strip().encode(), token.get_secret_value().encode()):
            raise Unauthorized("invalid bearer token")

    # HTTPBearer only documents the scheme in /openapi.json; `authorize` checks it, with our errors.
    bearer = HTTPBearer(auto_error=False, description="OFFRAMP_ADMIN_TOKEN; the admin API is off (403) without one")
    errors: dict[int | str, dict[str, Any]] = {status: {"description": what} for status, what in (
        (401, "missing or wrong bearer token"), (403, "admin API disabled (no token configured)"),
        (404, "unknown model"), (503, "policy store unreachable"))}
    router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(bearer), Depends(authorize)],
                       responses=errors)

    def described(model: str, record: ExitPolicy) -> JSONResponse:
        return JSONResponse(control.describe(model, record), headers={"ETag": f'"{record.version}"'})

    @router.get("/models/{model}/exit-policy")
    async def get_policy(model: str) -> JSONResponse:
        return described(model, await run_in_threadpool(control.current, model))

    changes: dict[int | str, dict[str, Any]] = {status: {"description": what} for status, what in (
        (400, "malformed JSON"), (408, "body too slow"), (412, "If-Match names another version"),
        (413, "body over 64 KiB"), (422, "invalid policy or target"))}

    @router.put("/models/{model}/exit-policy", responses=changes,
                openapi_extra={"requestBody": _schema_body(PolicyBody)})
    async def put_policy(model: str, request: Request) -> JSONResponse:
        body = parse_model(PolicyBody, parse_json(await read_body(request, MAX_ADMIN_BODY, settings.body_timeout_s)))
        expected = _if_match(request)
        record = await run_in_threadpool(control.put, model, body.criterion, body.thresholds, expected)
        return described(model, record)

    @router.post("/models/{model}/calibrate", responses=changes,
                 openapi_extra={"requestBody": _schema_body(CalibrateBody)})
    async def calibrate_policy(model: str, request: Request) -> JSONResponse:
        body = parse_model(CalibrateBody, parse_json(await read_body(request, MAX_ADMIN_BODY, settings.body_timeout_s)))
        targets = {k: float(getattr(body, k)) for k in TARGETS if getattr(body, k) is not None}
        out = await run_in_threadpool(control.calibrate, model, targets, body.criterion, body.dry_run,
                                      _if_match(request) if len(targets) == 1 else None, body.confidence)
        return JSONResponse(out, headers={"ETag": f'"{out["current_version"]}"'})

    if auto is not None:
        @router.get("/models/{model}/auto-calibration")
        async def get_auto(model: str) -> dict[str, Any]:
            return await run_in_threadpool(auto.describe, model)

        @router.put("/models/{model}/auto-calibration", responses=changes,
                    openapi_extra={"requestBody": _schema_body(AutoBody)})
        async def put_auto(model: str, request: Request) -> dict[str, Any]:
            body = parse_model(AutoBody, parse_json(await read_body(request, MAX_ADMIN_BODY, settings.body_timeout_s)))
            return await run_in_threadpool(auto.configure, model, AutoConfig(**body.model_dump()))

    @router.get("/models/{model}/exit-policy/history")
    async def get_history(model: str) -> dict[str, Any]:
        records = await run_in_threadpool(control.history, model)
        return {"model": model, "history": [r.to_dict() for r in records]}

    return router


def _schema_body(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI request body of a route that reads its body itself (bounded, see bodies.py)."""
    return {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}


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
