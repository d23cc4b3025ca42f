"""JSON Schemas of KServe's custom resources, for checking docker/kserve/ offline.

No KServe CRD ships in a package, and vendored copies would drift from a version; the `kserve`
wheel on PyPI (installed `--no-deps` by `make test`, version `KSERVE_VERSION`) carries its API
types as generated OpenAPI models (`kserve/models/v1*.py`: `openapi_types`, `attribute_map`, and
setters that refuse `None` for required fields). This module reads those files through
importlib.metadata and the AST (the package itself is never imported: its server needs far more
than we install) and builds one strict JSON Schema per kind: every KServe type a closed object of
its fields, every Kubernetes type (`V1Container`, `V1Probe`, ...) a reference into the Kubernetes
schemas that `kubernetes-validate` ships (strict, latest version).
"""
from __future__ import annotations

import ast
import importlib.metadata
import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

KSERVE_VERSION = "0.21.0"
KINDS = {  # (apiVersion, kind) -> the model class of the whole object
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "V1alpha1ServingRuntime",
    ("serving.kserve.io/v1alpha1", "ClusterServingRuntime"): "V1alpha1ClusterServingRuntime",
    ("serving.kserve.io/v1beta1", "InferenceService"): "V1beta1InferenceService",
}
PRIMITIVES: dict[str, dict[str, Any]] = {
    "str": {"type": "string"}, "int": {"type": "integer"}, "float": {"type": "number"},
    "bool": {"type": "boolean"}, "object": {}, "datetime": {"type": "string"}, "date": {"type": "string"},
}
ALIASES = {"ResourceQuantity": "io.k8s.apimachinery.pkg.api.resource.Quantity"}
# Required in KServe's Go types (`json:"name"`, no omitempty) where the generated Python setters do
# not refuse None, so the AST cannot see it: named here (kserve 0.21.0 pkg/apis/serving).
REQUIRED = {"V1beta1ModelFormat": {"name"}, "V1alpha1SupportedModelFormat": {"name"}}
_K8S_NAME = re.compile(r"^(V\d+(?:alpha\d+|beta\d+)?)([A-Z]\w*)$")


class _Model:
    def __init__(self, types: dict[str, str], names: dict[str, str], required: set[str]):
        self.types, self.names, self.required = types, names, required


def _literal(cls: ast.ClassDef, name: str) -> dict[str, str]:
    for node in cls.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            value = ast.literal_eval(node.value)
            assert isinstance(value, dict)
            return value
    raise LookupError(f"{cls.name} has no {name}")


def _required(cls: ast.ClassDef) -> set[str]:
    """Fields whose setter raises ValueError("... must not be `None`")."""
    out = set()
    for node in cls.body:
        if not isinstance(node, ast.FunctionDef) or not any(
                isinstance(d, ast.Attribute) and d.attr == "setter" for d in node.decorator_list):
            continue
        for sub in ast.walk(node):
            if isinstance(sub, ast.Raise) and isinstance(sub.exc, ast.Call) and sub.exc.args:
                message = sub.exc.args[0]
                if isinstance(message, ast.Constant) and "must not be `None`" in str(message.value):
                    out.add(node.name)
    return out


@lru_cache(maxsize=1)
def kserve_models() -> dict[str, _Model]:
    """Every `V1alpha1*` / `V1beta1*` model class of the installed kserve wheel."""
    installed = importlib.metadata.version("kserve")
    if installed != KSERVE_VERSION:
        raise RuntimeError(f"kserve {installed} installed; these checks use {KSERVE_VERSION}")
    files = importlib.metadata.files("kserve") or []
    models = {}
    for file in files:
        if file.parent.as_posix() != "kserve/models" or not file.name.startswith("v1"):
            continue
        tree = ast.parse(Path(str(file.locate())).read_text())
        for cls in tree.body:
            if isinstance(cls, ast.ClassDef):
                types, names = _literal(cls, "openapi_types"), _literal(cls, "attribute_map")
                models[cls.name] = _Model(types, names, _required(cls) | REQUIRED.get(cls.name, set()))
    return models


@lru_cache(maxsize=1)
def kubernetes_defs() -> dict[str, Any]:
    import kubernetes_validate.utils as kvu

    root = Path(kvu.__file__).parent / "kubernetes-json-schema" / f"v{kvu.latest_version()}-local-strict"
    defs: dict[str, Any] = json.loads((root / "_definitions.json").read_text())["$defs"]
    return defs


def _kubernetes_ref(name: str) -> str | None:
    """`V1Container` -> `io.k8s.api.core.v1.Container` (the one definition of that version and kind);
    None for a name no Kubernetes definition has."""
    if name in ALIASES:
        return ALIASES[name]
    match = _K8S_NAME.match(name)
    if match is None:  # spelled out in full: K8sIoApiAutoscalingV2HorizontalPodAutoscalerBehavior
        spelled = name.lower().replace("k8sio", "iok8s", 1)
        full = [k for k in kubernetes_defs() if k.replace(".", "").lower() == spelled]
        return full[0] if len(full) == 1 else None
    version, kind = match.group(1).lower(), match.group(2)
    found = sorted(k for k in kubernetes_defs() if k.endswith(f".{version}.{kind}"))
    core = [k for k in found if k.startswith(("io.k8s.api.core.", "io.k8s.apimachinery."))]
    return (core or found)[0] if len(core or found) == 1 else None


def schema(model: str) -> dict[str, Any]:
    """A strict JSON Schema (2020-12) for objects of the KServe model class `model`."""
    models, k8s = kserve_models(), kubernetes_defs()
    defs: dict[str, Any] = {}

    def type_schema(spec: str) -> dict[str, Any] | bool:
        if spec in PRIMITIVES:
            return PRIMITIVES[spec]
        if spec.startswith("list[") and spec.endswith("]"):
            return {"type": "array", "items": type_schema(spec[5:-1])}
        if spec.startswith("dict(") and spec.endswith(")"):
            return {"type": "object", "additionalProperties": type_schema(spec[5:-1].split(",", 1)[1].strip())}
        if spec in models:
            if spec not in defs:
                defs[spec] = {}  # reserve first: the types may refer to themselves
                defs[spec] = object_schema(models[spec])
            return {"$ref": f"#/$defs/{spec}"}
        ref = _kubernetes_ref(spec)
        if ref is None:  # named but defined nowhere (V1alpha1WorkerSpec, Knative status types): refuse
            return False
        return {"$ref": f"#/$defs/{ref}"}

    def object_schema(m: _Model) -> dict[str, Any]:
        return {"type": "object", "additionalProperties": False,
                "properties": {m.names[f]: type_schema(t) for f, t in m.types.items()},
                "required": sorted(m.names[f] for f in m.required)}

    top = type_schema(model)
    assert isinstance(top, dict)
    # Kubernetes definitions refer to one another: carry them all (cheap; the validator resolves lazily).
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **top, "$defs": {**k8s, **defs}}


def validate(doc: dict[str, Any]) -> None:
    """Raise `jsonschema.ValidationError` unless `doc` is a valid KServe object of a kind in KINDS."""
    import jsonschema

    key = (doc.get("apiVersion"), doc.get("kind"))
    if key not in KINDS:
        raise jsonschema.ValidationError(f"apiVersion/kind {key} is not one of {sorted(KINDS)}")
    jsonschema.Draft202012Validator(schema(KINDS[key])).validate(doc)  # type: ignore[arg-type]
