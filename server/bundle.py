"""The bundle: the contract between `model_export` (writes it) and `server` (reads it).

A bundle is a directory holding `manifest.json`, one ONNX segment per stage (`stage_00.onnx` ...),
`calibration.npz` and optionally `reference.onnx`, the same model as one monolithic graph (used
by benchmarks as the compute reference). The schema lives here because the runtime owns the
format; `model_export` imports it, never the reverse.

Tensor names are fixed by role so that every head kind serves through the same engine:

- stage 0 takes the model input (`manifest.input.name`); stage k > 0 takes `hidden_in`;
- every stage outputs `hidden` (its hidden state, [N, ...]) and `logits` ([N, C]);
- optionally `gate` ([N], a learned exit probability in [0, 1]) and `similarity` ([N], MuE's cosine
  similarity of the hidden state before and after the stage; older bundles have it for k > 0 only).

`calibration.npz` holds `labels` (int64 [N]), `logits` (float32 [S, N, C]) and, when the
stages have them, `gate` and `similarity` (float32 [S, N]; similarity is NaN where a stage has none), all on
the held-out validation split.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer, field_validator, model_validator

from server.errors import BundleError, validation_problems
from server.exits import GATE, SIMILARITY, lookup
from server.files import atomic_write
from server.policy import ExitPolicy
from server.settings import MODEL_NAME_PATTERN

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CALIBRATION = "calibration.npz"
REFERENCE = "reference.onnx"
TOKENIZER = "tokenizer.json"

HIDDEN_IN = "hidden_in"
HIDDEN = "hidden"
LOGITS = "logits"
OPTIONAL_OUTPUTS = (GATE, SIMILARITY)

Dtype = Literal["FP32", "FP16", "INT64", "INT32", "UINT8", "BOOL"]

# V2 datatype -> numpy dtype, and the ONNX TensorProto elem_type of each.
NUMPY_DTYPES: dict[str, np.dtype] = {
    "FP32": np.dtype(np.float32),
    "FP16": np.dtype(np.float16),
    "INT64": np.dtype(np.int64),
    "INT32": np.dtype(np.int32),
    "UINT8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
ONNX_ELEM_TYPES: dict[str, int] = {"FP32": 1, "UINT8": 2, "INT32": 6, "INT64": 7, "BOOL": 9, "FP16": 10}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    name: str
    shape: list[int] = Field(description="-1 marks a dynamic axis (always the batch axis, first).")
    dtype: Dtype = "FP32"


class InputSpec(TensorSpec):
    preprocessing: str = Field("", description="What the client sends and what stage 0 does with it.")


class StageSpec(_Strict):
    index: int = Field(ge=0)
    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    blocks: list[int] = Field(description="Backbone blocks this stage runs (its exit head follows the last).")
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    flops: int = Field(ge=0, description="FLOPs per sample of this stage, its exit head included.")
    params: int = Field(ge=0, description="Parameters of this stage, its exit head included.")
    head: str = Field("linear", description="Exit head kind (informational).")
    flops_curve: list[float] | None = Field(
        None, min_length=3, max_length=3,
        description="Text models: FLOPs per sample as c0 + c1 T + c2 T^2 in the row's token count T "
        "(`flops` is this at the validation split's mean length).")

    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def has_output(self, name: str) -> bool:
        return name in self.output_names()


class AccuracySpec(_Strict):
    split: str = "test"
    samples: int = Field(ge=0)
    per_stage: list[float] = Field(description="Accuracy of every exit, the final stage last.")


class ReferenceSpec(_Strict):
    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    outputs: list[str] = Field(description="Logits of every exit, in stage order.")


class TextSpec(_Strict):
    """Text models: the tokenizer the bundle ships and how the server applies it (server/text.py)."""

    file: str = TOKENIZER
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    max_length: int = Field(ge=2, description="Token rows are truncated to this many tokens, specials included.")
    input: str = Field("text", description="The V2 BYTES input carrying the sentences.")


class ConformalSpec(_Strict):
    """Conformal prediction sets (server/conformal.py): the coverage each exit's sets promise."""

    coverage: float = Field(gt=0, lt=1, description="1 - alpha: the sets hold the true label this often.")
    min_exit_samples: int = Field(20, ge=1, description="At most this many calibration samples exiting at a "
                                  "stage: that stage's quantile comes from all samples' scores there.")


