"""The engine's fixed cost, in-process: early exit and full depth against reference.onnx, alternating.

A quick look at the hot path while changing it (`offramp bench` is the full, interleaved
benchmark): `rounds` alternating runs of `requests` sequential requests of `batch` samples each,
through reference.onnx (1 intra-op thread, and onnxruntime's defaults) and the engine (early exit
calibrated to `--target-agreement`, and full depth); prints samples/s per run and writes JSON.

    python -m load_tests.hot_path BUNDLE_OR_PRESET --batch 1 --out results/hot-path.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path


def measure(bundle_dir: Path, batch: int, requests: int, rounds: int, threads: int,
            target_agreement: float) -> dict:
    import numpy as np

    from load_tests.data import digits_test_split
    from server.bundle import load_bundle
    from server.control.calibrate import calibrate
    from server.engine.engine import Engine
    from server.engine.runtime import open_session
    from server.metrics import Metrics
    from server.policy import ExitPolicy
    from server.settings import Settings

    bundle = load_bundle(bundle_dir)
    m = bundle.manifest
    assert m.reference is not None, f"{bundle_dir} has no reference.onnx"
    thresholds = calibrate(bundle.calibration(), m, target_agreement=target_agreement).thresholds
    x = digits_test_split().x
    settings = Settings(device="cpu", intra_op_threads=threads, max_batch_size=max(32, batch), max_queue_delay_ms=0)
    engine = Engine([bundle], settings, Metrics(), {bundle.name: ExitPolicy("max_prob", tuple(thresholds), 1)})
    refs = {f"reference-{t}t" if t else "reference-ort": open_session(bundle.reference_path(), intra_op_threads=t)
            for t in (1, 0)}
    final = m.reference.outputs[-1]

    async def run() -> dict[str, list[float]]:
        await engine.start()
        speeds: dict[str, list[float]] = {}
        try:
            for _ in range(rounds):
                for name in (*refs, "early", "full"):
                    began = time.perf_counter()
                    for i in range(requests):
                        j = (i * batch) % (len(x) - batch)
                        xb = x[j:j + batch]
                        if name in refs:
                            refs[name].run([final], {m.input.name: xb})
                        else:
                            await engine.infer(bundle.name, xb, early_exit=name == "early")
                    speeds.setdefault(name, []).append(requests * batch / (time.perf_counter() - began))
        finally:
            await engine.stop()
        return speeds

    speeds = asyncio.run(run())
    medians = {k: statistics.median(v) for k, v in speeds.items()}
    reference = max(medians[k] for k in refs)
    return {"bundle": m.name, "batch": batch, "engine_threads": threads, "samples_per_s": speeds,
            "median": medians, "early_over_reference": medians["early"] / reference,
            "full_over_reference": medians["full"] / reference, "numpy": np.__version__}


def main(argv: list[str] | None = None) -> int:
    from load_tests.bench import resolve_bundle

    parser = argparse.ArgumentParser(prog="python -m load_tests.hot_path", description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", help="bundle directory or preset (demo, heavy)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="engine intra-op threads (0: onnxruntime's default)")
    parser.add_argument("--target-agreement", type=float, default=0.99)
    parser.add_argument("--out", type=Path, help="JSON file to write")
    args = parser.parse_args(argv)
    result = measure(resolve_bundle(args.bundle), args.batch, max(1, args.requests // args.batch), args.rounds,
                     args.threads, args.target_agreement)
    for name, runs in result["samples_per_s"].items():
        print(f"{name:>14}: " + "  ".join(f"{v:9.0f}" for v in runs) + "  samples/s")
    print(f"early / reference {result['early_over_reference']:.2f}x, full / reference "
          f"{result['full_over_reference']:.2f}x")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
