"""Stage runtime: one onnxruntime session per stage, and where the hidden state lives between stages.

The scheduler sees one small interface, `StageRunner`: `run(stage, x)` gives a stage's outputs
(the hidden state as an opaque *handle*, logits and gate/similarity as numpy), `take(hidden, rows)`
selects the survivors and `concat(parts)` merges survivors of several batches. What a handle is
depends on the device strategy:

- CPU (`NumpyOps`): plain numpy arrays; sessions run with `session.run`.
- CUDA (`OrtValueOps`): `OrtValue`s that stay on the GPU. Stages run with IO binding: the input
  is bound as an OrtValue (or a host array that onnxruntime copies up, for stage 0), `hidden` is
  bound on the device, only logits (and gate/similarity) come back to the host. Survivors are
  selected with a tiny Gather graph and merged with a tiny Concat graph (one cached per input
  count), each in its own session on the same device, also with IO binding. The same code runs
  with `device_type="cpu"`, which is how the tests exercise it without a GPU.

Stage 0's input always arrives as a host array (the request's tensor); `take`/`concat` treat host
arrays with numpy whatever the strategy.

Text models (`Manifest.extra_inputs` = the attention mask) pass `server.text.TokenRows` instead:
the ids or hidden state with the mask beside it (the mask always on the host: it is small). Every
stage is fed both; `take` trims the padding columns the remaining rows do not need, and `concat`
pads rows of different lengths to the longest, so survivors of batches with different lengths run
as one batch. On CUDA the hidden state stays on the device: rows are gathered, trimmed and padded
there by tiny Gather / Slice / Pad + Concat graphs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from server.bundle import GATE, HIDDEN, LOGITS, SIMILARITY, Bundle
from server.engine.device import CPU_PROVIDER, CUDA_PROVIDER, HELPER_OPSET, OrtValueOps, providers_for
from server.exits import softmax
from server.settings import Settings
from server.text import ATTENTION_MASK, TokenRows, pad_concat, trim

__all__ = ["CPU_PROVIDER", "CUDA_PROVIDER", "DeviceError", "NumpyOps", "OrtStageRunner", "StageOutputs",
           "StageRunner", "open_session", "providers_for", "resolve_device", "session_options"]

log = logging.getLogger("offramp.runtime")



class DeviceError(RuntimeError):
    """The configured device cannot be used (e.g. `device=cuda` without a CUDA-enabled onnxruntime)."""


@dataclass(frozen=True)
class StageOutputs:
    """What one stage run gives back; `hidden` is None for the last stage (nobody reads it).

    Runners that compute the exit scores in the graph (`with_exit_scores`) also give `probs`,
    `labels` and `max_prob`; without them the host computes what it needs from the logits.
    """

    hidden: Any
    logits: np.ndarray | None  # float32 [N, C]
    gate: np.ndarray | None = None  # float32 [N]
    similarity: np.ndarray | None = None  # float32 [N]
    probs: np.ndarray | None = None  # float32 [N, C], softmax of the logits
    labels: np.ndarray | None = None  # int64 [N], argmax of the logits
    max_prob: np.ndarray | None = None  # float32 [N], the max_prob criterion's score

    def __len__(self) -> int:
        """The rows of this run."""
        return len(next(a for a in (self.labels, self.logits, self.probs) if a is not None))

    def probabilities(self) -> np.ndarray:
        if self.probs is not None:
            return self.probs
        assert self.logits is not None, "a stage gives its logits or their softmax"
        return softmax(self.logits)

    def in_graph_score(self, criterion: str) -> np.ndarray | None:
        """The criterion's score as the stage graph computed it, where it did (max_prob)."""
        return self.max_prob if criterion == "max_prob" else None

    def predicted(self) -> np.ndarray:
        return self.labels if self.labels is not None else self.probabilities().argmax(axis=-1)


