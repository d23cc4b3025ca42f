"""Export a multi-exit model to a bundle (server/bundle.py): one checked ONNX segment per stage.

Steps, in order; the manifest is written last, so a directory whose export failed half-way never
loads as a bundle:

1. each stage -> `stage_NN.onnx` (TorchScript exporter, dynamic batch axis), plus `reference.onnx`,
   the same model as one graph outputting every exit's logits (the benchmarks' baseline);
2. checks at every batch size of the export config: every output of every segment against
   PyTorch on the same input, then the segments chained from raw input against the full model,
   then the reference; all mismatches are collected and raised together as `ExportCheckError`;
3. FLOPs (torch.utils.flop_counter, per sample) and parameters per stage, its exit head included;
4. per-exit accuracy on the test split, `calibration.npz` on the validation split, a default
   max-prob policy chosen on validation;
5. `manifest.json` through `server.bundle.write_manifest`, then `load_bundle` as the final check.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from model_export.data import HARD_PREPROCESSING, PREPROCESSING, Splits
from model_export.vit import MultiExitViT
from server.bundle import (
    CALIBRATION,
    FORMAT_VERSION,
    HIDDEN,
    HIDDEN_IN,
    LOGITS,
    MANIFEST,
    REFERENCE,
    SIMILARITY,
    AccuracySpec,
    Calibration,
    InputSpec,
    Manifest,
    ReferenceSpec,
    StageSpec,
    TensorSpec,
    load_bundle,
    sha256_file,
    write_manifest,
)
from server.engine.runtime import open_session
from server.policy import ExitPolicy


class ExportCheckError(RuntimeError):
    """Exported ONNX does not reproduce PyTorch. `mismatches` lists every failed check."""

    def __init__(self, mismatches: list[str]):
        self.mismatches = list(mismatches)
        super().__init__(f"{len(mismatches)} export check(s) failed:\n  " + "\n  ".join(mismatches))


@dataclass(frozen=True)
class OnnxExportConfig:
    """How one model family exports (optimum's OnnxConfig, reduced to what offramp needs)."""

    family: str
    input_name: str
    input_dtype: str = "FP32"
    preprocessing: str = ""
    batch_axis: str = "batch"
    opset: int = 17
    atol: float = 1e-4
    check_batch_sizes: tuple[int, ...] = (1, 37)
    policy_criterion: str = "max_prob"
    policy_agreement: float = 0.99
    """Default thresholds keep this agreement with the final exit, per early exit, on validation ..."""
    policy_z: float = 1.0
    """... as a Wilson lower bound at this many standard errors (see `agreement_thresholds`)."""

    def dynamic_axes(self, names: list[str]) -> dict[str, dict[int, str]]:
        return {name: {0: self.batch_axis} for name in names}


EXPORT_CONFIGS: dict[str, OnnxExportConfig] = {
    "vit-digits": OnnxExportConfig(family="vit", input_name="pixels", preprocessing=PREPROCESSING),
    "vit-digits-hard": OnnxExportConfig(family="vit", input_name="pixels", preprocessing=HARD_PREPROCESSING),
}
DATASET_EXPORT_CONFIGS = {"digits": "vit-digits", "digits-hard": "vit-digits-hard"}


def stage_file(i: int) -> str:
    return f"stage_{i:02d}.onnx"


def reference_output(i: int) -> str:
    return f"{LOGITS}_{i:02d}"


class _Segment(nn.Module):
    """Stage i as a module with positional tuple outputs, for the ONNX exporter."""

    def __init__(self, model: MultiExitViT, i: int):
        super().__init__()
        self.model, self.i = model, i

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.model.forward_segment(self.i, x).values())


class _Reference(nn.Module):
    def __init__(self, model: MultiExitViT):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.model(x))


def _onnx_export(
    module: nn.Module,
    example: torch.Tensor,
    path: Path,
    inputs: list[str],
    outputs: list[str],
    cfg: OnnxExportConfig,
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer warnings
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=cfg.dynamic_axes(inputs + outputs),
            opset_version=cfg.opset,
            dynamo=False,
        )


def _compare(what: str, got: np.ndarray, want: np.ndarray, atol: float) -> str | None:
    if got.shape != want.shape:
        return f"{what}: shape {list(got.shape)}, PyTorch gives {list(want.shape)}"
    both_nan = np.isnan(got) & np.isnan(want)
    diff = np.where(both_nan, 0.0, np.abs(got.astype(np.float64) - want.astype(np.float64)))
    worst = float(np.nanmax(diff)) if diff.size else 0.0
    if not np.isfinite(worst) or worst > atol:
        return f"{what}: max abs difference {worst:.3g} > atol {atol:g}"
    return None


