"""Locust traffic for the V2 infer endpoint: single samples and batches from a request data file.

Configured by environment variables (locust owns the command line):

- `OFFRAMP_LOAD_DATA` (required): request data written by `python -m load_tests.data` (.npy/.npz/.json);
- `OFFRAMP_LOAD_MODEL`: model name (default `digits-vit`, the demo bundle);
- `OFFRAMP_LOAD_INPUT`: input tensor name (default `pixels`);
- `OFFRAMP_LOAD_FORMAT`: `json` (default, plain V2 JSON) or `binary` (binary tensor data extension,
  what tritonclient sends by default: inputs and outputs as raw bytes after a JSON header);
- `OFFRAMP_LOAD_EARLY_EXIT`: `1` (default) or `0` (request parameter `early_exit: false`).

Tasks are tagged so a run picks its mix with `--tags`/`--exclude-tags`: `single` (one sample per
request, weight 10), `batch` with `batch8` (8 samples, weight 3) and `batch32` (32 samples, weight 1).
Each request size is its own stats row (`infer[1]`, `infer[8]`, `infer[32]`). A response counts as
a failure unless it is 200 and answers every sample it was sent.

Bodies are encoded once at start (a pool cycling through the data), so the load generator spends
its CPU on sending, not on encoding. Run it headless through `load_tests/run_locust.py`.
"""

from __future__ import annotations

import itertools
import os

import numpy as np
from locust import FastHttpUser, between, events, tag, task

from load_tests.data import read_request_data
from server.http.codec import decode_response, encode_request

POOL = 64  # distinct bodies per request size


class _Traffic:
    """Pre-encoded request bodies per batch size (built once per locust process)."""

    def __init__(self) -> None:
        path = os.environ.get("OFFRAMP_LOAD_DATA")
        if not path:
            raise RuntimeError("set OFFRAMP_LOAD_DATA to a request data file (python -m load_tests.data)")
        self.data = read_request_data(path)
        self.model = os.environ.get("OFFRAMP_LOAD_MODEL", "digits-vit")
        self.input = os.environ.get("OFFRAMP_LOAD_INPUT", "pixels")
        fmt = os.environ.get("OFFRAMP_LOAD_FORMAT", "json").lower()
        if fmt not in ("json", "binary"):
            raise RuntimeError(f"OFFRAMP_LOAD_FORMAT must be json or binary, got {fmt!r}")
        self.binary = fmt == "binary"
        self.early_exit = os.environ.get("OFFRAMP_LOAD_EARLY_EXIT", "1").lower() not in ("0", "false", "no")
        self.bodies: dict[int, itertools.cycle] = {}

    def body(self, size: int) -> tuple[bytes, dict[str, str]]:
        pool = self.bodies.get(size)
        if pool is None:
            encoded = []
            count = max(1, min(POOL, len(self.data) // size))
            for i in range(count):
                x, _ = self.data.batch(i * size, size)
                encoded.append(encode_request(
                    np.ascontiguousarray(x), self.input, binary=self.binary, early_exit=self.early_exit,
                    binary_output=True if self.binary else None,
                ))
            pool = self.bodies[size] = itertools.cycle(encoded)
        return next(pool)


_traffic: _Traffic | None = None


@events.test_start.add_listener
def _load(environment, **_kwargs) -> None:  # noqa: ANN001 (locust's signature)
    global _traffic
    _traffic = _Traffic()


class InferUser(FastHttpUser):
    """One client: sends an infer request, waits for the answer, thinks a moment, repeats."""

    wait_time = between(0.0, 0.002)

    def _infer(self, size: int) -> None:
        traffic = _traffic or _Traffic()
        body, headers = traffic.body(size)
        with self.client.post(
            f"/v2/models/{traffic.model}/infer", data=body, headers=headers, name=f"infer[{size}]",
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {(response.text or '')[:200]}")
                return
            try:
                _, arrays = decode_response(response.content, response.headers)
            except (ValueError, KeyError) as err:
                response.failure(f"undecodable response: {err}")
                return
            if arrays.get("label") is None or arrays["label"].shape != (size,):
                response.failure(f"expected {size} labels, got {arrays.get('label')!r}")
                return
            response.success()

    @tag("single")
    @task(10)
    def single(self) -> None:
        self._infer(1)

    @tag("batch", "batch8")
    @task(3)
    def batch8(self) -> None:
        self._infer(8)

    @tag("batch", "batch32")
    @task(1)
    def batch32(self) -> None:
        self._infer(32)
