"""Open Inference Protocol (KServe V2) REST: decode and validate infer requests, encode responses.

Pure functions of bytes and numpy, no HTTP framework: the routes in `server/http/v2.py` call them.
Both body layouts are handled:

- JSON: the whole body is one JSON object; tensor `data` is a flat (row-major) or nested list.
- Binary tensor data extension (what tritonclient sends by default): the header
  `Inference-Header-Content-Length: n` says the first n bytes are the JSON object; the raw
  little-endian bytes of each input with `parameters.binary_data_size` follow, in input order.
  Outputs asked for with `parameters.binary_data: true` (or request-level
  `parameters.binary_data_output: true`) come back the same way.

Everything a client can get wrong is a `BadRequest` naming the problem (the route makes it a 400).
Decoding goes straight to numpy (`np.frombuffer` for binary data) so that large batches stay cheap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from server import jsonio
from server.bundle import NUMPY_DTYPES, Bundle, InputSpec, Manifest
from server.errors import BadRequest
from server.http import text_codec
from server.http.describe import PREDICTION_SET
from server.interface import InferResult
from server.text import TokenRows

INFER_HEADER = "Inference-Header-Content-Length"
JSON_CONTENT_TYPE = "application/json"
BINARY_CONTENT_TYPE = "application/octet-stream"

# Output name -> (V2 datatype, little-endian numpy dtype). Answered by default: DEFAULT_OUTPUTS, in
# this order; `prediction_set` only when asked for, and only by models with conformal calibration.
OUTPUTS: dict[str, tuple[str, np.dtype]] = {
    "label": ("INT64", np.dtype("<i8")),
    "probabilities": ("FP32", np.dtype("<f4")),
    "exit_stage": ("INT32", np.dtype("<i4")),
    PREDICTION_SET: ("BOOL", np.dtype("?")),
}
DEFAULT_OUTPUTS = ("label", "probabilities", "exit_stage")


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool


@dataclass(frozen=True)
class InferRequest:
    """A decoded, validated infer request: `x` is ready for the engine (token rows for text models)."""

    x: np.ndarray | TokenRows
    id: str | None = None
    early_exit: bool = True
    outputs: list[RequestedOutput] = field(default_factory=list)


# -- requests ---------------------------------------------------------------------------------


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """Split a body into its JSON header and its binary tail (empty without the extension header)."""
    if header_length is None:
        return body, memoryview(b"")
    try:
        n = int(header_length)
    except ValueError:
        raise BadRequest(f"{INFER_HEADER} must be an integer, got {header_length!r}") from None
    if not 0 < n <= len(body):
        raise BadRequest(f"{INFER_HEADER} is {n} but the body has {len(body)} bytes")
    view = memoryview(body)
    return bytes(view[:n]), view[n:]


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        doc = jsonio.loads(raw)
    except jsonio.JSONError as err:  # also numbers out of range and nesting past 1024 levels
        raise BadRequest(f"malformed JSON: {err}") from None
    if not isinstance(doc, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(doc).__name__}")
    return doc


def _parameters(obj: dict[str, Any], where: str) -> dict[str, Any]:
    params = obj.get("parameters", {})
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise BadRequest(f"{where}.parameters must be an object")
    return params


def _flag(params: dict[str, Any], key: str, where: str, default: bool) -> bool:
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise BadRequest(f"{where}.parameters.{key} must be true or false, got {value!r}")
    return value


def check_shape(tensor: dict[str, Any], spec: InputSpec, max_samples: int) -> tuple[int, ...]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise BadRequest(f"input {spec.name!r}: shape must be a list of integers, got {shape!r}")
    want = spec.shape
    if len(shape) != len(want) or any(w != -1 and s != w for s, w in zip(shape, want, strict=True)):
        raise BadRequest(f"input {spec.name!r}: shape {shape} does not match {want} (-1: any batch size)")
    if any(d < 0 for d in shape):
        raise BadRequest(f"input {spec.name!r}: shape {shape} has a negative dimension")
    batch = shape[0]
    if batch == 0:
        raise BadRequest(f"input {spec.name!r}: batch of 0 samples; send at least one")
    if batch > max_samples:
        raise BadRequest(
            f"input {spec.name!r}: batch of {batch} samples exceeds max_samples_per_request ({max_samples})"
        )
    return tuple(shape)


def array_from_list(data: Any, spec: InputSpec, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    if not isinstance(data, list):
        raise BadRequest(f"input {spec.name!r}: data must be a list of numbers (flat or nested)")
    try:
        arr = np.asarray(data)
    except ValueError as err:  # ragged nesting
        raise BadRequest(f"input {spec.name!r}: data is not a regular array ({err})") from None
    # Check the kind before casting: numpy would silently turn strings into floats, floats into ints,
    # booleans into numbers. (A list mixing booleans with numbers is read as numbers.)
    allowed = "iuf" if dtype.kind == "f" else ("iu" if dtype.kind in "iu" else "b")
    if arr.size and arr.dtype.kind not in allowed:
        raise BadRequest(
            f"input {spec.name!r}: data holds values of numpy kind {arr.dtype.kind!r}, "
            f"not valid for datatype {spec.dtype}"
        )
    expected = math.prod(shape)
    if arr.size != expected:
        raise BadRequest(
            f"input {spec.name!r}: data has {arr.size} elements, shape {list(shape)} needs {expected}"
        )
    if dtype.kind in "iu" and arr.size:
        info = np.iinfo(dtype)
        if arr.min() < info.min or arr.max() > info.max:
            raise BadRequest(f"input {spec.name!r}: values out of range for {spec.dtype}")
    with np.errstate(over="ignore"):  # float overflow to inf is reported as a non-finite value later
        return arr.astype(dtype, copy=False).reshape(shape)


def array_from_bytes(buf: memoryview, spec: InputSpec, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    expected = math.prod(shape) * dtype.itemsize
    if len(buf) != expected:
        raise BadRequest(
            f"input {spec.name!r}: binary_data_size is {len(buf)} bytes, shape {list(shape)} of {spec.dtype} "
            f"needs {expected}"
        )
    arr = np.frombuffer(buf, dtype=dtype.newbyteorder("<")).reshape(shape)
    if not arr.dtype.isnative or not arr.flags.aligned:
        arr = arr.astype(dtype)  # big-endian host or misaligned offset: one copy
    return arr


def decode_request(body: bytes, header_length: str | None, bundle: Bundle, *, max_samples: int) -> InferRequest:
    """Decode and validate a V2 infer request body for a bundle (array or text model, text_codec.py)."""
    if bundle.manifest.text is None:
        return decode_infer_request(body, header_length, bundle.manifest.input, max_samples=max_samples,
                                    served=served_outputs(bundle.manifest))
    raw_json, tail = split_body(body, header_length)
    request_id, early_exit, binary_default = _envelope(doc := _json_object(raw_json))
    rows = text_codec.decode_text_body(bundle, doc.get("inputs"), tail, header_length is not None, max_samples)
    return InferRequest(rows, request_id, early_exit, _requested_outputs(doc, binary_default,
                                                                         served_outputs(bundle.manifest)))


def _envelope(doc: dict[str, Any]) -> tuple[str | None, bool, bool]:
    """The request's id, early_exit flag and binary_data_output default."""
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest(f"id must be a string, got {request_id!r}")
    params = _parameters(doc, "request")
    return (request_id, _flag(params, "early_exit", "request", True),
            _flag(params, "binary_data_output", "request", False))


