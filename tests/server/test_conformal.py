"""Conformal prediction sets per exit (server/conformal.py, JEI-DNN's `conformal_eedn.py`): the
quantile rule on hand-computed cases, coverage on a synthetic well-calibrated model, the
exit-conditional quantiles, and the served `prediction_set` output over REST and gRPC."""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from server.bundle import Calibration, ConformalSpec, Manifest, load_bundle, write_manifest
from server.conformal import exit_quantiles, policy_quantiles, quantile, sets_from
from server.exits import softmax
from server.replay import replay
from tests.fakes import ServerProcess, digits, fake_manifest

MODEL = "digits-vit-tiny"  # the tiny bundle's name


def test_quantile_is_dynns_rule_and_infinite_when_too_few_samples() -> None:
    scores = np.array([0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6, 1.0])
    # n = 10, coverage 0.8: level ceil(11 * 0.8) / 10 = 0.9; numpy's "higher" at 0.9 of 10 sorted values
    # is the value at index ceil(0.9 * 9) = 9, the largest.
    assert quantile(scores, 0.8) == 1.0
    # coverage 0.5: level ceil(5.5) / 10 = 0.6, index ceil(0.6 * 9) = 6: the 7th smallest, 0.7.
    assert quantile(scores, 0.5) == pytest.approx(0.7)
    # 5 samples cannot promise 0.9: ceil(6 * 0.9) = 6 > 5, so no finite quantile does.
    assert quantile(scores[:5], 0.9) == math.inf
    assert quantile(np.zeros(0), 0.5) == math.inf


def test_sets_hold_every_class_at_or_above_one_minus_the_exit_quantile() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25], [0.5, 0.5, 0.0]])
    sets = sets_from(probs, np.array([0, 1, 2]), np.array([0.5, 0.7, math.inf]))
    # stage 0: p >= 0.5; stage 1: p >= 0.3; stage 2 (infinite quantile): every class.
    assert sets.tolist() == [[True, False, False], [True, True, False], [True, True, True]]


def synthetic(n: int, rng: np.random.Generator, stages: int = 3, classes: int = 5) -> Calibration:
    """A well-calibrated multi-exit model: labels drawn from the last exit's softmax; earlier exits
    see the same logits blurred by noise, sharper with depth."""
    base = rng.normal(0, 2.0, (n, classes))
    labels = np.array([rng.choice(classes, p=p) for p in softmax(base)])
    logits = np.stack([base * (0.4 + 0.6 * s / (stages - 1)) + rng.normal(0, 1.0 - 0.4 * s, (n, classes))
                       for s in range(stages)]).astype(np.float32)
    return Calibration(labels=labels, logits=logits)


def split(cal: Calibration, idx: np.ndarray) -> Calibration:
    return Calibration(labels=cal.labels[idx], logits=cal.logits[:, idx])


def test_coverage_holds_per_exit_on_exchangeable_data() -> None:
    """Split conformal's promise, per exit: over many random calibration / test splits, the sets of
    the answers each exit gives hold the true label at least `coverage` of the time on average."""
    rng = np.random.default_rng(0)
    spec, policy = ConformalSpec(coverage=0.9), ("max_prob", [0.8, 0.7])
    hits, total = np.zeros(3), np.zeros(3)
    sizes = []
    for _ in range(60):
        data = synthetic(1200, rng)
        perm = rng.permutation(1200)
        cal, test = split(data, perm[:600]), split(data, perm[600:])
        q = exit_quantiles(cal, spec, policy)
        stage_of, _ = replay(test, *policy)
        probs = softmax(test.logits[stage_of, np.arange(600)])
        sets = sets_from(probs, stage_of, q)
        covered = sets[np.arange(600), test.labels]
        for s in range(3):
            hits[s] += covered[stage_of == s].sum()
            total[s] += (stage_of == s).sum()
        sizes.append(sets.sum(axis=1).mean())
    coverage = hits / total
    assert (total > 2000).all()  # every exit answers enough for the check to mean something
    assert (coverage >= 0.9 - 0.01).all() and (coverage <= 0.9 + 0.04).all(), coverage
    assert 1.0 < np.mean(sizes) < 5.0  # informative sets: neither singletons always nor every class


