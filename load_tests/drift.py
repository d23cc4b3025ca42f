"""Drift: traffic shifts, and auto-recalibration brings live agreement back.

The digits demo served in-process by the real engine (shadow_rate, live window), with the admin
API's operations (server/control/policies.py) and the auto-recalibration controller
(server/control/auto.py) over a file policy store. The policy starts certified for the target on the
bundle's calibration data (the admin calibrate). Traffic: the digits test split, then every digit
image shifted by one pixel to the right (a mild, realistic shift the model was never tuned to).
The harness, not the server, measures agreement with full depth on *all* traffic: every request is
also answered at full depth (early_exit false) and compared. Run twice, with auto-recalibration on
and off; the controller steps every `--step` samples (the server's loop does it every
`auto_interval_s`).

    python -m load_tests.drift --out docs/results/drift-demo
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np


def traffic(before: int, after: int, seed: int = 0) -> tuple[np.ndarray, int]:
    """`before` in-distribution digits (the test split, cycled), then `after` shifted ones."""
    from model_export.data import load_digits_splits, shift_images

    splits = load_digits_splits()
    rng = np.random.default_rng(seed)
    a = splits.test.x[rng.integers(0, len(splits.test), before)]
    every = np.concatenate([splits.train.x, splits.val.x, splits.test.x])
    b = every[rng.integers(0, len(every), after)]
    b = shift_images(b, np.zeros(len(b), np.int64), np.ones(len(b), np.int64)).astype(np.float32)
    return np.concatenate([a, b]), before


async def replay(bundle: Any, x: np.ndarray, *, auto_on: bool, target: float, shadow_rate: float, window: int,
                 step: int, batch: int, min_samples: int, state_dir: Path) -> tuple[list[dict[str, float]], list[str]]:
    from server.control.auto import AutoCalibrator, AutoConfig
    from server.control.policies import PolicyControl
    from server.control.store import FilePolicyStore
    from server.engine.engine import Engine
    from server.metrics import Metrics
    from server.settings import Settings

    settings = Settings(shadow_rate=shadow_rate, window_size=window, intra_op_threads=1, max_queue_delay_ms=0)
    metrics = Metrics()
    store = FilePolicyStore(state_dir)
    engine = Engine([bundle], settings, metrics, {bundle.name: store.startup_policy(bundle.manifest)})
    control = PolicyControl(engine, store)
    auto = AutoCalibrator(engine, control, metrics)
    await engine.start()
    name = bundle.name
    cum = np.asarray(bundle.manifest.cumulative_flops(), float)
    try:
        control.calibrate(name, {"target_agreement": target}, None, False, None, 0.95)
        if auto_on:
            auto.configure(name, AutoConfig(enabled=True, target_agreement=target, confidence=0.95,
                                            min_samples=min_samples))
        rows = []
        for first in range(0, len(x), batch):
            xb = x[first:first + batch]
            early = await engine.infer(name, xb, direct=False)
            full = await engine.infer(name, xb, early_exit=False, direct=False)
            rows.append({"agree": (early.labels == full.labels).astype(float),
                         "fraction": cum[early.exit_stage] / cum[-1],
                         "version": engine.policy(name).version})
            if auto_on and (first // batch) % max(1, step // batch) == 0:
                await asyncio.sleep(0.05)  # let the idle worker run traced rows on (shadow work)
                auto.step(name)
        out = []
        for r in rows:
            for a, f in zip(r["agree"], r["fraction"], strict=True):
                out.append({"agree": float(a), "fraction": float(f), "version": r["version"]})
        return out, [h.source for h in control.history(name)]
    finally:
        await engine.stop()


def rolling(samples: list[dict[str, float]], width: int) -> tuple[np.ndarray, np.ndarray]:
    agree = np.array([s["agree"] for s in samples])
    frac = np.array([s["fraction"] for s in samples])
    kernel = np.ones(width) / width
    return np.convolve(agree, kernel, "valid"), np.convolve(frac, kernel, "valid")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default="demo", help="bundle directory or preset [demo]")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--target", type=float, default=0.97)
    parser.add_argument("--before", type=int, default=3000, help="in-distribution samples first [3000]")
    parser.add_argument("--after", type=int, default=6000, help="shifted samples then [6000]")
    parser.add_argument("--shadow-rate", type=float, default=0.1)
    parser.add_argument("--window", type=int, default=400, help="live window size [400]")
    parser.add_argument("--step", type=int, default=100, help="samples between controller steps [100]")
    parser.add_argument("--min-samples", type=int, default=200, help="auto-calibration min_samples [200]")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--width", type=int, default=500, help="rolling window of the plot, in samples [500]")
    args = parser.parse_args(argv)

    import tempfile

    from load_tests.bench import machine, resolve_bundle
    from server.bundle import load_bundle

    bundle = load_bundle(resolve_bundle(args.bundle))
    x, shift_at = traffic(args.before, args.after)
    runs, histories = {}, {}
    for auto_on in (True, False):
        name = "auto" if auto_on else "fixed"
        with tempfile.TemporaryDirectory(prefix="offramp-drift-") as tmp:
            runs[name], histories[name] = asyncio.run(replay(
                bundle, x, auto_on=auto_on, target=args.target, shadow_rate=args.shadow_rate, window=args.window,
                step=args.step, batch=args.batch, min_samples=args.min_samples, state_dir=Path(tmp)))
    summary: dict[str, Any] = {}
    for name, samples in runs.items():
        agree = np.array([s["agree"] for s in samples])
        frac = np.array([s["fraction"] for s in samples])
        after = agree[shift_at:]
        roll, _ = rolling(samples[shift_at:], args.width)
        back = np.flatnonzero(roll >= args.target - 0.01)
        summary[name] = {
            "agreement_before": float(agree[:shift_at].mean()), "agreement_after": float(after.mean()),
            "agreement_last_2000": float(after[-2000:].mean()), "compute_before": float(frac[:shift_at].mean()),
            "compute_after": float(frac[shift_at:].mean()), "compute_last_2000": float(frac[-2000:].mean()),
            "policy_versions": sorted({int(s["version"]) for s in samples}),
            # the first sample after the shift from which the rolling agreement is back within 1 point
            "recovered_after_samples": int(back[0] + args.width) if len(back) else None,
        }
    report = {"bundle": bundle.name, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "shift_at": shift_at, "runs": summary, "history": histories, "machine": machine()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "drift.json").write_text(json.dumps(report, indent=2) + "\n")
    _plot(runs, shift_at, args, args.out / "drift.png")
    print(json.dumps(summary, indent=2))
    return 0


def _plot(runs: dict[str, list[dict[str, float]]], shift_at: int, args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for name, samples in runs.items():
        agree, frac = rolling(samples, args.width)
        xs = np.arange(len(agree)) + args.width
        top.plot(xs, agree, label=f"auto-recalibration {'on' if name == 'auto' else 'off'}")
        bottom.plot(xs, frac, label=f"auto-recalibration {'on' if name == 'auto' else 'off'}")
    for ax in (top, bottom):
        ax.axvline(shift_at, color="grey", linestyle=":", label="traffic shifts (digits moved 1 px)")
    top.axhline(args.target, color="red", linestyle="--", linewidth=1, label=f"target {args.target:g}")
    top.set_ylabel(f"agreement with full depth\n(rolling {args.width} samples)")
    bottom.set_ylabel("compute fraction")
    bottom.set_xlabel("samples served")
    top.legend(loc="lower left", fontsize=8)
    fig.suptitle(f"Drift and auto-recalibration (shadow_rate {args.shadow_rate}, window {args.window})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