def check_export(
    model: MultiExitViT, out: Path, x: np.ndarray, cfg: OnnxExportConfig, *, reference: bool = True
) -> None:
    """Every check of step 2 on inputs `x`; raises `ExportCheckError` listing all mismatches."""
    problems: list[str] = []
    sessions = [open_session(out / stage_file(i)) for i in range(model.num_stages)]
    ref = open_session(out / REFERENCE) if reference else None
    for n in cfg.check_batch_sizes:
        xb = np.resize(x, (n, *x.shape[1:])).astype(np.float32)  # repeats rows when n > len(x)
        with torch.no_grad():
            full = [z.numpy() for z in model(torch.from_numpy(xb))]
            torch_in = torch.from_numpy(xb)
            chained = xb
            for i, sess in enumerate(sessions):
                name = cfg.input_name if i == 0 else HIDDEN_IN
                want = {k: v.numpy() for k, v in model.forward_segment(i, torch_in).items()}
                # The segment alone, on PyTorch's own input.
                got = dict(zip(want, sess.run(list(want), {name: torch_in.numpy()}), strict=True))
                for key in want:
                    problems.append(
                        _compare(f"{stage_file(i)} output {key!r} (batch {n})", got[key], want[key], cfg.atol)
                    )
                # The chain: this segment on the previous ONNX segment's output.
                chain_out = dict(zip(want, sess.run(list(want), {name: chained}), strict=True))
                problems.append(
                    _compare(
                        f"chained {stage_file(i)} exit logits vs full model (batch {n})",
                        chain_out[LOGITS],
                        full[i],
                        cfg.atol,
                    )
                )
                chained = chain_out[HIDDEN]
                torch_in = torch.from_numpy(want[HIDDEN])
        if ref is not None:
            for i, got_ref in enumerate(ref.run(None, {cfg.input_name: xb})):
                problems.append(
                    _compare(f"{REFERENCE} {reference_output(i)} (batch {n})", got_ref, full[i], cfg.atol)
                )
    failures = [p for p in problems if p is not None]
    if failures:
        raise ExportCheckError(failures)


def count_stage(model: MultiExitViT, i: int, example: torch.Tensor) -> tuple[int, int]:
    """(FLOPs per sample, parameters) of stage i, exit head included; `example` has batch 1."""
    seg = _Segment(model, i)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        seg(example)
    params = {id(p): p.numel() for m in model.stage_modules(i) for p in m.parameters()}
    return int(counter.get_total_flops()), int(sum(params.values()))


@torch.no_grad()
def stage_outputs(model: MultiExitViT, x: np.ndarray, batch: int = 256) -> dict[str, np.ndarray]:
    """Every exit's `logits` [S, N, C], `similarity` [S, N] (NaN at stage 0) and `gate` if any."""
    model.eval()
    chunks: list[dict[str, list[np.ndarray]]] = []
    for first in range(0, len(x), batch):
        h = torch.from_numpy(x[first : first + batch])
        per_stage: dict[str, list[np.ndarray]] = {LOGITS: [], SIMILARITY: [], "gate": []}
        for i in range(model.num_stages):
            out = model.forward_segment(i, h)
            h = out[HIDDEN]
            per_stage[LOGITS].append(out[LOGITS].numpy())
            per_stage[SIMILARITY].append(
                out[SIMILARITY].numpy() if i > 0 else np.full(len(h), np.nan, np.float32)
            )
            if "gate" in out:
                per_stage["gate"].append(out["gate"].numpy())
        chunks.append(per_stage)
    result = {k: np.concatenate([np.stack(c[k]) for c in chunks], axis=1) for k in (LOGITS, SIMILARITY)}
    if chunks and chunks[0]["gate"]:
        result["gate"] = np.concatenate([np.stack(c["gate"]) for c in chunks], axis=1)
    return {k: v.astype(np.float32) for k, v in result.items()}


def agreement_thresholds(logits: np.ndarray, target: float, z: float = 1.0) -> list[float | None]:
    """Per early exit, the lowest max-prob threshold at which the samples that would leave there
    agree with the final exit at least `target` of the time; None when no threshold does.

    The agreement is its Wilson lower bound at `z` standard errors, not the raw rate: a few
    hundred validation samples overstate it (on the demo, z = 0 picked thresholds giving 99.3 %
    agreement on validation but 96.9 % on test; z = 1 gives 99.6 % and 98.9 %).
    """
    final = logits[-1].argmax(-1)
    thresholds: list[float | None] = []
    for exit_logits in logits[:-1]:
        e = np.exp(exit_logits - exit_logits.max(-1, keepdims=True))
        conf = (e / e.sum(-1, keepdims=True)).max(-1)
        order = np.argsort(-conf, kind="stable")
        agree = (exit_logits.argmax(-1) == final)[order]
        k = np.arange(1, len(agree) + 1)
        p = np.cumsum(agree) / k
        lower = (p + z * z / (2 * k) - z * np.sqrt(p * (1 - p) / k + z * z / (4 * k * k))) / (1 + z * z / k)
        ok = np.nonzero(lower >= target)[0]
        thresholds.append(float(conf[order][ok[-1]]) if len(ok) else None)
    return thresholds


