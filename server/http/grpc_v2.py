"""Open Inference Protocol over gRPC: `inference.GRPCInferenceService` on its own port (`grpc_port`).

The same engine, decoding rules, errors and metrics as the REST routes: ServerLive, ServerReady,
ModelReady, ServerMetadata, ModelMetadata and ModelInfer, with inputs as `raw_input_contents`
(what tritonclient sends) or typed contents, the `early_exit` request parameter, and outputs as
`raw_output_contents`. Errors keep their meaning as gRPC status codes (400 INVALID_ARGUMENT, 404
NOT_FOUND, 413 and an overloaded queue RESOURCE_EXHAUSTED, other 503 UNAVAILABLE, 504
DEADLINE_EXCEEDED, 500 INTERNAL). The service operations offramp does not have (shared memory,
repository, statistics, trace, logging, streaming) answer UNIMPLEMENTED.

The message classes and service stubs are the ones `tritonclient[grpc]` ships, generated from
Triton's `grpc_service.proto`, a superset of the KServe protocol's (the `grpc` extra).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from server import __version__
from server.bundle import NUMPY_DTYPES
from server.errors import BadRequest, OfframpError, Overloaded
from server.http import codec, describe, text_codec
from server.http.v2 import UNKNOWN_MODEL, bundle_for, in_progress, outcome
from server.interface import ServingEngine
from server.metrics import Metrics
from server.settings import Settings

log = logging.getLogger("offramp.grpc")

TYPED = {"FP32": "fp32_contents", "FP16": None, "INT64": "int64_contents", "INT32": "int_contents",
         "UINT8": "uint_contents", "BOOL": "bool_contents"}


def status_code(err: OfframpError) -> grpc.StatusCode:
    if isinstance(err, Overloaded) or err.status_code == 413:
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    codes = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
             408: grpc.StatusCode.DEADLINE_EXCEEDED, 409: grpc.StatusCode.FAILED_PRECONDITION,
             503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED}
    return codes.get(err.status_code, grpc.StatusCode.INTERNAL)


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    """The servicer; `state` is the FastAPI app's state (engine, settings, metrics, draining)."""

    def __init__(self, state: Any):
        self.state = state

    @property
    def engine(self) -> ServingEngine:
        return self.state.engine

    async def _fail(self, context: Any, err: OfframpError) -> None:
        await context.abort(status_code(err), err.message)

    async def ServerLive(self, request: Any, context: Any) -> Any:  # noqa: N802 - the protocol's names
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        return pb.ServerReadyResponse(ready=self.engine.ready and not self.state.draining)

    async def ModelReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        try:
            self._bundle(request.name, request.version)
        except OfframpError as err:
            await self._fail(context, err)
        return pb.ModelReadyResponse(ready=self.engine.ready and not self.state.draining)

    async def ServerMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        meta = describe.server_metadata()
        return pb.ServerMetadataResponse(name=meta["name"], version=__version__, extensions=meta["extensions"])

    async def ModelMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        try:
            meta = describe.model_metadata(self._bundle(request.name, request.version).manifest)
        except OfframpError as err:
            await self._fail(context, err)

        def tensors(items: list[dict[str, Any]]) -> list[Any]:
            return [pb.ModelMetadataResponse.TensorMetadata(name=t["name"], datatype=t["datatype"], shape=t["shape"])
                    for t in items]

        return pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"],
                                        inputs=tensors(meta["inputs"]), outputs=tensors(meta["outputs"]))

    async def ModelInfer(self, request: Any, context: Any) -> Any:  # noqa: N802
        metrics: Metrics = self.state.metrics
        settings: Settings = self.state.settings
        model = request.model_name
        label = model if model in self.engine.model_names() else UNKNOWN_MODEL
        started = time.perf_counter()
        with in_progress(self.state):  # shared with REST: alone, the request may take the direct path
            try:
                if self.state.draining:
                    raise OfframpError("the server is shutting down: retry on another replica", 503)
                bundle = self._bundle(model, request.model_version)
                x, early_exit, wanted = decode(request, bundle, settings.max_samples_per_request)
                result = await describe.infer(self.engine, model, bundle, x, early_exit=early_exit, outputs=wanted,
                                              busy=self.state.in_progress > 1)
                response = encode(bundle.manifest, request.id, result, wanted)
            except OfframpError as err:
                metrics.request_done(label, outcome(err.status_code))
                await self._fail(context, err)
            except Exception as err:  # a bug: log it, INTERNAL, never a broken stream
                log.exception("gRPC infer on model %r failed", model)
                metrics.request_done(label, "error")
                await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(err).__name__}")
        metrics.request_done(label, "ok", time.perf_counter() - started)
        return response

    def _bundle(self, model: str, version: str) -> Any:
        return bundle_for(self.engine, model, version)


