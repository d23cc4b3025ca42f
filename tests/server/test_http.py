"""The V2 server over real HTTP: `offramp serve` in its own process on 127.0.0.1, a real bundle.

Covers a standard V2 client (tritonclient, binary tensors by default), JSON requests, the
bad-input matrix, /metrics counts, overload (503, never a hang) and SIGTERM with requests in flight.
"""

from __future__ import annotations

import http.client
import json
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.bundle import load_bundle
from server.http import codec as protocol
from tests.fakes import ServerProcess, digits, infer

REPO = Path(__file__).resolve().parents[2]
MAX_BYTES = 65536
MAX_SAMPLES = 128
STARTUP_S = 90


@pytest.fixture(scope="module")
def server(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(
        tiny_bundle, tmp_path_factory.mktemp("cache"),
        "--max-request-bytes", str(MAX_BYTES), "--max-samples-per-request", str(MAX_SAMPLES),
    )
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def model(tiny_bundle: Path) -> str:
    return load_bundle(tiny_bundle).name


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = httpx.get(url + "/metrics").text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text) for s in family.samples
    }


def metric(values: dict, name: str, **labels: str) -> float:
    return values.get((name, frozenset(labels.items())), 0.0)


def run_stages_directly(bundle: Path, x: np.ndarray) -> np.ndarray:
    """The last stage's logits, running the stage files one after another with onnxruntime."""
    import onnxruntime as ort

    b = load_bundle(bundle)
    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.intra_op_num_threads = 1
    feed = {b.manifest.input.name: x}
    for i in range(b.manifest.num_stages):
        sess = ort.InferenceSession(str(b.stage_path(i)), so, providers=["CPUExecutionProvider"])
        hidden, logits = sess.run(["hidden", "logits"], feed)
        feed = {"hidden_in": hidden}
    return logits


def test_health_and_metadata(server: ServerProcess, model: str, tiny_bundle: Path) -> None:
    manifest = load_bundle(tiny_bundle).manifest
    assert httpx.get(server.url + "/v2/health/live").json() == {"live": True}
    assert httpx.get(server.url + "/v2/health/ready").json() == {"ready": True}
    meta = httpx.get(server.url + "/v2").json()
    assert meta["name"] == "offramp" and "binary_tensor_data" in meta["extensions"]
    m = httpx.get(f"{server.url}/v2/models/{model}").json()
    assert m["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 8, 8]}]
    classes = manifest.num_classes
    assert m["outputs"][1] == {"name": "probabilities", "datatype": "FP32", "shape": [-1, classes]}
    assert httpx.get(f"{server.url}/v2/models/{model}/ready").json() == {"name": model, "ready": True}
    assert httpx.get(f"{server.url}/v2/models/{model}/versions/{manifest.version}").status_code == 200
    missing = httpx.get(server.url + "/v2/models/nope")
    assert missing.status_code == 404 and "nope" in missing.json()["error"]
    assert httpx.get(server.url + "/v2/nothing-here").json()["error"]


def test_tritonclient_round_trip_with_its_defaults(
    server: ServerProcess, model: str, tiny_bundle: Path
) -> None:
    httpclient = pytest.importorskip("tritonclient.http")
    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(model)
        assert client.get_model_metadata(model)["platform"] == "offramp-early-exit"
        x = digits(100)
        inp = httpclient.InferInput("pixels", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)  # binary_data=True: the binary tensor data extension
        result = client.infer(model, [inp], request_id="batch-1")  # no outputs: all come back binary
        assert result.get_response()["id"] == "batch-1"
        labels, probs, stages = (result.as_numpy(n) for n in ("label", "probabilities", "exit_stage"))
        assert labels.shape == (100,) and probs.shape == (100, 10) and stages.shape == (100,)
        assert labels.dtype == np.int64 and probs.dtype == np.float32 and stages.dtype == np.int32
        np.testing.assert_array_equal(labels, probs.argmax(1))
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
        assert set(stages.tolist()) <= {0, 1, 2}

        full = client.infer(model, [inp], outputs=[httpclient.InferRequestedOutput("label"),
                                                   httpclient.InferRequestedOutput("exit_stage")],
                            parameters={"early_exit": False})
        assert full.as_numpy("probabilities") is None  # only what was asked for
        assert (full.as_numpy("exit_stage") == 2).all()
        np.testing.assert_array_equal(full.as_numpy("label"), run_stages_directly(tiny_bundle, x).argmax(1))
    finally:
        client.close()


def test_json_request_and_response(server: ServerProcess, model: str) -> None:
    x = digits(7, seed=1)
    response = infer(server.url, model, x, binary=False, request_id="j", early_exit=False)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    doc = response.json()
    assert doc["id"] == "j" and doc["model_name"] == model
    outputs = {o["name"]: o for o in doc["outputs"]}
    assert outputs["probabilities"]["shape"] == [7, 10] and len(outputs["probabilities"]["data"]) == 70
    assert outputs["exit_stage"]["data"] == [2] * 7
    nested = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [7, 8, 8], "data": x.tolist()}],
              "outputs": [{"name": "label"}]}
    again = httpx.post(f"{server.url}/v2/models/{model}/versions/1/infer", json=nested).json()
    assert again["outputs"][0]["data"] == outputs["label"]["data"]