def decode_infer_request(
    body: bytes, header_length: str | None, spec: InputSpec, *, max_samples: int,
    served: list[str] = list(DEFAULT_OUTPUTS),  # noqa: B006 - read only
) -> InferRequest:
    """Decode and validate a V2 infer request body against a model's input spec (and the outputs it
    serves, `served_outputs`)."""
    raw_json, tail = split_body(body, header_length)
    request_id, early_exit, binary_default = _envelope(doc := _json_object(raw_json))
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs or not all(isinstance(t, dict) for t in inputs):
        raise BadRequest(f"inputs must be a non-empty list of tensors; this model takes [{spec.name!r}]")
    check_input_names([t.get("name") for t in inputs], spec)
    tensor = inputs[0]
    check_datatype(tensor.get("datatype"), spec)
    dtype = NUMPY_DTYPES[spec.dtype]
    shape = check_shape(tensor, spec, max_samples)

    tparams = _parameters(tensor, f"input {spec.name!r}")
    size = tparams.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BadRequest(f"input {spec.name!r}: binary_data_size must be a non-negative integer")
        if "data" in tensor:
            raise BadRequest(f"input {spec.name!r}: give either data or binary_data_size, not both")
        if header_length is None:
            raise BadRequest(f"input {spec.name!r} has binary_data_size but no {INFER_HEADER} header came")
        if size > len(tail):
            raise BadRequest(
                f"input {spec.name!r}: binary_data_size is {size} bytes, "
                f"only {len(tail)} follow the JSON header"
            )
        x = array_from_bytes(tail[:size], spec, shape, dtype)
        used = size
    else:
        if "data" not in tensor:
            raise BadRequest(f"input {spec.name!r}: no data (give data or parameters.binary_data_size)")
        x = array_from_list(tensor["data"], spec, shape, dtype)
        used = 0
    if len(tail) != used:
        raise BadRequest(f"{len(tail) - used} bytes after the JSON header are not claimed by any input")
    check_finite(x, spec)
    return InferRequest(
        x=x, id=request_id, early_exit=early_exit, outputs=_requested_outputs(doc, binary_default, served)
    )


