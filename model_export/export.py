"""Export a multi-exit model to a bundle (server/bundle.py): one checked ONNX segment per stage.

Steps, in order; the manifest is written last, so a directory whose export failed half-way never
loads as a bundle:

Any model implementing `model_export.protocol.MultiExitModel` exports: the digits ViT, a Hugging
Face encoder with exits (model_export/text.py), a user's own model.

1. each stage -> `stage_NN.onnx` (TorchScript exporter, dynamic batch axis, and the sequence axis
   for text), plus `reference.onnx`, the same model as one graph outputting every exit's logits
   (the benchmarks' baseline);
2. checks at every (batch, length) pair of the export config: every output of every segment against
   PyTorch on the same input, then the segments chained from raw input against the full model,
   then the reference; for text, batches are padded beyond their longest row and every row's
   logits must equal that row run alone. All mismatches are collected and raised together as
   `ExportCheckError`;
3. FLOPs (torch.utils.flop_counter, per sample) and parameters per stage, its exit head included;
   for text, FLOPs as a quadratic in the row's token count (`StageSpec.flops_curve`), `flops` at
   the mean length of the validation split;
4. per-exit accuracy on the test split, `calibration.npz` on the validation split, a default
   policy certified on validation (`default_thresholds`);
5. `manifest.json` through `server.bundle.write_manifest`, then `load_bundle` as the final check.
"""

from __future__ import annotations

import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from model_export.data import HARD_PREPROCESSING, PREPROCESSING
from model_export.protocol import MultiExitModel, check_model, next_stage_inputs
from model_export.text import SENTIMENT_PREPROCESSING
from model_export.vision import mnist_preprocessing
from server.bundle import (
    CALIBRATION,
    FORMAT_VERSION,
    HIDDEN,
    LOGITS,
    MANIFEST,
    REFERENCE,
    SIMILARITY,
    TOKENIZER,
    AccuracySpec,
    Calibration,
    ConformalSpec,
    InputSpec,
    Manifest,
    ReferenceSpec,
    StageSpec,
    TensorSpec,
    TextSpec,
    load_bundle,
    sha256_file,
    write_manifest,
)
from server.engine.runtime import open_session
from server.policy import ExitPolicy
from server.text import ATTENTION_MASK, INPUT_IDS


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
    opset: int = 17
    atol: float = 1e-4
    check_batch_sizes: tuple[int, ...] = (1, 37)
    extra_padding: int = 0
    """Text: check batches padded this many columns beyond their longest row."""
    policy_criterion: str = "max_prob"
    policy_agreement: float = 0.99
    """Default thresholds keep this agreement with the final exit on new data ..."""
    policy_confidence: float = 0.95
    """... with this probability (certified on the validation split, `default_thresholds`)."""



EXPORT_CONFIGS: dict[str, OnnxExportConfig] = {
    # The digits' 270 validation samples cannot certify 99 % at 95 % (that needs >= 368 test samples
    # without a single disagreement): the digits bundles promise 97 %.
    "vit-digits": OnnxExportConfig(family="vit", input_name="pixels", preprocessing=PREPROCESSING,
                                   policy_agreement=0.97),
    "vit-digits-hard": OnnxExportConfig(family="vit", input_name="pixels", preprocessing=HARD_PREPROCESSING,
                                        policy_agreement=0.97),
    "encoder-text": OnnxExportConfig(family="encoder", input_name=INPUT_IDS, input_dtype="INT64",
                                     preprocessing=SENTIMENT_PREPROCESSING, check_batch_sizes=(1, 5, 37),
                                     extra_padding=3),
}
EXPORT_CONFIGS["dinov2-mnist"] = OnnxExportConfig(family="dinov2", input_name="pixels",
                                                  preprocessing=mnist_preprocessing())
DATASET_EXPORT_CONFIGS = {"digits": "vit-digits", "digits-hard": "vit-digits-hard", "rotten-tomatoes": "encoder-text",
                          "mnist": "dinov2-mnist"}


def stage_file(i: int) -> str:
    return f"stage_{i:02d}.onnx"


def reference_output(i: int) -> str:
    return f"{LOGITS}_{i:02d}"


class _Segment(nn.Module):
    """Stage i as a module with positional inputs and tuple outputs, for the ONNX exporter."""

    def __init__(self, model: MultiExitModel, i: int):
        super().__init__()
        self.model, self.i = model, i
        self.names = model.stage_input_names(i)

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.model.segment(self.i, dict(zip(self.names, args, strict=True))).values())


class _Reference(nn.Module):
    def __init__(self, model: MultiExitModel):
        super().__init__()
        self.model = model
        self.names = [t.name for t in model.input_specs()]

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.model.exits(dict(zip(self.names, args, strict=True))))


