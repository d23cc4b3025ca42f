"""Headless locust runs against a local offramp server, with a markdown summary.

`run_loadtest` scrapes `/metrics`, runs locust (a subprocess: locust monkey-patches the process
with gevent, which must never happen to the caller), scrapes `/metrics` again, and writes:

- `locust_stats.csv`, `locust_stats_history.csv`, `locust_failures.csv`, `locust_exceptions.csv`
  (locust's own `--csv` files);
- `summary.md` and `summary.json`: requests/s, p50/p95/p99, failures per request size, and the
  exit histogram and compute fraction of the samples answered during the run (the difference
  of the server's `offramp_exit_stage_total` and FLOP counters before and after).

Users, spawn rate and run time are bounded and the target is 127.0.0.1 unless `--allow-remote`.
With `--bundle DIR` the runner starts its own `offramp serve` on a free port and stops it (by pid).

    python -m load_tests.data --out /tmp/digits.npz
    python -m load_tests.run_locust --bundle DIR --data /tmp/digits.npz --out results/load \
        --users 16 --spawn-rate 8 --run-time 30s --tags single
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = Path(__file__).with_name("locustfile.py")
MAX_USERS = 1000
MAX_RUN_S = 3600
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


# ---- /metrics ----------------------------------------------------------------------------------


@dataclass
class MetricsSnapshot:
    """The counters of one `/metrics` scrape a load test needs, per model."""

    exits: dict[str, dict[int, float]] = field(default_factory=dict)  # model -> stage -> samples
    requests: dict[str, dict[str, float]] = field(default_factory=dict)  # model -> outcome -> count
    executed_flops: dict[str, float] = field(default_factory=dict)
    full_depth_flops: dict[str, float] = field(default_factory=dict)


def parse_metrics(text: str) -> MetricsSnapshot:
    """Parse Prometheus text exposition (what `GET /metrics` returns)."""
    snap = MetricsSnapshot()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            model = s.labels.get("model")
            if model is None:
                continue
            if s.name == "offramp_exit_stage_total":
                snap.exits.setdefault(model, {})[int(s.labels["stage"])] = s.value
            elif s.name == "offramp_requests_total":
                snap.requests.setdefault(model, {})[s.labels["outcome"]] = s.value
            elif s.name == "offramp_executed_flops_total":
                snap.executed_flops[model] = s.value
            elif s.name == "offramp_full_depth_flops_total":
                snap.full_depth_flops[model] = s.value
    return snap


def metrics_delta(before: MetricsSnapshot, after: MetricsSnapshot, model: str) -> dict:
    """What happened to `model` between two scrapes: exit histogram, requests, compute fraction."""
    b_exits, a_exits = before.exits.get(model, {}), after.exits.get(model, {})
    stages = sorted(set(a_exits) | set(b_exits))
    last = max(stages, default=-1)
    counts = [int(round(a_exits.get(k, 0.0) - b_exits.get(k, 0.0))) for k in range(last + 1)]
    total = sum(counts)
    b_req, a_req = before.requests.get(model, {}), after.requests.get(model, {})
    requests = {k: int(round(a_req.get(k, 0.0) - b_req.get(k, 0.0))) for k in sorted(set(a_req) | set(b_req))}
    executed = after.executed_flops.get(model, 0.0) - before.executed_flops.get(model, 0.0)
    full = after.full_depth_flops.get(model, 0.0) - before.full_depth_flops.get(model, 0.0)
    return {
        "samples": total,
        "exit_counts": counts,
        "exit_histogram": [c / total for c in counts] if total else [],
        "mean_exit_depth": sum((k + 1) * c for k, c in enumerate(counts)) / total if total else None,
        "compute_fraction": executed / full if full > 0 else None,
        "requests": requests,
    }


def scrape(base_url: str, timeout: float = 10.0) -> MetricsSnapshot:
    import httpx  # the `load`/`test` extra; imported late so `offramp --help` works without it

    response = httpx.get(f"{base_url}/metrics", timeout=timeout)
    response.raise_for_status()
    return parse_metrics(response.text)


# ---- locust's CSV and the summary ----------------------------------------------------------------


def read_locust_stats(stats_csv: Path) -> list[dict]:
    """Rows of locust's `*_stats.csv`: name, requests, failures, requests/s and percentiles (ms)."""
    rows = []
    with open(stats_csv, newline="") as f:
        for row in csv.DictReader(f):
            def num(key: str, row: dict = row) -> float | None:
                value = row.get(key, "")
                return None if value in ("", "N/A") else float(value)

            rows.append({
                "name": row["Name"], "requests": int(num("Request Count") or 0),
                "failures": int(num("Failure Count") or 0), "requests_per_s": num("Requests/s"),
                "p50_ms": num("50%"), "p95_ms": num("95%"), "p99_ms": num("99%"),
                "mean_ms": num("Average Response Time"),
            })
    return rows


