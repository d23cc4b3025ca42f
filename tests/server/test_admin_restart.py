"""Live exit control on a real server process: the admin API changes what inference does, and a
restarted server keeps the policy operators set (issue 4's end-to-end check)."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest

from server.bundle import load_bundle
from server.http import codec as protocol
from tests.fakes import ServerProcess, digits

TOKEN = "test-admin-token-0123456789"


def _infer(url: str, model: str, x: np.ndarray, *, early_exit: bool = True) -> dict[str, np.ndarray]:
    body, headers = protocol.encode_request(x, "pixels", early_exit=early_exit)
    response = httpx.post(f"{url}/v2/models/{model}/infer", content=body, headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    return protocol.decode_response(response.content, response.headers)[1]


def test_policy_changes_apply_and_survive_a_restart(tiny_bundle: Path, tmp_path: Path) -> None:
    manifest = load_bundle(tiny_bundle).manifest
    model, last = manifest.name, manifest.num_stages - 1
    auth = {"Authorization": f"Bearer {TOKEN}"}
    x = digits(120, seed=3)

    server = ServerProcess(tiny_bundle, tmp_path / "cache", "--admin-token", TOKEN)
    try:
        policy_url = f"{server.url}/admin/models/{model}/exit-policy"
        assert httpx.get(policy_url).status_code == 401
        assert httpx.get(policy_url, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert TOKEN not in server.log

        # Every exit disabled: every answer comes from the last stage.
        put = httpx.put(policy_url, headers=auth, json={"criterion": "max_prob", "thresholds": [None] * last})
        assert put.status_code == 200, put.text
        assert set(_infer(server.url, model, x)["exit_stage"].tolist()) == {last}

        # Calibrated to 99% agreement on the calibration data (a point estimate: the tiny bundle's few
        # hundred samples cannot certify 99 %): earlier exits, near-full agreement.
        cal = httpx.post(f"{server.url}/admin/models/{model}/calibrate", headers=auth,
                         json={"target_agreement": 0.99, "confidence": None})
        assert cal.status_code == 200, cal.text
        early = _infer(server.url, model, x)
        full = _infer(server.url, model, x, early_exit=False)
        assert early["exit_stage"].mean() < last
        assert (early["label"] == full["label"]).mean() >= 0.95
        stored = httpx.get(policy_url, headers=auth).json()
    finally:
        assert server.terminate() == 0

    restarted = ServerProcess(tiny_bundle, tmp_path / "cache", "--admin-token", TOKEN)
    try:
        again = httpx.get(f"{restarted.url}/admin/models/{model}/exit-policy", headers=auth).json()
        assert (again["version"], again["criterion"], again["thresholds"]) == (
            stored["version"], stored["criterion"], stored["thresholds"])
        after = _infer(restarted.url, model, x)
        np.testing.assert_array_equal(after["exit_stage"], early["exit_stage"])
    finally:
        restarted.stop()


def test_admin_api_is_off_without_a_token(tiny_bundle: Path, tmp_path: Path) -> None:
    server = ServerProcess(tiny_bundle, tmp_path / "cache")
    try:
        model = load_bundle(tiny_bundle).name
        response = httpx.get(f"{server.url}/admin/models/{model}/exit-policy",
                             headers={"Authorization": f"Bearer {TOKEN}"})
        assert response.status_code == 403
        assert "OFFRAMP_ADMIN_TOKEN" in response.json()["error"]
    finally:
        server.stop()


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(pytest.main([__file__, "-q"]))
