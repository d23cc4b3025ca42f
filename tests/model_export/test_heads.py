"""Every registered exit head: trains, exports inside its stage segments (checked against PyTorch),
and serves through the engine with the criterion it is meant for.

`HEAD_CASES` lists the heads these tests cover, with what a user should see in the bundle; the
meta-test fails when a head is registered without a case here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from model_export.data import load_digits_splits  # noqa: E402
from model_export.export import EXPORT_CONFIGS, check_export, export_bundle  # noqa: E402
from model_export.heads import FEATURES, HEADS, CovariancePool  # noqa: E402
from model_export.train import TrainConfig, seed_everything, train  # noqa: E402
from model_export.vit import vit  # noqa: E402
from server.bundle import load_bundle  # noqa: E402
from tests.fakes import serve_bundle  # noqa: E402

# head -> (exports a gate, criterion to serve it with)
HEAD_CASES: dict[str, tuple[bool, str]] = {
    "linear": (False, "max_prob"),
    "shared": (False, "similarity"),
    "lgvit": (False, "max_prob"),
    "dmpo": (False, "max_prob"),
    "palbert": (True, "q_exit"),
    "jei": (True, "gate"),
}


def test_every_registered_head_has_a_case() -> None:
    assert set(HEAD_CASES) == set(HEADS), "add the new head to HEAD_CASES (train, export and serve tests)"


@pytest.fixture(scope="module")
def splits():  # noqa: ANN201
    return load_digits_splits()


@pytest.mark.parametrize("head", sorted(HEAD_CASES))
def test_head_trains_exports_and_serves(head: str, splits, tmp_path: Path) -> None:  # noqa: ANN001
    has_gate, criterion = HEAD_CASES[head]
    seed_everything(0, 1)
    mean, std = splits.pixel_stats()
    model = vit("tiny", head=head, input_mean=mean, input_std=std)
    before = [p.detach().clone() for p in model.heads[0].parameters()]
    train(model, splits.train, TrainConfig(epochs=1, max_steps=3, threads=1), progress=False)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.heads[0].parameters(), strict=True))

    out = export_bundle(model, tmp_path / head, splits, name=f"head-{head}", cfg=EXPORT_CONFIGS["vit-digits"],
                        criterion=criterion)
    check_export(model, out, splits.test.subset(np.arange(5)), EXPORT_CONFIGS["vit-digits"],
                 reference=False)  # re-checks
    bundle = load_bundle(out)
    m = bundle.manifest
    assert all(("gate" in s.output_names()) == has_gate for s in m.stages)
    assert m.default_policy.criterion == criterion
    calib = bundle.calibration()
    assert (calib.gate is not None) == has_gate
    if has_gate:
        assert ((calib.gate >= 0) & (calib.gate <= 1)).all() and (calib.gate[-1] == 1).all()

    x = splits.test.x[:12]
    labels, stages = serve_bundle(bundle, x, early_exit=False)
    with torch.no_grad():
        want = model(torch.from_numpy(x))[-1].argmax(-1).numpy()
    assert stages.tolist() == [m.num_stages - 1] * 12 and labels.tolist() == want.tolist()
    labels, stages = serve_bundle(bundle, x)  # the default policy, whatever it lets leave early
    assert labels.shape == (12,) and ((stages >= 0) & (stages < m.num_stages)).all()


def test_heads_see_what_the_papers_describe() -> None:
    """LGViT: local heads early, global heads late, linear last; DMPO: bypass + covariance early."""
    model = vit("demo", head="lgvit")
    assert [h.role for h in model.heads] == ["local"] * 3 + ["global"] * 2 + ["linear"]
    dmpo = vit("tiny", head="dmpo")
    assert [h.bypass is not None for h in dmpo.heads] == [True, True, False]
    shared = vit("tiny", head="shared")
    assert shared.heads[0] is shared.heads[1] is shared.heads[2]
    outs = vit("tiny", head="lgvit").forward_all(torch.rand(4, 8, 8) * 16)
    assert all(o[FEATURES].shape == (4, 32) for o in outs)


def test_dmpo_bypass_leaves_the_hidden_state_alone() -> None:
    """The next stage gets the backbone's tokens; only the predictor reads the bypassed ones."""
    seed_everything(0, 1)
    model = vit("tiny", head="dmpo").eval()
    x = torch.rand(3, 8, 8) * 16
    with torch.no_grad():
        hidden = model.forward_segment(0, x)["hidden"]
        torch.nn.init.normal_(model.heads[0].bypass.up.weight)
        assert torch.equal(model.forward_segment(0, x)["hidden"], hidden)


