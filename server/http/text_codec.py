"""Text models over the V2 protocol (REST and gRPC): sentences in, or token ids the client made.

A text bundle (`Manifest.text`) takes either

- `text`: datatype BYTES, shape [N] (or [N, 1]), one UTF-8 sentence per element: JSON strings,
  or with the binary extension (and gRPC `raw_input_contents`) elements of a 4-byte little-endian
  length followed by that many bytes, as tritonclient writes them. The server tokenizes them with
  the bundle's own tokenizer (server/text.py), truncating to the bundle's `max_length`; an empty
  string is a valid sentence ([CLS] [SEP]).
- `input_ids` and `attention_mask`: both INT64 [N, T], right-padded, from the same tokenizer,
  T <= max_length, ids below the tokenizer's vocabulary size.

Each input arrives as a `Tensor`: name, datatype, shape and either a list of values or raw bytes.
Everything wrong is a `BadRequest` naming the input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from server.bundle import NUMPY_DTYPES, Bundle, InputSpec, Manifest
from server.errors import BadRequest
from server.text import ATTENTION_MASK, INPUT_IDS, TEXT_INPUT, TokenRows, tokenizer_for

__all__ = ["Tensor", "decode_text_body", "decode_text_inputs", "encode_text_request", "input_metadata",
           "serialize_bytes", "split_bytes", "tokenizer_for"]

LENGTH_PREFIX = 4


@dataclass(frozen=True)
class Tensor:
    """One input of a request, before decoding: `values` (a JSON or gRPC typed list) or `raw`."""

    name: Any
    datatype: Any
    shape: Any
    values: Any = None
    raw: memoryview | None = None


def input_metadata(manifest: Manifest) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The metadata's `inputs` and the parameters that describe the token-id alternative."""
    text = manifest.text
    assert text is not None
    inputs = [{"name": text.input, "datatype": "BYTES", "shape": [-1]}]
    params = {
        "max_length": text.max_length,
        "tokenizer": text.file,
        "alternative_inputs": [{"name": t.name, "datatype": t.dtype, "shape": [-1, -1]}
                               for t in manifest.model_inputs],
    }
    return inputs, params


def decode_text_inputs(bundle: Bundle, tensors: list[Tensor], max_samples: int) -> TokenRows:
    """The request's inputs as token rows for the engine."""
    names = [t.name for t in tensors]
    if names == [TEXT_INPUT]:
        return _sentences(bundle, tensors[0], max_samples)
    if sorted(n for n in names if isinstance(n, str)) == sorted([INPUT_IDS, ATTENTION_MASK]) and len(names) == 2:
        by_name = {t.name: t for t in tensors}
        return _token_ids(bundle, by_name[INPUT_IDS], by_name[ATTENTION_MASK], max_samples)
    raise BadRequest(f"this text model takes [{TEXT_INPUT!r}] (BYTES) or [{INPUT_IDS!r}, {ATTENTION_MASK!r}] "
                     f"(INT64), got {names}")


def decode_text_body(bundle: Bundle, inputs: Any, tail: memoryview, binary: bool, max_samples: int) -> TokenRows:
    """A REST body's `inputs` (and its binary tail, consumed in input order) as token rows."""
    if not isinstance(inputs, list) or not inputs or not all(isinstance(t, dict) for t in inputs):
        raise BadRequest(f"inputs must be a non-empty list of tensors; this model takes [{TEXT_INPUT!r}]")
    tensors, at = [], 0
    for t in inputs:
        name = t.get("name")
        params = t.get("parameters") or {}
        if not isinstance(params, dict):
            raise BadRequest(f"input {name!r}.parameters must be an object")
        size = params.get("binary_data_size")
        raw = None
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise BadRequest(f"input {name!r}: binary_data_size must be a non-negative integer")
            if "data" in t:
                raise BadRequest(f"input {name!r}: give either data or binary_data_size, not both")
            if not binary or at + size > len(tail):
                raise BadRequest(f"input {name!r}: binary_data_size is {size} bytes, "
                                 f"only {len(tail) - at} follow the JSON header")
            raw, at = tail[at:at + size], at + size
        elif "data" not in t:
            raise BadRequest(f"input {name!r}: no data (give data or parameters.binary_data_size)")
        tensors.append(Tensor(name, t.get("datatype"), t.get("shape"), t.get("data"), raw))
    if len(tail) != at:
        raise BadRequest(f"{len(tail) - at} bytes after the JSON header are not claimed by any input")
    return decode_text_inputs(bundle, tensors, max_samples)


def _batch(name: str, n: int, max_samples: int) -> None:
    if n == 0:
        raise BadRequest(f"input {name!r}: batch of 0 samples; send at least one")
    if n > max_samples:
        raise BadRequest(f"input {name!r}: batch of {n} samples exceeds max_samples_per_request ({max_samples})")