def default_thresholds(
    calibration: Calibration, flops: list[int], criterion: str, cfg: OnnxExportConfig
) -> list[float | None]:
    """Default per-exit thresholds on validation data for `criterion`.

    max_prob keeps `agreement_thresholds` (Wilson lower bound per exit); the other criteria use
    the server's own calibration (least compute at `cfg.policy_agreement` agreement with the
    final exit), and fall back to every exit disabled (full depth, always correct) when that
    target is out of reach, so a default policy never costs accuracy it did not measure.
    """
    if criterion == "max_prob":
        return agreement_thresholds(calibration.logits, cfg.policy_agreement, cfg.policy_z)
    from server.control.calibrate import calibrate

    try:
        return calibrate(
            calibration, flops, target_agreement=cfg.policy_agreement, criterion=criterion
        ).thresholds
    except ValueError:
        return [None] * (len(flops) - 1)


def _tensor_specs(names: list[str], tensors: dict[str, torch.Tensor]) -> list[TensorSpec]:
    return [TensorSpec(name=n, shape=[-1, *tensors[n].shape[1:]], dtype="FP32") for n in names]


def export_bundle(
    model: MultiExitViT,
    out: Path,
    splits: Splits,
    *,
    name: str,
    cfg: OnnxExportConfig,
    version: str = "1",
    created_by: str = "",
    criterion: str | None = None,
) -> Path:
    """Export, check, measure and calibrate `model` into the bundle directory `out`.

    `criterion` names the default policy's exit criterion (default: the config's, max_prob);
    its thresholds are chosen on the validation split (`default_thresholds`).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # the directory is not a bundle until step 5
    model.eval()
    start = time.perf_counter()
    example = torch.from_numpy(splits.val.x[:2])
    one = example[:1]
    stages: list[StageSpec] = []
    with torch.no_grad():
        h, h1 = example, one
        for i in range(model.num_stages):
            in_name = cfg.input_name if i == 0 else HIDDEN_IN
            outs = model.forward_segment(i, h)
            names = list(outs)
            _onnx_export(_Segment(model, i), h, out / stage_file(i), [in_name], names, cfg)
            flops, params = count_stage(model, i, h1)
            in_spec = TensorSpec(
                name=in_name, shape=[-1, *h.shape[1:]], dtype=cfg.input_dtype if i == 0 else "FP32"
            )
            stages.append(
                StageSpec(
                    index=i,
                    file=stage_file(i),
                    sha256=sha256_file(out / stage_file(i)),
                    blocks=model.stage_blocks[i],
                    inputs=[in_spec],
                    outputs=_tensor_specs(names, outs),
                    flops=flops,
                    params=params,
                    head=model.cfg.head,
                )
            )
            h, h1 = outs[HIDDEN], model.forward_segment(i, h1)[HIDDEN]
        ref_outputs = [reference_output(i) for i in range(model.num_stages)]
        _onnx_export(_Reference(model), example, out / REFERENCE, [cfg.input_name], ref_outputs, cfg)
    check_export(model, out, splits.test.x, cfg)

    test = stage_outputs(model, splits.test.x)
    accuracy = [float((z.argmax(-1) == splits.test.y).mean()) for z in test[LOGITS]]
    val = stage_outputs(model, splits.val.x)
    calibration = Calibration(
        labels=splits.val.y, logits=val[LOGITS], similarity=val[SIMILARITY], gate=val.get("gate")
    )
    calibration.save(out / CALIBRATION)
    criterion = criterion or cfg.policy_criterion
    thresholds = default_thresholds(calibration, [s.flops for s in stages], criterion, cfg)

    manifest = Manifest(
        format_version=FORMAT_VERSION,
        name=name,
        version=version,
        labels=splits.labels,
        input=InputSpec(
            name=cfg.input_name,
            shape=[-1, *example.shape[1:]],
            dtype=cfg.input_dtype,
            preprocessing=cfg.preprocessing,
        ),
        stages=stages,
        default_policy=ExitPolicy(criterion, tuple(thresholds)),
        accuracy=AccuracySpec(split="test", samples=len(splits.test), per_stage=accuracy),
        calibration=CALIBRATION,
        reference=ReferenceSpec(file=REFERENCE, sha256=sha256_file(out / REFERENCE), outputs=ref_outputs),
        created_by=created_by
        or f"offramp model_export (torch {torch.__version__}, {time.perf_counter() - start:.1f} s)",
    )
    write_manifest(out, manifest)
    load_bundle(out)
    return out


def exit_shares(logits: np.ndarray, thresholds: list[float | None]) -> tuple[list[float], float]:
    """Under a max-prob policy: the share of samples answered by each stage, and the agreement of
    those answers with the final exit (for reports; the server's calibration does the full job)."""
    n = logits.shape[1]
    final = logits[-1].argmax(-1)
    remaining = np.ones(n, bool)
    shares, agree = [], 0
    for s, z in enumerate(logits):
        if s == len(logits) - 1:
            leave = remaining
        else:
            e = np.exp(z - z.max(-1, keepdims=True))
            conf = (e / e.sum(-1, keepdims=True)).max(-1)
            t = thresholds[s]
            leave = remaining & (conf >= t) if t is not None else np.zeros(n, bool)
        shares.append(float(leave.sum() / n))
        agree += int((z.argmax(-1)[leave] == final[leave]).sum())
        remaining &= ~leave
    return shares, agree / max(1, n)
