"""V2 (Open Inference Protocol / KServe V2) conformance of the HTTP server, seen from a client.

One real server for the module: `offramp serve` in its own process on 127.0.0.1 (a free port), over
the small ONNX bundle of `tests.fakes.build_onnx_bundle` (model `helper-dense`, input `pixels` FP32
[-1, 8, 8], outputs `label` INT64, `probabilities` FP32, `exit_stage` INT32), with small limits so
that the limit cases stay cheap. It is stopped by its process id when the module is done.

Three parts:

1. The protocol: health, server and model metadata, model ready, infer with JSON and with the binary
   tensor data extension (`Inference-Header-Content-Length`). Answers are checked against the
   schemas of `tests/server/conformance/v2_dataplane.yaml`, an OpenAPI description of the Open
   Inference Protocol's REST data plane written for these tests from the protocol's text (what
   any V2 server must do; MLServer publishes one like it as `openapi/dataplane.yaml`).
2. The V2 cases of Triton's `qa/L0_http/http_test.py` (triton-inference-server/server at
   e1db8a603d863b1317ee859bdeea2be19959462e) that apply to offramp, plus the rest of the bad-input
   matrix: malformed JSON, wrong datatypes, wrong shapes, unknown model or version, bad
   `Inference-Header-Content-Length`, oversized bodies, missing inputs. Every bad request must get
   a 4xx (never a 5xx) with a JSON body `{"error": "..."}`, and the server must stay healthy.
3. Schemathesis against that description, positive and negative examples (derandomized, no example
   database, no deadline), checking that no answer is a server error (5xx) and that answers with a
   status the spec documents match its response schema. Two runs, 273 requests in all:
   - every implemented operation with any path parameters (mostly unknown models, so 404s): 25
     examples per operation, 153 requests (the three operations without parameters need one each);
   - the two infer operations on the served model, 60 examples each: in memory (the file
     stays as it is) the spec is narrowed to the served model and version, one input, its name,
     datatype and shape, so that generated bodies reach the decoding of `data`, `id` and
     `parameters` instead of stopping at 404 or at the input's name.

The description holds only the base protocol's operations; the optional extensions offramp does
not implement (streaming and generate inference, repository, statistics, trace, logging) are not
in it (NOT_IMPLEMENTED below still names the streaming and generate operationIds, should they be
added to the description).
Not checked: status_code_conformance, because the spec documents only 200 for the health and model
ready routes, where a 404 for an unknown model is the protocol's answer.

Triton cases ported (Triton's name -> the test here): test_content_encoding_chunked_manually ->
test_chunked_request_body; test_buffer_size_overflow -> test_shape_whose_element_count_overflows;
test_negative_dimensions -> test_negative_dimension (Triton answers 500 there, offramp must 400);
test_json_recursion_depth_limit -> test_deeply_nested_data; test_duplicate_output_names (same name);
test_inference_header_content_length_out_of_range -> test_inference_header_content_length_past_the_body
and test_bad_inference_header_content_length. Every Triton check that the server is still up after a
bad request is in expect_error, for every bad request here.

Triton cases not ported, one reason each:
    test_raw_binary, test_raw_binary_longer   raw binary requests (`Inference-Header-Content-Length: 0`,
                                              no JSON header) are not supported; what a client gets
                                              instead is checked (a clean 400), see
                                              test_raw_binary_request_is_refused_cleanly
    test_byte, test_byte_too_many_elements    BYTES tensors and raw binary; no offramp model has a
                                              BYTES input (a BYTES datatype is checked as a wrong one)
    test_multi_variable_dimensions,           how raw binary requests deduce shapes; raw binary is
    test_multi_inputs                         not supported
    test_content_encoding_unsupported_client  tests the Python client's header check, not a server
    test_descriptive_status_code              queue-full 503 needs a model slow enough to hold the
                                              queue; covered in test_http.py (overload, 503 at once)
    test_loading_large_invalid_model,         model repository control (load with inline files); the
    test_load_oversized_file_parameter        point of the first, a body over the size limit, is
                                              ported to infer (test_oversized_*)
    test_repository_index_deeply_nested_json  model repository index; its point, deep JSON nesting,
                                              is ported to the infer body (test_deeply_nested_data)
Nor anything on shared memory (system/CUDA), model repository control, generate endpoints,
statistics, trace or logging settings: offramp has none of these (server metadata lists only the
`binary_tensor_data` and `parameters` extensions).

Defects this module found, fixed with it (each test failed before the fix): a non-string output
name (`"outputs": [{"name": ["label"]}]`) gave 500 (TypeError: unhashable type), now 400
(test_output_name_that_is_not_a_string); `true`/`false` in the data of an FP32 input were taken as
1.0 / 0.0 (200), now 400 as in Triton (test_booleans_as_fp32_data).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import numpy as np
import pytest

from tests.fakes import ServerProcess, build_onnx_bundle

yaml = pytest.importorskip("yaml", reason="the conformance tests need PyYAML (the `test` extra)")
schemathesis = pytest.importorskip("schemathesis", reason="the conformance tests need schemathesis (the `test` extra)")
requests = pytest.importorskip("requests", reason="schemathesis calls the server with requests")
hypothesis = pytest.importorskip("hypothesis")

SPEC_PATH = Path(__file__).parent / "conformance" / "v2_dataplane.yaml"


def load_spec() -> dict[str, Any]:
    """The V2 data plane description, a fresh copy each time (schemathesis and the narrowing below
    change theirs)."""
    return yaml.safe_load(SPEC_PATH.read_text())


SPEC = load_spec()

MODEL, VERSION, INPUT = "helper-dense", "1", "pixels"
SAMPLE_SHAPE = (8, 8)
CLASSES, STAGES = 10, 3
INFER = f"/v2/models/{MODEL}/infer"
INFER_HEADER = "Inference-Header-Content-Length"
JSON_TYPE = {"content-type": "application/json"}
MAX_REQUEST_BYTES = 64 * 1024
MAX_SAMPLES = 64
SERVER_FLAGS = ("--max-request-bytes", str(MAX_REQUEST_BYTES), "--max-samples-per-request", str(MAX_SAMPLES),
                "--max-queue-delay-ms", "0")
OUTPUT_DTYPES = {"label": ("INT64", "<i8"), "probabilities": ("FP32", "<f4"), "exit_stage": ("INT32", "<i4")}
HUGE_INT = "9" * 5000  # past CPython's 4300-digit limit for int <-> str conversion


# -- the server and a client -----------------------------------------------------------------------


def start_server(bundle: Path, cache_dir: Path, *flags: str) -> ServerProcess:
    """A started ServerProcess. Its constructor can raise after spawning the process (never ready):
    stop that process (by its pid, through ServerProcess.stop) before passing the error on."""
    server = ServerProcess.__new__(ServerProcess)
    try:
        server.__init__(bundle, cache_dir, *flags)
    except BaseException:
        if getattr(server, "proc", None) is not None:
            server.stop()
        raise
    return server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("conformance")
    proc = start_server(build_onnx_bundle(root / "bundle"), root / "cache", *SERVER_FLAGS)
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


# -- requests ---------------------------------------------------------------------------------------


def pixels(n: int = 2) -> np.ndarray:
    """n deterministic samples shaped like the model's input (values 0..16, like digit pixels)."""
    return (np.arange(n * 64, dtype=np.float32) % 17).reshape(n, *SAMPLE_SHAPE)


