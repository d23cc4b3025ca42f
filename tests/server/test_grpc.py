"""The V2 protocol over gRPC: a standard client (tritonclient's `grpc` module) against `offramp
serve --grpc-port`, typed and raw contents, early_exit, the bad-input matrix as gRPC status codes,
metrics; the answers equal the REST answers for the same samples."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

grpcclient = pytest.importorskip("tritonclient.grpc", reason="the gRPC tests need tritonclient[grpc] (test extra)")
grpc = pytest.importorskip("grpc")

from tritonclient.grpc import service_pb2 as pb  # noqa: E402
from tritonclient.grpc import service_pb2_grpc as pb_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from server.errors import BadRequest, NotFound, OfframpError, Overloaded, RequestTimeout  # noqa: E402
from server.http import codec  # noqa: E402
from server.http.grpc_v2 import status_code  # noqa: E402
from tests.fakes import ServerProcess, build_onnx_bundle  # noqa: E402

MODEL, INPUT = "helper-dense", "pixels"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    bundle = build_onnx_bundle(tmp_path_factory.mktemp("grpc") / "bundle")
    proc = ServerProcess(bundle, tmp_path_factory.mktemp("cache"), "--grpc-port", "0",
                         "--max-samples-per-request", "64")
    assert proc.grpc_port is not None, proc.log
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[object]:
    c = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    yield c
    c.close()


@pytest.fixture(scope="module")
def stub(server: ServerProcess) -> Iterator[object]:
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    yield pb_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 16, (n, 8, 8)).astype(np.float32)


def rest_answer(server: ServerProcess, x: np.ndarray, early_exit: bool = True) -> dict[str, np.ndarray]:
    body, headers = codec.encode_request(x, INPUT, early_exit=early_exit)
    r = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    return codec.decode_response(r.content, r.headers)[1]


def infer(client: object, x: np.ndarray, **kw: object) -> object:
    inp = grpcclient.InferInput(INPUT, list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer(MODEL, [inp], **kw)  # type: ignore[attr-defined]


def test_health_and_metadata(client: object) -> None:
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)  # type: ignore[attr-defined]
    meta = client.get_model_metadata(MODEL, as_json=True)  # type: ignore[attr-defined]
    assert meta["name"] == MODEL and meta["platform"] == "offramp-early-exit"
    assert meta["inputs"] == [{"name": INPUT, "datatype": "FP32", "shape": ["-1", "8", "8"]}]
    assert [o["name"] for o in meta["outputs"]] == ["label", "probabilities", "exit_stage"]
    server_meta = client.get_server_metadata(as_json=True)  # type: ignore[attr-defined]
    assert server_meta["name"] == "offramp" and "binary_tensor_data" in server_meta["extensions"]


def test_raw_contents_answer_as_rest_does(client: object, server: ServerProcess) -> None:
    x = pixels(20, seed=1)
    result = infer(client, x)
    want = rest_answer(server, x)
    np.testing.assert_array_equal(result.as_numpy("label"), want["label"])
    np.testing.assert_array_equal(result.as_numpy("exit_stage"), want["exit_stage"])
    np.testing.assert_allclose(result.as_numpy("probabilities"), want["probabilities"], rtol=1e-6)
    assert result.get_response().model_name == MODEL


def test_early_exit_false_runs_every_stage(client: object, server: ServerProcess) -> None:
    x = pixels(12, seed=2)
    full = infer(client, x, parameters={"early_exit": False})
    assert set(full.as_numpy("exit_stage").tolist()) == {2}
    np.testing.assert_array_equal(full.as_numpy("label"), rest_answer(server, x, early_exit=False)["label"])


def test_typed_contents_and_chosen_outputs(stub: object, server: ServerProcess) -> None:
    x = pixels(3, seed=3)
    tensor = pb.ModelInferRequest.InferInputTensor(name=INPUT, datatype="FP32", shape=[3, 8, 8])
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    request = pb.ModelInferRequest(model_name=MODEL, id="t1", inputs=[tensor],
                                   outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="label")])
    response = stub.ModelInfer(request)  # type: ignore[attr-defined]
    assert response.id == "t1" and [o.name for o in response.outputs] == ["label"]
    labels = np.frombuffer(response.raw_output_contents[0], dtype="<i8")
    np.testing.assert_array_equal(labels, rest_answer(server, x)["label"])


def _request(**overrides: object) -> object:
    x = pixels(2)
    fields: dict[str, object] = {"name": INPUT, "datatype": "FP32", "shape": [2, 8, 8]}
    fields.update({k: v for k, v in overrides.items() if k in fields})
    tensor = pb.ModelInferRequest.InferInputTensor(**fields)
    raw = overrides.get("raw", x.tobytes())
    request = pb.ModelInferRequest(model_name=overrides.get("model", MODEL), inputs=[tensor])
    if raw is not None:
        request.raw_input_contents.append(raw)
    if "outputs" in overrides:
        request.outputs.extend(pb.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in overrides["outputs"])
    if "contents" in overrides:
        tensor = request.inputs[0]
        tensor.contents.fp32_contents.extend([1.0] * 128)
    return request


BAD = {
    "unknown model": (_request(model="nope"), "NOT_FOUND", "unknown model"),
    "wrong datatype": (_request(datatype="FP64"), "INVALID_ARGUMENT", "datatype"),
    "wrong shape": (_request(shape=[2, 8, 7]), "INVALID_ARGUMENT", "shape"),
    "too many samples": (_request(shape=[65, 8, 8], raw=pixels(65).tobytes()), "INVALID_ARGUMENT", "exceeds"),
    "short raw contents": (_request(raw=b"\x00" * 10), "INVALID_ARGUMENT", "binary_data_size"),
    "no data": (_request(raw=None), "INVALID_ARGUMENT", "no data"),
    "raw and typed": (_request(contents=True), "INVALID_ARGUMENT", "not both"),
    "NaN": (_request(raw=np.full((2, 8, 8), np.nan, np.float32).tobytes()), "INVALID_ARGUMENT", "NaN"),
    "unknown output": (_request(outputs=["logits"]), "INVALID_ARGUMENT", "unknown output"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests_get_a_clear_status_and_the_server_stays_healthy(stub: object, client: object,
                                                                      case: str) -> None:
    request, code, message = BAD[case]
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request)  # type: ignore[attr-defined]
    assert err.value.code().name == code and message in err.value.details(), err.value.details()
    assert client.is_server_ready()  # type: ignore[attr-defined]


def test_an_unknown_model_is_not_found_for_metadata_too(client: object) -> None:
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.get_model_metadata("nope")  # type: ignore[attr-defined]


def test_statuses_map_to_grpc_codes() -> None:
    codes = {type(e).__name__: status_code(e).name for e in (
        BadRequest("x"), NotFound("x"), Overloaded("x"), RequestTimeout("x"), OfframpError("x", 413),
        OfframpError("x", 503), OfframpError("x"))}
    assert codes == {"BadRequest": "INVALID_ARGUMENT", "NotFound": "NOT_FOUND", "Overloaded": "RESOURCE_EXHAUSTED",
                     "RequestTimeout": "DEADLINE_EXCEEDED", "OfframpError": "INTERNAL"}
    assert status_code(OfframpError("x", 413)).name == "RESOURCE_EXHAUSTED"
    assert status_code(OfframpError("x", 503)).name == "UNAVAILABLE"


def test_metrics_count_grpc_requests(client: object, server: ServerProcess) -> None:
    def count(outcome: str) -> float:
        for line in httpx.get(server.url + "/metrics").text.splitlines():
            if line.startswith(f'offramp_requests_total{{model="{MODEL}",outcome="{outcome}"}}'):
                return float(line.split()[-1])
        return 0.0

    ok, bad = count("ok"), count("bad_request")
    for seed in range(3):
        infer(client, pixels(2, seed=seed))
    with pytest.raises(InferenceServerException):
        inp = grpcclient.InferInput(INPUT, [2, 8, 8], "FP64")
        inp.set_data_from_numpy(pixels(2).astype(np.float64))
        client.infer(MODEL, [inp])  # type: ignore[attr-defined]
    assert count("ok") == ok + 3 and count("bad_request") == bad + 1


def test_no_grpc_port_no_grpc(tmp_path: Path) -> None:
    proc = ServerProcess(build_onnx_bundle(tmp_path / "b"), tmp_path / "c")
    try:
        assert proc.grpc_port is None and not any("gRPC" in line for line in proc.lines)
    finally:
        proc.stop()