class Manifest(_Strict):
    format_version: int
    name: str = Field(pattern=MODEL_NAME_PATTERN)
    version: str = "1"
    task: Literal["classification"] = "classification"
    labels: list[str]
    input: InputSpec
    extra_inputs: list[TensorSpec] = Field(
        default_factory=list,
        description="Model inputs after `input` (a text model's attention_mask): stage 0 takes them beside "
        "`input`, every later stage beside `hidden_in`, unchanged.")
    text: TextSpec | None = None
    stages: list[StageSpec] = Field(min_length=1)
    default_policy: ExitPolicy = Field(description="One threshold per early exit; stored without a version.")
    accuracy: AccuracySpec
    calibration: str | None = CALIBRATION
    reference: ReferenceSpec | None = None
    conformal: ConformalSpec | None = None
    created_by: str = ""

    @field_validator("default_policy", mode="after")
    @classmethod
    def _known_criterion(cls, policy: ExitPolicy) -> ExitPolicy:
        lookup(policy.criterion)  # ValueError naming the known criteria
        return policy

    @field_serializer("default_policy")
    def _policy_content(self, policy: ExitPolicy) -> dict[str, Any]:
        return {"criterion": policy.criterion, "thresholds": list(policy.thresholds)}

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        problems: list[str] = []
        for i, stage in enumerate(self.stages):
            if stage.index != i:
                problems.append(f"stage {i} has index {stage.index}")
            want_in = [self.input.name if i == 0 else HIDDEN_IN, *(t.name for t in self.extra_inputs)]
            if [t.name for t in stage.inputs] != want_in:
                got = [t.name for t in stage.inputs]
                problems.append(f"stage {i} inputs must be {want_in}, got {got}")
            names = stage.output_names()
            if names[:2] != [HIDDEN, LOGITS] or any(n not in OPTIONAL_OUTPUTS for n in names[2:]):
                problems.append(
                    f"stage {i} outputs must be ['hidden', 'logits'] + optional {OPTIONAL_OUTPUTS}, got {names}"
                )
            logits = next((t for t in stage.outputs if t.name == LOGITS), None)
            if logits is not None and logits.shape[-1] != len(self.labels):
                problems.append(
                    f"stage {i} logits have {logits.shape[-1]} classes, manifest has {len(self.labels)} labels"
                )
        if self.conformal is not None and self.calibration is None:
            problems.append("conformal prediction sets need the calibration data (calibration is null)")
        if len(self.default_policy.thresholds) != len(self.stages) - 1:
            problems.append(
                f"default_policy has {len(self.default_policy.thresholds)} thresholds, "
                f"expected {len(self.stages) - 1} (one per early exit)"
            )
        if self.text is not None and (self.input.name != "input_ids"
                                      or [t.name for t in self.extra_inputs] != ["attention_mask"]):
            problems.append("a text model takes 'input_ids' (input) and 'attention_mask' (extra_inputs), got "
                            f"{[self.input.name, *(t.name for t in self.extra_inputs)]}")
        if self.text is None and self.extra_inputs:
            problems.append("extra_inputs (an attention mask) are served for text models only (set text)")
        if len(self.accuracy.per_stage) != len(self.stages):
            problems.append(
                f"accuracy.per_stage has {len(self.accuracy.per_stage)} entries for {len(self.stages)} stages"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def model_inputs(self) -> list[TensorSpec]:
        return [self.input, *self.extra_inputs]

    def cumulative_flops(self) -> list[int]:
        out, total = [], 0
        for stage in self.stages:
            total += stage.flops
            out.append(total)
        return out


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path, manifest: Manifest) -> Path:
    return atomic_write(Path(directory) / MANIFEST, (manifest.model_dump_json(indent=2) + "\n").encode())