def summary_markdown(summary: dict) -> str:
    """The markdown summary of one load test (what `summary.md` holds)."""
    cfg = summary["config"]
    lines = [
        f"# Load test: {cfg['model']} at {cfg['host']}",
        "",
        f"{cfg['users']} users (spawn rate {cfg['spawn_rate']}/s), {cfg['run_time']}, "
        f"format {cfg['format']}, "
        f"early_exit {cfg['early_exit']}, tags {cfg['tags'] or 'all'}.",
        "",
        "| request | requests | failures | req/s | p50 (ms) | p95 (ms) | p99 (ms) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def show(v: float | None, digits: int = 1) -> str:
        return "-" if v is None else f"{v:.{digits}f}"

    for r in summary["stats"]:
        lines.append(f"| {r['name']} | {r['requests']} | {r['failures']} | {show(r['requests_per_s'])} | "
                     f"{show(r['p50_ms'], 0)} | {show(r['p95_ms'], 0)} | {show(r['p99_ms'], 0)} |")
    server = summary["server"]
    lines += ["", f"Samples answered by the server during the run: {server['samples']}; "
              f"mean exit depth {show(server['mean_exit_depth'], 2)} stages; compute fraction "
              f"{show(server['compute_fraction'], 3)}; requests by outcome {server['requests']}.", ""]
    if server["exit_counts"]:
        lines += ["| exit stage | samples | share |", "| ---: | ---: | ---: |"]
        for k, (c, h) in enumerate(zip(server["exit_counts"], server["exit_histogram"], strict=True)):
            lines.append(f"| {k} | {c} | {100 * h:.1f} % |")
    return "\n".join(lines) + "\n"


# ---- the server and locust processes -------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


@contextmanager
def serve(bundles: Sequence[Path], log_path: Path, *, flags: Sequence[str] = (),
          ready_timeout_s: float = 180.0) -> Iterator[str]:
    """Run `offramp serve` on 127.0.0.1 (a free port) until the block ends; yields its base URL.

    The server gets its own empty state directory (a temporary one, removed afterwards), so a policy
    persisted by an earlier run never replaces the bundle's; it is stopped by its pid (SIGTERM, then
    SIGKILL after 30 s)."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="offramp-state-") as state:
        cmd = [sys.executable, "-m", "offramp.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--state-dir", state, "--log-level", "warning", *flags]
        for b in bundles:
            cmd += ["--bundle", str(b)]
        with run_server(cmd, port, log_path, "offramp serve", ready_timeout_s) as base:
            yield base


@contextmanager
def serve_reference(bundle: Path, log_path: Path, *, threads: int = 0,
                    ready_timeout_s: float = 120.0) -> Iterator[str]:
    """Run the HTTP baseline (load_tests/reference_server.py: reference.onnx behind a bare V2 endpoint)."""
    port = free_port()
    cmd = [sys.executable, "-m", "load_tests.reference_server", str(bundle), "--port", str(port),
           "--threads", str(threads)]
    with run_server(cmd, port, log_path, "the reference server", ready_timeout_s) as base:
        yield base


class Served(str):
    """A running server's base URL, with its process id (to read its CPU time)."""

    pid: int

    def __new__(cls, base: str, pid: int) -> Served:
        served = super().__new__(cls, base)
        served.pid = pid
        return served


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc; 0.0 where that is missing)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def run_server(cmd: list[str], port: int, log_path: Path, what: str, ready_timeout_s: float) -> Iterator[str]:
    """`cmd` (a server on 127.0.0.1:`port`) until the block ends, once `/v2/health/ready` answers;
    stopped by its pid."""
    import httpx

    log_path.parent.mkdir(parents=True, exist_ok=True)
    base = f"http://127.0.0.1:{port}"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{what} exited with {proc.returncode} before ready:\n{tail}")
            try:
                if httpx.get(f"{base}/v2/health/ready", timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} not ready within {ready_timeout_s:g} s (log: {log_path})")
            time.sleep(0.2)
        yield Served(base, proc.pid)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()


