"""`offramp bench`: early exit against full depth, side by side in one run, on one bundle.

Configurations, measured on the test split of the bundle's own data set (load_tests/data.py
`test_split_for`: digits, digits-hard, MNIST, or for text models the sentiment preset's test
sentences), never the calibration data; with text every configuration, the
references included, tokenizes its sentences inside the timed call, with the bundle's tokenizer:

- `reference-1t` / `reference-ort`: the bundle's monolithic `reference.onnx` in plain onnxruntime,
  with 1 intra-op thread / onnxruntime's defaults (spinning off in both); at each batch size the
  faster of the two is `reference`, the baseline every speed-up is divided by; for text models also
  `reference-buckets` (onnxruntime's default threads, each batch run per 16-token length bucket: what
  a plain-onnxruntime user can do against padding), and the fastest of the three is the baseline;
- with `--cuda-graphs` (array models): `reference-graph`, reference.onnx as a CUDA graph per batch
  size on fixed device buffers (`GraphReference`; the strongest plain-onnxruntime baseline on a
  GPU), one of the baselines; the engine's rows then run with `cuda_graphs` too;
- `full`: the engine in-process with `early_exit=False` (every stage);
- `early`: the same engine with thresholds calibrated to `--target-agreement` (server.control.calibrate on
  the bundle's calibration data), one request of `batch` samples at a time;
- `http-reference`: `reference.onnx` behind the simplest fast V2 endpoint (load_tests/reference_server.py,
  with the faster thread setting of the in-process reference), the HTTP baseline;
- `http-full` / `http-early`: the engine through a real `offramp serve` subprocess on 127.0.0.1;
  all three under `c` concurrent clients each sending `--http-batch` samples per request (default 1)
  in a closed loop (threads each with one keep-alive connection: load_tests/raw_client.py by default, whose
  Python per request is a small fraction of httpx's, so the cores go to the servers; `--http-client httpx`
  for httpx; V2 binary tensor data by default, `--http-format json` for JSON).

Configurations being compared run interleaved (A, B, C, then B, C, A, ...) so a shared machine's
drifts hit all of them alike; figures are medians over `--repeats`. Exit histograms and
agreement pool every repeat. Speed-ups are over `reference` (in-process) and `http-reference`
(HTTP), and realisation = that speed-up / the ideal one, full-depth FLOPs over the expected executed
FLOPs under the measured exit histogram (FLOPs per stage from the manifest); the old figures over
our own full-depth path stay beside them. The engine's stage sessions use `--threads` intra-op
threads (default 1; 0 = onnxruntime's default), inter-op 1, spinning off.

    offramp bench demo --out results/bench-demo        # or: sentiment, heavy, or a bundle directory
    python -m load_tests.bench BUNDLE --out DIR --quick   # tiny sizes (tests)
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from load_tests.data import RequestData, read_request_data, test_split_for
from load_tests.reference_server import model_feed
from server.text import ATTENTION_MASK

PRESETS = ("demo", "sentiment", "heavy")
REFERENCES = {"reference-1t": 1, "reference-ort": 0}  # in-process baselines: intra-op threads
REFERENCE_BUCKET = 16  # text models: reference-buckets runs each batch per length bucket of this many tokens


@dataclass
class BenchConfig:
    batch_sizes: list[int] = field(default_factory=lambda: [1, 32])
    concurrency: list[int] = field(default_factory=lambda: [1, 4, 16, 32])
    repeats: int = 5
    samples_per_trial: int = 256
    """Samples per timed trial (in-process: at least `min_requests` requests; HTTP: requests)."""
    min_requests: int = 20
    warmup_requests: int = 5
    threads: int = 1
    max_queue_delay_ms: float = 0.0
    target_agreement: float = 0.99
    criterion: str = "max_prob"
    device: str = "cpu"
    """`cpu` or `cuda` (engine with IO binding, reference.onnx with the CUDA provider)."""
    http: bool = True
    http_format: str = "binary"
    http_batch: int = 1
    """Samples per HTTP request."""
    http_client: str = "raw"
    """The load generator's client: `raw` (load_tests/raw_client.py) or `httpx`."""
    cuda_graphs: bool = False
    """The engine with `cuda_graphs`, and a `reference-graph` baseline (array models)."""

    @classmethod
    def quick(cls) -> BenchConfig:
        return cls(batch_sizes=[1, 4], concurrency=[1, 2], repeats=2, samples_per_trial=8, min_requests=4,
                   warmup_requests=1)


