"""The multi-exit ViT: stages chain to the full model, exits sit where the config says."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from model_export.heads import HEADS, ExitHead, build_head, register_head  # noqa: E402
from model_export.vit import VARIANTS, MultiExitViT, ViTConfig, vit  # noqa: E402


def _raw(n: int, h: int = 8, w: int = 8) -> torch.Tensor:
    return torch.randint(0, 17, (n, h, w)).float()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_stages_chained_equal_forward(variant: str) -> None:
    torch.manual_seed(0)
    model = vit(variant).eval()
    x = _raw(5)
    with torch.no_grad():
        full = model(x)
        h = x
        for i in range(model.num_stages):
            out = model.forward_segment(i, h)
            torch.testing.assert_close(out["logits"], full[i])
            h = out["hidden"]
    assert len(full) == model.num_stages == model.cfg.depth


def test_exit_subset_groups_blocks_into_stages() -> None:
    model = MultiExitViT(ViTConfig(depth=6, embed_dim=32, num_heads=2, exits=(1, 3)))
    assert model.stage_blocks == [[0, 1], [2, 3], [4, 5]]  # the last block always gets an exit
    with torch.no_grad():
        assert len(model(_raw(2))) == 3


def test_segment_outputs_follow_the_bundle_names() -> None:
    model = vit("tiny").eval()
    with torch.no_grad():
        first = model.forward_segment(0, _raw(4))
        second = model.forward_segment(1, first["hidden"])
    assert list(first) == ["hidden", "logits", "similarity"]  # MuE: stage 0 against the embeddings
    assert list(second) == ["hidden", "logits", "similarity"]
    assert first["hidden"].shape == (4, model.cfg.num_patches + 1, model.cfg.embed_dim)
    assert second["similarity"].shape == (4,)
    assert bool(((second["similarity"] >= -1.0001) & (second["similarity"] <= 1.0001)).all())


def test_non_square_images_and_channels() -> None:
    model = MultiExitViT(
        ViTConfig(img_size=(8, 12), patch_size=4, in_chans=3, embed_dim=16, depth=2, num_heads=2)
    )
    with torch.no_grad():
        out = model.forward_segment(0, torch.rand(2, 3, 8, 12))
    assert out["hidden"].shape == (2, 2 * 3 + 1, 16)


def test_stage_zero_normalises_raw_pixels() -> None:
    """Clients send raw 0..16 pixels: scaling the config's statistics must change nothing else."""
    torch.manual_seed(0)
    a = MultiExitViT(ViTConfig(depth=1, embed_dim=16, num_heads=2, input_scale=16.0)).eval()
    b = MultiExitViT(ViTConfig(depth=1, embed_dim=16, num_heads=2, input_scale=1.0)).eval()
    b.load_state_dict(a.state_dict())
    x = _raw(3)
    with torch.no_grad():
        torch.testing.assert_close(a(x)[0], b(x / 16.0)[0])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"img_size": 8, "patch_size": 3}, "not divisible by patch size"),
        ({"embed_dim": 30, "num_heads": 4}, "not divisible by num_heads"),
        ({"depth": 4, "exits": (7,)}, "exits"),
        ({"head": "nope"}, "unknown exit head"),
    ],
)
def test_bad_configs_say_what_is_wrong(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MultiExitViT(ViTConfig(**kwargs))


def test_config_round_trips_through_a_plain_dict() -> None:
    cfg = ViTConfig(img_size=(8, 12), patch_size=4, exits=(0, 2), depth=3, embed_dim=16, num_heads=2)
    assert ViTConfig.from_dict(cfg.to_dict()) == cfg


def test_every_registered_head_gives_logits() -> None:
    for kind in HEADS:
        head = build_head(kind, 16, 10)
        out = head(torch.randn(3, 5, 16))
        assert out["logits"].shape == (3, 10)
        if head.has_gate:
            assert out["gate"].shape == (3,)


def test_head_registry_refuses_duplicates() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_head("linear")(type("Again", (ExitHead,), {}))


def test_similarity_is_mues_whole_hidden_state_cosine_from_stage_0() -> None:
    model = vit("tiny").eval()
    x = _raw(3)
    with torch.no_grad():
        outs = model.forward_all(x)
        before = model.embed(x)
        for out in outs:
            a, b = before.flatten(1).numpy().astype(np.float64), out["hidden"].flatten(1).numpy().astype(np.float64)
            want = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
            np.testing.assert_allclose(out["similarity"].numpy(), want, rtol=1e-5)
            before = out["hidden"]
