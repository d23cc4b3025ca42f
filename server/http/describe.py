"""What the server says of itself and its models (V2 metadata), and the one output that needs more
than the engine's answer: conformal prediction sets (server/conformal.py), for models whose
manifest has `conformal`."""

from __future__ import annotations

from typing import Any

import numpy as np

from server import __version__
from server.bundle import Bundle, Manifest
from server.conformal import policy_quantiles, sets_from
from server.errors import Conflict
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


async def infer(engine: ServingEngine, model: str, bundle: Bundle, x: Any, *, early_exit: bool,
                outputs: list[str], busy: bool) -> InferResult:
    """The engine's answer, with its prediction sets when `outputs` asks for them (REST and gRPC)."""
    quantiles = set_quantiles(engine, model, bundle, outputs, early_exit)
    result = await engine.infer(model, x, early_exit=early_exit, busy=busy)
    if quantiles is None:
        return result
    sets = sets_from(result.probabilities, result.exit_stage, quantiles)
    return InferResult(result.labels, result.probabilities, result.exit_stage, sets)


def set_quantiles(engine: ServingEngine, model: str, bundle: Bundle, outputs: list[str],
                  early_exit: bool) -> np.ndarray | None:
    """The exit quantiles of the live policy (of full depth for `early_exit` false) when the request
    asks for prediction sets (the decoders let it only for models with conformal calibration),
    before any inference: a live policy its calibration data cannot replay is a 409. (A policy
    swapped while the request runs may have answered it; its sets use the quantiles read here.)"""
    if PREDICTION_SET not in outputs:
        return None
    try:
        return policy_quantiles(bundle, engine.policy(model) if early_exit else None)
    except ValueError as err:
        raise Conflict(f"output {PREDICTION_SET!r}: {err}") from None
