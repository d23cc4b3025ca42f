"""Every registered recipe: trains for a few steps, exports a checked bundle whose default policy
uses the recipe's criterion, and serves through the engine. `RECIPE_CASES` lists the covered
recipes; the meta-test fails when a recipe is registered without a case here."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from model_export.data import load_digits_splits, load_hard_digits_splits, load_splits  # noqa: E402
from model_export.recipes import (  # noqa: E402
    RECIPES,
    export_recipe,
    get_recipe,
    graph_regulariser,
    halting_distribution,
    train_recipe,
)
from server.bundle import load_bundle  # noqa: E402
from tests.fakes import serve_bundle  # noqa: E402

# recipe -> (default head, served criterion, calibration array the criterion reads)
RECIPE_CASES: dict[str, tuple[str, str, str | None]] = {
    "joint": ("linear", "max_prob", None),
    "pabee": ("linear", "patience", None),
    "dmpo": ("dmpo", "max_prob", None),
    "lgvit": ("lgvit", "max_prob", None),
    "met": ("linear", "max_prob", None),
    "palbert": ("palbert", "q_exit", "gate"),
    "jei": ("jei", "gate", "gate"),
    "mue": ("shared", "similarity", "similarity"),
}


def test_every_registered_recipe_has_a_case() -> None:
    assert set(RECIPE_CASES) == set(RECIPES), "add the new recipe to RECIPE_CASES (train, export, serve)"


@pytest.fixture(scope="module")
def splits():  # noqa: ANN201
    return load_digits_splits()


@pytest.mark.parametrize("recipe", sorted(RECIPE_CASES))
def test_recipe_trains_exports_and_serves(recipe: str, splits, tmp_path: Path) -> None:  # noqa: ANN001
    head, criterion, array = RECIPE_CASES[recipe]
    run, _ = train_recipe(recipe, variant="tiny", progress=False, splits=splits, max_steps=4, threads=1)
    assert run.head == head and run.result.steps == 4
    bundle = load_bundle(export_recipe(run, tmp_path / recipe, splits, name=f"r-{recipe}"))
    m = bundle.manifest
    assert m.default_policy.criterion == criterion
    assert all(s.head == head for s in m.stages)
    # JEI-DNN's bundles serve conformal prediction sets (server/conformal.py); the others do not.
    assert (m.conformal.coverage if m.conformal else None) == (0.95 if recipe == "jei" else None)
    calib = bundle.calibration()
    if array is not None:
        values = getattr(calib, array)
        assert values is not None and values.shape == (m.num_stages, len(calib.labels))
    labels, stages = serve_bundle(bundle, splits.test.x[:10])
    assert labels.shape == (10,) and ((stages >= 0) & (stages < m.num_stages)).all()


def test_met_trains_only_adapters_and_heads_after_pretraining(splits) -> None:  # noqa: ANN001
    """The backbone MET tunes is frozen: phase 2 leaves embedding and blocks as phase 1 left them."""
    recipe = get_recipe("met")
    from model_export.train import TrainConfig, seed_everything
    from model_export.vit import vit

    seed_everything(0, 1)
    model = vit("tiny", **recipe.model_overrides())
    snapshots: list[dict[str, torch.Tensor]] = []
    import model_export.recipes as recipes

    real_train = recipes.train

    def spy(model, data, cfg, **kw):  # noqa: ANN001, ANN003, ANN202
        result = real_train(model, data, cfg, **kw)
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return result

    recipes.train = spy
    try:
        recipe.fit(model, splits.train, TrainConfig(epochs=1, max_steps=4, threads=1), progress=False)
    finally:
        recipes.train = real_train
    first, second = snapshots
    backbone = [k for k in first if k.startswith(("embed.", "blocks."))]
    assert backbone and all(torch.equal(first[k], second[k]) for k in backbone)
    assert not torch.equal(first["adapters.up.weight"], second["adapters.up.weight"])
    assert torch.equal(first["adapters.up.weight"], torch.zeros_like(first["adapters.up.weight"]))


def test_halting_distribution_sums_to_one() -> None:
    gates = [torch.tensor([0.2, 0.9]), torch.tensor([0.5, 0.1]), torch.ones(2)]
    p = halting_distribution(gates)
    torch.testing.assert_close(p.sum(0), torch.ones(2))
    torch.testing.assert_close(p[:, 0], torch.tensor([0.2, 0.4, 0.4]))


def test_graph_regulariser_pulls_same_class_features_together() -> None:
    y = torch.tensor([0, 0, 1, 1])
    anchor = torch.randn(4, 8)
    apart = torch.tensor([[1.0, 0], [0, 1.0], [1.0, 0], [0, 1.0]])
    together = torch.tensor([[1.0, 0], [1.0, 0], [0, 1.0], [0, 1.0]])
    assert graph_regulariser(together, anchor, y) < 1e-6 < graph_regulariser(apart, anchor, y)


def test_recipes_refuse_heads_they_do_not_train() -> None:
    with pytest.raises(ValueError, match="palbert"):
        train_recipe("palbert", "linear", variant="tiny", progress=False, max_steps=1)
    with pytest.raises(ValueError, match="unknown recipe"):
        get_recipe("nope")


def test_hard_digits_are_the_same_digits_moved_and_noisy() -> None:
    easy, hard = load_digits_splits(), load_hard_digits_splits()
    assert (easy.test.y == hard.test.y).all() and hard.test.x.shape == easy.test.x.shape
    assert hard.test.x.min() >= 0 and hard.test.x.max() <= 16
    assert np.abs(hard.test.x - easy.test.x).mean() > 1.0
    assert (load_splits("digits-hard").test.x == hard.test.x).all()  # fixed, run after run


def test_offramp_train_writes_a_bundle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from model_export.cli import register

    parser = argparse.ArgumentParser(prog="offramp")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", "--recipe", "mue", "--variant", "tiny", "--max-steps", "3",
                              "--dataset", "digits-hard", "--out", str(tmp_path / "b"), "--quiet"])
    assert args.func(args) == 0
    m = load_bundle(tmp_path / "b").manifest
    assert m.name == "digits-mue-shared-hard" and m.default_policy.criterion == "similarity"
    assert "noise" in m.input.preprocessing and "digits-mue-shared-hard" in capsys.readouterr().out
    args = parser.parse_args(["train", "--recipe", "jei", "--head", "linear", "--out", str(tmp_path / "c")])
    assert args.func(args) == 2


def test_palbert_regulariser_is_kl_of_the_prior_to_p_as_the_official_code() -> None:
    import math

    from model_export.recipes import geometric_prior, prior_kl

    prior = geometric_prior(3, 0.1)
    assert prior.tolist() == pytest.approx([0.1, 0.09, 0.81])  # the last stage takes the rest
    p = torch.tensor([[0.5, 0.2], [0.25, 0.3], [0.25, 0.5]])  # [S, N]
    want = sum(q * math.log(q / pi) for q, pi in zip([0.1, 0.09, 0.81], [0.5, 0.25, 0.25], strict=True))
    want += sum(q * math.log(q / pi) for q, pi in zip([0.1, 0.09, 0.81], [0.2, 0.3, 0.5], strict=True))
    assert prior_kl(p, prior).item() == pytest.approx(want / 2, rel=1e-5)
    # KLDivLoss(p.log(), prior, batchmean) on [N, S], as tinkoff-ai/palbert calls it:
    ref = torch.nn.KLDivLoss(reduction="batchmean")(p.T.log(), prior[None].expand(2, 3))
    assert prior_kl(p, prior).item() == pytest.approx(ref.item(), rel=1e-5)


def test_lgvit_losses_as_the_official_code() -> None:
    from model_export.recipes import hetero_kl, homo_mse, lgvit_weights
    from model_export.vit import vit

    assert lgvit_weights(vit("demo")).tolist() == [1, 2, 3, 4, 5, 6]  # exit i weighted by its layer
    s, t = torch.tensor([[[1.0, 2.0]]]), torch.tensor([[[2.0, 0.0]]])
    ps, pt = torch.softmax(s, -1), torch.softmax(t, -1)
    want = (pt * (pt.log() - ps.log())).sum()  # KL(teacher || student) over channels, batch of one
    assert hetero_kl(s, t).item() == pytest.approx(want.item(), rel=1e-6)
    gram_s, gram_t = s.transpose(-1, -2) @ s, t.transpose(-1, -2) @ t
    assert homo_mse(s, t, gram=True).item() == pytest.approx(((gram_s - gram_t) ** 2).mean().item())
    assert homo_mse(s, t, gram=False).item() == pytest.approx(((s - t) ** 2).mean().item())


def test_jei_targets_are_subsequent_from_the_best_trade_off() -> None:
    from model_export.recipes import jei_targets

    ce = torch.tensor([[2.0, 0.1, 3.0], [0.5, 0.1, 2.0], [0.1, 0.1, 0.2]])  # [S=3, N=3]
    cost = torch.tensor([1 / 3, 2 / 3, 1.0])
    # sample 0: 2.23 / 0.97 / 0.8 -> the final exit; sample 1: 0.33 first; sample 2: 3.23 / 2.47 / 0.9 -> final
    target = jei_targets(ce, cost, 0.7)
    assert target.tolist() == [[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]
    ce[1, 0] = 0.0  # now exit 1 is best for sample 0 (0 + 0.47 < 0.8)
    assert jei_targets(ce, cost, 0.7)[:, 0].tolist() == [0.0, 1.0]


def test_jei_gate_reads_four_detached_uncertainty_features() -> None:
    from model_export.vit import vit

    head = vit("tiny", head="jei").heads[0]
    logits = torch.tensor([[2.0, 0.0, 0.0] + [0.0] * 7], requires_grad=True)
    f = head.gate_features(logits)
    p = torch.softmax(logits, -1)
    assert f.shape == (1, 4) and f[0, 0].item() == pytest.approx(p.max().item())
    assert f[0, 2].item() == pytest.approx((p.max() - torch.topk(p, 2).values[0, 1]).item())
    head.gate_logit(logits).sum().backward()
    assert logits.grad is None or not logits.grad.any()  # the gate never moves the classifier
