"""Server settings: one class, read once, from `OFFRAMP_*` environment variables or `offramp serve` flags.

Live state (exit thresholds) does not live here: it lives in the policy store.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

STORE_SCHEMES = ("redis", "rediss", "unix")
PLACEHOLDER_SECRETS = {"", "changeme", "change-me", "secret", "token", "admin", "password", "xxx"}
MIN_TOKEN_LENGTH = 16
MIN_TOKEN_CLASSES = 2  # of: lower case, upper case, digits, other characters


def token_problem(token: str) -> str | None:
    """Why `token` is too weak to guard the admin API (None when it is strong enough)."""
    if token.strip().lower() in PLACEHOLDER_SECRETS:
        return "admin_token is a placeholder; set a real secret or leave it unset"
    classes = sum(any(test(c) for c in token) for test in (str.islower, str.isupper, str.isdigit,
                                                            lambda c: not c.isalnum()))
    if len(token) < MIN_TOKEN_LENGTH or classes < MIN_TOKEN_CLASSES or len(set(token)) < MIN_TOKEN_LENGTH // 2:
        return (f"admin_token is too weak: use at least {MIN_TOKEN_LENGTH} characters of at least "
                f"{MIN_TOKEN_CLASSES} kinds (letters, digits, symbols), e.g. `openssl rand -hex 32`")
    return None


MODEL_NAME_PATTERN = r"^[A-Za-z0-9_.-]+$"


class Settings(BaseSettings):
    # use_attribute_docstrings: each field's docstring becomes its description (the `serve --help` text).
    model_config = SettingsConfigDict(env_prefix="OFFRAMP_", extra="ignore", use_attribute_docstrings=True)

    bundles: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    """Bundle directories to serve, each as a model named by its manifest. Environment: comma-separated.
    Empty: serve the demo bundle, building it on first use (needs the `export` extra)."""

    model_name: str | None = Field(None, pattern=MODEL_NAME_PATTERN)
    """Serve the one bundle under this model name instead of its manifest's (KServe passes the
    InferenceService's name this way). Unset: each bundle's manifest names it."""

    host: str = "127.0.0.1"
    """Interface to bind. Use 0.0.0.0 inside a container."""

    port: int = Field(8000, ge=0, le=65535)
    """TCP port (0 picks a free one)."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Execution provider: `cuda` requires onnxruntime-gpu with a visible GPU; `auto` uses CUDA when
    onnxruntime offers it, CPU otherwise."""

    cuda_conv_algo_search: Literal["HEURISTIC", "EXHAUSTIVE", "DEFAULT"] = "HEURISTIC"
    """cuDNN convolution algorithm choice on CUDA. EXHAUSTIVE (onnxruntime's own default) benchmarks
    again for every new input shape, and dynamic batching makes every batch size a new shape."""

    cuda_graphs: bool = False
    """On CUDA, replay each stage as a CUDA graph per batch bucket (1, 2, 4, ... up to max_batch_size
    rounded up to a power of two), rows padded to the bucket on fixed device buffers (held per stage
    and bucket), all captured at start: one launch per stage instead of one per kernel. Array models
    only (text keeps IO binding); ignored, with a warning, on CPU."""

    intra_op_threads: int = Field(0, ge=0)
    """onnxruntime intra-op threads per stage session (0: onnxruntime's default, one per core).
    Spinning is always off on CPU: chained sessions that spin fight each other for the cores."""

    inter_op_threads: int = Field(1, ge=0)
    """onnxruntime inter-op threads per stage session."""

    max_batch_size: int = Field(32, ge=1)
    """Largest batch (in samples) one stage runs at once."""

    max_queue_delay_ms: float = Field(2.0, ge=0)
    """How long the first waiting sample may wait for a batch to fill before stage 0 runs."""

    inline_budget_ms: float = Field(10.0, ge=0)
    """A request of up to 4 samples that finds the model idle (nothing queued or running) runs its
    stages on the caller's thread, with no hand-off to the worker thread, when its full depth is
    expected to take at most this long (from measured stage times); through HTTP and gRPC only when no
    other request is in progress (else `inline_busy_budget_ms`). This saves two thread wake-ups per
    request, which is what a small model costs at low load. 0 turns it off. Not used while samples
    are traced into the live window (`shadow_rate` and `window_size` > 0)."""

    inline_busy_budget_ms: float = Field(2.0, ge=0)
    """The same, for a request that arrives while other requests are in progress: a model whose full
    depth is expected to take at most this long (measured on the direct path) still runs on the
    caller's thread when idle, together with the requests that arrived in the same turn of the
    event loop (one batch), as handing a small model's requests to the worker thread and back costs
    more CPU than the compute it would overlap. 0: such requests always go through the worker's
    queues."""

    length_bucket_tokens: int = Field(16, ge=0)
    """Text models on CPU: a stage batch whose rows differ in length runs as one run per bucket of
    this many tokens (1-16, 17-32, ...), each at its own longest length, instead of one run padded to
    the batch's longest (measured on the sentiment preset: 0.70x the stage time of one padded run,
    docs/benchmarks.md). 0: one padded run. Answers are the same either way up to float rounding
    (1e-5 on probabilities)."""

    max_queue_size: int = Field(1024, ge=1)
    """Samples that may wait or be in flight per model; beyond that new requests get 503 at once."""

    request_timeout_s: float = Field(30.0, gt=0)
    """A request not answered within this time gets 504 and its remaining work is dropped."""

    max_request_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    """Largest request body accepted; larger bodies get 413."""

    max_samples_per_request: int = Field(4096, ge=1)
    """Largest batch a single request may carry; more gets 400."""

    cache_dir: Path = Path.home() / ".cache" / "offramp"
    """Where the demo bundle is built and cached."""

    state_dir: Path | None = None
    """Where live exit policies are persisted (atomic writes). None: `<cache_dir>/state`."""

    store_url: SecretStr | None = None
    """Shared policy store for a replica set, e.g. `redis://redis:6379/0` (also `rediss://` and
    `unix://`; credentials as `redis://:PASSWORD@host:6379/0`). A change through any replica's admin
    API then reaches every replica within a second. Unset: each replica keeps its policy in
    `state_dir`. Needs the `redis` extra. Logs show only scheme, host, port and database; with a
    password, prefer the environment variable (flags show up in the process list)."""

    admin_token: SecretStr | None = None
    """Bearer token for `/admin`. Unset: the admin API is off (403). Never logged."""

    shadow_rate: float = Field(0.0, ge=0.0, le=1.0)
    """Fraction of request samples traced into the live calibration window: their exit outputs at
    every stage are kept, and when they exit early they also run to full depth off the request path
    (answers unchanged), to measure live agreement with the full model and recalibrate from it."""

    window_size: int = Field(2000, ge=0)
    """Traced samples kept per model in the live calibration window (the oldest leave first); memory
    is window_size x stages x (classes + 2) float32. 0: no window."""

    persist_window: bool = False
    """Keep each model's live window across restarts: saved beside the policy state
    (`<state_dir>/<model>.window.npz`) when the server stops, read back when it starts."""

    auto_interval_s: float = Field(2.0, gt=0)
    """How often auto-recalibration looks at a model's live window (models opt in through the admin
    API, docs/admin.md)."""

    header_timeout_s: float = Field(10.0, gt=0)
    """A connection must deliver a request's headers within this time of opening (or of its first
    byte after a keep-alive pause), else it is closed: slow or silent clients cannot hold sockets."""

    body_timeout_s: float = Field(30.0, gt=0)
    """A request's whole body must arrive within this time; else 408 and the connection closes (also
    when Content-Length promises more than is sent)."""

    idle_timeout_s: float = Field(5.0, gt=0)
    """A keep-alive connection with no new request for this long is closed."""

    max_connections: int = Field(1000, ge=1)
    """Open connections (and requests in progress) accepted at once; a request beyond gets 503 and
    its connection is closed. Keep it below the process's open-file limit."""

    drain_grace_s: float = Field(1.0, ge=0)
    """On SIGTERM, for this long the server still accepts requests on open connections but answers
    503 with `Connection: close` (readiness is already 503), so that keep-alive clients move on
    cleanly; then it stops accepting and finishes the requests in flight."""

    grpc_port: int | None = Field(None, ge=0, le=65535)
    """Serve the Open Inference Protocol over gRPC (`inference.GRPCInferenceService`) on this port too,
    same host (0 picks a free one). Unset: no gRPC. Needs the `grpc` extra."""

    workers: int = Field(1, ge=1, le=64)
    """Server processes on one port (and one admin port), each with its own engine: for hosts with
    more cores than one process can use. They share the live policy through the store (the state
    directory, polled every 0.5 s, or Redis): a change through one reaches all. Survivors of
    different batches merge only within a process."""

    admin_port: int | None = Field(None, ge=0, le=65535)
    """Serve the admin API on its own listener (same host) on this port, and not on the inference
    port. Unset: on the inference port."""

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Log level of the server and uvicorn."""

    @field_validator("bundles", mode="before")
    @classmethod
    def _split_bundles(cls, value: object) -> object:
        if isinstance(value, str):
            return [p.strip() for p in value.split(",") if p.strip()]
        return value

    @field_validator("admin_token", mode="after")
    @classmethod
    def _refuse_placeholder(cls, value: SecretStr | None) -> SecretStr | None:
        problem = None if value is None else token_problem(value.get_secret_value())
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("store_url", mode="after")
    @classmethod
    def _check_store_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        url = value.get_secret_value().strip()
        if not url:
            return None
        if url.split("://", 1)[0] not in STORE_SCHEMES or "://" not in url:
            schemes = ", ".join(s + "://" for s in STORE_SCHEMES)
            raise ValueError(f"store_url must start with one of {schemes}")
        if importlib.util.find_spec("redis") is None:
            raise ValueError("store_url needs the redis client: pip install 'offramp[redis]'")
        return SecretStr(url)

    @property
    def resolved_state_dir(self) -> Path:
        return self.state_dir if self.state_dir is not None else self.cache_dir / "state"