def _sentences(bundle: Bundle, t: Tensor, max_samples: int) -> TokenRows:
    if t.datatype != "BYTES":
        raise BadRequest(f"input {TEXT_INPUT!r}: datatype {t.datatype!r}; sentences are BYTES")
    shape = t.shape
    if (not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                for d in shape)
            or not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1))):
        raise BadRequest(f"input {TEXT_INPUT!r}: shape must be [N] (or [N, 1]), got {shape!r}")
    n = shape[0]
    _batch(TEXT_INPUT, n, max_samples)
    if t.raw is not None:
        items = split_bytes(t.raw, n)
    else:
        values = t.values
        if len(shape) == 2 and isinstance(values, list) and all(isinstance(v, list) and len(v) == 1 for v in values):
            values = [v[0] for v in values]
        if not isinstance(values, list) or len(values) != n:
            got = len(values) if isinstance(values, list) else type(values).__name__
            raise BadRequest(f"input {TEXT_INPUT!r}: shape {shape} needs {n} strings, data has {got}")
        items = []
        for i, v in enumerate(values):
            if isinstance(v, str):
                items.append(v.encode("utf-8", "surrogatepass"))
            elif isinstance(v, bytes):
                items.append(v)
            else:
                raise BadRequest(f"input {TEXT_INPUT!r} element {i} is a {type(v).__name__}, not a string")
    ids, mask = tokenizer_for(bundle).encode_bytes(items)
    return TokenRows(ids, mask)


def split_bytes(raw: memoryview, n: int) -> list[bytes]:
    """The elements of a serialized BYTES tensor (4-byte little-endian length, then the bytes)."""
    items, at = [], 0
    for i in range(n):
        if at + LENGTH_PREFIX > len(raw):
            raise BadRequest(f"input {TEXT_INPUT!r}: binary data ends before element {i} of {n}")
        size = int.from_bytes(raw[at:at + LENGTH_PREFIX], "little")
        at += LENGTH_PREFIX
        if at + size > len(raw):
            raise BadRequest(f"input {TEXT_INPUT!r}: element {i} claims {size} bytes, {len(raw) - at} are left")
        items.append(bytes(raw[at:at + size]))
        at += size
    if at != len(raw):
        raise BadRequest(f"input {TEXT_INPUT!r}: {len(raw) - at} bytes follow the {n} elements of the shape")
    return items


def _int_array(t: Tensor, max_samples: int) -> np.ndarray:
    from server.http import codec

    spec = InputSpec(name=str(t.name), shape=[-1, -1], dtype="INT64")
    codec.check_datatype(t.datatype, spec)
    shape = codec.check_shape({"shape": t.shape}, spec, max_samples)
    dtype = NUMPY_DTYPES["INT64"]
    if t.raw is not None:
        return codec.array_from_bytes(t.raw, spec, shape, dtype)
    if t.values is None:
        raise BadRequest(f"input {t.name!r}: no data")
    return codec.array_from_list(t.values, spec, shape, dtype)


def _token_ids(bundle: Bundle, ids_t: Tensor, mask_t: Tensor, max_samples: int) -> TokenRows:
    """Decoded ids and mask; their shapes, mask and lengths are checked where every caller's rows are,
    in `Engine.infer` (`server.text.check_mask`); the vocabulary only the tokenizer knows, here."""
    tokenizer = tokenizer_for(bundle)
    ids, mask = _int_array(ids_t, max_samples), _int_array(mask_t, max_samples)
    if ids.size and int(ids.max()) >= tokenizer.vocab_size:
        raise BadRequest(f"{INPUT_IDS!r}: token id {int(ids.max())} is outside the vocabulary "
                         f"({tokenizer.vocab_size} tokens)")
    return TokenRows(ids, mask)


def serialize_bytes(items: list[bytes]) -> bytes:
    """BYTES elements in the binary layout (for clients and tests)."""
    return b"".join(len(b).to_bytes(LENGTH_PREFIX, "little") + b for b in items)


def encode_text_request(texts: Any, *, binary: bool = True, early_exit: bool = True,
                        binary_output: bool | None = None) -> tuple[bytes, dict[str, str]]:
    """A client's infer request body sending sentences as the `text` input (tests, load tests)."""
    from server import jsonio
    from server.http.codec import INFER_HEADER, JSON_CONTENT_TYPE

    items = [t.encode("utf-8") if isinstance(t, str) else bytes(t) for t in texts]
    tensor: dict[str, Any] = {"name": TEXT_INPUT, "datatype": "BYTES", "shape": [len(items)]}
    blob = serialize_bytes(items) if binary else b""
    if binary:
        tensor["parameters"] = {"binary_data_size": len(blob)}
    else:
        tensor["data"] = [t.decode("utf-8") for t in items]
    doc: dict[str, Any] = {"inputs": [tensor], "parameters": {"early_exit": early_exit}}
    if binary_output is not None:
        doc["parameters"]["binary_data_output"] = binary_output
    header = jsonio.dumps(doc)
    if not binary:
        return header, {"content-type": JSON_CONTENT_TYPE}
    return header + blob, {"content-type": "application/octet-stream", INFER_HEADER: str(len(header))}
