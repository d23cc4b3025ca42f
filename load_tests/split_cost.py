"""What splitting a model into stages costs: every stage chained vs one monolithic graph.

Both sides compute the same thing at full depth: the chained stage files (hidden state handed from
session to session through host memory) and `reference.onnx` (one graph that outputs every exit's
logits, so it runs the same exit heads). The difference is the price of being able to stop early:
extra session calls, hidden-state copies, and fusion lost at stage boundaries.

Runs alternate (A, B, A, B, ...) so drifts of a shared machine hit both sides alike; medians are
reported. onnxruntime CPU, intra-op spinning off on both sides (as the server runs).

    python -m load_tests.split_cost --bundle DIR --out results.json [--batch 1 32] [--repeats 300]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from server.bundle import load_bundle
from server.engine.runtime import open_session


def measure(
    bundle_dir: Path, batches: list[int], repeats: int, warmup: int, threads: int, seed: int = 0
) -> dict:
    """Median latency of the chained stages and of the reference graph, per batch size."""
    bundle = load_bundle(bundle_dir)
    m = bundle.manifest
    if bundle.reference_path() is None:
        raise SystemExit(f"{bundle_dir}: this bundle has no reference.onnx to compare with")
    stages = [(open_session(bundle.stage_path(i), intra_op_threads=threads), s.inputs[0].name)
              for i, s in enumerate(m.stages)]
    reference = open_session(bundle.reference_path(), intra_op_threads=threads)
    rng = np.random.default_rng(seed)

    def chained(x: np.ndarray) -> None:
        h = x
        for sess, name in stages:
            h = sess.run(["hidden", "logits"], {name: h})[0]

    def monolithic(x: np.ndarray) -> None:
        reference.run(None, {m.input.name: x})

    results = []
    for n in batches:
        x = rng.integers(0, 17, size=(n, *m.input.shape[1:])).astype(np.float32)
        for _ in range(warmup):
            chained(x)
            monolithic(x)
        times: dict[str, list[float]] = {"chained": [], "reference": []}
        for r in range(repeats):
            # A, B, A, B ...: swap which goes first every other round so neither always runs warm.
            order = [("chained", chained), ("reference", monolithic)]
            for key, fn in order if r % 2 == 0 else order[::-1]:
                start = time.perf_counter_ns()
                fn(x)
                times[key].append((time.perf_counter_ns() - start) / 1e6)
        chained_ms = statistics.median(times["chained"])
        reference_ms = statistics.median(times["reference"])
        results.append(
            {
                "batch": n,
                "chained_median_ms": round(chained_ms, 4),
                "reference_median_ms": round(reference_ms, 4),
                "overhead_ms": round(chained_ms - reference_ms, 4),
                "overhead_pct": round(100 * (chained_ms / reference_ms - 1), 1),
                "chained_p90_ms": round(float(np.percentile(times["chained"], 90)), 4),
                "reference_p90_ms": round(float(np.percentile(times["reference"], 90)), 4),
            }
        )
    return {
        "bundle": m.name,
        "stages": m.num_stages,
        "mflops_per_sample": round(sum(s.flops for s in m.stages) / 1e6, 3),
        "repeats": repeats,
        "warmup": warmup,
        "intra_op_threads": threads,
        "onnxruntime": ort.__version__,
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "system": platform.platform(),
        },
        "command": " ".join(["python -m load_tests.split_cost", *sys.argv[1:]]),
        "results": results,
    }


def markdown(report: dict) -> str:
    lines = [
        "| batch | chained stages (ms) | reference.onnx (ms) | overhead |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['batch']} | {r['chained_median_ms']:.3f} | {r['reference_median_ms']:.3f} | "
            f"{r['overhead_ms']:+.3f} ms ({r['overhead_pct']:+.1f} %) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True, help="bundle directory (with reference.onnx)")
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON results")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32], help="batch sizes")
    parser.add_argument("--repeats", type=int, default=300, help="timed runs per side and batch size")
    parser.add_argument("--warmup", type=int, default=20, help="untimed runs per side first")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads per session")
    args = parser.parse_args(argv)
    report = measure(args.bundle, args.batch, args.repeats, args.warmup, args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