@dataclass
class Trial:
    """One timed run of one configuration: wall time, per-request latencies, and every answer."""

    seconds: float
    latencies_ms: list[float]
    samples: int
    indices: np.ndarray  # data rows answered
    labels: np.ndarray
    exit_stage: np.ndarray
    server_cpu_s: float = 0.0  # HTTP: CPU time the server process used during the trial
    client_cpu_s: float = 0.0  # HTTP: CPU time this (load-generating) process used during the trial


def resolve_bundle(spec: str, cache_dir: Path | None = None, *, progress: bool = True) -> Path:
    """A bundle directory, or a preset (`demo`, `sentiment`, `heavy`) built on first use under the cache dir."""
    path = Path(spec)
    if (path / "manifest.json").is_file():
        return path
    if spec in PRESETS:
        if cache_dir is None:
            from server.settings import Settings

            cache_dir = Settings().cache_dir
        if spec == "demo":
            from model_export.demo import ensure_demo_bundle

            return ensure_demo_bundle(cache_dir, progress=progress)
        if spec == "sentiment":
            from model_export.sentiment import ensure_sentiment_bundle

            return ensure_sentiment_bundle(cache_dir, progress=progress)
        from load_tests.heavy import ensure_heavy_bundle

        return ensure_heavy_bundle(cache_dir, progress=progress)
    raise ValueError(f"{spec!r} is neither a bundle directory (no manifest.json) nor a preset {PRESETS}")


def policy_bundle(bundle_dir: Path, criterion: str, thresholds: list[float | None], where: Path) -> Path:
    """A copy of the bundle whose default policy is `thresholds`: links to the same files, a new
    manifest. The HTTP server serves it, so it starts with the calibrated policy without the admin API."""
    from server.bundle import MANIFEST, load_bundle, write_manifest
    from server.policy import ExitPolicy

    manifest = load_bundle(bundle_dir).manifest
    where.mkdir(parents=True, exist_ok=True)
    for item in bundle_dir.iterdir():
        if item.name != MANIFEST and not (where / item.name).exists():
            (where / item.name).symlink_to(item.resolve())
    policy = ExitPolicy(criterion, tuple(thresholds))
    write_manifest(where, manifest.model_copy(update={"default_policy": policy}))
    return where