def _requested_outputs(doc: dict[str, Any], binary_default: bool, served: list[str]) -> list[RequestedOutput]:
    requested = doc.get("outputs")
    if requested is None or requested == []:
        return [RequestedOutput(name, binary_default) for name in DEFAULT_OUTPUTS]
    if not isinstance(requested, list) or not all(isinstance(o, dict) for o in requested):
        raise BadRequest("outputs must be a list of objects with a name")
    out: list[RequestedOutput] = []
    for item in requested:
        name = item.get("name")
        check_output_name(name, [o.name for o in out], served)
        where = f"output {name!r}"
        binary = _flag(_parameters(item, where), "binary_data", where, binary_default)
        out.append(RequestedOutput(name, binary))
    return out


# -- responses --------------------------------------------------------------------------------


def check_input_names(names: list[Any], spec: InputSpec) -> None:
    """The request names exactly the model's one input (REST and gRPC)."""
    extra = [n for n in names if n != spec.name]
    if spec.name not in names:
        raise BadRequest(f"missing input {spec.name!r} (got {names}); this model takes exactly that one")
    if extra:
        raise BadRequest(f"unexpected input(s) {extra}; this model takes exactly [{spec.name!r}]")
    if len(names) > 1:
        raise BadRequest(f"input {spec.name!r} given {len(names)} times")


def check_datatype(datatype: Any, spec: InputSpec) -> None:
    if datatype != spec.dtype:
        raise BadRequest(f"input {spec.name!r}: datatype {datatype!r} is not the model's {spec.dtype}")


def check_finite(x: np.ndarray, spec: InputSpec) -> None:
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        bad = int(np.count_nonzero(~np.isfinite(x)))
        raise BadRequest(f"input {spec.name!r}: {bad} value(s) are NaN or infinite")


def served_outputs(manifest: Manifest) -> list[str]:
    """The outputs this model answers: prediction sets only with conformal calibration."""
    return [*DEFAULT_OUTPUTS, *([PREDICTION_SET] if manifest.conformal is not None else [])]


