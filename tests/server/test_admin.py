"""Admin API: the auth matrix, validation that leaves the policy alone, If-Match, calibration."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI

from server.bundle import Bundle, Calibration, InputSpec, Manifest, StageSpec, TensorSpec
from server.control.auto import AutoCalibrator
from server.control.policies import PolicyControl
from server.control.store import FilePolicyStore, startup_policy
from server.http.admin import DISABLED, build_admin_router
from server.http.bodies import install_error_handlers
from server.metrics import Metrics
from server.policy import ExitPolicy
from server.settings import Settings
from tests.fakes import FakeEngine

TOKEN = "s3cret-admin-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def make_bundle(root: Path, num_stages: int = 3, classes: int = 4, samples: int = 200) -> Bundle:
    """A bundle with a manifest and calibration data (no ONNX files: the admin API never runs them)."""
    root.mkdir(parents=True, exist_ok=True)
    stages = [
        StageSpec(
            index=i, file=f"stage_{i:02d}.onnx", sha256="0" * 64, blocks=[i],
            inputs=[TensorSpec(name="x" if i == 0 else "hidden_in", shape=[-1, 4])],
            outputs=[TensorSpec(name="hidden", shape=[-1, 4]),
                     TensorSpec(name="logits", shape=[-1, classes])],
            flops=100, params=10,
        )
        for i in range(num_stages)
    ]
    manifest = Manifest(
        format_version=1, name="fake", labels=[str(c) for c in range(classes)],
        input=InputSpec(name="x", shape=[-1, 4]), stages=stages,
        default_policy=ExitPolicy(criterion="max_prob", thresholds=[0.9] * (num_stages - 1)),
        accuracy={"samples": samples, "per_stage": [0.5] * num_stages},
    )
    rng = np.random.default_rng(0)
    labels = rng.integers(0, classes, samples)
    logits = rng.normal(0, 1, (num_stages, samples, classes)).astype(np.float32)
    for s in range(num_stages):
        logits[s, np.arange(samples), labels] += (s + 1) * rng.uniform(0, 2.5, samples)
    Calibration(labels=labels, logits=logits).save(root / "calibration.npz")
    return Bundle(root, manifest)


@pytest.fixture
def setup(tmp_path: Path) -> tuple[FakeEngine, FilePolicyStore, Bundle]:
    bundle = make_bundle(tmp_path / "bundle")
    store = FilePolicyStore(tmp_path / "state")
    engine = FakeEngine(bundle, startup_policy(store, bundle.manifest))
    return engine, store, bundle


def client(engine: FakeEngine, store: FilePolicyStore, token: str | None = TOKEN) -> httpx.AsyncClient:
    app = FastAPI()
    control = PolicyControl(engine, store)
    auto = AutoCalibrator(engine, control, Metrics())
    app.include_router(build_admin_router(control, Settings(admin_token=token), auto))
    install_error_handlers(app)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def run(coro: Any) -> Any:
    return asyncio.run(coro)


POLICY = "/admin/models/fake/exit-policy"


@pytest.mark.parametrize(
    ("token", "headers", "status"),
    [
        (None, AUTH, 403),
        (TOKEN, {}, 401),
        (TOKEN, {"Authorization": "Bearer wrong-token"}, 401),
        (TOKEN, {"Authorization": TOKEN}, 401),  # no scheme
        (TOKEN, AUTH, 200),
    ],
)
def test_auth_matrix(setup, token: str | None, headers: dict[str, str], status: int) -> None:
    engine, store, _ = setup

    async def go() -> None:
        async with client(engine, store, token) as c:
            for method, path, body in [("GET", POLICY, None), ("GET", POLICY + "/history", None),
                                       ("PUT", POLICY, {"thresholds": [0.5, 0.5]}),
                                       ("POST", "/admin/models/fake/calibrate", {"target_agreement": 0.9,
                                                                                "dry_run": True})]:
                r = await c.request(method, path, json=body, headers=headers)
                assert r.status_code == status, (method, path, r.text)
                if status == 403:
                    assert r.json() == {"error": DISABLED}
                if status == 401:
                    assert r.headers["www-authenticate"] == "Bearer" and TOKEN not in r.text

    run(go())


def test_get_put_and_history(setup) -> None:
    engine, store, _ = setup

    async def go() -> None:
        async with client(engine, store) as c:
            r = await c.get(POLICY, headers=AUTH)
            body = r.json()
            assert (body["criterion"], body["thresholds"], body["version"]) == ("max_prob", [0.9, 0.9], 1)
            assert body["source"] == "bundle-default" and "patience" in body["criteria"]
            assert "gate" not in body["criteria"] and r.headers["etag"] == '"1"'

            r = await c.put(POLICY, json={"criterion": "patience", "thresholds": [2, None]}, headers=AUTH)
            assert r.status_code == 200, r.text
            assert r.json()["thresholds"] == [2, None] and r.json()["version"] == 2
            assert r.headers["etag"] == '"2"'
            assert engine.policy("fake") == ExitPolicy("patience", (2.0, None), 2)

            r = await c.put(POLICY, json={"thresholds": [None, None]}, headers={**AUTH, "If-Match": '"2"'})
            assert r.status_code == 200 and r.json()["criterion"] == "patience"  # kept when omitted

            history = (await c.get(POLICY + "/history", headers=AUTH)).json()["history"]
            assert [(h["version"], h["source"]) for h in history] == [
                (1, "bundle-default"), (2, "admin:PUT"), (3, "admin:PUT")]
            assert (await c.get("/admin/models/nope/exit-policy", headers=AUTH)).status_code == 404

    run(go())


@pytest.mark.parametrize(
    "body",
    [
        {"criterion": "max_prob", "thresholds": [0.9]},  # wrong length
        {"criterion": "max_prob", "thresholds": [0.9, 1.5]},  # out of range
        {"criterion": "nope", "thresholds": [0.9, 0.9]},  # unknown criterion
        {"criterion": "gate", "thresholds": [0.9, 0.9]},  # the stages have no gate output
        {"criterion": "patience", "thresholds": [1.5, 2]},  # patience takes integers
        {"criterion": "max_prob", "thresholds": ["0.9", 0.9]},  # strings are not numbers
        {"criterion": "max_prob", "thresholds": [True, 0.9]},
        {"criterion": "max_prob", "thresholds": [0.9, 0.9], "extra": 1},
        {"criterion": "max_prob"},
        [0.9, 0.9],
    ],
)
def test_invalid_put_is_422_and_changes_nothing(setup, body: Any) -> None:
    engine, store, _ = setup

    async def go() -> None:
        async with client(engine, store) as c:
            r = await c.put(POLICY, json=body, headers=AUTH)
            assert r.status_code == 422, r.text
            assert isinstance(r.json()["error"], str) and r.json()["error"]
            assert (await c.get(POLICY, headers=AUTH)).json()["version"] == 1

    run(go())
    assert engine.applied == [] and len(store.history("fake")) == 1


def test_malformed_json_is_400(setup) -> None:
    engine, store, _ = setup

    async def go() -> None:
        async with client(engine, store) as c:
            r = await c.put(POLICY, content=b"{nope", headers={**AUTH, "Content-Type": "application/json"})
            assert r.status_code == 400 and "not valid JSON" in r.json()["error"]

    run(go())


def test_if_match_stale_is_412(setup) -> None:
    engine, store, _ = setup

    async def go() -> None:
        async with client(engine, store) as c:
            ok = await c.put(POLICY, json={"thresholds": [0.8, 0.8]}, headers={**AUTH, "If-Match": "1"})
            assert ok.status_code == 200
            for tag in ["1", '"1"', 'W/"1"', "garbage"]:
                r = await c.put(POLICY, json={"thresholds": [0.7, 0.7]}, headers={**AUTH, "If-Match": tag})
                assert r.status_code == 412, tag
            assert (await c.get(POLICY, headers=AUTH)).json()["thresholds"] == [0.8, 0.8]

    run(go())
    assert [p.version for p in engine.applied] == [2]


def test_concurrent_puts_with_if_match_one_wins(setup) -> None:
    engine, store, _ = setup

    async def go() -> list[int]:
        async with client(engine, store) as c:
            puts = [c.put(POLICY, json={"thresholds": [i / 10, None]}, headers={**AUTH, "If-Match": '"1"'})
                    for i in range(1, 9)]
            return [r.status_code for r in await asyncio.gather(*puts)]

    statuses = run(go())
    assert sorted(statuses) == [200] + [412] * 7
    assert engine.policy("fake").version == 2 and store.get("fake").version == 2


def test_auto_calibration_routes(setup) -> None:
    engine, store, _ = setup
    path = "/admin/models/fake/auto-calibration"

    async def go() -> None:
        async with client(engine, store) as c:
            assert (await c.get(path)).status_code == 401
            r = await c.put(path, json={"enabled": True, "target_agreement": 0.98, "min_samples": 50}, headers=AUTH)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["enabled"] and body["target_agreement"] == 0.98 and body["min_samples"] == 50
            assert body["live"]["window_samples"] == 0 and body["last_action"] is None  # no window yet
            got = (await c.get(path, headers=AUTH)).json()
            assert got["enabled"] and got["confidence"] == 0.95
            for bad in [{}, {"enabled": "yes"}, {"enabled": True, "target_agreement": 1.5},
                        {"enabled": True, "min_samples": 3}, {"enabled": True, "surprise": 1}]:
                r = await c.put(path, json=bad, headers=AUTH)
                assert r.status_code == 422, (bad, r.text)
            assert (await c.get("/admin/models/nope/auto-calibration", headers=AUTH)).status_code == 404
            assert (await c.put(path, json={"enabled": False}, headers=AUTH)).json()["enabled"] is False

    run(go())


def test_calibrate_certifies_the_target_by_default(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "big", samples=3000)
    store = FilePolicyStore(tmp_path / "store")
    engine = FakeEngine(bundle, startup_policy(store, bundle.manifest))

    async def go() -> dict:
        async with client(engine, store) as c:
            r = await c.post("/admin/models/fake/calibrate", json={"target_agreement": 0.9, "dry_run": True},
                             headers=AUTH)
            assert r.status_code == 200, r.text
            return r.json()

    out = run(go())
    g = out["guarantee"]
    assert g["confidence"] == 0.95 and g["certified"] and g["fit_samples"] + g["test_samples"] == 3000
    assert out["thresholds"] == g["thresholds"] and g["interval"][0] <= g["held_out"]["agreement"] <= g["interval"][1]
    assert out["expected"]["compute_fraction"] < 1.0
    assert "learn-then-test" in g["method"]


def test_calibrate_dry_run_changes_nothing_and_apply_does(setup) -> None:
    engine, store, bundle = setup
    path = "/admin/models/fake/calibrate"

    async def go() -> None:
        async with client(engine, store) as c:
            r = await c.post(path, json={"target_agreement": 0.95, "dry_run": True, "confidence": None}, headers=AUTH)
            assert r.status_code == 200, r.text
            dry = r.json()
            assert dry["applied"] is False and dry["version"] is None
            expected = dry["expected"]
            assert expected["agreement"] >= 0.95 and expected["compute_fraction"] < 1.0
            assert len(expected["exit_histogram"]) == 3 and abs(sum(expected["exit_histogram"]) - 1) < 1e-9
            assert (await c.get(POLICY, headers=AUTH)).json()["version"] == 1
            assert engine.applied == []

            r = await c.post(path, json={"target_agreement": 0.95, "criterion": "entropy", "confidence": None},
                             headers=AUTH)
            applied = r.json()
            assert applied["applied"] is True and applied["version"] == 2 and r.headers["etag"] == '"2"'
            live = (await c.get(POLICY, headers=AUTH)).json()
            assert live["criterion"] == "entropy" and live["thresholds"] == applied["thresholds"]
            assert live["source"].startswith("admin:calibrate")
            assert engine.policy("fake").thresholds == tuple(applied["thresholds"])

            for bad in [{}, {"target_agreement": 0.9, "compute_budget": 0.5}, {"target_agreement": 2},
                        {"target_agreement": 0.9, "confidence": 1.0}, {"target_agreement": 0.9, "confidence": 0.2},
                        {"target_agreement": 0.9, "criterion": "gate"}, {"compute_budget": 0.01}]:
                r = await c.post(path, json=bad, headers=AUTH)
                assert r.status_code == 422, (bad, r.text)

    run(go())


def test_startup_policy_falls_back_when_the_stored_one_does_not_fit(tmp_path: Path, caplog) -> None:
    store = FilePolicyStore(tmp_path / "state")
    three = make_bundle(tmp_path / "three", num_stages=3)
    store.load("fake", three.manifest.default_policy)
    store.update("fake", ExitPolicy(criterion="margin", thresholds=[0.5, 0.5]), "admin:PUT")
    assert startup_policy(store, three.manifest) == ExitPolicy("margin", (0.5, 0.5), 2)  # restart keeps it

    four = make_bundle(tmp_path / "four", num_stages=4)  # same name, other stages
    policy = startup_policy(store, four.manifest)
    assert policy == ExitPolicy("max_prob", (0.9, 0.9, 0.9), 3)
    assert store.history("fake")[-1].source.startswith("startup:bundle-default")
    assert any("does not fit" in r.message for r in caplog.records)


# -- against the real app and engine --------------------------------------------------------------


def test_real_app_serves_the_admin_api(tiny_bundle: Path, tmp_path: Path) -> None:
    from server.bundle import load_bundle
    from server.engine.engine import Engine
    from server.http.app import create_app
    from server.metrics import Metrics

    settings = Settings(bundles=[tiny_bundle], admin_token=TOKEN, state_dir=tmp_path / "state")
    bundle = load_bundle(tiny_bundle)
    store = FilePolicyStore(settings.resolved_state_dir)
    metrics = Metrics()
    engine = Engine([bundle], settings, metrics, {bundle.name: startup_policy(store, bundle.manifest)})
    app = create_app(settings, engine=engine, metrics=metrics)
    policy = f"/admin/models/{bundle.name}/exit-policy"

    async def go() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            assert (await c.get(policy)).status_code == 401
            assert (await c.put(policy, json={"thresholds": [2.0, 0.5]}, headers=AUTH)).status_code == 422
            r = await c.put(policy, json={"criterion": "max_prob", "thresholds": [None, None]}, headers=AUTH)
            assert r.status_code == 200, r.text
            r = await c.post(f"/admin/models/{bundle.name}/calibrate", json={"target_agreement": 0.99},
                             headers=AUTH)
            assert r.status_code == 200, r.text
            assert r.json()["expected"]["agreement"] >= 0.99
            text = (await c.get("/metrics")).text
            version = float(r.json()["version"])
            assert f'offramp_exit_policy_version{{model="{bundle.name}"}} {version}' in text

    run(go())
    assert engine.policy(bundle.name).version == 3
