"""Figures, tables and plots of `offramp bench` (load_tests/bench.py measures, this module reports).

Per configuration and batch size / client count: throughput (samples/s, median over repeats),
p50/p95/p99 latency per request (medians over repeats of each repeat's percentile), mean exit
depth (1 = the first exit, S = full depth), agreement with the full-depth label of the same
sample, and the realisation ratio = measured speed-up over the baseline / ideal speed-up, where the
ideal is full-depth FLOPs over the expected executed FLOPs under the exit histogram measured.

The baseline is `reference.onnx` in plain onnxruntime with its faster thread setting at that batch
size (in-process), and `http-reference` (HTTP). The figures over our own full-depth path, which
flattered us, stay beside them as `speedup_vs_full` / `realisation_vs_full`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

IN_PROCESS = ("reference-1t", "reference-ort", "reference-buckets", "reference-graph", "full", "early")
HTTP = ("http-reference", "http-full", "http-early")
REFERENCE_ROWS = ("reference-1t", "reference-ort", "reference-buckets", "reference-graph")
"""`reference-buckets` (text models only): onnxruntime's default threads, each batch run as one run per
16-token length bucket, the best a plain-onnxruntime user can do with a batch of sentences."""


def _row(name: str, key: int, trials: list, full_labels: np.ndarray, y: np.ndarray | None,
         cum_flops: np.ndarray) -> dict[str, Any]:
    stages = len(cum_flops)
    idx = np.concatenate([t.indices for t in trials])
    labels = np.concatenate([t.labels for t in trials])
    exit_stage = np.concatenate([t.exit_stage for t in trials]).astype(np.int64)
    counts = np.bincount(exit_stage, minlength=stages)
    hist = counts / max(1, counts.sum())
    fraction = float((hist * cum_flops).sum() / cum_flops[-1])
    throughput = [t.samples / t.seconds for t in trials]
    pct = np.array([np.percentile(t.latencies_ms, [50, 95, 99]) for t in trials])
    row = {
        "mode": "in_process" if name in IN_PROCESS else "http",
        "config": name,
        ("batch" if name in IN_PROCESS else "clients"): key,
        "throughput": float(np.median(throughput)),
        "throughput_runs": [round(v, 3) for v in throughput],
        "p50_ms": float(np.median(pct[:, 0])),
        "p95_ms": float(np.median(pct[:, 1])),
        "p99_ms": float(np.median(pct[:, 2])),
        "requests": int(sum(len(t.latencies_ms) for t in trials)),
        "samples": int(len(labels)),
        "exit_counts": counts.tolist(),
        "exit_histogram": hist.tolist(),
        "mean_exit_depth": float(exit_stage.mean() + 1),
        "agreement": float((labels == full_labels[idx]).mean()),
        "accuracy": None if y is None else float((labels == y[idx]).mean()),
        "compute_fraction": fraction,
        "ideal_speedup": 1.0 / fraction,
    }
    if row["mode"] == "http":  # CPU: the load generator shares the cores with the server
        requests = max(1, row["requests"])
        server = sum(getattr(t, "server_cpu_s", 0.0) for t in trials)
        client = sum(getattr(t, "client_cpu_s", 0.0) for t in trials)
        row["server_cpu_ms_per_request"] = 1e3 * server / requests
        row["client_cpu_share"] = client / (client + server) if client + server > 0 else None
    return row


def build_report(manifest: Any, trials: dict[tuple[str, int], list], full_labels: np.ndarray, data: Any,
                 calibration: dict, config: dict) -> dict[str, Any]:
    """Rows for every (configuration, batch size / clients), with speed-ups and realisation ratios."""
    flops = [int(s.flops) for s in manifest.stages]
    cum = np.cumsum(np.asarray(flops, dtype=np.float64))
    rows = [_row(name, key, ts, full_labels, data.y, cum) for (name, key), ts in trials.items()]
    by = {(r["config"], r.get("batch", r.get("clients"))): r for r in rows}
    for r in rows:
        key = r.get("batch", r.get("clients"))
        full = by.get(("full" if r["mode"] == "in_process" else "http-full", key))
        base = baseline(by, r["mode"], key)
        r["baseline"] = None if base is None else base["config"]
        r["speedup"] = None if base is None else r["throughput"] / base["throughput"]
        r["realisation"] = None if r["speedup"] is None else r["speedup"] / r["ideal_speedup"]
        r["speedup_vs_full"] = None if full is None else r["throughput"] / full["throughput"]
        r["realisation_vs_full"] = None if full is None else r["speedup_vs_full"] / r["ideal_speedup"]
    order = {n: i for i, n in enumerate(IN_PROCESS + HTTP)}
    rows.sort(key=lambda r: (r["mode"] != "in_process", r.get("batch", r.get("clients")), order[r["config"]]))
    return {
        "bundle": {"name": manifest.name, "stages": manifest.num_stages, "flops_per_stage": flops,
                   "mflops_full_depth": round(float(cum[-1]) / 1e6, 3)},
        "config": config,
        "calibration": calibration,
        "data": {"samples": int(len(data)), "labelled": data.y is not None},
        "results": rows,
        "targets": targets(rows),
    }


def baseline(by: dict[tuple[str, int], dict], mode: str, key: int) -> dict | None:
    """The row every speed-up at this batch size / client count is divided by."""
    if mode == "http":
        return by.get(("http-reference", key))
    refs = [by[(name, key)] for name in REFERENCE_ROWS if (name, key) in by]
    return max(refs, key=lambda r: r["throughput"]) if refs else None


def targets(rows: list[dict]) -> list[dict]:
    """The engine issue's targets that these rows can answer (met or not, with the figures), all
    against the baseline of the same run."""
    by = {(r["config"], r.get("batch", r.get("clients"))): r for r in rows}
    checks: list[dict] = []

    def check(text: str, value: float | None, goal: float) -> None:
        if value is not None:
            checks.append({"check": f"{text} >= {goal:g}", "value": value, "met": value >= goal})

    for b in sorted({r["batch"] for r in rows if "batch" in r}):
        full, early = by.get(("full", b)), by.get(("early", b))
        if full:
            check(f"in-process batch {b}: full depth / reference", full["speedup"], 0.95)
        if early:
            check(f"in-process batch {b}: early exit / reference", early["speedup"], 2.5 if b == 1 else 2.0)
            check(f"in-process batch {b}: realisation", early["realisation"], 0.8 if b == 1 else 0.9)
    for c in sorted({r["clients"] for r in rows if "clients" in r}):
        early = by.get(("http-early", c))
        if early:
            check(f"HTTP {c} clients: early exit / http-reference", early["speedup"], 1.5)
    return checks


def _f(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def markdown(report: dict) -> str:
    """The results table, the calibrated policy and the target checks, as markdown."""
    b, cal, cfg = report["bundle"], report["calibration"], report["config"]
    expected = cal["expected"]
    shown = ", ".join("null" if t is None else f"{t:.4g}" for t in cal["thresholds"])
    lines = [
        f"### {b['name']}: {b['stages']} stages, {b['mflops_full_depth']:.3g} MFLOPs per sample "
        "at full depth",
        "",
        f"Policy: {cal['criterion']} calibrated to agreement {cfg['target_agreement']} on the calibration "
        f"data: thresholds [{shown}]; expected agreement {expected['agreement']:.4f}, compute fraction "
        f"{expected['compute_fraction']:.3f}. Engine stages: {cfg['threads']} intra-op thread(s) per session "
        "(0: onnxruntime's default), spinning off; reference.onnx with 1 thread and with onnxruntime's defaults "
        "(text models also per length bucket), the fastest is the baseline (*); "
        f"engine max_queue_delay_ms {cfg['max_queue_delay_ms']}; HTTP "
        f"{cfg['http_format']} bodies, {cfg.get('http_batch', 1)} sample(s) per request; medians of "
        f"{cfg['repeats']} interleaved repeats. Speed-up and realisation are over the baseline; the last two "
        "columns are over our own full-depth path.",
        "",
        "| mode | config | batch / clients | samples/s | p50 ms | p95 ms | p99 ms | mean exit depth | "
        "agreement | speed-up | ideal | realisation | vs full | realisation vs full |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["results"]:
        key = r.get("batch", r.get("clients"))
        star = " *" if r["config"] == r.get("baseline") else ""
        lines.append(
            f"| {r['mode'].replace('_', '-')} | {r['config']}{star} | {key} | {r['throughput']:.1f} | "
            f"{_f(r['p50_ms'])} | {_f(r['p95_ms'])} | {_f(r['p99_ms'])} | {r['mean_exit_depth']:.2f} | "
            f"{r['agreement']:.4f} | "
            f"{_f(r['speedup'])} | {r['ideal_speedup']:.2f} | {_f(r['realisation'])} | "
            f"{_f(r.get('speedup_vs_full'))} | {_f(r.get('realisation_vs_full'))} |")
    http = [r for r in report["results"] if r["mode"] == "http"]
    if http:
        lines += ["", "HTTP CPU (the load generator shares the cores with the servers):", "",
                  "| config | clients | server CPU ms per request | load generator's share of the CPU used |",
                  "| --- | ---: | ---: | ---: |"]
        for r in http:
            lines.append(f"| {r['config']} | {r['clients']} | {_f(r.get('server_cpu_ms_per_request'), 3)} | "
                         f"{_f(r.get('client_cpu_share'))} |")
    if report["targets"]:
        lines += ["", "| target | value | met |", "| --- | ---: | :---: |"]
        for t in report["targets"]:
            lines.append(f"| {t['check']} | {_f(t['value'])} | {'yes' if t['met'] else 'no'} |")
    m = report.get("machine")
    if m:
        lines += ["", f"Machine: {m['cpus']} CPUs ({m['processor']}), {m['system']}, Python {m['python']}, "
                  f"onnxruntime {m['onnxruntime']}, load average at the end {m['load_average']}."]
    if report.get("command"):
        lines += [f"Command: `{report['command']}`"]
    return "\n".join(lines) + "\n"


def plot_throughput_latency(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = ((axes[0], "in_process", "batch", IN_PROCESS), (axes[1], "http", "clients", HTTP))
    for ax, mode, key, names in panels:
        for name in names:
            rows = sorted((r for r in report["results"] if r["config"] == name), key=lambda r: r[key])
            if not rows:
                continue
            x = [r["throughput"] for r in rows]
            (line,) = ax.plot(x, [r["p50_ms"] for r in rows], "o-", label=f"{name} p50")
            ax.plot(x, [r["p99_ms"] for r in rows], "x--", color=line.get_color(), label=f"{name} p99")
            for r in rows:
                ax.annotate(str(r[key]), (r["throughput"], r["p50_ms"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        ax.set_xlabel("throughput (samples/s)")
        ax.set_ylabel("latency per request (ms)")
        ax.set_yscale("log")
        ax.set_title(f"{mode.replace('_', '-')} (points labelled by {key})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{report['bundle']['name']}: early exit vs full depth")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_exit_histogram(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = report["bundle"]["stages"]
    series = {"expected (calibration data)": np.asarray(report["calibration"]["expected"]["exit_histogram"])}
    for name in ("early", "http-early"):
        counts = sum((np.asarray(r["exit_counts"]) for r in report["results"] if r["config"] == name),
                     np.zeros(stages))
        if counts.sum() > 0:
            series[f"measured: {name}"] = counts / counts.sum()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.8 / len(series)
    for i, (label, hist) in enumerate(series.items()):
        ax.bar(np.arange(stages) + (i - (len(series) - 1) / 2) * width, hist, width, label=label)
    ax.set_xlabel("exit stage (0-based)")
    ax.set_ylabel("share of samples")
    ax.set_xticks(range(stages))
    ax.set_title(f"{report['bundle']['name']}: where samples exit")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(report: dict, out: Path) -> None:
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "bench.md").write_text(markdown(report))
    plot_throughput_latency(report, out / "throughput_latency.png")
    plot_exit_histogram(report, out / "exit_histogram.png")


def save_table(out: Path, stem: str, report: dict, title: str, header: list[str], rows: list[list[str]]) -> str:
    """`<stem>.json` (the report) and `<stem>.md` (a title and one table) in `out`; returns the table's
    text (the small load-test scripts: coverage, policy_accuracy, ragged)."""
    lines = [title, "", "| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{stem}.md").write_text(text)
    return text