def check_output_name(name: Any, seen: list[str], served: list[str]) -> None:
    """`name` is one of the model's `served` outputs, and not among those already requested (`seen`)."""
    if name == PREDICTION_SET and name not in served:
        raise BadRequest(f"output {PREDICTION_SET!r}: this model has no conformal calibration "
                         "(export it with a conformal coverage)")
    if not isinstance(name, str) or name not in served:
        raise BadRequest(f"unknown output {name!r}; this model has {served}")
    if name in seen:
        raise BadRequest(f"output {name!r} requested twice")


def output_array(name: str, result: InferResult) -> np.ndarray:
    """An answer's output as the little-endian array the protocol sends."""
    source = {"label": result.labels, "probabilities": result.probabilities, "exit_stage": result.exit_stage,
              PREDICTION_SET: result.prediction_set}
    return np.ascontiguousarray(source[name], dtype=OUTPUTS[name][1])


def encode_infer_response(
    manifest: Manifest, request: InferRequest, result: InferResult
) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers (content type, and the extension header when binary)."""
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for want in request.outputs or [RequestedOutput(n, False) for n in DEFAULT_OUTPUTS]:
        arr = output_array(want.name, result)
        entry: dict[str, Any] = {
            "name": want.name, "datatype": OUTPUTS[want.name][0], "shape": list(arr.shape),
        }
        if want.binary:
            blob = arr.tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = arr.ravel()  # written by orjson without per-element Python
        outputs.append(entry)
    doc: dict[str, Any] = {"model_name": manifest.name, "model_version": manifest.version}
    if request.id is not None:
        doc["id"] = request.id
    doc["outputs"] = outputs
    header = jsonio.dumps(doc)
    if not blobs:
        return header, {"content-type": JSON_CONTENT_TYPE}
    return b"".join([header, *blobs]), {"content-type": BINARY_CONTENT_TYPE, INFER_HEADER: str(len(header))}


# ---------------------------------------------------------------------------------------------
# Client side: used by tests, load tests and examples; the server does not call these.


def encode_request(
    x: np.ndarray,
    input_name: str,
    *,
    binary: bool = True,
    early_exit: bool = True,
    outputs: dict[str, bool] | None = None,
    request_id: str | None = None,
    binary_output: bool | None = None,
) -> tuple[bytes, dict[str, str]]:
    """Build an infer request body for one input tensor. `outputs` maps output name -> binary_data."""
    datatype = next(k for k, v in NUMPY_DTYPES.items() if v == x.dtype)
    tensor: dict[str, Any] = {"name": input_name, "datatype": datatype, "shape": list(x.shape)}
    blob = np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("<")).tobytes() if binary else b""
    if binary:
        tensor["parameters"] = {"binary_data_size": len(blob)}
    else:
        tensor["data"] = x.ravel().tolist()
    doc: dict[str, Any] = {"inputs": [tensor]}
    if request_id is not None:
        doc["id"] = request_id
    params: dict[str, Any] = {}
    if not early_exit:
        params["early_exit"] = False
    if binary_output is not None:
        params["binary_data_output"] = binary_output
    if params:
        doc["parameters"] = params
    if outputs is not None:
        doc["outputs"] = [{"name": n, "parameters": {"binary_data": b}} for n, b in outputs.items()]
    header = jsonio.dumps(doc)
    if not binary:
        return header, {"content-type": JSON_CONTENT_TYPE}
    return header + blob, {"content-type": BINARY_CONTENT_TYPE, INFER_HEADER: str(len(header))}


def decode_response(body: bytes, headers: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Parse an infer response (JSON or binary) into its JSON document and one array per output."""
    header_length = headers.get(INFER_HEADER) or headers.get(INFER_HEADER.lower())
    raw, tail = split_body(body, header_length)
    doc = jsonio.loads(raw)
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for out in doc.get("outputs", []):
        dtype = NUMPY_DTYPES[out["datatype"]].newbyteorder("<")
        size = (out.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            arr = np.frombuffer(tail[offset : offset + size], dtype=dtype).copy()
            offset += size
        else:
            arr = np.asarray(out["data"], dtype=dtype)
        arrays[out["name"]] = arr.reshape(out["shape"])
    return doc, arrays