def decode(request: Any, bundle: Any, max_samples: int) -> tuple[Any, bool, list[str]]:
    """The input array (token rows for text models), the early_exit flag and the outputs asked for;
    BadRequest for anything wrong."""
    spec = bundle.manifest.input
    early_exit = True
    for key, param in request.parameters.items():
        if key == "early_exit":
            if param.WhichOneof("parameter_choice") != "bool_param":
                raise BadRequest("request parameter early_exit must be a bool")
            early_exit = param.bool_param
    wanted: list[str] = []
    served = codec.served_outputs(bundle.manifest)
    for output in request.outputs:
        codec.check_output_name(output.name, wanted, served)
        wanted.append(output.name)
    if bundle.manifest.text is not None:
        return _text_rows(request, bundle, max_samples), early_exit, wanted or list(codec.DEFAULT_OUTPUTS)
    codec.check_input_names([t.name for t in request.inputs], spec)
    tensor = request.inputs[0]
    codec.check_datatype(tensor.datatype, spec)
    shape = codec.check_shape({"shape": list(tensor.shape)}, spec, max_samples)
    dtype = NUMPY_DTYPES[spec.dtype]
    if len(request.raw_input_contents) > 1:
        raise BadRequest(f"{len(request.raw_input_contents)} raw_input_contents for one input")
    if request.raw_input_contents:
        if tensor.HasField("contents"):
            raise BadRequest(f"input {spec.name!r}: give raw_input_contents or contents, not both")
        x = codec.array_from_bytes(memoryview(request.raw_input_contents[0]), spec, shape, dtype)
    else:
        field = TYPED.get(spec.dtype)
        if field is None:
            raise BadRequest(f"input {spec.name!r}: {spec.dtype} data only as raw_input_contents")
        values = list(getattr(tensor.contents, field))
        if not values:
            raise BadRequest(f"input {spec.name!r}: no data (raw_input_contents or contents.{field})")
        x = codec.array_from_list(values, spec, shape, dtype)
    codec.check_finite(x, spec)
    return x, early_exit, wanted or list(codec.DEFAULT_OUTPUTS)


def _text_rows(request: Any, bundle: Any, max_samples: int) -> Any:
    """A text model's inputs: sentences (BYTES) or token ids, raw or typed contents (text_codec.py)."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise BadRequest(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    tensors = []
    for i, t in enumerate(request.inputs):
        values = None
        if not raw:
            values = list(t.contents.bytes_contents) if t.datatype == "BYTES" else list(t.contents.int64_contents)
        tensors.append(text_codec.Tensor(t.name, t.datatype, list(t.shape), values,
                                         memoryview(raw[i]) if raw else None))
    return text_codec.decode_text_inputs(bundle, tensors, max_samples)


def encode(manifest: Any, request_id: str, result: Any, wanted: list[str]) -> Any:
    response = pb.ModelInferResponse(model_name=manifest.name, model_version=manifest.version, id=request_id)
    for name in wanted:
        arr = codec.output_array(name, result)
        datatype = codec.OUTPUTS[name][0]
        response.outputs.append(pb.ModelInferResponse.InferOutputTensor(name=name, datatype=datatype,
                                                                        shape=list(arr.shape)))
        response.raw_output_contents.append(arr.tobytes())
    return response


def build_grpc_server(state: Any, settings: Settings) -> tuple[Any, int]:
    """The gRPC server (not started) and the port it is bound to (`grpc_port` 0 picks a free one)."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", settings.max_request_bytes),
                                      ("grpc.max_send_message_length", 64 * 1024 * 1024)])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(state), server)
    port = server.add_insecure_port(f"{settings.host}:{settings.grpc_port}")
    return server, port
