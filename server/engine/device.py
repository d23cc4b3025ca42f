"""Hidden states kept on a device between stages: `OrtValueOps` and its tiny helper graphs.

With IO binding (CUDA, or `device_type="cpu"` in tests) a stage's `hidden` output stays an
`OrtValue` on the device. Selecting survivors, merging several batches' survivors and, for text
models, trimming and padding rows of different lengths are then done on the device too, by tiny
graphs (Gather, Concat, Gather + Slice, Pad + Concat), each in its own session on the same device,
cached per (input count, element type, rank).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from server.text import TokenRows, pad_concat, trim

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"
# Opset and IR version of the helper graphs: old enough for every onnxruntime >= 1.17.
HELPER_OPSET = 13
HELPER_IR_VERSION = 8


def providers_for(device: str, device_id: int = 0, conv_algo_search: str = "HEURISTIC",
                  cuda_graph: bool = False) -> list[Any]:
    """onnxruntime providers for `device`; `cuda_graph`: the sessions may capture CUDA graphs
    (server/engine/graphs.py)."""
    if device == "cuda":
        # EXHAUSTIVE (onnxruntime's default) benchmarks cuDNN convolution algorithms again whenever
        # the input shape changes; with dynamic batching every batch size is a new shape, and stage 0
        # (patch embedding) then costs milliseconds instead of microseconds.
        options: dict[str, Any] = {"device_id": device_id, "cudnn_conv_algo_search": conv_algo_search}
        if cuda_graph:
            options["enable_cuda_graph"] = "1"
        return [(CUDA_PROVIDER, options), CPU_PROVIDER]
    return [CPU_PROVIDER]


def _dims(rank: int, first: str) -> list[str | None]:
    return [first] + [None] * (rank - 1)


def gather_model(elem_type: int, rank: int) -> onnx.ModelProto:
    """`out = data[indices]` along axis 0 (`data` of the given rank, any sizes)."""
    graph = helper.make_graph(
        [helper.make_node("Gather", ["data", "indices"], ["out"], axis=0)],
        "offramp_gather_rows",
        [helper.make_tensor_value_info("data", elem_type, _dims(rank, "n")),
         helper.make_tensor_value_info("indices", TensorProto.INT64, ["m"])],
        [helper.make_tensor_value_info("out", elem_type, _dims(rank, "m"))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", HELPER_OPSET)],
                             ir_version=HELPER_IR_VERSION, producer_name="offramp")


def concat_model(count: int, elem_type: int, rank: int) -> onnx.ModelProto:
    """`out = concat(in_0 ... in_{count-1})` along axis 0."""
    names = [f"in_{i}" for i in range(count)]
    graph = helper.make_graph(
        [helper.make_node("Concat", names, ["out"], axis=0)],
        f"offramp_concat_{count}",
        [helper.make_tensor_value_info(n, elem_type, _dims(rank, f"n{i}")) for i, n in enumerate(names)],
        [helper.make_tensor_value_info("out", elem_type, _dims(rank, "m"))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", HELPER_OPSET)],
                             ir_version=HELPER_IR_VERSION, producer_name="offramp")


def pad_concat_model(count: int, elem_type: int, rank: int) -> onnx.ModelProto:
    """`out = concat(pad(in_i, right on axis 1 by pad_i))` along axis 0: rows of several lengths as one
    batch (`pad_i`: int64 [2 * rank] in ONNX Pad layout, zeros but the end of axis 1)."""
    names = [f"in_{i}" for i in range(count)]
    nodes = [helper.make_node("Pad", [n, f"pad_{i}"], [f"padded_{i}"], mode="constant") for i, n in enumerate(names)]
    nodes.append(helper.make_node("Concat", [f"padded_{i}" for i in range(count)], ["out"], axis=0))
    inputs = [helper.make_tensor_value_info(n, elem_type, _dims(rank, f"n{i}")) for i, n in enumerate(names)]
    inputs += [helper.make_tensor_value_info(f"pad_{i}", TensorProto.INT64, [2 * rank]) for i in range(count)]
    graph = helper.make_graph(nodes, f"offramp_pad_concat_{count}", inputs,
                              [helper.make_tensor_value_info("out", elem_type, _dims(rank, "m"))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", HELPER_OPSET)],
                             ir_version=HELPER_IR_VERSION, producer_name="offramp")


def take_trim_model(elem_type: int, rank: int) -> onnx.ModelProto:
    """`out = data[indices][:, :width]`: survivors' rows, without the padding none of them needs."""
    nodes = [helper.make_node("Gather", ["data", "indices"], ["rows"], axis=0),
             helper.make_node("Slice", ["rows", "starts", "ends", "axes"], ["out"])]
    graph = helper.make_graph(
        nodes, "offramp_take_trim",
        [helper.make_tensor_value_info("data", elem_type, _dims(rank, "n")),
         helper.make_tensor_value_info("indices", TensorProto.INT64, ["m"]),
         helper.make_tensor_value_info("starts", TensorProto.INT64, [1]),
         helper.make_tensor_value_info("ends", TensorProto.INT64, [1]),
         helper.make_tensor_value_info("axes", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("out", elem_type, _dims(rank, "m"))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", HELPER_OPSET)],
                             ir_version=HELPER_IR_VERSION, producer_name="offramp")


class OrtValueOps:
    """Hidden states as OrtValues on a device; rows gathered and merged there by tiny graphs."""

    def __init__(self, device_type: str, device_id: int, options: ort.SessionOptions):
        self.device_type = device_type
        self.device_id = device_id
        self._options = options
        self._providers = providers_for("cuda" if device_type == "cuda" else "cpu", device_id)
        self._gather: dict[tuple[int, int], ort.InferenceSession] = {}  # (elem type, rank)
        self._concat: dict[tuple[int, int, int], ort.InferenceSession] = {}  # (count, elem type, rank)
        self._take_trim: dict[tuple[int, int], ort.InferenceSession] = {}
        self._pad_concat: dict[tuple[int, int, int], ort.InferenceSession] = {}

    def _session(self, model: onnx.ModelProto) -> ort.InferenceSession:
        return ort.InferenceSession(model.SerializeToString(), self._options, providers=self._providers)

    def to_device(self, array: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device_type, self.device_id)

    def take(self, hidden: Any, rows: np.ndarray) -> Any:
        if isinstance(hidden, TokenRows):
            return self._take_rows(hidden, rows)
        if isinstance(hidden, np.ndarray):
            return hidden[rows]
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        key = (hidden.element_type(), len(hidden.shape()))
        sess = self._gather.get(key)
        if sess is None:
            sess = self._gather[key] = self._session(gather_model(*key))
        binding = sess.io_binding()
        binding.bind_ortvalue_input("data", hidden)
        binding.bind_cpu_input("indices", rows)  # a few bytes; onnxruntime copies them up
        binding.bind_output("out", self.device_type, self.device_id)
        sess.run_with_iobinding(binding)
        return binding.get_outputs()[0]

    def _take_rows(self, hidden: TokenRows, rows: np.ndarray) -> TokenRows:
        mask = hidden.mask[rows]
        if isinstance(hidden.data, np.ndarray):
            return trim(TokenRows(hidden.data[rows], mask))
        width = int(mask.sum(axis=1).max(initial=0))
        key = (hidden.data.element_type(), len(hidden.data.shape()))
        sess = self._take_trim.get(key)
        if sess is None:
            sess = self._take_trim[key] = self._session(take_trim_model(*key))
        binding = sess.io_binding()
        binding.bind_ortvalue_input("data", hidden.data)
        binding.bind_cpu_input("indices", np.ascontiguousarray(rows, dtype=np.int64))
        for name, value in (("starts", 0), ("ends", width), ("axes", 1)):
            binding.bind_cpu_input(name, np.array([value], np.int64))
        binding.bind_output("out", self.device_type, self.device_id)
        sess.run_with_iobinding(binding)
        return TokenRows(binding.get_outputs()[0], np.ascontiguousarray(mask[:, :width]))

    def _concat_rows(self, parts: list[TokenRows]) -> TokenRows:
        if all(isinstance(p.data, np.ndarray) for p in parts):
            return pad_concat(parts)
        width = max(p.mask.shape[1] for p in parts)
        values = [self.to_device(p.data) if isinstance(p.data, np.ndarray) else p.data for p in parts]
        rank = len(values[0].shape())
        key = (len(values), values[0].element_type(), rank)
        sess = self._pad_concat.get(key)
        if sess is None:
            sess = self._pad_concat[key] = self._session(pad_concat_model(*key))
        binding = sess.io_binding()
        for i, (v, p) in enumerate(zip(values, parts, strict=True)):
            pads = np.zeros(2 * rank, np.int64)
            pads[rank + 1] = width - p.mask.shape[1]  # the end of axis 1
            binding.bind_ortvalue_input(f"in_{i}", v)
            binding.bind_cpu_input(f"pad_{i}", pads)
        binding.bind_output("out", self.device_type, self.device_id)
        sess.run_with_iobinding(binding)
        mask = pad_concat([TokenRows(p.mask, p.mask) for p in parts]).mask
        return TokenRows(binding.get_outputs()[0], mask)

    def concat(self, parts: list[Any]) -> Any:
        if len(parts) == 1:
            return parts[0]
        if isinstance(parts[0], TokenRows):
            return self._concat_rows(parts)
        if all(isinstance(p, np.ndarray) for p in parts):
            return np.concatenate(parts, axis=0)
        values = [self.to_device(p) if isinstance(p, np.ndarray) else p for p in parts]
        key = (len(values), values[0].element_type(), len(values[0].shape()))
        sess = self._concat.get(key)
        if sess is None:
            sess = self._concat[key] = self._session(concat_model(*key))
        binding = sess.io_binding()
        for i, v in enumerate(values):
            binding.bind_ortvalue_input(f"in_{i}", v)
        binding.bind_output("out", self.device_type, self.device_id)
        sess.run_with_iobinding(binding)
        return binding.get_outputs()[0]

    def rows(self, hidden: Any) -> int:
        if isinstance(hidden, TokenRows):
            return len(hidden)
        return int(hidden.shape[0] if isinstance(hidden, np.ndarray) else hidden.shape()[0])