def _raw_post(port: int, path: str, headers: dict[str, str], chunks: list[bytes]) -> tuple[int, dict]:
    """POST with exact control of the framing (a Content-Length with no body, or a chunked body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest("POST", path)
        for key, value in headers.items():
            conn.putheader(key, value)
        conn.endheaders()
        try:
            for chunk in chunks:
                conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may refuse before reading everything; its answer is still there
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_bad_inputs_get_4xx_and_the_server_stays_healthy(server: ServerProcess, model: str) -> None:
    url = f"{server.url}/v2/models/{model}/infer"
    good = digits(2)
    blob, bin_headers = protocol.encode_request(good, "pixels")
    tensor = {"name": "pixels", "datatype": "FP32", "shape": [2, 8, 8], "data": good.ravel().tolist()}

    def js(**changes: object) -> bytes:
        return json.dumps({"inputs": [{**tensor, **changes}]}).encode()

    cases: list[tuple[str, str, bytes, dict[str, str], int, str]] = [
        ("malformed JSON", url, b'{"inputs": [1,', {}, 400, "malformed JSON"),
        ("wrong shape", url, js(shape=[2, 64]), {}, 400, "does not match"),
        ("wrong datatype", url, js(datatype="FP64"), {}, 400, "datatype 'FP64'"),
        ("NaN", url, js(data=[float("nan")] * 128), {}, 400, "NaN or infinite"),
        ("missing input", url, js(name="image"), {}, 400, "missing input 'pixels'"),
        ("extra input", url, json.dumps({"inputs": [tensor, {**tensor, "name": "extra"}]}).encode(), {}, 400,
         "unexpected input"),
        ("data length", url, js(data=[0.0] * 100), {}, 400, "has 100 elements"),
        ("binary size", url, blob[:-4], bin_headers, 400, "binary_data_size"),
        ("too many samples", url, js(shape=[MAX_SAMPLES + 1, 8, 8], data=[0] * 64 * (MAX_SAMPLES + 1)), {},
         400, "max_samples_per_request"),
        ("unknown model", f"{server.url}/v2/models/nope/infer", js(), {}, 404, "nope"),
        ("unknown version", f"{server.url}/v2/models/{model}/versions/99/infer", js(), {}, 404,
         "version '99'"),
    ]
    for what, target, body, headers, status, message in cases:
        response = httpx.post(target, content=body, headers=headers, timeout=30)
        assert response.status_code == status, (what, response.text)
        assert message in response.json()["error"], (what, response.json())

    path = f"/v2/models/{model}/infer"
    status, doc = _raw_post(server.port, path, {"Content-Length": str(MAX_BYTES * 100)}, [])
    assert status == 413 and "exceeds the limit" in doc["error"]
    status, doc = _raw_post(server.port, path, {"Transfer-Encoding": "chunked"}, [b" " * 20000] * 4)
    assert status == 413 and "exceeds the limit" in doc["error"]

    assert httpx.get(server.url + "/v2/health/ready").status_code == 200
    assert infer(server.url, model, good).status_code == 200


def test_metrics_count_the_requests_sent(server: ServerProcess, model: str) -> None:
    before = scrape(server.url)
    sizes = [1, 3, 5]
    for i, n in enumerate(sizes):
        assert infer(server.url, model, digits(n, seed=i), binary=i % 2 == 0).status_code == 200
    for _ in range(2):
        assert httpx.post(f"{server.url}/v2/models/{model}/infer", content=b"nope").status_code == 400
    after = scrape(server.url)

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("offramp_requests_total", model=model, outcome="ok") == len(sizes)
    assert delta("offramp_requests_total", model=model, outcome="bad_request") == 2
    assert delta("offramp_request_latency_seconds_count", model=model) == len(sizes)
    assert delta("offramp_samples_total", model=model) == sum(sizes)
    exited = sum(delta("offramp_exit_stage_total", model=model, stage=str(s)) for s in range(3))
    assert exited == sum(sizes)


def test_overload_gives_503_at_once_not_a_hang(tiny_bundle: Path, tmp_path: Path) -> None:
    # One sample may be queued; the first waits 300 ms for its batch to fill, so the rest find it full.
    proc = ServerProcess(tiny_bundle, tmp_path, "--max-queue-size", "1", "--max-queue-delay-ms", "300")
    try:
        model = load_bundle(tiny_bundle).name
        x = digits(1)
        with ThreadPoolExecutor(12) as pool:
            responses = list(pool.map(lambda _: infer(proc.url, model, x), range(12)))
        statuses = [r.status_code for r in responses]
        assert set(statuses) == {200, 503}, statuses
        for r in responses:
            if r.status_code == 503:
                assert "overloaded" in r.json()["error"] and int(r.headers["retry-after"]) >= 1
        values = scrape(proc.url)
        overloaded = metric(values, "offramp_requests_total", model=model, outcome="overloaded")
        assert overloaded == statuses.count(503)
        assert infer(proc.url, model, x).status_code == 200  # and it still serves
    finally:
        proc.stop()


def test_sigterm_answers_requests_in_flight_then_exits_0(tiny_bundle: Path, tmp_path: Path) -> None:
    # Requests wait up to 2.5 s for a batch to fill: SIGTERM arrives while all of them are queued.
    proc = ServerProcess(tiny_bundle, tmp_path, "--max-queue-delay-ms", "2500", "--max-batch-size", "64")
    try:
        model = load_bundle(tiny_bundle).name
        count = 6
        with ThreadPoolExecutor(count) as pool:
            futures = [pool.submit(infer, proc.url, model, digits(1, seed=i)) for i in range(count)]
            for _ in range(200):  # bounded: until every request is queued inside the server
                queued = metric(scrape(proc.url), "offramp_queue_depth", model=model, stage="0")
                if queued == count:
                    break
                time.sleep(0.02)
            else:
                pytest.fail(f"requests never queued up ({queued} of {count})")
            code = proc.terminate()
            statuses = [f.result().status_code for f in futures]
        assert statuses == [200] * count
        assert code == 0, proc.log
        assert "engine stopped" in proc.log
    finally:
        proc.stop()


def test_several_bundles_serve_as_several_models(tiny_bundle: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(tiny_bundle, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["name"] = "second-model"
    (other / "manifest.json").write_text(json.dumps(manifest))
    proc = ServerProcess(tiny_bundle, tmp_path, "--bundle", str(other))
    try:
        first = load_bundle(tiny_bundle).name
        x = digits(4)
        answers = [infer(proc.url, name, x) for name in (first, "second-model")]
        assert [a.status_code for a in answers] == [200, 200]
        labels = [protocol.decode_response(a.content, a.headers)[1]["label"] for a in answers]
        np.testing.assert_array_equal(labels[0], labels[1])  # same stage files, same answers
        values = scrape(proc.url)
        for name in (first, "second-model"):
            assert metric(values, "offramp_samples_total", model=name) == 4
    finally:
        proc.stop()