class Calibration(BaseModel):
    """Every exit's outputs on held-out data, to recompute thresholds at any time."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    labels: np.ndarray  # int64 [N]
    logits: np.ndarray  # float32 [S, N, C]
    gate: np.ndarray | None = None  # float32 [S, N]
    similarity: np.ndarray | None = None  # float32 [S, N], NaN where a stage has none (stage 0 of older bundles)

    @classmethod
    def load(cls, path: Path) -> Calibration:
        try:
            with np.load(path) as data:
                arrays = {k: data[k] for k in data.files}
        except Exception as err:  # np.load raises many kinds for a damaged file
            raise BundleError(f"{path.name}: cannot read calibration data ({err})") from err
        missing = {"labels", "logits"} - arrays.keys()
        if missing:
            raise BundleError(f"{path.name}: missing arrays {sorted(missing)}")
        calib = cls(
            labels=arrays["labels"].astype(np.int64),
            logits=arrays["logits"].astype(np.float32),
            gate=arrays["gate"].astype(np.float32) if "gate" in arrays else None,
            similarity=arrays["similarity"].astype(np.float32) if "similarity" in arrays else None,
        )
        if calib.logits.ndim != 3 or calib.logits.shape[1] != calib.labels.shape[0]:
            raise BundleError(
                f"{path.name}: logits must be [stages, samples, classes] matching labels, "
                f"got {calib.logits.shape} for {calib.labels.shape[0]} labels"
            )
        return calib

    def save(self, path: Path) -> None:
        arrays = {"labels": self.labels, "logits": self.logits}
        if self.gate is not None:
            arrays["gate"] = self.gate
        if self.similarity is not None:
            arrays["similarity"] = self.similarity
        np.savez_compressed(path, **arrays)  # type: ignore[arg-type]


class Bundle:
    """A verified bundle on disk. Build it with `load_bundle`."""

    def __init__(self, root: Path, manifest: Manifest):
        self.root = Path(root)
        self.manifest = manifest
        self._calibration: Calibration | None = None

    @property
    def name(self) -> str:
        return self.manifest.name

    def stage_path(self, index: int) -> Path:
        return self.root / self.manifest.stages[index].file

    def reference_path(self) -> Path | None:
        ref = self.manifest.reference
        return None if ref is None else self.root / ref.file

    def calibration(self) -> Calibration:
        """The calibration data, read once (verified bundles do not change on disk while served)."""
        if self.manifest.calibration is None:
            raise BundleError(f"{self.root / MANIFEST}: this bundle has no calibration data")
        if self._calibration is None:
            self._calibration = Calibration.load(self.root / self.manifest.calibration)
        return self._calibration

    def __repr__(self) -> str:
        return f"Bundle({self.name!r}, {self.manifest.num_stages} stages, {self.root})"


def _check_onnx_io(path: Path, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> list[str]:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf decode errors have no common base
        return [f"{path.name}: not a readable ONNX model ({type(err).__name__}: {err})"]
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    actual_in = {v.name: v for v in graph.input if v.name not in initializers}
    actual_out = {v.name: v for v in graph.output}
    problems = []
    for kind, want, have in (("input", inputs, actual_in), ("output", outputs, actual_out)):
        want_names = [t.name for t in want]
        if sorted(want_names) != sorted(have):
            problems.append(f"{path.name}: {kind}s are {sorted(have)}, manifest says {sorted(want_names)}")
            continue
        for spec in want:
            ttype = have[spec.name].type.tensor_type
            if ttype.elem_type != ONNX_ELEM_TYPES[spec.dtype]:
                problems.append(
                    f"{path.name}: {kind} {spec.name!r} has ONNX elem_type {ttype.elem_type}, "
                    f"manifest says {spec.dtype}"
                )
            rank = len(ttype.shape.dim)
            if rank != len(spec.shape):
                problems.append(f"{path.name}: {kind} {spec.name!r} has rank {rank}, manifest shape is {spec.shape}")
    return problems


def load_bundles(paths: list[Path], model_name: str | None = None) -> list[Bundle]:
    """Load and verify every bundle; `model_name` renames the one bundle (refused with several)."""
    if model_name is not None and len(paths) != 1:
        raise BundleError(f"model_name {model_name!r} names one bundle, and {len(paths)} are configured")
    return [load_bundle(path, name=model_name) for path in paths]


def load_bundle(root: str | Path, *, verify_hashes: bool = True, name: str | None = None) -> Bundle:
    """Read and verify a bundle: format version, schema, files present, sha256, ONNX inputs/outputs.
    `name` serves it under another model name than its manifest's (KServe names models itself).

    Raises `BundleError` naming the file and everything wrong with it.
    """
    root = Path(root)
    manifest_path = root / MANIFEST
    if not root.is_dir():
        raise BundleError(f"{root}: bundle directory does not exist")
    if not manifest_path.is_file():
        raise BundleError(f"{manifest_path}: manifest is missing")
    try:
        raw = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{manifest_path}: malformed JSON ({err})") from err
    if not isinstance(raw, dict):
        raise BundleError(f"{manifest_path}: malformed manifest (expected a JSON object)")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{manifest_path}: format_version {version!r} is not supported (this server reads {FORMAT_VERSION})"
        )
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as err:
        raise BundleError(f"{manifest_path}: malformed manifest: {validation_problems(err, 'manifest')}") from err

    if name is not None:
        if not re.fullmatch(MODEL_NAME_PATTERN, name):
            raise BundleError(f"{root}: {name!r} is not a valid model name (letters, digits, '_', '.', '-')")
        manifest = manifest.model_copy(update={"name": name})

    problems: list[str] = []
    files: list[tuple[str, str, list[TensorSpec] | None, list[TensorSpec] | None]] = [
        (s.file, s.sha256, s.inputs, s.outputs) for s in manifest.stages
    ]
    if manifest.reference is not None:
        files.append((manifest.reference.file, manifest.reference.sha256, None, None))
    if manifest.text is not None:
        files.append((manifest.text.file, manifest.text.sha256, None, None))
    for file, sha, inputs, outputs in files:
        path = root / file
        if not path.is_file():
            problems.append(f"{path}: file is missing")
            continue
        if verify_hashes and sha256_file(path) != sha:
            problems.append(f"{path}: sha256 does not match the manifest (file changed or corrupt)")
            continue
        if inputs is not None and outputs is not None:
            problems.extend(_check_onnx_io(path, inputs, outputs))
    if manifest.calibration is not None and not (root / manifest.calibration).is_file():
        problems.append(f"{root / manifest.calibration}: calibration file is missing")
    if problems:
        raise BundleError("bundle " + str(root) + " is invalid:\n  " + "\n  ".join(problems))
    return Bundle(root, manifest)