def test_quantiles_condition_on_the_exit_and_fall_back_to_all_samples_when_few_exit() -> None:
    rng = np.random.default_rng(1)
    cal = synthetic(400, rng)
    spec = ConformalSpec(coverage=0.9, min_exit_samples=20)
    policy = ("max_prob", [0.9, 0.6])
    stage_of, _ = replay(cal, *policy)
    counts = np.bincount(stage_of, minlength=3)
    assert counts[0] <= 20 < counts[1]  # exit 0 takes the fallback, exit 1 its own samples
    got = exit_quantiles(cal, spec, policy)
    for s in range(3):
        scores = 1.0 - softmax(cal.logits[s])[np.arange(400), cal.labels]
        here = scores[stage_of == s]
        want = quantile(here if len(here) > 20 else scores, 0.9)
        assert got[s] == want
    # Exit 0 disabled: nobody exits there, so its quantile is every sample's (never served, but defined).
    off = exit_quantiles(cal, spec, ("max_prob", [None, 0.6]))
    assert off[0] == quantile(1.0 - softmax(cal.logits[0])[np.arange(400), cal.labels], 0.9)
    # Full depth (early_exit false): the last stage's quantile over every sample.
    full = exit_quantiles(cal, spec, None)
    assert full[2] == quantile(1.0 - softmax(cal.logits[2])[np.arange(400), cal.labels], 0.9)


def test_a_manifest_with_conformal_sets_needs_calibration_data() -> None:
    raw = fake_manifest().model_dump(mode="json")
    with pytest.raises(ValueError, match="conformal prediction sets need the calibration data"):
        Manifest.model_validate({**raw, "calibration": None, "conformal": {"coverage": 0.9}})
    with pytest.raises(ValueError, match="coverage"):
        Manifest.model_validate({**raw, "conformal": {"coverage": 1.0}})


@pytest.fixture(scope="module")
def conformal_bundle(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("conformal") / "bundle"
    shutil.copytree(tiny_bundle, root)
    manifest = load_bundle(root).manifest
    write_manifest(root, manifest.model_copy(update={"conformal": ConformalSpec(coverage=0.9)}))
    return root


@pytest.fixture(scope="module")
def server(conformal_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(conformal_bundle, tmp_path_factory.mktemp("cache"), "--grpc-port", "0")
    yield proc
    proc.stop()


def _infer(server: ServerProcess, x: np.ndarray, outputs: list[str], early_exit: bool = True) -> httpx.Response:
    body = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}],
            "outputs": [{"name": n} for n in outputs], "parameters": {"early_exit": early_exit}}
    return httpx.post(f"{server.url}/v2/models/{MODEL}/infer", json=body)


def _outputs(response: httpx.Response) -> dict[str, np.ndarray]:
    assert response.status_code == 200, response.text
    return {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in response.json()["outputs"]}


@pytest.mark.parametrize("early_exit", [True, False])
def test_served_sets_are_the_exit_quantiles_of_the_live_policy(
        server: ServerProcess, conformal_bundle: Path, early_exit: bool) -> None:
    bundle = load_bundle(conformal_bundle)
    x = digits(24, seed=3)
    out = _outputs(_infer(server, x, ["prediction_set", "probabilities", "exit_stage"], early_exit))
    assert out["prediction_set"].dtype == bool and out["prediction_set"].shape == (24, 10)
    policy = bundle.manifest.default_policy
    q = exit_quantiles(bundle.calibration(), bundle.manifest.conformal,  # type: ignore[arg-type]
                       (policy.criterion, list(policy.thresholds)) if early_exit else None)
    want = sets_from(out["probabilities"], out["exit_stage"], q)
    assert (out["prediction_set"] == want).all()
    assert not out["prediction_set"].all()  # informative: not every class for every sample (LAC sets
    # may also be empty: no class reaches 1 - q, as in dynn's `get_pred_sets`)
    assert (policy_quantiles(bundle, policy if early_exit else None) == q).all()  # the server's cached path too


def test_sets_are_only_sent_when_asked_and_listed_in_the_metadata(server: ServerProcess) -> None:
    names = [o["name"] for o in _infer(server, digits(2), []).json()["outputs"]]
    assert names == ["label", "probabilities", "exit_stage"]
    meta = httpx.get(f"{server.url}/v2/models/{MODEL}").json()
    assert {"name": "prediction_set", "datatype": "BOOL", "shape": [-1, 10]} in meta["outputs"]
    assert meta["parameters"]["conformal_coverage"] == 0.9