def parse_duration(text: str) -> float:
    """Seconds in a locust run time (`45`, `30s`, `2m`, `1h30m`)."""
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+)([hms])", text)
    if not parts or "".join(a + b for a, b in parts) != text:
        raise ValueError(f"run time {text!r} is not like 30s, 2m or 1h30m")
    return float(sum(int(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts))


def run_loadtest(host: str, model: str, data: Path, out: Path, *, users: int = 16, spawn_rate: float = 8.0,
                 run_time: str = "30s", tags: Sequence[str] = (), exclude_tags: Sequence[str] = (),
                 fmt: str = "json", early_exit: bool = True, allow_remote: bool = False) -> dict:
    """One headless locust run against `host`; writes locust's CSVs and the summary into `out`."""
    seconds = parse_duration(run_time)
    problems = []
    if not 1 <= users <= MAX_USERS:
        problems.append(f"users must be in [1, {MAX_USERS}], got {users}")
    if not 0 < spawn_rate <= users:
        problems.append(f"spawn rate must be in (0, users], got {spawn_rate}")
    if not 0 < seconds <= MAX_RUN_S:
        problems.append(f"run time must be in (0, {MAX_RUN_S}] s, got {run_time}")
    if not allow_remote and urlparse(host).hostname not in LOOPBACK:
        problems.append(f"host {host} is not 127.0.0.1 (pass allow_remote / --allow-remote to load it)")
    if fmt not in ("json", "binary"):
        problems.append(f"format must be json or binary, got {fmt!r}")
    if problems:
        raise ValueError("; ".join(problems))
    out.mkdir(parents=True, exist_ok=True)
    host = host.rstrip("/")
    before = scrape(host)
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", host,
           "-u", str(users), "-r", str(spawn_rate), "-t", run_time, "--csv", str(out / "locust"),
           "--only-summary", "--stop-timeout", "5", "--loglevel", "WARNING"]
    if tags:
        cmd += ["--tags", *tags]
    if exclude_tags:
        cmd += ["--exclude-tags", *exclude_tags]
    env = _env() | {"OFFRAMP_LOAD_DATA": str(Path(data).resolve()), "OFFRAMP_LOAD_MODEL": model,
                    "OFFRAMP_LOAD_FORMAT": fmt, "OFFRAMP_LOAD_EARLY_EXIT": "1" if early_exit else "0"}
    with open(out / "locust.log", "wb") as log:
        # locust exits 1 when any request failed: the summary reports failures, so that is no error here.
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                              timeout=seconds + 120)
    stats_csv = out / "locust_stats.csv"
    if not stats_csv.is_file():
        tail = (out / "locust.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"locust exited with {proc.returncode} and wrote no stats:\n{tail}")
    after = scrape(host)
    summary = {
        "config": {"host": host, "model": model, "data": str(data), "users": users, "spawn_rate": spawn_rate,
                   "run_time": run_time, "tags": list(tags), "exclude_tags": list(exclude_tags),
                   "format": fmt, "early_exit": early_exit},
        "locust_exit_code": proc.returncode,
        "stats": read_locust_stats(stats_csv),
        "server": metrics_delta(before, after, model),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(summary_markdown(summary))
    return summary


# ---- command line --------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--host", default="http://127.0.0.1:8000", help="server URL (default %(default)s)")
    target.add_argument("--bundle", type=Path, action="append", help="start `offramp serve` on this bundle")
    parser.add_argument("--model", help="model name (default: the bundle's name, else digits-vit)")
    parser.add_argument("--data", type=Path, required=True, help="request data (python -m load_tests.data)")
    parser.add_argument("--out", type=Path, required=True, help="directory for the CSVs and summary")
    parser.add_argument("--users", type=int, default=16, help="concurrent users (default %(default)s)")
    parser.add_argument("--spawn-rate", type=float, default=8.0, help="users started per second")
    parser.add_argument("--run-time", default="30s", help="run time, e.g. 30s, 2m (default %(default)s)")
    parser.add_argument("--tags", nargs="*", default=[], help="tags to run: single batch batch8 batch32")
    parser.add_argument("--exclude-tags", nargs="*", default=[], help="task tags to leave out")
    parser.add_argument("--format", choices=["json", "binary"], default="json", help="V2 body format")
    parser.add_argument("--full-depth", action="store_true", help="send early_exit: false")
    parser.add_argument("--allow-remote", action="store_true", help="allow a host other than 127.0.0.1")
    parser.add_argument("--serve-flag", action="append", default=[], metavar="FLAG",
                        help="extra `offramp serve` flag with --bundle, e.g. --serve-flag=--max-batch-size=8")


def run_cli(args: argparse.Namespace) -> int:
    import httpx

    def go(host: str, model: str) -> dict:
        return run_loadtest(host, model, args.data, args.out, users=args.users, spawn_rate=args.spawn_rate,
                            run_time=args.run_time, tags=args.tags, exclude_tags=args.exclude_tags,
                            fmt=args.format, early_exit=not args.full_depth, allow_remote=args.allow_remote)

    try:
        if args.bundle:
            from server.bundle import load_bundle

            model = args.model or load_bundle(args.bundle[0]).name
            with serve(args.bundle, args.out / "server.log", flags=args.serve_flag) as base:
                summary = go(base, model)
        else:
            summary = go(args.host, args.model or "digits-vit")
    except (ValueError, RuntimeError, httpx.HTTPError) as err:
        print(f"offramp loadtest: {err}", file=sys.stderr)
        return 2
    print(summary_markdown(summary))
    print(f"wrote {args.out}/summary.md, summary.json and locust_*.csv")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `offramp loadtest` to the `offramp` command line."""
    parser = subparsers.add_parser("loadtest", help="headless locust load test against a local server",
                                   description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.set_defaults(func=run_cli)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_cli(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
