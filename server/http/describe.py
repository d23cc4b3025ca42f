"""What the server says of itself and its models (V2 metadata), and the one output that needs more
than the engine's answer: conformal prediction sets (server/conformal.py), for models whose
manifest has `conformal`."""

from __future__ import annotations

from typing import Any

from server import __version__
from server.bundle import Bundle, Manifest
from server.conformal import prediction_sets
from server.errors import BadRequest
from server.http import text_codec
from server.interface import InferResult, ServingEngine

PLATFORM = "offramp-early-exit"
EXTENSIONS = ["binary_tensor_data", "parameters"]
PREDICTION_SET = "prediction_set"


def server_metadata() -> dict[str, Any]:
    return {"name": "offramp", "version": __version__, "extensions": list(EXTENSIONS)}


def model_metadata(manifest: Manifest) -> dict[str, Any]:
    spec = manifest.input
    inputs = [{"name": spec.name, "datatype": spec.dtype, "shape": list(spec.shape)}]
    text_params: dict[str, Any] = {}
    if manifest.text is not None:
        inputs, text_params = text_codec.input_metadata(manifest)
    return {
        "name": manifest.name,
        "versions": [manifest.version],
        "platform": PLATFORM,
        "inputs": inputs,
        "outputs": [
            {"name": "label", "datatype": "INT64", "shape": [-1]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, manifest.num_classes]},
            {"name": "exit_stage", "datatype": "INT32", "shape": [-1]},
            *([{"name": PREDICTION_SET, "datatype": "BOOL", "shape": [-1, manifest.num_classes]}]
              if manifest.conformal else []),
        ],
        "parameters": {
            "stages": manifest.num_stages,
            "labels": list(manifest.labels),
            "exit_criterion": manifest.default_policy.criterion,
            "preprocessing": spec.preprocessing,
            **({"conformal_coverage": manifest.conformal.coverage} if manifest.conformal else {}),
            **text_params,
        },
    }


def wants_sets(manifest: Manifest, outputs: list[str]) -> bool:
    """Whether the request asks for prediction sets; BadRequest, before any inference, when the model
    has none to give."""
    if PREDICTION_SET not in outputs:
        return False
    if manifest.conformal is None:
        raise BadRequest(f"output {PREDICTION_SET!r}: model {manifest.name!r} has no conformal calibration "
                         "(export it with a conformal coverage)")
    return True


def with_sets(engine: ServingEngine, model: str, bundle: Bundle, result: InferResult,
              early_exit: bool) -> InferResult:
    """The answer with its prediction sets, from the quantiles of the live policy (of full depth
    for `early_exit` false). During a policy swap a request may get the new policy's quantiles."""
    policy = engine.policy(model) if early_exit else None
    sets = prediction_sets(bundle, policy, result.probabilities, result.exit_stage)
    return InferResult(result.labels, result.probabilities, result.exit_stage, sets)
