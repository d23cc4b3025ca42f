"""V2 request decoding / response encoding, JSON and binary, and every way a request can be wrong."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest

from server.bundle import InputSpec
from server.errors import BadRequest
from server.http import codec as protocol
from server.http import describe
from tests.fakes import fake_manifest

SPEC = InputSpec(name="pixels", shape=[-1, 8, 8], dtype="FP32")
MAX = 16


@dataclass(frozen=True)
class Result:
    labels: np.ndarray
    probabilities: np.ndarray
    exit_stage: np.ndarray
    prediction_set: np.ndarray | None = None


def _result(n: int, classes: int = 10) -> Result:
    rng = np.random.default_rng(n)
    p = rng.random((n, classes)).astype(np.float32)
    p /= p.sum(1, keepdims=True)
    return Result(p.argmax(1).astype(np.int64), p, rng.integers(0, 3, n).astype(np.int32), p >= 0.1)


def _decode(body: bytes, headers: dict[str, str]) -> protocol.InferRequest:
    return protocol.decode_infer_request(body, headers.get(protocol.INFER_HEADER), SPEC, max_samples=MAX)


def _json_body(**overrides: object) -> bytes:
    tensor = {"name": "pixels", "datatype": "FP32", "shape": [2, 8, 8], "data": list(range(128))}
    doc: dict = {"inputs": [tensor]}
    for key, value in overrides.items():
        if key in tensor or key == "parameters_tensor":
            tensor["parameters" if key == "parameters_tensor" else key] = value
        else:
            doc[key] = value
    return json.dumps(doc).encode()


@pytest.mark.parametrize("binary", [False, True])
def test_request_round_trip(binary: bool) -> None:
    x = np.random.default_rng(0).uniform(0, 16, (5, 8, 8)).astype(np.float32)
    body, headers = protocol.encode_request(x, "pixels", binary=binary, request_id="r-1", early_exit=False)
    req = _decode(body, headers)
    np.testing.assert_array_equal(req.x, x)
    assert req.x.dtype == np.float32 and req.id == "r-1" and req.early_exit is False
    assert [o.name for o in req.outputs] == ["label", "probabilities", "exit_stage"]


def test_json_data_may_be_nested() -> None:
    nested = np.arange(128, dtype=np.float32).reshape(2, 8, 8).tolist()
    req = _decode(_json_body(data=nested), {})
    np.testing.assert_array_equal(req.x.ravel(), np.arange(128))


@pytest.mark.parametrize("pad", range(4))
def test_binary_tensor_at_any_byte_offset(pad: int) -> None:
    """The JSON header has any length, so the tensor bytes may start misaligned for float32."""
    x = np.arange(3 * 64, dtype=np.float32).reshape(3, 8, 8)
    body, headers = protocol.encode_request(x, "pixels")
    n = int(headers[protocol.INFER_HEADER])
    body = body[:n] + b" " * pad + body[n:]
    req = _decode(body, {protocol.INFER_HEADER: str(n + pad)})
    np.testing.assert_array_equal(req.x, x)
    assert req.x.flags.aligned


@pytest.mark.parametrize("binary_output", [False, True])
def test_response_round_trip(binary_output: bool) -> None:
    result = _result(4)
    req = protocol.InferRequest(
        x=np.zeros((4, 8, 8), np.float32), id="abc",
        outputs=[protocol.RequestedOutput(n, binary_output) for n in protocol.OUTPUTS],
    )
    body, headers = protocol.encode_infer_response(fake_manifest(), req, result)
    assert (protocol.INFER_HEADER in headers) is binary_output
    assert headers["content-type"] == (
        protocol.BINARY_CONTENT_TYPE if binary_output else protocol.JSON_CONTENT_TYPE
    )
    doc, arrays = protocol.decode_response(body, headers)
    assert doc["id"] == "abc" and doc["model_name"] == "digits" and doc["model_version"] == "3"
    assert [o["datatype"] for o in doc["outputs"]] == ["INT64", "FP32", "INT32", "BOOL"]
    np.testing.assert_array_equal(arrays["prediction_set"], result.prediction_set)
    assert arrays["prediction_set"].dtype == bool
    np.testing.assert_array_equal(arrays["label"], result.labels)
    np.testing.assert_array_equal(arrays["probabilities"], result.probabilities)
    np.testing.assert_array_equal(arrays["exit_stage"], result.exit_stage)
    assert arrays["probabilities"].shape == (4, 10)


def test_outputs_select_and_mix_binary_and_json() -> None:
    wanted = [{"name": "exit_stage"}, {"name": "label", "parameters": {"binary_data": True}}]
    req = _decode(_json_body(outputs=wanted), {})
    Out = protocol.RequestedOutput
    assert req.outputs == [Out("exit_stage", False), Out("label", True)]
    result = _result(2)
    out, headers = protocol.encode_infer_response(fake_manifest(), req, result)
    doc, arrays = protocol.decode_response(out, headers)
    assert [o["name"] for o in doc["outputs"]] == ["exit_stage", "label"]
    assert "data" in doc["outputs"][0] and "data" not in doc["outputs"][1]
    np.testing.assert_array_equal(arrays["label"], result.labels)


def test_binary_data_output_is_the_default_for_every_output() -> None:
    req = _decode(_json_body(parameters={"binary_data_output": True}), {})
    assert all(o.binary for o in req.outputs)
    req = _decode(_json_body(
        parameters={"binary_data_output": True},
        outputs=[{"name": "label"}, {"name": "exit_stage", "parameters": {"binary_data": False}}],
    ), {})
    assert [o.binary for o in req.outputs] == [True, False]


def test_metadata_describes_inputs_and_outputs() -> None:
    meta = describe.model_metadata(fake_manifest(classes=7))
    assert meta["name"] == "digits" and meta["versions"] == ["3"] and meta["platform"] == "offramp-early-exit"
    assert meta["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 8, 8]}]
    assert {o["name"]: (o["datatype"], o["shape"]) for o in meta["outputs"]} == {
        "label": ("INT64", [-1]), "probabilities": ("FP32", [-1, 7]), "exit_stage": ("INT32", [-1]),
    }
    assert "binary_tensor_data" in describe.server_metadata()["extensions"]


def _binary(x: np.ndarray, *, size: int | None = None, trailing: bytes = b"", header: str | None = None,
            **tensor: object) -> tuple[bytes, dict[str, str]]:
    blob = x.tobytes()
    t = {"name": "pixels", "datatype": "FP32", "shape": list(x.shape),
         "parameters": {"binary_data_size": len(blob) if size is None else size}, **tensor}
    head = json.dumps({"inputs": [t]}).encode()
    return head + blob + trailing, {protocol.INFER_HEADER: header or str(len(head))}


GOOD = np.ones((2, 8, 8), np.float32)
BAD_CASES = {
    "malformed JSON": (b'{"inputs": [', {}, "malformed JSON"),
    "not an object": (b"[1, 2]", {}, "JSON object"),
    "no inputs": (b"{}", {}, "inputs must be"),
    "missing input": (_json_body(name="image"), {}, "missing input 'pixels'"),
    "extra input": (json.dumps({"inputs": [
        json.loads(_json_body())["inputs"][0],
        {"name": "mask", "datatype": "FP32", "shape": [1], "data": [1]},
    ]}).encode(), {}, "unexpected input(s) ['mask']"),
    "duplicate input": (json.dumps({"inputs": [json.loads(_json_body())["inputs"][0]] * 2}).encode(), {},
                        "given 2 times"),
    "wrong datatype": (_json_body(datatype="INT64"), {}, "datatype 'INT64'"),
    "wrong rank": (_json_body(shape=[2, 64]), {}, "does not match [-1, 8, 8]"),
    "wrong dims": (_json_body(shape=[2, 8, 7]), {}, "does not match"),
    "shape not ints": (_json_body(shape=[2, "8", 8]), {}, "list of integers"),
    "batch of zero": (_json_body(shape=[0, 8, 8], data=[]), {}, "batch of 0"),
    "batch too large": (_json_body(shape=[MAX + 1, 8, 8], data=[0] * (MAX + 1) * 64), {},
                        "exceeds max_samples_per_request"),
    "data too short": (_json_body(data=list(range(127))), {}, "has 127 elements"),
    "data too long": (_json_body(data=list(range(129))), {}, "has 129 elements"),
    "ragged data": (_json_body(data=[[1, 2], [3]]), {}, "not a regular array"),
    "strings in data": (_json_body(data=["1"] * 128), {}, "not valid for datatype FP32"),
    "no data": (json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 8, 8]}]}).encode(),
                {}, "no data"),
    "NaN": (_json_body(data=[float("nan")] + [0] * 127), {}, "NaN or infinite"),
    "infinity": (_json_body(data=[1e39] + [0] * 127), {}, "NaN or infinite"),
    "bad early_exit": (_json_body(parameters={"early_exit": "no"}), {}, "early_exit must be true or false"),
    "bad id": (_json_body(id=7), {}, "id must be a string"),
    "unknown output": (_json_body(outputs=[{"name": "logits"}]), {}, "unknown output 'logits'"),
    "output twice": (_json_body(outputs=[{"name": "label"}, {"name": "label"}]), {}, "requested twice"),
    "binary NaN": (*_binary(np.full((2, 8, 8), np.nan, np.float32)), "NaN or infinite"),
    "binary size mismatch": (*_binary(GOOD, size=100), "binary_data_size is 100 bytes"),
    "binary size beyond body": (*_binary(GOOD, size=10_000), "only 512 follow"),
    "binary shape mismatch": (*_binary(GOOD, shape=[3, 8, 8]), "needs 768"),
    "binary trailing bytes": (*_binary(GOOD, trailing=b"xxxx"), "4 bytes after the JSON header"),
    "binary without header": (_binary(GOOD)[0], {}, "malformed JSON"),
    "header not a number": (*_binary(GOOD, header="ten"), "must be an integer"),
    "header beyond body": (*_binary(GOOD, header="100000"), "the body has"),
    "binary and data": (*_binary(GOOD, data=[1]), "not both"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_requests_are_refused_with_a_message_naming_the_problem(case: str) -> None:
    body, headers, expected = BAD_CASES[case]
    with pytest.raises(BadRequest) as info:
        _decode(body, headers)
    assert info.value.status_code == 400
    assert expected in str(info.value)


def test_binary_size_declared_without_extension_header() -> None:
    body, _ = _binary(GOOD)
    head = body[: -GOOD.nbytes]
    with pytest.raises(BadRequest, match="no Inference-Header-Content-Length"):
        _decode(head, {})


def test_integer_input_out_of_range() -> None:
    spec = InputSpec(name="ids", shape=[-1, 2], dtype="INT32")
    body = json.dumps({"inputs": [{"name": "ids", "datatype": "INT32", "shape": [1, 2], "data": [1, 2**40]}]})
    with pytest.raises(BadRequest, match="out of range for INT32"):
        protocol.decode_infer_request(body.encode(), None, spec, max_samples=4)
    body = json.dumps({"inputs": [{"name": "ids", "datatype": "INT32", "shape": [1, 2], "data": [1.5, 2]}]})
    with pytest.raises(BadRequest, match="not valid for datatype INT32"):
        protocol.decode_infer_request(body.encode(), None, spec, max_samples=4)