def test_covariance_pool_is_a_matrix_square_root() -> None:
    pool = CovariancePool(8, reduced=4, iterations=8)
    x = torch.randn(2, 12, 8)
    z = pool.reduce(pool.norm(x))
    z = z - z.mean(1, keepdim=True)
    cov = z.transpose(1, 2) @ z / 12 + 1e-4 * torch.eye(4)
    full = torch.zeros(2, 16)
    full[:, pool.triu] = pool(x)
    root = full.reshape(2, 4, 4).triu()
    root = root + root.transpose(1, 2) - torch.diag_embed(root.diagonal(dim1=1, dim2=2))
    torch.testing.assert_close(root @ root, cov, atol=2e-3, rtol=1e-2)


def test_gates_are_probabilities_and_one_at_the_last_stage() -> None:
    for head in ("palbert", "jei"):
        outs = vit("tiny", head=head).forward_all(torch.rand(6, 8, 8) * 16)
        gates = torch.stack([o["gate"] for o in outs])
        assert ((gates > 0) & (gates <= 1)).all() and (gates[-1] == 1).all()


def test_lgvit_heads_follow_the_official_layout() -> None:
    """falcon-xu/LGViT: depthwise conv in the first local heads, stride 2 then 3 in the global ones,
    the class token added to the pooled head tokens before the classifier."""
    from model_export.heads import TOKENS

    model = vit("demo", head="lgvit").eval()
    local = [h for h in model.heads if h.role == "local"]
    glob = [h for h in model.heads if h.role == "global"]
    assert [not isinstance(h.body.dw, torch.nn.Identity) for h in local] == [True, False, False]
    assert [h.stride for h in glob] == [2, 3]
    x = torch.rand(2, 8, 8) * 16
    with torch.no_grad():
        outs = model.forward_all(x)
        head, hidden = model.heads[0], outs[0]["hidden"]
        tokens = head.body(hidden)
        want = head.classifier(tokens.mean(dim=1) + hidden[:, 0])["logits"]
    assert torch.allclose(outs[0]["logits"], want) and torch.equal(outs[0][TOKENS], tokens)
    assert outs[3][TOKENS].shape[1] == 1  # stride 2 on the demo's 2 x 2 patch grid: one token
    assert TOKENS not in outs[-1]


def test_palbert_exits_share_one_classifier_and_lambda_layer_with_a_layer_position() -> None:
    model = vit("tiny", head="palbert").eval()
    cores = {id(h.core) for h in model.heads}
    assert len(cores) == 1  # tinkoff-ai/palbert: one PonderClassifier for every layer
    core = model.heads[0].core
    assert core.position.shape == (model.num_stages, model.cfg.embed_dim)
    x = torch.rand(3, 8, 8) * 16
    with torch.no_grad():
        outs = model.forward_all(x)
        hidden = outs[1]["hidden"]
        # The same hidden state at another stage position gives the same logits but another lambda.
        here, elsewhere = model.heads[1](hidden, outs[0]["hidden"]), model.heads[0](hidden, outs[0]["hidden"])
    assert torch.equal(here["logits"], elsewhere["logits"]) and not torch.equal(here["gate"], elsewhere["gate"])
    assert torch.equal(outs[-1]["gate"], torch.ones(3))  # every sample that reaches the last stage leaves
    head_params = sum(p.numel() for p in model.heads.parameters())  # shared parameters count once
    assert head_params == sum(p.numel() for p in core.parameters())