def tensor(x: np.ndarray | None = None, **fields: Any) -> dict[str, Any]:
    """The `pixels` input as JSON (flat `data`); `fields` replace or add tensor fields."""
    x = pixels(1) if x is None else x
    return {"name": INPUT, "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist(), **fields}


def infer_doc(**fields: Any) -> dict[str, Any]:
    """A valid JSON infer request for one sample; `fields` replace or add top-level fields."""
    return {"inputs": [tensor()], **fields}


def binary_request(doc: dict[str, Any], blob: bytes) -> tuple[bytes, dict[str, str]]:
    """Body and headers of the binary tensor data extension: JSON header, then the raw bytes."""
    header = json.dumps(doc).encode()
    return header + blob, {"content-type": "application/octet-stream", INFER_HEADER: str(len(header))}


def binary_tensor(x: np.ndarray) -> tuple[dict[str, Any], bytes]:
    """The `pixels` input of the binary extension (`binary_data_size`, no `data`) and its bytes."""
    blob = x.astype("<f4").tobytes()
    spec = {"name": INPUT, "datatype": "FP32", "shape": list(x.shape), "parameters": {"binary_data_size": len(blob)}}
    return spec, blob


def post_json(client: httpx.Client, doc: Any, path: str = INFER) -> httpx.Response:
    return client.post(path, content=json.dumps(doc), headers=JSON_TYPE)


def post_raw(client: httpx.Client, body: bytes | str, headers: dict[str, str] | None = None,
             path: str = INFER) -> httpx.Response:
    return client.post(path, content=body, headers=JSON_TYPE if headers is None else headers)


# -- answers ----------------------------------------------------------------------------------------


def assert_conforms(instance: Any, schema_name: str) -> None:
    """`instance` is valid against `components.schemas.<schema_name>` of the V2 description."""
    jsonschema.validate(instance, {"$ref": f"#/components/schemas/{schema_name}", "components": SPEC["components"]})


def assert_healthy(client: httpx.Client) -> None:
    live, ready = client.get("/v2/health/live"), client.get("/v2/health/ready")
    assert (live.status_code, live.json()) == (200, {"live": True})
    assert (ready.status_code, ready.json()) == (200, {"ready": True})


def expect_error(client: httpx.Client, response: httpx.Response, status: int, fragment: str = "") -> str:
    """The answer is `status` with a JSON body `{"error": "..."}` (naming `fragment`), and the
    server is still healthy afterwards. Returns the message."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert list(body) == ["error"] and isinstance(body["error"], str) and body["error"], body
    assert fragment in body["error"], body["error"]
    assert_conforms(body, "InferenceErrorResponse")
    assert_healthy(client)
    return body["error"]


def decode_outputs(response: httpx.Response) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """An infer answer (JSON or binary), decoded here and not by the server's own codec: the JSON
    document and one array per output."""
    body, header_length = response.content, response.headers.get(INFER_HEADER)
    n = len(body) if header_length is None else int(header_length)
    doc, tail, offset = json.loads(body[:n]), body[n:], 0
    arrays = {}
    for out in doc["outputs"]:
        dtype = np.dtype(OUTPUT_DTYPES[out["name"]][1])
        size = (out.get("parameters") or {}).get("binary_data_size")
        if size is None:
            arrays[out["name"]] = np.asarray(out["data"], dtype=dtype).reshape(out["shape"])
        else:
            arrays[out["name"]] = np.frombuffer(tail[offset:offset + size], dtype=dtype).reshape(out["shape"])
            offset += size
    assert offset == len(tail), "bytes after the JSON header not claimed by any output"
    return doc, arrays


def assert_valid_outputs(arrays: dict[str, np.ndarray], n: int) -> None:
    assert arrays["label"].shape == (n,) and arrays["exit_stage"].shape == (n,)
    assert arrays["probabilities"].shape == (n, CLASSES)
    assert ((arrays["label"] >= 0) & (arrays["label"] < CLASSES)).all()
    assert ((arrays["exit_stage"] >= 0) & (arrays["exit_stage"] < STAGES)).all()
    np.testing.assert_allclose(arrays["probabilities"].sum(axis=1), 1.0, rtol=1e-4)
    np.testing.assert_array_equal(arrays["label"], arrays["probabilities"].argmax(axis=1))


# == 1. the protocol ================================================================================


def test_server_live_and_ready(client: httpx.Client) -> None:
    assert_healthy(client)


def test_server_metadata(client: httpx.Client) -> None:
    r = client.get("/v2")
    assert r.status_code == 200
    assert_conforms(r.json(), "MetadataServerResponse")
    assert r.json()["name"] == "offramp"
    assert "binary_tensor_data" in r.json()["extensions"]


@pytest.mark.parametrize("path", [f"/v2/models/{MODEL}", f"/v2/models/{MODEL}/versions/{VERSION}"])
def test_model_metadata(client: httpx.Client, path: str) -> None:
    r = client.get(path)
    assert r.status_code == 200
    meta = r.json()
    assert_conforms(meta, "MetadataModelResponse")
    assert (meta["name"], meta["versions"]) == (MODEL, [VERSION])
    assert meta["inputs"] == [{"name": INPUT, "datatype": "FP32", "shape": [-1, *SAMPLE_SHAPE]}]
    assert [(o["name"], o["datatype"]) for o in meta["outputs"]] == [
        (name, datatype) for name, (datatype, _) in OUTPUT_DTYPES.items()]


@pytest.mark.parametrize("path", [f"/v2/models/{MODEL}/ready", f"/v2/models/{MODEL}/versions/{VERSION}/ready"])
def test_model_ready(client: httpx.Client, path: str) -> None:
    r = client.get(path)
    assert (r.status_code, r.json()) == (200, {"name": MODEL, "ready": True})


@pytest.mark.parametrize("path", [INFER, f"/v2/models/{MODEL}/versions/{VERSION}/infer"])
def test_infer_json(client: httpx.Client, path: str) -> None:
    x = pixels(3)
    r = post_json(client, {"id": "req-1", "inputs": [tensor(x)]}, path)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    doc, arrays = decode_outputs(r)
    assert_conforms(doc, "InferenceResponse")
    assert (doc["model_name"], doc["model_version"], doc["id"]) == (MODEL, VERSION, "req-1")
    assert [(o["name"], o["datatype"]) for o in doc["outputs"]] == [
        (name, datatype) for name, (datatype, _) in OUTPUT_DTYPES.items()]
    assert_valid_outputs(arrays, 3)


def test_infer_json_nested_data_answers_like_flat_data(client: httpx.Client) -> None:
    x = pixels(2)
    _, flat = decode_outputs(post_json(client, {"inputs": [tensor(x)]}))
    _, nested = decode_outputs(post_json(client, {"inputs": [tensor(x, data=x.tolist())]}))
    for name in OUTPUT_DTYPES:
        np.testing.assert_array_equal(flat[name], nested[name])


def test_infer_binary_in_and_out_answers_like_json(client: httpx.Client) -> None:
    x = pixels(4)
    _, from_json = decode_outputs(post_json(client, {"inputs": [tensor(x)]}))
    spec, blob = binary_tensor(x)
    outputs = [{"name": name, "parameters": {"binary_data": True}} for name in OUTPUT_DTYPES]
    r = post_raw(client, *binary_request({"inputs": [spec], "outputs": outputs}, blob))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream" and INFER_HEADER in r.headers
    doc, from_binary = decode_outputs(r)
    assert all("data" not in o and o["parameters"]["binary_data_size"] > 0 for o in doc["outputs"])
    for name in OUTPUT_DTYPES:
        np.testing.assert_array_equal(from_binary[name], from_json[name])


def test_binary_data_output_parameter_and_per_output_override(client: httpx.Client) -> None:
    spec, blob = binary_tensor(pixels(2))
    doc = {"inputs": [spec], "parameters": {"binary_data_output": True},
           "outputs": [{"name": "exit_stage"}, {"name": "label", "parameters": {"binary_data": False}}]}
    r = post_raw(client, *binary_request(doc, blob))
    assert r.status_code == 200, r.text
    answer, arrays = decode_outputs(r)
    assert [o["name"] for o in answer["outputs"]] == ["exit_stage", "label"]  # only these, in this order
    assert "binary_data_size" in answer["outputs"][0]["parameters"] and "data" in answer["outputs"][1]
    assert arrays["exit_stage"].shape == arrays["label"].shape == (2,)


def test_early_exit_false_runs_every_sample_to_the_last_stage(client: httpx.Client) -> None:
    r = post_json(client, {"inputs": [tensor(pixels(5))], "parameters": {"early_exit": False}})
    assert r.status_code == 200, r.text
    _, arrays = decode_outputs(r)
    assert (arrays["exit_stage"] == STAGES - 1).all()


def test_unknown_request_parameters_are_ignored(client: httpx.Client) -> None:
    r = post_json(client, infer_doc(parameters={"timeout": 1000, "content_type": "np", "headers": {}}))
    assert r.status_code == 200, r.text


def test_chunked_request_body(client: httpx.Client) -> None:
    """Triton test_content_encoding_chunked_manually: a chunk-encoded binary request is answered."""
    spec, blob = binary_tensor(pixels(2))
    body, headers = binary_request({"inputs": [spec]}, blob)
    r = client.post(INFER, content=iter([body[:100], body[100:]]), headers=headers)  # an iterator: chunked
    assert r.request.headers.get("transfer-encoding") == "chunked"
    assert r.status_code == 200, r.text
    assert_valid_outputs(decode_outputs(r)[1], 2)


# == 2. bad requests (Triton's http_test.py and the rest of the matrix) =============================


NUMBER_SLOT = 123456789  # a number that no request here holds otherwise


def cases(by_id: dict[str, Any]) -> list[Any]:
    """`pytest.param`s from {test id: value}."""
    return [pytest.param(value, id=case_id) for case_id, value in by_id.items()]


def with_number(doc: dict[str, Any], number: str) -> str:
    """`doc` as JSON text with the number NUMBER_SLOT written as `number`, verbatim (for numbers and
    literals that Python's json would not write: NaN, 1e400, 5000 digits)."""
    text = json.dumps(doc)
    assert text.count(str(NUMBER_SLOT)) == 1
    return text.replace(str(NUMBER_SLOT), number)


NO_SUCH_MODEL = "/v2/models/no-such-model"
UNIMPLEMENTED_ROUTES = [  # extensions and APIs that Triton or KServe servers have and offramp does not
    "/v2/repository/index", f"/v2/repository/models/{MODEL}/load", f"/v2/repository/models/{MODEL}/unload",
    f"/v2/models/{MODEL}/stats", f"/v2/models/{MODEL}/generate", f"/v2/models/{MODEL}/generate_stream",
    f"/v2/models/{MODEL}/infer_stream", "/v2/systemsharedmemory/status", "/v2/cudasharedmemory/status",
    "/v2/trace/setting", "/v2/logging",
]
MALFORMED_JSON = {
    "empty": b"", "open-brace": b"{", "truncated": b'{"inputs": [', "not-json": b"not json",
    "trailing-comma": b'{"inputs": [],}', "not-utf8": b"\xff\xfe{}", "trailing-garbage": b'{"inputs": []} x',
    "single-quotes": b"{'inputs': []}",
}
NOT_AN_OBJECT = {"array": [], "string": "inputs", "number": 42, "null": None}
BAD_INPUTS = {
    "no-inputs": {}, "empty-inputs": {"inputs": []}, "inputs-object": {"inputs": {}},
    "input-not-object": {"inputs": [1]}, "input-empty": {"inputs": [{}]},
    "wrong-name": {"inputs": [tensor(name="image")]}, "extra-input": {"inputs": [tensor(), tensor(name="extra")]},
    "duplicate-input": {"inputs": [tensor(), tensor()]},
    "no-data": {"inputs": [{"name": INPUT, "datatype": "FP32", "shape": [1, *SAMPLE_SHAPE]}]},
}
WRONG_DATATYPES = ["FP64", "FP16", "INT32", "UINT8", "BYTES", "BOOL", "fp32", "", None, 32, ["FP32"]]
WRONG_SHAPES = {
    "last-dim-7": [1, 8, 7], "flat": [1, 64], "no-batch-dim": [8, 8], "4-dims": [1, 1, 8, 8], "empty": [],
    "float-dim": [1, 8, 8.0], "bool-dim": [1, True, 8], "string-dim": ["1", 8, 8], "string": "1,8,8", "null": None,
    "batch-0": [0, 8, 8], "batch--1": [-1, 8, 8], "batch--5": [-5, 8, 8], "batch-over-limit": [MAX_SAMPLES + 1, 8, 8],
}
OVERFLOWING_SHAPES = {  # Triton test_buffer_size_overflow: element and byte counts past 64 bits
    "2**4 x 2**60+2": [2**4, 2**60 + 2, 8], "batch-2**60+2": [2**60 + 2, 8, 8], "batch-2**64+32": [2**64 + 32, 8, 8],
    "dim-2**63": [1, 8, 2**63],
}
WRONG_DATA = {
    "too-few": [1.0] * 63, "too-many": [1.0] * 65, "ragged": [[1.0] * 8] * 7 + [[1.0] * 7], "strings": ["1"] * 64,
    "nulls": [None] * 64, "objects": [{}] * 64, "mixed": [[1.0, "x"]] * 32, "past-fp32-range": [10**300] * 64,
    "base64-string": "AAAAAAAA", "scalar": 1.0, "object": {"values": [1.0]},
}
NOT_FINITE = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400"]
BAD_FIELDS = {
    "id-int": infer_doc(id=42), "parameters-array": infer_doc(parameters=[]),
    "early-exit-string": infer_doc(parameters={"early_exit": "no"}),
    "binary-output-int": infer_doc(parameters={"binary_data_output": 1}),
    "tensor-parameters-string": {"inputs": [tensor(parameters="binary")]},
    "outputs-object": infer_doc(outputs={"name": "label"}), "output-string": infer_doc(outputs=["label"]),
    "unknown-output": infer_doc(outputs=[{"name": "logits"}]), "output-without-name": infer_doc(outputs=[{}]),
    "binary-data-string": infer_doc(outputs=[{"name": "label", "parameters": {"binary_data": "yes"}}]),
}
HUGE_INT_IN = {  # where a 5000-digit integer goes: anywhere in the body
    "id": infer_doc(id=NUMBER_SLOT), "shape": {"inputs": [tensor(shape=[NUMBER_SLOT, 8, 8])]},
    "data": {"inputs": [tensor(data=[NUMBER_SLOT] + [1.0] * 63)]},
    "parameters": infer_doc(parameters={"timeout": NUMBER_SLOT}),
}


@pytest.mark.parametrize("path", [NO_SUCH_MODEL, f"{NO_SUCH_MODEL}/ready", f"{NO_SUCH_MODEL}/versions/1",
                                  f"{NO_SUCH_MODEL}/versions/1/ready"])
def test_unknown_model_metadata_and_ready(client: httpx.Client, path: str) -> None:
    expect_error(client, client.get(path), 404, "no-such-model")


@pytest.mark.parametrize("path", [f"{NO_SUCH_MODEL}/infer", f"{NO_SUCH_MODEL}/versions/1/infer"])
def test_infer_on_unknown_model(client: httpx.Client, path: str) -> None:
    expect_error(client, post_json(client, infer_doc(), path), 404, "no-such-model")


@pytest.mark.parametrize("path", [f"/v2/models/{MODEL}/versions/2", f"/v2/models/{MODEL}/versions/2/ready"])
def test_unknown_version_metadata_and_ready(client: httpx.Client, path: str) -> None:
    expect_error(client, client.get(path), 404, "version")


def test_infer_on_unknown_version(client: httpx.Client) -> None:
    expect_error(client, post_json(client, infer_doc(), f"/v2/models/{MODEL}/versions/2/infer"), 404, "version")


@pytest.mark.parametrize("path", UNIMPLEMENTED_ROUTES)
def test_unimplemented_extensions_answer_404(client: httpx.Client, path: str) -> None:
    expect_error(client, post_json(client, {}, path), 404)


@pytest.mark.parametrize(("method", "path"), [
    ("GET", INFER), ("PUT", INFER), ("POST", "/v2/health/live"), ("DELETE", f"/v2/models/{MODEL}"),
])
def test_wrong_method(client: httpx.Client, method: str, path: str) -> None:
    expect_error(client, client.request(method, path), 405)


@pytest.mark.parametrize("body", cases(MALFORMED_JSON))
def test_malformed_json(client: httpx.Client, body: bytes) -> None:
    expect_error(client, post_raw(client, body), 400, "JSON")


@pytest.mark.parametrize("doc", cases(NOT_AN_OBJECT))
def test_body_that_is_not_an_object(client: httpx.Client, doc: Any) -> None:
    expect_error(client, post_json(client, doc), 400, "JSON object")


@pytest.mark.parametrize("doc", cases(BAD_INPUTS))
def test_missing_extra_or_duplicate_inputs(client: httpx.Client, doc: dict[str, Any]) -> None:
    expect_error(client, post_json(client, doc), 400, "input")


@pytest.mark.parametrize("datatype", WRONG_DATATYPES)
def test_wrong_datatype(client: httpx.Client, datatype: Any) -> None:
    expect_error(client, post_json(client, {"inputs": [tensor(datatype=datatype)]}), 400, "datatype")


@pytest.mark.parametrize("shape", cases(WRONG_SHAPES))
def test_wrong_shape(client: httpx.Client, shape: Any) -> None:
    expect_error(client, post_json(client, {"inputs": [tensor(shape=shape)]}), 400, INPUT)


@pytest.mark.parametrize("shape", cases(OVERFLOWING_SHAPES))
def test_shape_whose_element_count_overflows(client: httpx.Client, shape: list[int]) -> None:
    """Triton test_buffer_size_overflow: a 400, not a crash (Triton's data is one element, so is ours)."""
    expect_error(client, post_json(client, {"inputs": [tensor(shape=shape, data=[1.0])]}), 400, INPUT)


def test_negative_dimension(client: httpx.Client) -> None:
    """Triton test_negative_dimensions (where Triton itself answers 500): a 400 here."""
    expect_error(client, post_json(client, {"inputs": [tensor(shape=[2, -5, 8], data=[1.0])]}), 400, "shape")


@pytest.mark.parametrize("data", cases(WRONG_DATA))
def test_wrong_data(client: httpx.Client, data: Any) -> None:
    expect_error(client, post_json(client, {"inputs": [tensor(data=data)]}), 400, INPUT)


def test_booleans_as_fp32_data(client: httpx.Client) -> None:
    """V2 JSON data holds values of the tensor's datatype; Triton refuses `true` for an FP32 input."""
    expect_error(client, post_json(client, {"inputs": [tensor(data=[True, False] * 32)]}), 400, INPUT)


@pytest.mark.parametrize("literal", NOT_FINITE)
def test_non_finite_numbers(client: httpx.Client, literal: str) -> None:
    body = with_number({"inputs": [tensor(data=[NUMBER_SLOT] + [1.0] * 63)]}, literal)
    expect_error(client, post_raw(client, body), 400)


@pytest.mark.parametrize("depth", [120, 20_000])
def test_deeply_nested_data(client: httpx.Client, depth: int) -> None:
    """Triton test_json_recursion_depth_limit and test_repository_index_deeply_nested_json, on the
    infer body: nesting far deeper than the input's is a 400 (past what numpy or json can nest)."""
    body = with_number({"inputs": [tensor(data=NUMBER_SLOT)]}, "[" * depth + "1.0" + "]" * depth)
    expect_error(client, post_raw(client, body), 400, "")


@pytest.mark.parametrize("doc", cases(BAD_FIELDS))
def test_bad_fields(client: httpx.Client, doc: dict[str, Any]) -> None:
    expect_error(client, post_json(client, doc), 400)


def test_duplicate_output_names(client: httpx.Client) -> None:
    """Triton test_duplicate_output_names."""
    doc = infer_doc(outputs=[{"name": "label"}, {"name": "label"}])
    expect_error(client, post_json(client, doc), 400, "label")


@pytest.mark.parametrize("name", cases({"array": ["label"], "object": {"name": "label"}}))
def test_output_name_that_is_not_a_string(client: httpx.Client, name: Any) -> None:
    expect_error(client, post_json(client, infer_doc(outputs=[{"name": name}])), 400, "output")


@pytest.mark.parametrize("doc", cases(HUGE_INT_IN))
def test_integer_of_5000_digits(client: httpx.Client, doc: dict[str, Any]) -> None:
    """Past CPython's 4300-digit limit for int conversion, where a json.loads-based decoder raises
    ValueError (a 500 until c086891): a 400 wherever the number is."""
    expect_error(client, post_raw(client, with_number(doc, HUGE_INT)), 400)


# -- the binary tensor data extension --------------------------------------------------------------


BAD_HEADER_LENGTHS = {
    "word": "abc", "exponent": "1e3", "fraction": "1.5", "empty": "", "negative": "-1", "past-int32": "99999999999",
    "5000-digits": HUGE_INT,
}


@pytest.mark.parametrize("value", cases(BAD_HEADER_LENGTHS))
def test_bad_inference_header_content_length(client: httpx.Client, value: str) -> None:
    """Triton test_inference_header_content_length_out_of_range (99999999999), and friends."""
    spec, blob = binary_tensor(pixels(1))
    body, headers = binary_request({"inputs": [spec]}, blob)
    expect_error(client, post_raw(client, body, {**headers, INFER_HEADER: value}), 400, INFER_HEADER)


def test_inference_header_content_length_past_the_body(client: httpx.Client) -> None:
    """Triton's case exactly: `{"inputs": []}` with a header length far past the body."""
    r = post_raw(client, json.dumps({"inputs": []}), {**JSON_TYPE, INFER_HEADER: "99999999999"})
    expect_error(client, r, 400, INFER_HEADER)


def test_raw_binary_request_is_refused_cleanly(client: httpx.Client) -> None:
    """Triton test_raw_binary: `Inference-Header-Content-Length: 0` and nothing but the tensor's
    bytes. Triton deduces the input; offramp does not support raw binary requests and says so."""
    blob = pixels(1).astype("<f4").tobytes()
    r = post_raw(client, blob, {"content-type": "application/octet-stream", INFER_HEADER: "0"})
    expect_error(client, r, 400, INFER_HEADER)


def broken_binary_requests() -> dict[str, tuple[dict[str, Any], bytes]]:
    """Binary requests (2 samples) broken one way each, by name: (JSON header, bytes after it)."""
    x = pixels(2)
    spec, blob = binary_tensor(x)
    size = len(blob)
    return {
        "size-larger-than-tail": ({"inputs": [{**spec, "parameters": {"binary_data_size": size * 2}}]}, blob),
        "size-not-matching-shape": ({"inputs": [{**spec, "shape": [1, 8, 8]}]}, blob),
        "bytes-left-over": ({"inputs": [spec]}, blob + b"\0" * 4),
        "data-and-size": ({"inputs": [{**spec, "data": x.ravel().tolist()}]}, blob),
        "negative-size": ({"inputs": [{**spec, "parameters": {"binary_data_size": -4}}]}, blob),
        "fractional-size": ({"inputs": [{**spec, "parameters": {"binary_data_size": size + 0.5}}]}, blob),
        "wrong-datatype": ({"inputs": [{**spec, "datatype": "FP64"}]}, blob),
        "nan-values": ({"inputs": [spec]}, np.full(x.shape, np.nan, "<f4").tobytes()),
    }


@pytest.mark.parametrize("request_parts", cases(broken_binary_requests()))
def test_bad_binary_request(client: httpx.Client, request_parts: tuple[dict[str, Any], bytes]) -> None:
    expect_error(client, post_raw(client, *binary_request(*request_parts)), 400)


def test_binary_request_whose_json_header_is_not_json(client: httpx.Client) -> None:
    body = b"\x00\x01garbage" + pixels(1).astype("<f4").tobytes()
    r = post_raw(client, body, {"content-type": "application/octet-stream", INFER_HEADER: "9"})
    expect_error(client, r, 400, "JSON")


def test_binary_data_size_without_the_extension_header(client: httpx.Client) -> None:
    spec, blob = binary_tensor(pixels(1))
    body, _ = binary_request({"inputs": [spec]}, blob)
    r = post_raw(client, body, {"content-type": "application/octet-stream"})  # all of it parsed as JSON
    expect_error(client, r, 400, "JSON")
    r = post_json(client, {"inputs": [spec]})
    expect_error(client, r, 400, INFER_HEADER)


# -- limits ------------------------------------------------------------------------------------------


def test_oversized_body_by_content_length(client: httpx.Client) -> None:
    """Triton test_loading_large_invalid_model's point, on infer: a body over the limit is refused."""
    body = json.dumps(infer_doc(id="x" * MAX_REQUEST_BYTES))
    expect_error(client, post_raw(client, body), 413, "exceeds")


def test_oversized_chunked_body(client: httpx.Client) -> None:
    chunk = b" " * 8192
    chunks = iter([b'{"inputs": [', *[chunk] * (MAX_REQUEST_BYTES // len(chunk) + 1), b"]}"])
    expect_error(client, client.post(INFER, content=chunks, headers=JSON_TYPE), 413, "exceeds")


def test_batch_over_max_samples_per_request(client: httpx.Client) -> None:
    spec, blob = binary_tensor(pixels(MAX_SAMPLES + 1))
    expect_error(client, post_raw(client, *binary_request({"inputs": [spec]}, blob)), 400, "max_samples_per_request")


def test_unsupported_content_encoding_is_a_client_error(client: httpx.Client) -> None:
    """Triton accepts gzip and deflate request bodies; offramp does not, and must say so with a 4xx."""
    r = post_raw(client, json.dumps(infer_doc()), {**JSON_TYPE, "content-encoding": "gzip"})
    assert 400 <= r.status_code < 500
    expect_error(client, r, r.status_code, "Content-Encoding")


# == 3. schemathesis against the V2 description ======================================================

NOT_IMPLEMENTED = [
    "model-inference-stream", "model-version-inference-stream",
    "model-generate", "model-version-generate",
    "model-generate-stream", "model-version-generate-stream",
]
INFER_OPERATIONS = ["model-inference", "model-version-inference"]
ANY_MODEL_EXAMPLES = 25  # per operation
SERVED_MODEL_EXAMPLES = 60  # per infer operation
FUZZ_CONFIG = {
    "seed": 20240605,
    "generation": {"mode": "all", "deterministic": True, "database": "none"},
    "phases": {"examples": {"enabled": False}, "coverage": {"enabled": False}, "stateful": {"enabled": False}},
}
FUZZ_SETTINGS = {"deadline": None, "derandomize": True, "database": None,
                 "suppress_health_check": [hypothesis.HealthCheck.too_slow, hypothesis.HealthCheck.filter_too_much]}


def load_fuzz_schema(spec: dict[str, Any]) -> Any:
    return schemathesis.openapi.from_dict(spec, config=schemathesis.Config.from_dict(FUZZ_CONFIG))


def spec_for_the_served_model() -> dict[str, Any]:
    """The V2 description narrowed, in memory only, to what the served model takes: path parameters
    `model_name` and `model_version`, one input, and its name, datatype and shape. Generated bodies then
    get past the model lookup and the input's header and reach the decoding of `data`, `id` and
    `parameters` (negative examples break one of the narrowed fields at a time)."""
    spec = load_spec()
    served = {"model_name": MODEL, "model_version": VERSION}
    for item in spec["paths"].values():
        for param in item.get("parameters", []):
            if param["in"] == "path" and param["name"] in served:
                param["schema"] = {"type": "string", "enum": [served[param["name"]]]}
    spec["components"]["schemas"]["InferenceRequest"]["properties"]["inputs"].update(minItems=1, maxItems=1)
    spec["components"]["schemas"]["RequestInput"]["properties"].update(
        name={"type": "string", "enum": [INPUT]},
        datatype={"type": "string", "enum": ["FP32"]},
        shape={"type": "array", "items": {"type": "integer"}, "enum": [[1, *SAMPLE_SHAPE], [2, *SAMPLE_SHAPE]]},
    )
    return spec


any_model_schema = load_fuzz_schema(load_spec()).exclude(operation_id=NOT_IMPLEMENTED)
served_model_schema = load_fuzz_schema(spec_for_the_served_model()).include(operation_id=INFER_OPERATIONS)
SESSION = requests.Session()


def call_and_check(case: Any, server: ServerProcess, client: httpx.Client) -> None:
    """Send the case; no 5xx, answers with a documented status as the spec says, server still live."""
    case.call_and_validate(
        base_url=server.url, session=SESSION, timeout=30,
        checks=[schemathesis.checks.not_a_server_error, schemathesis.checks.response_schema_conformance],
    )
    assert client.get("/v2/health/live").status_code == 200


@any_model_schema.parametrize()
@hypothesis.settings(max_examples=ANY_MODEL_EXAMPLES, **FUZZ_SETTINGS)
def test_schemathesis_any_model_name(case: Any, server: ServerProcess, client: httpx.Client) -> None:
    """Every implemented operation, any path parameters (mostly unknown models: 404)."""
    call_and_check(case, server, client)


@served_model_schema.parametrize()
@hypothesis.settings(max_examples=SERVED_MODEL_EXAMPLES, **FUZZ_SETTINGS)
def test_schemathesis_infer_on_the_served_model(case: Any, server: ServerProcess, client: httpx.Client) -> None:
    """The infer operations on the served model: generated bodies against the real decoder."""
    call_and_check(case, server, client)
