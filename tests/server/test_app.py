"""The app's own behaviour, in process with a fake engine: error mapping, outcomes, readiness,
lifespan. The real engine over real HTTP is in test_http.py."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from offramp.cli import demo_bundle
from server.errors import BundleError, Overloaded, RequestTimeout
from server.http import codec as protocol
from server.http.app import create_app
from server.http.v2 import UNKNOWN_MODEL
from server.metrics import Metrics
from server.settings import Settings
from tests.fakes import FakeEngine


def _client(engine: FakeEngine, metrics: Metrics) -> TestClient:
    return TestClient(create_app(Settings(), engine=engine, metrics=metrics))


def _outcomes(metrics: Metrics, model: str = "digits") -> dict[str, float]:
    return {
        s.labels["outcome"]: s.value
        for fam in metrics.requests.collect() for s in fam.samples
        if s.name.endswith("_total") and s.labels["model"] == model
    }


def _post(client: TestClient, model: str = "digits", n: int = 2, **kwargs: Any) -> httpx.Response:
    body, headers = protocol.encode_request(np.zeros((n, 8, 8), np.float32), "pixels", **kwargs)
    return client.post(f"/v2/models/{model}/infer", content=body, headers=headers)


def test_lifespan_starts_and_drains_the_engine() -> None:
    engine = FakeEngine()
    with _client(engine, Metrics()) as client:
        assert engine.started and client.get("/v2/health/ready").status_code == 200
        response = _post(client, early_exit=False, request_id="x")
        doc, arrays = protocol.decode_response(response.content, response.headers)
        assert doc["id"] == "x" and (arrays["exit_stage"] == 2).all()
    assert engine.stopped_with == [True]


def test_not_ready_and_draining_answer_503() -> None:
    engine = FakeEngine()
    app = create_app(Settings(), engine=engine, metrics=Metrics())
    with TestClient(app) as client:
        engine.started = False
        assert client.get("/v2/health/ready").status_code == 503
        assert client.get("/v2/models/digits/ready").json() == {"name": "digits", "ready": False}
        engine.started = True
        app.state.draining = True
        assert client.get("/v2/health/ready").json() == {"ready": False}
        assert client.get("/v2/health/live").status_code == 200


@pytest.mark.parametrize(("error", "status", "outcome"), [
    (Overloaded("model 'digits' is overloaded", retry_after_s=2), 503, "overloaded"),
    (RequestTimeout("model 'digits' did not answer within 1s"), 504, "timeout"),
    (RuntimeError("boom"), 500, "error"),
])
def test_engine_errors_keep_their_status_and_count_by_outcome(
    error: Exception, status: int, outcome: str
) -> None:
    metrics = Metrics()
    with _client(FakeEngine(error=error), metrics) as client:
        response = _post(client)
        assert response.status_code == status
        assert response.json()["error"]
        if status == 503:
            assert response.headers["retry-after"] == "2"
        if status == 500:
            assert "boom" not in response.json()["error"]  # internals stay in the log
    assert _outcomes(metrics) == {outcome: 1.0}


def test_outcomes_and_unknown_models_keep_metric_labels_bounded() -> None:
    metrics = Metrics()
    with _client(FakeEngine(), metrics) as client:
        assert _post(client).status_code == 200
        assert _post(client, n=0).status_code == 400
        for name in ("a", "b", "c"):
            assert _post(client, model=name).status_code == 404
        assert client.get("/metrics").headers["content-type"].startswith("text/plain")
    assert _outcomes(metrics) == {"ok": 1.0, "bad_request": 1.0}
    assert _outcomes(metrics, UNKNOWN_MODEL) == {"bad_request": 3.0}


def test_framework_errors_use_the_same_error_format() -> None:
    with _client(FakeEngine(), Metrics()) as client:
        assert client.get("/v2/no/such/route").json() == {"error": "Not Found"}
        wrong_method = client.get("/v2/models/digits/infer")
        assert wrong_method.status_code == 405 and "error" in wrong_method.json()


def test_a_missing_bundle_stops_the_app_before_it_starts(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="does not exist"):
        create_app(Settings(bundles=[tmp_path / "missing"]))


def test_no_bundle_without_the_export_extra_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "model_export.demo", None)  # as if model_export were not installed
    with pytest.raises(BundleError, match=r"pip install 'offramp\[export\]'"):
        demo_bundle(Settings())


def test_the_server_serves_only_what_it_is_given() -> None:
    with pytest.raises(BundleError, match="no bundle to serve"):
        create_app(Settings())