class StageRunner(Protocol):
    """The interface the scheduler runs stages through (a fake implements it in the tests)."""

    num_stages: int

    def run(self, stage: int, x: Any) -> StageOutputs: ...

    def take(self, hidden: Any, rows: np.ndarray) -> Any: ...

    def concat(self, parts: list[Any]) -> Any: ...

    def rows(self, hidden: Any) -> int: ...

    def close(self) -> None: ...


def resolve_device(requested: str, available: list[str] | None = None) -> str:
    """`auto` -> `cuda` when onnxruntime offers the CUDA provider, else `cpu`; `cuda` must be offered."""
    available = ort.get_available_providers() if available is None else available
    if requested == "cpu":
        return "cpu"
    if CUDA_PROVIDER in available:
        return "cuda"
    if requested == "cuda":
        raise DeviceError(
            f"device=cuda was requested but onnxruntime {ort.__version__} offers only {available}: "
            "install the `gpu` extra (onnxruntime-gpu, and not onnxruntime beside it) on a machine "
            "with a visible NVIDIA GPU, or set OFFRAMP_DEVICE=auto/cpu"
        )
    return "cpu"


def session_options(settings: Settings) -> ort.SessionOptions:
    """Session options shared by every stage: no spinning, thread counts from settings."""
    return ort_session_options(settings.intra_op_threads, settings.inter_op_threads)


def ort_session_options(intra_op_threads: int = 0, inter_op_threads: int = 1) -> ort.SessionOptions:
    so = ort.SessionOptions()
    # Chained sessions that spin fight each other (and the other models' workers) for the cores.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.intra_op_num_threads = intra_op_threads
    so.inter_op_num_threads = inter_op_threads
    so.log_severity_level = 3
    return so


def open_session(path: str | Path, *, device: str = "cpu", intra_op_threads: int = 1) -> ort.InferenceSession:
    """One session with the server's options, for code that runs ONNX files outside the engine
    (export checks, benchmarks): the same no-spinning rule and providers as the stages."""
    return ort.InferenceSession(str(path), ort_session_options(intra_op_threads), providers=providers_for(device))


PROBS, LABEL, MAX_PROB = "offramp_probs", "offramp_label", "offramp_max_prob"
SCORES = (PROBS, LABEL, MAX_PROB)


def with_exit_scores(model: onnx.ModelProto) -> onnx.ModelProto:
    """A stage graph that also outputs its exit scores: `offramp_probs` (softmax of the logits),
    `offramp_label` (their argmax) and `offramp_max_prob`. onnxruntime computes them in C++ in the
    same run, so the host reads a few small arrays instead of running softmax, argmax and the
    criterion in numpy after every stage. Done when the server loads a stage (the verified file is
    unchanged), so every bundle, old ones included, gets it; thresholds stay a host-side comparison."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    opset = next((o.version for o in out.opset_import if o.domain in ("", "ai.onnx")), HELPER_OPSET)
    graph.node.append(helper.make_node("Softmax", [LOGITS], [PROBS], axis=-1))
    graph.node.append(helper.make_node("ArgMax", [LOGITS], [LABEL], axis=-1, keepdims=0))
    if opset >= 18:  # ReduceMax takes its axes as an input from opset 18 on
        graph.initializer.append(helper.make_tensor("offramp_last_axis", TensorProto.INT64, [1], [-1]))
        graph.node.append(helper.make_node("ReduceMax", [PROBS, "offramp_last_axis"], [MAX_PROB], keepdims=0))
    else:
        graph.node.append(helper.make_node("ReduceMax", [PROBS], [MAX_PROB], axes=[-1], keepdims=0))
    graph.output.extend([
        helper.make_tensor_value_info(PROBS, TensorProto.FLOAT, ["n", None]),
        helper.make_tensor_value_info(LABEL, TensorProto.INT64, ["n"]),
        helper.make_tensor_value_info(MAX_PROB, TensorProto.FLOAT, ["n"]),
    ])
    return out


def _stage_session(path: Path, options: ort.SessionOptions, providers: list[Any]) -> tuple[ort.InferenceSession, bool]:
    """A stage's session, with the exit scores in its graph when that works (else the plain file)."""
    try:
        model = with_exit_scores(onnx.load(str(path)))
        return ort.InferenceSession(model.SerializeToString(), options, providers=providers), True
    except Exception as err:  # an unusual graph (e.g. logits not float): serve it as it is
        log.warning("%s: exit scores stay on the host (%s: %s)", path.name, type(err).__name__, err)
        return ort.InferenceSession(str(path), options, providers=providers), False


