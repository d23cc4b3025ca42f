"""Re-batching rows of different lengths: merge (pad to the longest) or bucket by length?

The engine merges the survivors of several batches into one stage run. For a text model those
rows have different lengths, so the merged batch is padded to its longest row (what
`server.text.pad_concat` and the runtime do). The alternative is to bucket rows by length and run
one batch per bucket: less padding, more (smaller) runs. This measures both on a real bundle and
real sentences, with the exit decisions of the bundle's default policy:

- request batches of `--batch` sentences run stage 0; at every later stage the survivors of
  `--group` consecutive batches are re-batched, either **merged** (one padded run) or
  **bucketed** (one run per length bucket of `--bucket` tokens: 1-16, 17-32, ...), or left
  **separate** (each batch's survivors on their own: no re-batching at all);
- every stage run is timed; the figure is the total time of stages 1.. over the test split,
  the median of `--repeats` interleaved repeats, with the padding each strategy computes.

    python -m load_tests.ragged sentiment --out docs/results/ragged-sentiment-cpu2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

STRATEGIES = ("merge", "bucket", "separate")


def run_strategy(runner: Any, policy: Any, batches: list[Any], strategy: str, group: int, bucket: int) -> dict:
    from server.engine.direct import exit_step
    from server.exits import ExitState
    from server.text import TokenRows, pad_concat

    seconds, real, computed, runs = 0.0, 0, 0, 0
    last = runner.num_stages - 1
    for first in range(0, len(batches), group):
        parts = []
        for b in batches[first:first + group]:
            out = runner.run(0, b)
            leave, _, _, _ = exit_step(policy, 0, False, out, ExitState.initial(len(b)))
            stay = np.flatnonzero(~leave)
            if len(stay):
                parts.append(runner.take(out.hidden, stay))
        for stage in range(1, runner.num_stages):
            if not parts:
                break
            if strategy == "bucket":
                merged = pad_concat(parts) if len(parts) > 1 else parts[0]
                lengths = merged.lengths()
                keys = (lengths - 1) // bucket
                jobs = [runner.take(merged, np.flatnonzero(keys == k)) for k in np.unique(keys)]
            elif strategy == "merge":
                jobs = [pad_concat(parts)]
            else:
                jobs = parts
            nxt = []
            for job in jobs:
                t0 = time.perf_counter()
                out = runner.run(stage, job)
                seconds += time.perf_counter() - t0
                runs += 1
                real += int(job.lengths().sum())
                computed += int(np.prod(job.mask.shape))
                if stage < last:
                    leave, _, _, _ = exit_step(policy, stage, False, out, ExitState.initial(len(job)))
                    stay = np.flatnonzero(~leave)
                    if len(stay):
                        nxt.append(runner.take(out.hidden, stay))
            parts = [p for p in nxt if isinstance(p, TokenRows)]
    return {"seconds": seconds, "runs": runs, "real_tokens": real, "computed_tokens": computed,
            "padding": computed / max(1, real) - 1}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", help="text bundle directory or preset (sentiment)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=8, help="sentences per request batch [8]")
    parser.add_argument("--group", type=int, default=4, help="batches whose survivors re-batch together [4]")
    parser.add_argument("--bucket", type=int, default=16, help="bucket width in tokens [16]")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    from load_tests.bench import machine, resolve_bundle
    from load_tests.bench_report import save_table
    from load_tests.data import sentiment_test_split
    from server.bundle import load_bundle
    from server.engine.runtime import OrtStageRunner
    from server.settings import Settings
    from server.text import TokenRows, tokenizer_for

    bundle = load_bundle(resolve_bundle(args.bundle))
    runner = OrtStageRunner(bundle, Settings(intra_op_threads=1))
    policy = bundle.manifest.default_policy.with_version(1)
    tok = tokenizer_for(bundle)
    texts = list(sentiment_test_split().x)
    batches = [TokenRows(*tok.encode(texts[i:i + args.batch])) for i in range(0, len(texts), args.batch)]
    results: dict[str, list[dict]] = {s: [] for s in STRATEGIES}
    run_strategy(runner, policy, batches[:8], "merge", args.group, args.bucket)  # warm-up
    for r in range(args.repeats):
        for s in STRATEGIES[r % 3:] + STRATEGIES[:r % 3]:
            results[s].append(run_strategy(runner, policy, batches, s, args.group, args.bucket))
    summary = {}
    for s, runs in results.items():
        secs = sorted(x["seconds"] for x in runs)
        summary[s] = {**runs[0], "seconds": secs[len(secs) // 2], "all_seconds": [x["seconds"] for x in runs]}
    base = summary["merge"]["seconds"]
    for s in summary:
        summary[s]["vs_merge"] = summary[s]["seconds"] / base
    report = {"bundle": bundle.name, "policy": policy.to_dict(), "sentences": len(texts), "args": vars(args) | {
        "out": str(args.out)}, "machine": machine(), "strategies": summary}
    title = (f"{bundle.name}: {len(texts)} test sentences in batches of {args.batch}, survivors of {args.group} "
             f"batches re-batched; stages 1..{runner.num_stages - 1}, median of {args.repeats} repeats")
    rows = [[s, str(v["runs"]), f"{v['seconds']:.3f}", f"{v['vs_merge']:.2f}", f"{v['padding']:.3f}"]
            for s, v in summary.items()]
    header = ["strategy", "stage runs", "seconds", "vs merge", "padding (computed / real tokens - 1)"]
    print(save_table(args.out, "ragged", report, title, header, rows), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
