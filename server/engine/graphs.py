"""CUDA graphs per (stage, batch bucket): `GraphStageRunner`.

On a GPU every stage of a small model is launch-bound: the kernels take microseconds and launching
them takes as long. onnxruntime's CUDA provider can capture a session's kernels once into a CUDA
graph (`enable_cuda_graph`) and replay the whole graph with one launch. A captured graph has fixed
shapes and fixed buffer addresses, so this runner keeps, for each stage and each batch bucket
(1, 2, 4, ... up to `max_batch_size` rounded up to a power of two):

- preallocated device buffers for the stage's input and every output, bound once per run by IO
  binding (a graph replays into the same addresses);
- its own graph, selected with the run option `gpu_graph_id`, captured when the runner is built
  (two runs on zeros per stage and bucket: onnxruntime runs a graph id once plainly, then captures);
- rows padded to the bucket: stage 0's host input is copied into its buffer with zeros after the
  real rows (`OrtValue.update_inplace`), a later stage's device input is written into its buffer
  by a tiny Pad graph (its output bound to the buffer). The padding rows are computed and dropped;
  exited rows never reach a later stage (its input holds only the survivors).

What leaves a run is copied out of the buffers (the next replay of that bucket overwrites them):
the small outputs to the host, the hidden state's real rows into a fresh device value by a tiny
Slice graph. A run larger than the largest bucket is split into runs of that bucket.

Text models are not captured (their sequence axis changes from batch to batch): they keep the IO
binding path of `OrtStageRunner`. With `device_type="cpu"` (tests) everything above runs except the
capture itself, which only the CUDA provider does.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from server.bundle import HIDDEN, NUMPY_DTYPES, Bundle
from server.engine.device import HELPER_IR_VERSION, HELPER_OPSET, OrtValueOps
from server.engine.runtime import OrtStageRunner, StageOutputs, resolve_device
from server.settings import Settings
from server.text import TokenRows

log = logging.getLogger("offramp.runtime")


def buckets(max_batch_size: int) -> list[int]:
    """1, 2, 4, ... up to the first power of two >= max_batch_size."""
    out = [1]
    while out[-1] < max_batch_size:
        out.append(out[-1] * 2)
    return out


def _helper(name: str, nodes: list[onnx.NodeProto], inputs: list[Any], rank: int, elem: int) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs,
                              [helper.make_tensor_value_info("out", elem, ["m"] + [None] * (rank - 1))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", HELPER_OPSET)],
                             ir_version=HELPER_IR_VERSION, producer_name="offramp")


def pad_rows_model(elem: int, rank: int) -> onnx.ModelProto:
    """`out = data` with zero rows appended (`pads`: int64 [2 * rank], ONNX Pad layout)."""
    data = helper.make_tensor_value_info("data", elem, ["n"] + [None] * (rank - 1))
    pads = helper.make_tensor_value_info("pads", TensorProto.INT64, [2 * rank])
    return _helper("offramp_pad_rows", [helper.make_node("Pad", ["data", "pads"], ["out"], mode="constant")],
                   [data, pads], rank, elem)


def first_rows_model(elem: int, rank: int) -> onnx.ModelProto:
    """`out = data[:n]`: the real rows of a padded buffer, as a new value."""
    data = helper.make_tensor_value_info("data", elem, ["b"] + [None] * (rank - 1))
    ends = helper.make_tensor_value_info("ends", TensorProto.INT64, [1])
    nodes = [helper.make_node("Constant", [], ["zero"], value=helper.make_tensor("z", TensorProto.INT64, [1], [0])),
             helper.make_node("Slice", ["data", "zero", "ends", "zero"], ["out"])]
    return _helper("offramp_first_rows", nodes, [data, ends], rank, elem)


def graph_run(graph_id: int) -> ort.RunOptions:
    """Run options selecting CUDA graph `graph_id` (-1: a plain run, nothing captured or replayed)."""
    options = ort.RunOptions()
    options.add_run_config_entry("gpu_graph_id", str(graph_id))
    return options


def output_buffers(sess: ort.InferenceSession, name: str, value: ort.OrtValue, device_type: str,
                   device_id: int) -> dict[str, ort.OrtValue]:
    """A zero buffer on the device for every output of `sess` with `value` as its input `name`: one
    plain run tells their shapes (fixed buffers for a CUDA graph's replays)."""
    probe = sess.io_binding()
    probe.bind_ortvalue_input(name, value)
    for o in sess.get_outputs():
        probe.bind_output(o.name, device_type, device_id)
    sess.run_with_iobinding(probe, graph_run(-1))
    return {o.name: ort.OrtValue.ortvalue_from_numpy(
                np.zeros(v.shape(), helper.tensor_dtype_to_np_dtype(v.element_type())), device_type, device_id)
            for o, v in zip(sess.get_outputs(), probe.get_outputs(), strict=True)}


CAPTURE_LOCK = threading.Lock()  # captures run one at a time, whichever model's (CUDA's capture is global)


class GraphStageRunner(OrtStageRunner):
    """`OrtStageRunner` whose array stages run as CUDA graphs per (stage, bucket) on fixed buffers.

    Every (stage, bucket) runs twice on zeros when the runner is built (onnxruntime runs a graph id
    once plainly, then captures it), so a capture that fails fails at start, where `stage_runner`
    falls back, and no request pays for one. `thread_bound`: the scheduler never runs it on the
    caller's thread (onnxruntime's CUDA graphs belong to the thread that captured them)."""

    thread_bound = True

    def __init__(self, bundle: Bundle, settings: Settings, *, bind_device: str | None = None,
                 device_id: int = 0):
        super().__init__(bundle, settings, bind_device=bind_device or "cuda", device_id=device_id,
                         cuda_graph=True)
        assert isinstance(self.ops, OrtValueOps)
        self.buckets = buckets(settings.max_batch_size)
        self.capture = self.ops.device_type == "cuda"  # the CPU provider replays nothing: plain runs
        self._buffers: dict[tuple[int, int], dict[str, ort.OrtValue]] = {}
        self._pad: dict[tuple[int, int], ort.InferenceSession] = {}  # (element type, rank) -> session
        self._first: dict[tuple[int, int], ort.InferenceSession] = {}
        self._warm_up(bundle)

    def _warm_up(self, bundle: Bundle) -> None:
        """Allocate, run and capture every (stage, bucket) now: a chain of zero batches per bucket."""
        spec = bundle.manifest.input
        with CAPTURE_LOCK:
            for bucket in self.buckets:
                for _ in range(2):
                    x: Any = np.zeros([bucket, *spec.shape[1:]], NUMPY_DTYPES[spec.dtype])
                    for stage in range(self.num_stages):
                        x = self._run_graph(stage, x, bucket).hidden

    def close(self) -> None:
        self._buffers.clear()
        self._pad.clear()
        self._first.clear()
        super().close()

    def _session(self, cache: dict[tuple[int, int], ort.InferenceSession], key: tuple[int, int],
                 build: Any) -> ort.InferenceSession:
        sess = cache.get(key)
        if sess is None:  # a helper session like OrtValueOps' own: no graphs, any shape
            assert isinstance(self.ops, OrtValueOps)
            sess = cache[key] = self.ops._session(build(*key))
        return sess

    def run(self, stage: int, x: Any) -> StageOutputs:
        if isinstance(x, TokenRows):
            return super().run(stage, x)
        n = x.shape[0] if isinstance(x, np.ndarray) else x.shape()[0]
        top = self.buckets[-1]
        if n <= top:
            return self._run_graph(stage, x, n)
        parts = [self._run_graph(stage, self._rows(x, i, min(i + top, n)), min(top, n - i)) for i in range(0, n, top)]
        return self._merge(parts)

    def _rows(self, x: Any, start: int, end: int) -> Any:
        if isinstance(x, np.ndarray):
            return x[start:end]
        return self.ops.take(x, np.arange(start, end))

    def _merge(self, parts: list[StageOutputs]) -> StageOutputs:
        def cat(name: str) -> np.ndarray | None:
            values = [getattr(p, name) for p in parts]
            return None if values[0] is None else np.concatenate(values, axis=0)

        hidden = None if parts[0].hidden is None else self.ops.concat([p.hidden for p in parts])
        return StageOutputs(hidden=hidden, logits=cat("logits"), gate=cat("gate"), similarity=cat("similarity"),
                            probs=cat("probs"), labels=cat("labels"), max_prob=cat("max_prob"))

    def _buffers_for(self, stage: int, bucket: int, x: Any) -> dict[str, ort.OrtValue]:
        """The (stage, bucket)'s fixed device buffers, allocated on its first run."""
        key = (stage, bucket)
        bufs = self._buffers.get(key)
        if bufs is None:
            ops = self.ops
            assert isinstance(ops, OrtValueOps)
            sess = self.sessions[stage]
            shape = list(x.shape) if isinstance(x, np.ndarray) else list(x.shape())
            dtype = x.dtype if isinstance(x, np.ndarray) else helper.tensor_dtype_to_np_dtype(x.element_type())
            name = self._inputs[stage]
            value = ops.to_device(np.zeros([bucket, *shape[1:]], dtype))
            bufs = {name: value, **output_buffers(sess, name, value, ops.device_type, ops.device_id)}
            self._buffers[key] = bufs
        return bufs

    def _fill(self, buffer: ort.OrtValue, x: Any, n: int, bucket: int) -> None:
        """Write x's n rows into the bucket's input buffer, zeros after them."""
        if isinstance(x, np.ndarray):
            padded = np.zeros([bucket, *x.shape[1:]], x.dtype)
            padded[:n] = x
            buffer.update_inplace(padded)
            return
        rank = len(x.shape())
        pads = np.zeros(2 * rank, np.int64)
        pads[rank] = bucket - n  # the end of axis 0
        sess = self._session(self._pad, (x.element_type(), rank), pad_rows_model)
        binding = sess.io_binding()
        binding.bind_ortvalue_input("data", x)
        binding.bind_cpu_input("pads", pads)
        binding.bind_ortvalue_output("out", buffer)
        sess.run_with_iobinding(binding)

    def _first_rows(self, buffer: ort.OrtValue, n: int) -> ort.OrtValue:
        ops = self.ops
        assert isinstance(ops, OrtValueOps)
        sess = self._session(self._first, (buffer.element_type(), len(buffer.shape())), first_rows_model)
        binding = sess.io_binding()
        binding.bind_ortvalue_input("data", buffer)
        binding.bind_cpu_input("ends", np.array([n], np.int64))
        binding.bind_output("out", ops.device_type, ops.device_id)
        sess.run_with_iobinding(binding)
        return binding.get_outputs()[0]

    def _run_graph(self, stage: int, x: Any, n: int) -> StageOutputs:
        bucket = next(b for b in self.buckets if b >= n)
        bufs = self._buffers_for(stage, bucket, x)
        name_in = self._inputs[stage]
        self._fill(bufs[name_in], x, n, bucket)
        sess = self.sessions[stage]
        binding = sess.io_binding()
        binding.bind_ortvalue_input(name_in, bufs[name_in])
        wanted = ([HIDDEN] if stage < self.num_stages - 1 else []) + self._small[stage]
        for o in sess.get_outputs():  # every output bound to its buffer: a graph writes them all
            binding.bind_ortvalue_output(o.name, bufs[o.name])
        sess.run_with_iobinding(binding, graph_run(self.buckets.index(bucket) if self.capture else -1))
        values: dict[str, Any] = {}
        for name in wanted:
            if name == HIDDEN:
                values[name] = self._first_rows(bufs[name], n)  # the next replay overwrites the buffer
            else:
                values[name] = np.array(bufs[name].numpy()[:n], copy=True)
        return self._outputs(values)


def stage_runner(bundle: Bundle, settings: Settings) -> OrtStageRunner:
    """The engine's runner for a bundle: CUDA graphs when `cuda_graphs` is set, the sessions run on
    CUDA and the model takes arrays; otherwise (or when capture cannot start) `OrtStageRunner`."""
    if settings.cuda_graphs:
        if bundle.manifest.text is not None or resolve_device(settings.device) != "cuda":
            log.warning("%s: cuda_graphs applies to array models on CUDA only; running without", bundle.name)
        else:
            try:
                return GraphStageRunner(bundle, settings)
            except Exception as err:  # e.g. a node the CUDA provider does not run: no graph can hold it
                log.warning("%s: CUDA graphs unavailable (%s: %s); IO binding without them",
                            bundle.name, type(err).__name__, err)
    return OrtStageRunner(bundle, settings)