class NumpyOps:
    """Hidden states as host numpy arrays (or `TokenRows` of them)."""

    def take(self, hidden: Any, rows: np.ndarray) -> Any:
        if isinstance(hidden, TokenRows):
            return trim(TokenRows(hidden.data[rows], hidden.mask[rows]))
        return hidden[rows]

    def concat(self, parts: list[Any]) -> Any:
        if isinstance(parts[0], TokenRows):
            return pad_concat(parts)
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)

    def rows(self, hidden: Any) -> int:
        return len(hidden) if isinstance(hidden, TokenRows) else int(hidden.shape[0])


class OrtStageRunner:
    """One onnxruntime session per stage of a bundle, on the device the settings choose.

    `bind_device` forces the IO-binding path on a device type ("cpu" in tests, to exercise the
    code the GPU runs); left None, IO binding is used exactly when the sessions run on CUDA.
    """

    def __init__(self, bundle: Bundle, settings: Settings, *, bind_device: str | None = None,
                 device_id: int = 0, cuda_graph: bool = False):
        self.bundle = bundle
        manifest = bundle.manifest
        self.num_stages = manifest.num_stages
        self.device = resolve_device(settings.device)
        options = session_options(settings)
        providers = providers_for(self.device, device_id, settings.cuda_conv_algo_search, cuda_graph=cuda_graph)
        opened = [_stage_session(bundle.stage_path(i), options, providers) for i in range(self.num_stages)]
        self.sessions = [s for s, _ in opened]
        self.in_graph = [scored for _, scored in opened]
        if self.device == "cuda" and CUDA_PROVIDER not in self.sessions[0].get_providers():
            # onnxruntime falls back to CPU silently when the CUDA libraries fail to load.
            if settings.device == "cuda":
                raise DeviceError(
                    f"{bundle.name}: onnxruntime could not start the CUDA provider (missing CUDA/cuDNN "
                    f"libraries?); sessions run on {self.sessions[0].get_providers()}"
                )
            log.warning("%s: CUDA provider failed to start, serving on CPU", bundle.name)
            self.device = "cpu"
        self.providers = self.sessions[0].get_providers()
        self.bucket = settings.length_bucket_tokens
        self._inputs = [s.inputs[0].name for s in manifest.stages]
        self._extra = [[n for n in (GATE, SIMILARITY) if s.has_output(n)] for s in manifest.stages]
        # The host-bound outputs of each stage: the logits, the in-graph scores where they exist, gate/similarity.
        self._small = [[LOGITS, *(SCORES if scored else ())] + extra
                       for scored, extra in zip(self.in_graph, self._extra, strict=True)]
        bind = bind_device if bind_device is not None else ("cuda" if self.device == "cuda" else None)
        self.ops: NumpyOps | OrtValueOps = (
            OrtValueOps(bind, device_id, session_options(settings)) if bind else NumpyOps()
        )
        log.info("%s: %d stage sessions on %s (io binding: %s)", bundle.name, self.num_stages,
                 self.providers, bind or "off")

    def run(self, stage: int, x: Any) -> StageOutputs:
        if isinstance(self.ops, OrtValueOps):
            return self._run_bound(stage, x)
        names = ([HIDDEN] if stage < self.num_stages - 1 else []) + self._small[stage]
        if isinstance(x, TokenRows):
            return self._outputs(self._run_buckets(stage, x, names))
        values = dict(zip(names, self.sessions[stage].run(names, {self._inputs[stage]: x}), strict=True))
        return self._outputs(values)

    def _run_rows(self, stage: int, x: TokenRows, names: list[str]) -> dict[str, Any]:
        feed = {self._inputs[stage]: x.data, ATTENTION_MASK: x.mask}
        return dict(zip(names, self.sessions[stage].run(names, feed), strict=True))

    def _run_buckets(self, stage: int, x: TokenRows, names: list[str]) -> dict[str, Any]:
        """A text batch as one run per length bucket (`length_bucket_tokens`), each trimmed to its
        own longest row; outputs back in row order, the hidden state padded to the batch's width."""
        lengths = x.lengths()
        keys = (np.maximum(lengths, 1) - 1) // self.bucket if self.bucket else np.zeros(len(lengths), np.int64)
        if len(x) < 2 or keys.min() == keys.max():
            values = self._run_rows(stage, x, names)
        else:
            values = {}
            for key in np.unique(keys):
                rows = np.flatnonzero(keys == key)
                width = int(lengths[rows].max())
                part = self._run_rows(stage, TokenRows(np.ascontiguousarray(x.data[rows, :width]),
                                                      np.ascontiguousarray(x.mask[rows, :width])), names)
                for name, value in part.items():
                    if name not in values:
                        shape = (len(x), x.mask.shape[1], *value.shape[2:]) if name == HIDDEN else (
                            len(x), *value.shape[1:])
                        values[name] = np.zeros(shape, value.dtype)
                    if name == HIDDEN:
                        values[name][rows, :width] = value
                    else:
                        values[name][rows] = value
        if HIDDEN in values:
            values[HIDDEN] = TokenRows(values[HIDDEN], x.mask)
        return values

    def _run_bound(self, stage: int, x: Any) -> StageOutputs:
        ops = self.ops
        assert isinstance(ops, OrtValueOps)
        sess = self.sessions[stage]
        binding = sess.io_binding()
        mask = None
        if isinstance(x, TokenRows):
            mask = x.mask
            binding.bind_cpu_input(ATTENTION_MASK, np.ascontiguousarray(mask))
            x = x.data
        if isinstance(x, np.ndarray):
            binding.bind_cpu_input(self._inputs[stage], np.ascontiguousarray(x))
        else:
            binding.bind_ortvalue_input(self._inputs[stage], x)
        names: list[str] = []
        if stage < self.num_stages - 1:
            binding.bind_output(HIDDEN, ops.device_type, ops.device_id)  # stays on the device
            names.append(HIDDEN)
        for name in self._small[stage]:
            binding.bind_output(name, "cpu")  # small: comes back to the host
            names.append(name)
        sess.run_with_iobinding(binding)
        values: dict[str, Any] = dict(zip(names, binding.get_outputs(), strict=True))
        for name in names[1:] if names[0] == HIDDEN else names:
            values[name] = np.array(values[name].numpy(), copy=True)
        if mask is not None and HIDDEN in values:
            values[HIDDEN] = TokenRows(values[HIDDEN], mask)
        return self._outputs(values)

    @staticmethod
    def _outputs(values: dict[str, Any]) -> StageOutputs:
        gate, sim, logits = values.get(GATE), values.get(SIMILARITY), values.get(LOGITS)
        return StageOutputs(
            hidden=values.get(HIDDEN),
            logits=None if logits is None else np.asarray(logits, dtype=np.float32),
            gate=None if gate is None else np.asarray(gate, dtype=np.float32).reshape(-1),
            similarity=None if sim is None else np.asarray(sim, dtype=np.float32).reshape(-1),
            probs=values.get(PROBS), labels=values.get(LABEL), max_prob=values.get(MAX_PROB),
        )

    def take(self, hidden: Any, rows: np.ndarray) -> Any:
        return self.ops.take(hidden, rows)

    def concat(self, parts: list[Any]) -> Any:
        return self.ops.concat(parts)

    def rows(self, hidden: Any) -> int:
        return self.ops.rows(hidden)

    def close(self) -> None:
        self.sessions = []