def _onnx_export(model: MultiExitModel, module: nn.Module, example: dict[str, torch.Tensor], path: Path,
                 outputs: list[str], cfg: OnnxExportConfig) -> None:
    inputs = list(example)
    module.eval()  # a new wrapper is in training mode, and the exporter restores the wrapper's mode
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer warnings
        torch.onnx.export(
            module,
            tuple(example.values()),
            str(path),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes={name: model.dynamic_axes(name) for name in inputs + outputs},
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


def _torch(inputs: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in inputs.items()}


def _padded(inputs: dict[str, np.ndarray], extra: int) -> dict[str, np.ndarray]:
    """Text inputs with `extra` more padding columns (ids 0, mask 0): rows padded beyond need."""
    if extra <= 0 or ATTENTION_MASK not in inputs:
        return inputs
    return {k: np.pad(v, [(0, 0), (0, extra)]) for k, v in inputs.items()}


def check_batches(data: Any, cfg: OnnxExportConfig) -> list[dict[str, np.ndarray]]:
    """The check inputs: for every batch size, that many rows of `data` (repeated when short);
    text rows of mixed lengths, padded `cfg.extra_padding` columns beyond the longest."""
    out = []
    for n in cfg.check_batch_sizes:
        rows = np.resize(np.arange(len(data)), n)
        out.append(_padded(data.features(rows), cfg.extra_padding))
    return out


def check_export(model: MultiExitModel, out: Path, data: Any, cfg: OnnxExportConfig, *,
                 reference: bool = True) -> None:
    """Every check of step 2 on rows of `data`; raises `ExportCheckError` listing all mismatches."""
    problems: list[str | None] = []
    sessions = [open_session(out / stage_file(i)) for i in range(model.num_stages)]
    ref = open_session(out / REFERENCE) if reference else None
    for xb in check_batches(data, cfg):
        first = next(iter(xb.values()))
        shape = f"batch {len(first)}" + (f", length {first.shape[1]}" if ATTENTION_MASK in xb else "")
        with torch.no_grad():
            full = [z.numpy() for z in model.exits(_torch(xb))]
            torch_in: dict[str, Any] = _torch(xb)
            chained: dict[str, Any] = dict(xb)
            for i, sess in enumerate(sessions):
                want = {k: v.numpy() for k, v in model.segment(i, torch_in).items()}
                # The segment alone, on PyTorch's own input.
                feed = {k: v.numpy() for k, v in torch_in.items()}
                got = dict(zip(want, sess.run(list(want), feed), strict=True))
                problems += [_compare(f"{stage_file(i)} output {key!r} ({shape})", got[key], want[key], cfg.atol)
                             for key in want]
                # The chain: this segment on the previous ONNX segment's output.
                chain_out = dict(zip(want, sess.run(list(want), chained), strict=True))
                problems.append(_compare(f"chained {stage_file(i)} exit logits vs full model ({shape})",
                                         chain_out[LOGITS], full[i], cfg.atol))
                if i + 1 < model.num_stages:
                    chained = next_stage_inputs(model, i, chained, chain_out[HIDDEN])
                    torch_in = next_stage_inputs(model, i, torch_in, torch.from_numpy(want[HIDDEN]))
        if ref is not None:
            for i, got_ref in enumerate(ref.run(None, xb)):
                problems.append(_compare(f"{REFERENCE} {reference_output(i)} ({shape})", got_ref, full[i], cfg.atol))
        if ATTENTION_MASK in xb:  # padding must not change a row's answer
            problems += _alone_checks(model, xb, full, cfg.atol, shape)
    failures = [p for p in problems if p is not None]
    if failures:
        raise ExportCheckError(failures)


def _alone_checks(model: MultiExitModel, xb: dict[str, np.ndarray], full: list[np.ndarray], atol: float,
                  shape: str) -> list[str | None]:
    problems: list[str | None] = []
    lengths = xb[ATTENTION_MASK].sum(axis=1)
    for row in np.unique(np.minimum(len(lengths) - 1, [0, int(np.argmin(lengths)), int(np.argmax(lengths))])):
        n = int(lengths[row])
        alone = {k: v[row:row + 1, :n] for k, v in xb.items()}
        with torch.no_grad():
            mine = [z.numpy() for z in model.exits(_torch(alone))]
        for i, (a, b) in enumerate(zip(mine, full, strict=True)):
            problems.append(_compare(f"row {row} ({n} tokens) alone vs in a padded batch ({shape}), exit {i}",
                                     a[0], b[row], atol))
    return problems


def _count(model: MultiExitModel, i: int, inputs: dict[str, torch.Tensor]) -> tuple[int, dict[str, torch.Tensor]]:
    """Stage i's FLOPs on `inputs`, and its outputs (one run for both)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        out = model.segment(i, inputs)
    return int(counter.get_total_flops()), out


def stage_params(model: MultiExitModel, i: int) -> int:
    """Parameters of stage i, exit head included (shared ones counted once)."""
    return int(sum({id(p): p.numel() for m in model.stage_modules(i) for p in m.parameters()}.values()))


def count_stage(model: MultiExitModel, i: int, example: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(FLOPs per sample, parameters) of stage i, exit head included; `example` has batch 1."""
    return _count(model, i, example)[0], stage_params(model, i)


def stage_flops(model: MultiExitModel, data: Any) -> list[int]:
    """FLOPs per sample of every stage on the first row of `data` (its `features`), the stages chained."""
    h: dict[str, Any] = _torch(data.features(slice(0, 1)))
    flops = []
    for i in range(model.num_stages):
        count, out = _count(model, i, h)
        flops.append(count)
        if i + 1 < model.num_stages:
            h = next_stage_inputs(model, i, h, out[HIDDEN])
    return flops


def flops_curve(model: MultiExitModel, i: int, example: dict[str, torch.Tensor],
                lengths: tuple[int, int, int] = (8, 16, 32)) -> list[float]:
    """Stage i's FLOPs per sample as c0 + c1 T + c2 T^2 in the row's token count T, fitted exactly
    at three lengths (dense layers are linear in T, attention quadratic, the head constant)."""
    counts = []
    for t in lengths:
        feed = {k: v[:1, :1].expand(1, t, *v.shape[2:]).contiguous() if v.dim() >= 2 else v
                for k, v in example.items()}
        counts.append(_count(model, i, feed)[0])
    coeffs = np.linalg.solve(np.vander(np.asarray(lengths, np.float64), 3, increasing=True), np.asarray(counts, float))
    return [float(round(c, 3)) for c in coeffs]


@torch.no_grad()
def stage_outputs(model: MultiExitModel, data: Any, batch: int = 256) -> dict[str, np.ndarray]:
    """Every exit's `logits` [S, N, C], `similarity` [S, N] (NaN at stage 0) and `gate` if any."""
    model.eval()  # type: ignore[attr-defined]
    chunks: list[dict[str, list[np.ndarray]]] = []
    for first in range(0, len(data), batch):
        inputs: dict[str, Any] = _torch(data.features(slice(first, first + batch)))
        per_stage: dict[str, list[np.ndarray]] = {LOGITS: [], SIMILARITY: [], "gate": []}
        for i in range(model.num_stages):
            out = model.segment(i, inputs)
            n = len(out[LOGITS])
            per_stage[LOGITS].append(out[LOGITS].numpy())
            per_stage[SIMILARITY].append(out[SIMILARITY].numpy() if SIMILARITY in out
                                         else np.full(n, np.nan, np.float32))
            if "gate" in out:
                per_stage["gate"].append(out["gate"].numpy())
            if i + 1 < model.num_stages:
                inputs = next_stage_inputs(model, i, inputs, out[HIDDEN])
        chunks.append(per_stage)
    result = {k: np.concatenate([np.stack(c[k]) for c in chunks], axis=1) for k in (LOGITS, SIMILARITY)}
    if chunks and chunks[0]["gate"]:
        result["gate"] = np.concatenate([np.stack(c["gate"]) for c in chunks], axis=1)
    if np.isnan(result[SIMILARITY]).all():  # a model without the similarity output
        del result[SIMILARITY]
    return {k: v.astype(np.float32) for k, v in result.items()}


def default_thresholds(
    calibration: Calibration, flops: list[int], criterion: str, cfg: OnnxExportConfig
) -> list[float | None]:
    """Default per-exit thresholds for `criterion`, certified on the validation split: agreement with
    the final exit >= `cfg.policy_agreement` with probability >= `cfg.policy_confidence`, by the
    server's own Learn-then-Test calibration (server/control/guarantee.py), the same method for
    every criterion. When nothing can be certified (too few validation samples for the target)
    every exit is disabled: full depth, which always agrees with itself."""
    from server.control.guarantee import guaranteed

    return guaranteed(calibration, flops, target_agreement=cfg.policy_agreement,
                      confidence=cfg.policy_confidence, criterion=criterion).thresholds


def _tensor_specs(names: list[str], tensors: dict[str, torch.Tensor], model: MultiExitModel) -> list[TensorSpec]:
    """Specs of named tensors: their dtype, -1 on the model's dynamic axes."""
    specs = []
    for n in names:
        t, dynamic = tensors[n], model.dynamic_axes(n)
        dtype = "INT64" if t.dtype == torch.int64 else "FP32"
        specs.append(TensorSpec(name=n, shape=[-1 if a in dynamic else d for a, d in enumerate(t.shape)], dtype=dtype))
    return specs


def export_bundle(
    model: MultiExitModel,
    out: Path,
    splits: Any,
    *,
    name: str,
    cfg: OnnxExportConfig,
    version: str = "1",
    created_by: str = "",
    criterion: str | None = None,
    tokenizer: Path | None = None,
    conformal_coverage: float | None = None,
) -> Path:
    """Export, check, measure and calibrate `model` into the bundle directory `out`.

    `splits` has `train`, `val`, `test` (each with `features(idx)` and `y`) and `labels`.
    `criterion` names the default policy's exit criterion (default: the config's, max_prob);
    its thresholds are chosen on the validation split (`default_thresholds`). `tokenizer` (text
    models): the `tokenizer.json` the bundle ships, so the server tokenizes exactly as training did.
    `conformal_coverage`: the bundle serves conformal prediction sets promising it (server/conformal.py).
    """
    check_model(model)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # the directory is not a bundle until step 5
    model.eval()  # type: ignore[attr-defined]
    start = time.perf_counter()
    model_inputs = model.input_specs()
    text = ATTENTION_MASK in [t.name for t in model_inputs]
    if text and tokenizer is None:
        raise ValueError("a text model's bundle ships its tokenizer: pass tokenizer=PATH (the tokenizer.json the "
                         "training data was tokenized with)")
    example: dict[str, Any] = _torch(splits.val.features(slice(0, 2)))
    one: dict[str, Any] = {k: v[:1] for k, v in example.items()}
    if text:  # batch-1 FLOPs at the first row's real length
        width = int(one[ATTENTION_MASK].sum())
        one = {k: v[:, :width] for k, v in one.items()}
    mean_length = float(splits.val.lengths.mean()) if text else None
    stages: list[StageSpec] = []
    with torch.no_grad():
        h, h1 = example, one
        for i in range(model.num_stages):
            outs = model.segment(i, h)
            names = list(outs)
            _onnx_export(model, _Segment(model, i), h, out / stage_file(i), names, cfg)
            flops, outs1 = _count(model, i, h1)
            params = stage_params(model, i)
            curve = None
            if mean_length is not None:
                curve = flops_curve(model, i, h1)
                flops = int(round(curve[0] + curve[1] * mean_length + curve[2] * mean_length**2))
            in_specs = _tensor_specs(list(h), h, model)
            stages.append(StageSpec(
                index=i, file=stage_file(i), sha256=sha256_file(out / stage_file(i)), blocks=model.stage_blocks[i],
                inputs=in_specs, outputs=_tensor_specs(names, outs, model), flops=flops, params=params,
                head=model.head_kind, flops_curve=curve,
            ))
            if i + 1 < model.num_stages:
                h1 = next_stage_inputs(model, i, h1, outs1[HIDDEN])
                h = next_stage_inputs(model, i, h, outs[HIDDEN])
        ref_outputs = [reference_output(i) for i in range(model.num_stages)]
        _onnx_export(model, _Reference(model), example, out / REFERENCE, ref_outputs, cfg)
    check_export(model, out, splits.test, cfg)

    test = stage_outputs(model, splits.test)
    accuracy = [float((z.argmax(-1) == splits.test.y).mean()) for z in test[LOGITS]]
    val = stage_outputs(model, splits.val)
    calibration = Calibration(
        labels=splits.val.y, logits=val[LOGITS], similarity=val.get(SIMILARITY), gate=val.get("gate")
    )
    calibration.save(out / CALIBRATION)
    criterion = criterion or cfg.policy_criterion
    thresholds = default_thresholds(calibration, [s.flops for s in stages], criterion, cfg)

    text_spec = None
    if tokenizer is not None:
        shutil.copyfile(tokenizer, out / TOKENIZER)
        max_length = int(getattr(getattr(model, "cfg", None), "max_length", 0) or splits.val.ids.shape[1])
        text_spec = TextSpec(file=TOKENIZER, sha256=sha256_file(out / TOKENIZER), max_length=max_length)
    first, *extra = _tensor_specs([t.name for t in model_inputs], example, model)
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        name=name,
        version=version,
        labels=splits.labels,
        input=InputSpec(name=first.name, shape=first.shape, dtype=first.dtype, preprocessing=cfg.preprocessing),
        extra_inputs=extra,
        text=text_spec,
        stages=stages,
        default_policy=ExitPolicy(criterion, tuple(thresholds)),
        accuracy=AccuracySpec(split="test", samples=len(splits.test), per_stage=accuracy),
        calibration=CALIBRATION,
        reference=ReferenceSpec(file=REFERENCE, sha256=sha256_file(out / REFERENCE), outputs=ref_outputs),
        conformal=None if conformal_coverage is None else ConformalSpec(coverage=conformal_coverage),
        created_by=created_by
        or f"offramp model_export (torch {torch.__version__}, {time.perf_counter() - start:.1f} s)",
    )
    write_manifest(out, manifest)
    load_bundle(out)
    return out