def test_binary_sets_and_grpc(server: ServerProcess) -> None:
    grpcclient = pytest.importorskip("tritonclient.grpc", reason="needs tritonclient[grpc] (test extra)")
    httpclient = pytest.importorskip("tritonclient.http", reason="needs tritonclient[http] (test extra)")
    x = digits(5, seed=4)
    json_sets = _outputs(_infer(server, x, ["prediction_set"]))["prediction_set"]
    http = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
    inp = httpclient.InferInput("pixels", [5, 8, 8], "FP32")
    inp.set_data_from_numpy(x)
    got = http.infer(MODEL, [inp], outputs=[httpclient.InferRequestedOutput("prediction_set", binary_data=True)])
    assert (got.as_numpy("prediction_set") == json_sets).all()
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    try:
        ginp = grpcclient.InferInput("pixels", [5, 8, 8], "FP32")
        ginp.set_data_from_numpy(x)
        result = client.infer(MODEL, [ginp], outputs=[grpcclient.InferRequestedOutput("prediction_set")])
        assert (result.as_numpy("prediction_set") == json_sets).all()
    finally:
        client.close()


def test_a_model_without_conformal_calibration_refuses_the_output(tiny_bundle: Path,
                                                                   tmp_path: Path) -> None:
    proc = ServerProcess(tiny_bundle, tmp_path / "cache", "--grpc-port", "0")
    try:
        r = _infer(proc, digits(2), ["prediction_set"])
        assert r.status_code == 400 and "no conformal calibration" in r.json()["error"]
        meta = httpx.get(f"{proc.url}/v2/models/{MODEL}").json()
        assert "prediction_set" not in [o["name"] for o in meta["outputs"]]
        r = _infer(proc, digits(2), ["logits"])  # the list of outputs names what this model serves
        assert r.status_code == 400 and r.json()["error"].endswith("['label', 'probabilities', 'exit_stage']")
        grpcclient = pytest.importorskip("tritonclient.grpc", reason="needs tritonclient[grpc] (test extra)")
        from tritonclient.utils import InferenceServerException

        client = grpcclient.InferenceServerClient(f"127.0.0.1:{proc.grpc_port}")
        inp = grpcclient.InferInput("pixels", [1, 8, 8], "FP32")
        inp.set_data_from_numpy(digits(1))
        with pytest.raises(InferenceServerException, match="no conformal calibration") as err:
            client.infer(MODEL, [inp], outputs=[grpcclient.InferRequestedOutput("prediction_set")])
        assert "INVALID_ARGUMENT" in str(err.value.status())
        client.close()
        assert httpx.get(f"{proc.url}/v2/health/ready").status_code == 200
    finally:
        proc.stop()


def test_a_policy_the_calibration_data_cannot_replay_is_a_409_before_inference(conformal_bundle: Path) -> None:
    """A live policy is checked against the stages, not the calibration data: a criterion whose array
    the calibration data lacks cannot give sets; the request says so instead of failing with a 500."""
    import asyncio

    from server.errors import OfframpError
    from server.http.describe import infer
    from server.policy import ExitPolicy
    from tests.fakes import FakeEngine

    bundle = load_bundle(conformal_bundle)
    calib = bundle.calibration()
    stripped = Calibration(labels=calib.labels, logits=calib.logits)  # no similarity array
    engine = FakeEngine()
    engine.policy = lambda model: ExitPolicy("similarity", (0.9,) * (bundle.manifest.num_stages - 1), 1)  # type: ignore[method-assign]
    called = []

    async def never(*args: object, **kw: object) -> None:
        called.append(args)

    engine.infer = never  # type: ignore[method-assign]
    bundle.calibration = lambda: stripped  # type: ignore[method-assign]
    with pytest.raises(OfframpError) as err:
        asyncio.run(infer(engine, MODEL, bundle, digits(2), early_exit=True, outputs=["prediction_set"], busy=False))
    assert err.value.status_code == 409 and "needs the calibration array 'similarity'" in str(err.value) and not called