def _requests(cfg: BenchConfig, batch: int) -> int:
    return max(cfg.min_requests, cfg.samples_per_trial // batch)


async def _timed(call: Callable, data: RequestData, batch: int, count: int, start: int) -> Trial:
    """`count` sequential requests of `batch` samples through `call(x) -> (labels, exit_stage)`."""
    lat, idx, labels, stages = [], [], [], []
    began = time.perf_counter()
    for r in range(count):
        x, rows = data.batch(start + r * batch, batch)
        t0 = time.perf_counter()
        lab, st = await call(x)
        lat.append((time.perf_counter() - t0) * 1e3)
        idx.append(rows)
        labels.append(lab)
        stages.append(st)
    return Trial(time.perf_counter() - began, lat, count * batch, np.concatenate(idx), np.concatenate(labels),
                 np.concatenate(stages))


async def measure_in_process(bundle, data: RequestData, cfg: BenchConfig, thresholds: list[float | None],  # noqa: ANN001
                             bar) -> tuple[dict[tuple[str, int], list[Trial]], np.ndarray]:  # noqa: ANN001
    """Trials of reference / full / early per batch size, and the full-depth label of every sample."""
    from server.engine.engine import Engine
    from server.engine.runtime import open_session
    from server.metrics import Metrics
    from server.policy import ExitPolicy
    from server.settings import Settings

    m = bundle.manifest
    settings = Settings(
        bundles=[bundle.root], device=cfg.device, intra_op_threads=cfg.threads, inter_op_threads=1,
        max_batch_size=max(max(cfg.batch_sizes), 32), max_queue_delay_ms=cfg.max_queue_delay_ms,
        max_queue_size=max(1024, 2 * len(data)), cuda_graphs=cfg.cuda_graphs,
    )
    policy = ExitPolicy(cfg.criterion, tuple(thresholds), version=1)
    engine = Engine([bundle], settings, Metrics(), {bundle.name: policy})
    references = {name: open_session(bundle.reference_path(), device=cfg.device, intra_op_threads=threads)
                  for name, threads in REFERENCES.items()}
    last = m.num_stages - 1
    await engine.start()
    try:
        tokenize = model_input(bundle)  # text: both sides tokenize inside the timed call

        def via_reference(session) -> Callable:  # noqa: ANN001
            async def call(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
                logits = session.run([m.reference.outputs[-1]], model_feed(m, tokenize(x)))[0]
                return logits.argmax(-1), np.full(len(x), last, np.int32)
            return call

        def via_engine(early: bool) -> Callable:
            async def call(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
                result = await engine.infer(bundle.name, tokenize(x), early_exit=early)
                return result.labels, result.exit_stage
            return call

        def via_reference_buckets(session) -> Callable:  # noqa: ANN001
            async def call(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
                rows = tokenize(x)
                lengths = rows.lengths()  # type: ignore[attr-defined]
                keys, labels = (lengths - 1) // REFERENCE_BUCKET, np.empty(len(x), np.int64)
                for key in np.unique(keys):
                    pick = np.flatnonzero(keys == key)
                    width = int(lengths[pick].max())
                    feed = {m.input.name: rows.data[pick, :width], ATTENTION_MASK: rows.mask[pick, :width]}  # type: ignore[attr-defined]
                    labels[pick] = session.run([m.reference.outputs[-1]], feed)[0].argmax(-1)
                return labels, np.full(len(x), last, np.int32)
            return call

        calls = {name: via_reference(s) for name, s in references.items()}
        if cfg.cuda_graphs and m.text is None:
            graph = GraphReference(bundle.reference_path(), cfg.device, m.reference.outputs[-1])

            async def via_graph(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
                return graph(model_feed(m, x)).argmax(-1), np.full(len(x), last, np.int32)
            calls["reference-graph"] = via_graph
        if m.text is not None:
            calls["reference-buckets"] = via_reference_buckets(references["reference-ort"])
        calls |= {"full": via_engine(False), "early": via_engine(True)}
        full_labels = np.concatenate([(await engine.infer(bundle.name, tokenize(data.x[i:i + 256]), early_exit=False,
                                                          direct=False)).labels for i in range(0, len(data), 256)])
        trials: dict[tuple[str, int], list[Trial]] = {}
        for batch in cfg.batch_sizes:
            count = _requests(cfg, batch)
            for call in calls.values():
                await _timed(call, data, batch, cfg.warmup_requests, 0)
            for r in range(cfg.repeats):
                names = list(calls)
                for name in names[r % len(names):] + names[: r % len(names)]:  # rotate who goes first
                    trial = await _timed(calls[name], data, batch, count, r * count * batch)
                    trials.setdefault((name, batch), []).append(trial)
                    bar.update(1)
        return trials, full_labels
    finally:
        await engine.stop(drain=True)


class GraphReference:
    """reference.onnx as a CUDA graph per batch size: fixed input and output buffers on the device
    for each batch size seen, bound by IO binding, the input written in place, the graph selected by
    `gpu_graph_id` (captured on the size's first run). On `cpu` the same buffers and runs without
    capture (the CPU provider has none): how the tests exercise it."""

    def __init__(self, path: Path, device: str, output: str):
        import onnxruntime as ort

        from server.engine.device import providers_for
        from server.engine.runtime import ort_session_options

        self.device, self.output = device, output
        self.session = ort.InferenceSession(str(path), ort_session_options(0),
                                            providers=providers_for(device, cuda_graph=device == "cuda"))
        self._buffers: dict[int, tuple[object, dict[str, object], int]] = {}

    def __call__(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        import onnxruntime as ort

        from server.engine.graphs import graph_run, output_buffers

        (name, x), = feed.items()
        x = np.ascontiguousarray(x)
        found = self._buffers.get(len(x))
        if found is None:
            value = ort.OrtValue.ortvalue_from_numpy(x, self.device, 0)
            outs = output_buffers(self.session, name, value, self.device, 0)
            found = self._buffers[len(x)] = (value, outs, len(self._buffers))
        else:
            found[0].update_inplace(x)  # type: ignore[attr-defined]
        value, outs, graph_id = found
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(name, value)
        for out_name, buffer in outs.items():
            binding.bind_ortvalue_output(out_name, buffer)
        self.session.run_with_iobinding(binding, graph_run(graph_id if self.device == "cuda" else -1))
        return np.array(outs[self.output].numpy(), copy=True)  # type: ignore[attr-defined]


def model_input(bundle) -> Callable[[np.ndarray], object]:  # noqa: ANN001
    """Request samples -> what the engine takes: the array itself, or a text model's token rows."""
    if bundle.manifest.text is None:
        return lambda x: x
    from server.text import TokenRows, tokenizer_for

    tokenizer = tokenizer_for(bundle)
    return lambda x: TokenRows(*tokenizer.encode(list(x)))


class _HttpClients:
    """A thread pool whose threads each keep one keep-alive client (`kind`: raw or httpx) to the server."""

    def __init__(self, base: str, concurrency: int, kind: str = "raw"):
        import httpx

        from load_tests.raw_client import RawHttpClient

        self.base, self.concurrency = base, concurrency
        self._make = (lambda: RawHttpClient(base)) if kind == "raw" else (
            lambda: httpx.Client(base_url=base, timeout=120.0))
        self.pool = ThreadPoolExecutor(concurrency)
        self._local = threading.local()
        self._clients: list = []

    def client(self):  # noqa: ANN201
        c = getattr(self._local, "client", None)
        if c is None:
            c = self._local.client = self._make()
            self._clients.append(c)
        return c

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        for c in self._clients:
            c.close()


def _http_trial(clients: _HttpClients, model: str, bodies: list[tuple[bytes, dict]], rows: list[np.ndarray],
                total: int, start: int) -> Trial:
    """`total` requests from `clients.concurrency` closed-loop clients; body i answers data `rows[i]`."""
    from server.http.codec import decode_response

    counter = itertools.count()
    out: list[tuple[int, float, np.ndarray, np.ndarray]] = []

    def worker() -> None:
        client = clients.client()
        while (k := next(counter)) < total:
            i = (start + k) % len(bodies)
            body, headers = bodies[i]
            t0 = time.perf_counter()
            response = client.post(f"/v2/models/{model}/infer", content=body, headers=headers)
            ms = (time.perf_counter() - t0) * 1e3
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
            _, arrays = decode_response(response.content, response.headers)
            out.append((i, ms, arrays["label"].astype(np.int64), arrays["exit_stage"].astype(np.int32)))

    from load_tests.run_locust import cpu_seconds

    pid = getattr(clients.base, "pid", None)
    server_cpu, client_cpu = cpu_seconds(pid) if pid else 0.0, time.process_time()
    began = time.perf_counter()
    for f in [clients.pool.submit(worker) for _ in range(clients.concurrency)]:
        f.result()
    seconds = time.perf_counter() - began
    return Trial(seconds, [o[1] for o in out], sum(len(o[2]) for o in out),
                 np.concatenate([rows[o[0]] for o in out]), np.concatenate([o[2] for o in out]),
                 np.concatenate([o[3] for o in out]),
                 server_cpu_s=(cpu_seconds(pid) - server_cpu) if pid else 0.0,
                 client_cpu_s=time.process_time() - client_cpu)


def measure_http(bundle_dir: Path, model: str, input_name: str, data: RequestData, cfg: BenchConfig,
                 out: Path, bar, reference_threads: int = 0) -> dict[tuple[str, int], list[Trial]]:  # noqa: ANN001
    """Trials of http-reference / http-full / http-early per concurrency level, interleaved, against
    the reference server and one `offramp serve`."""
    from load_tests.run_locust import serve, serve_reference
    from server.http.codec import encode_request
    from server.http.text_codec import encode_text_request

    binary = cfg.http_format == "binary"
    k = cfg.http_batch
    rows = [np.arange(i, i + k) for i in range(0, len(data) - k + 1, k)]
    encode = encode_text_request if data.is_text else partial(encode_request, input_name=input_name)
    bodies = {
        name: [encode(data.x[r], binary=binary, early_exit=early, binary_output=True if binary else None)
               for r in rows]
        for name, early in (("http-reference", False), ("http-full", False), ("http-early", True))
    }
    flags = [f"--intra-op-threads={cfg.threads}", "--inter-op-threads=1", f"--device={cfg.device}",
             f"--max-batch-size={max(32, max(cfg.concurrency) * k)}",
             f"--max-queue-delay-ms={cfg.max_queue_delay_ms}"]
    trials: dict[tuple[str, int], list[Trial]] = {}
    with serve([bundle_dir], out / "server.log", flags=flags) as base, \
            serve_reference(bundle_dir, out / "reference-server.log", threads=reference_threads) as ref_base:
        for c in cfg.concurrency:
            pools = {"engine": _HttpClients(base, c, cfg.http_client),
                     "reference": _HttpClients(ref_base, c, cfg.http_client)}
            try:
                total = max(cfg.samples_per_trial // k, 4 * c)
                names = list(bodies)
                for name in names:
                    pool = pools["reference" if name == "http-reference" else "engine"]
                    _http_trial(pool, model, bodies[name], rows, max(c, cfg.warmup_requests), 0)
                for r in range(cfg.repeats):
                    for name in names[r % len(names):] + names[: r % len(names)]:  # rotate who goes first
                        pool = pools["reference" if name == "http-reference" else "engine"]
                        trials.setdefault((name, c), []).append(
                            _http_trial(pool, model, bodies[name], rows, total, r * total))
                        bar.update(1)
            finally:
                for pool in pools.values():
                    pool.close()
    return trials


def machine() -> dict:
    import onnxruntime as ort

    return {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "system": platform.platform(),
            "onnxruntime": ort.__version__,
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "gpu": _gpu_name()}


def _gpu_name() -> str | None:
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def run_bench(bundle_dir: Path, out: Path, cfg: BenchConfig, *, data: RequestData | None = None,
              progress: bool = True, command: str = "") -> dict:
    """Measure every configuration; write bench.json, bench.md and the plots into `out`; return it."""
    from tqdm.auto import tqdm

    from load_tests.bench_report import build_report, write_outputs
    from server.bundle import load_bundle
    from server.control.calibrate import calibrate

    bundle = load_bundle(bundle_dir)
    m = bundle.manifest
    if bundle.reference_path() is None:
        raise ValueError(f"{bundle_dir}: the bundle has no reference.onnx to compare with")
    if data is None:
        data = test_split_for(m)
    if m.text is not None and not data.is_text:
        raise ValueError("a text model is benchmarked on sentences (the sentiment test split by default)")
    if m.text is None and list(data.x.shape[1:]) != [d for d in m.input.shape[1:]]:
        raise ValueError(f"request data has samples of shape {list(data.x.shape[1:])}, "
                         f"the model takes {m.input.shape[1:]}")
    calibration = calibrate(bundle.calibration(), m, target_agreement=cfg.target_agreement,
                            criterion=cfg.criterion)
    thresholds = list(calibration.thresholds)
    out.mkdir(parents=True, exist_ok=True)
    extra_refs = (m.text is not None) + (cfg.cuda_graphs and m.text is None)
    total = len(cfg.batch_sizes) * cfg.repeats * (2 + len(REFERENCES) + extra_refs)
    total += len(cfg.concurrency) * cfg.repeats * 3 if cfg.http else 0
    with tqdm(total=total, desc=f"bench {m.name}", unit="trial", disable=not progress) as bar:
        trials, full_labels = asyncio.run(measure_in_process(bundle, data, cfg, thresholds, bar))
        if cfg.http:
            with tempfile.TemporaryDirectory(prefix="offramp-bench-") as tmp:
                served = policy_bundle(bundle.root, cfg.criterion, thresholds, Path(tmp) / "bundle")
                trials |= measure_http(served, m.name, m.input.name, data, cfg, out, bar,
                                       reference_threads=_faster_reference_threads(trials))
    report = build_report(m, trials, full_labels, data, calibration.to_dict(), asdict(cfg))
    report["machine"] = machine()
    report["bundle"]["path"] = str(bundle_dir)
    report["command"] = command
    write_outputs(report, out)
    return report


def _faster_reference_threads(trials: dict[tuple[str, int], list[Trial]]) -> int:
    """The intra-op thread setting of the faster in-process reference at the smallest batch."""
    batch = min(b for (name, b) in trials if name in REFERENCES)

    def speed(name: str) -> float:
        return float(np.median([t.samples / t.seconds for t in trials[(name, batch)]]))

    return REFERENCES[max(REFERENCES, key=speed)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", metavar="BUNDLE_OR_PRESET", help=f"bundle directory or preset {PRESETS}")
    parser.add_argument("--out", type=Path, required=True, help="directory for bench.json, bench.md, *.png")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (tests, smoke checks)")
    parser.add_argument("--batch", type=int, nargs="+", help="in-process batch sizes (default 1 32)")
    parser.add_argument("--concurrency", type=int, nargs="+", help="HTTP clients (default 1 4 16 32)")
    parser.add_argument("--repeats", type=int, help="interleaved repeats per configuration (default 5)")
    parser.add_argument("--samples", type=int, help="samples per timed trial (default 256)")
    parser.add_argument("--threads", type=int, help="onnxruntime intra-op threads per session (default 1)")
    parser.add_argument("--max-queue-delay-ms", type=float, help="engine batching delay (default 0)")
    parser.add_argument("--target-agreement", type=float, help="calibration target (default 0.99)")
    parser.add_argument("--criterion", help="exit criterion to calibrate (default max_prob)")
    parser.add_argument("--http-format", choices=["binary", "json"], help="V2 body format (default binary)")
    parser.add_argument("--http-batch", type=int, help="samples per HTTP request (default 1)")
    parser.add_argument("--http-client", choices=["raw", "httpx"],
                        help="the load generator's client (default raw: load_tests/raw_client.py)")
    parser.add_argument("--no-http", action="store_true", help="in-process configurations only")
    parser.add_argument("--data", type=Path,
                        help="request data file (default: the test split of the bundle's own data set; text "
                        "models: the sentiment test sentences)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="execution provider (default cpu)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="the engine with cuda_graphs and a reference-graph baseline (CUDA graphs on cuda)")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    cfg = BenchConfig.quick() if args.quick else BenchConfig()
    for flag, key in (("batch", "batch_sizes"), ("concurrency", "concurrency"), ("repeats", "repeats"),
                      ("samples", "samples_per_trial"), ("threads", "threads"),
                      ("max_queue_delay_ms", "max_queue_delay_ms"), ("target_agreement", "target_agreement"),
                      ("criterion", "criterion"), ("http_format", "http_format"), ("device", "device"),
                      ("http_batch", "http_batch"), ("http_client", "http_client")):
        if getattr(args, flag) is not None:
            setattr(cfg, key, getattr(args, flag))
    cfg.http = not args.no_http
    cfg.cuda_graphs = bool(getattr(args, "cuda_graphs", False))
    return cfg


def run_cli(args: argparse.Namespace) -> int:
    from load_tests.bench_report import markdown

    try:
        cfg = config_from_args(args)
        bundle_dir = resolve_bundle(args.bundle, progress=not args.quiet)
        data = read_request_data(args.data) if args.data else None
        argv = sys.argv[sys.argv.index(args.bundle):] if args.bundle in sys.argv else [args.bundle]
        report = run_bench(bundle_dir, args.out, cfg, data=data, progress=not args.quiet,
                           command="offramp bench " + " ".join(argv))
    except (ValueError, RuntimeError) as err:
        print(f"offramp bench: {err}", file=sys.stderr)
        return 2
    print(markdown(report))
    print(f"wrote {args.out}/bench.json, bench.md, throughput_latency.png, exit_histogram.png")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `offramp bench` and `offramp loadtest` to the `offramp` command line."""
    from load_tests import run_locust

    parser = subparsers.add_parser("bench", help="early exit vs full depth, in-process and over HTTP",
                                   description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.set_defaults(func=run_cli)
    run_locust.register(subparsers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m load_tests.bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_cli(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
