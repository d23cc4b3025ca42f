"""Hugging Face encoders with exits: a tiny random BERT (built in a second, no download) exported
with dynamic batch and sequence axes, checked at mixed lengths, trained by the recipes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from model_export.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from model_export.export import EXPORT_CONFIGS, ExportCheckError, check_export, export_bundle  # noqa: E402
from model_export.protocol import MultiExitModel, check_model  # noqa: E402
from model_export.recipes import frozen, get_recipe  # noqa: E402
from model_export.text import (  # noqa: E402
    TINY_WORDS,
    EncoderConfig,
    MultiExitEncoder,
    tiny_bert_config,
    tiny_text_splits,
    write_wordpiece_tokenizer,
)
from model_export.train import TrainConfig, train  # noqa: E402
from server.bundle import load_bundle  # noqa: E402
from server.engine.runtime import open_session  # noqa: E402
from server.text import ATTENTION_MASK, INPUT_IDS, TextTokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> TextTokenizer:
    path = write_wordpiece_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json", list(TINY_WORDS))
    return TextTokenizer(path, 24)


@pytest.fixture(scope="module")
def splits(tokenizer: TextTokenizer):  # noqa: ANN201 - TextSplits
    return tiny_text_splits(tokenizer, n=200)


def encoder(tokenizer: TextTokenizer, **cfg: object) -> MultiExitEncoder:
    torch.manual_seed(0)
    return MultiExitEncoder(EncoderConfig(backbone=tiny_bert_config(tokenizer.vocab_size), max_length=24,
                                          **cfg)).eval()  # type: ignore[arg-type]


def test_the_encoder_implements_the_protocol(tokenizer: TextTokenizer) -> None:
    model = encoder(tokenizer)
    assert isinstance(model, MultiExitModel)
    check_model(model)
    assert model.num_stages == 3 and model.stage_input_names(1) == ["hidden_in", ATTENTION_MASK]
    with pytest.raises(TypeError, match="missing"):
        check_model(torch.nn.Linear(2, 2))


def test_max_length_must_fit_the_position_embeddings(tokenizer: TextTokenizer) -> None:
    with pytest.raises(ValueError, match="position embeddings"):
        EncoderConfig(backbone=tiny_bert_config(tokenizer.vocab_size), max_length=65)


@pytest.mark.parametrize("kind", ["lgvit", "dmpo"])
def test_heads_that_need_a_patch_grid_are_refused(tokenizer: TextTokenizer, kind: str) -> None:
    with pytest.raises(ValueError, match="patch grid"):
        encoder(tokenizer, head=kind)


def test_padding_does_not_change_a_rows_answer(tokenizer: TextTokenizer, splits) -> None:  # noqa: ANN001
    model = encoder(tokenizer)
    x = splits.test.features(np.arange(6))
    ids, mask = (torch.from_numpy(x[k]) for k in (INPUT_IDS, ATTENTION_MASK))
    padded = {INPUT_IDS: torch.nn.functional.pad(ids, (0, 7)), ATTENTION_MASK: torch.nn.functional.pad(mask, (0, 7))}
    with torch.no_grad():
        batch = model.exits(padded)
        for row in range(6):
            n = int(mask[row].sum())
            alone = model.exits({INPUT_IDS: ids[row:row + 1, :n], ATTENTION_MASK: mask[row:row + 1, :n]})
            for a, b in zip(alone, batch, strict=True):
                assert torch.allclose(a[0], b[row], atol=1e-5)


def test_export_checks_mixed_lengths_and_records_token_flops(tmp_path: Path, tokenizer: TextTokenizer,
                                                             splits) -> None:  # noqa: ANN001
    model = encoder(tokenizer, pooling="cls")
    tok = tmp_path / "tok.json"
    write_wordpiece_tokenizer(tok, list(TINY_WORDS))
    out = export_bundle(model, tmp_path / "b", splits, name="tiny-text", cfg=EXPORT_CONFIGS["encoder-text"],
                        tokenizer=tok)
    bundle = load_bundle(out)
    m = bundle.manifest
    assert m.text is not None and m.text.max_length == 24 and (out / m.text.file).is_file()
    assert [t.name for t in m.model_inputs] == [INPUT_IDS, ATTENTION_MASK]
    assert m.stages[1].inputs[0].shape == [-1, -1, 32]  # dynamic batch and sequence
    # The FLOPs curve predicts what the counter measures at a length it was not fitted on.
    from model_export.export import count_stage

    t = 11
    example = {INPUT_IDS: torch.full((1, t), 7), ATTENTION_MASK: torch.ones(1, t, dtype=torch.long)}
    measured = count_stage(model, 0, example)[0]
    c0, c1, c2 = m.stages[0].flops_curve or [0, 0, 0]
    assert measured == pytest.approx(c0 + c1 * t + c2 * t * t)
    assert m.stages[0].flops == pytest.approx(c0 + c1 * splits.val.lengths.mean() + c2 * splits.val.lengths.mean() ** 2,
                                              abs=1)
    # The segments run at (batch, length) pairs never seen at export time.
    sess = open_session(out / "stage_00.onnx")
    for n, length in ((1, 3), (4, 20)):
        got = sess.run(["logits"], {INPUT_IDS: np.full((n, length), 7, np.int64),
                                    ATTENTION_MASK: np.ones((n, length), np.int64)})[0]
        assert got.shape == (n, 2)


def test_a_broken_segment_fails_the_padding_checks(tmp_path: Path, tokenizer: TextTokenizer,
                                                   splits) -> None:  # noqa: ANN001
    model = encoder(tokenizer)
    with pytest.raises(ValueError, match="tokenizer"):
        export_bundle(model, tmp_path / "b", splits, name="tiny-text", cfg=EXPORT_CONFIGS["encoder-text"])
    tok = write_wordpiece_tokenizer(tmp_path / "tok.json", list(TINY_WORDS))
    out = export_bundle(model, tmp_path / "b", splits, name="tiny-text", cfg=EXPORT_CONFIGS["encoder-text"],
                        tokenizer=tok)
    with torch.no_grad():
        model.heads[2].fc.bias.add_(1.0)  # PyTorch now differs from the exported last stage
    with pytest.raises(ExportCheckError) as err:
        check_export(model, out, splits.test, EXPORT_CONFIGS["encoder-text"])
    assert any("length" in f and "stage_02" in f for f in err.value.mismatches)


@pytest.mark.parametrize("recipe", ["joint", "pabee", "palbert", "jei", "mue", "met", "lgvit", "dmpo"])
def test_every_recipe_trains_the_encoder(tokenizer: TextTokenizer, splits, recipe: str) -> None:  # noqa: ANN001
    r = get_recipe(recipe)
    head = r.default_head if r.default_head not in ("lgvit", "dmpo") else "linear"
    model = encoder(tokenizer, head=head, **r.model_overrides())  # type: ignore[arg-type]
    before = [p.detach().clone() for p in model.heads[0].parameters()]
    result = r.fit(model, splits.train, TrainConfig(epochs=2, batch_size=16, max_steps=4, lr=1e-3), progress=False)
    assert result.steps == 4
    assert any(not torch.equal(a, b) for a, b in zip(before, model.heads[0].parameters(), strict=True))


def test_a_frozen_backbone_keeps_its_weights(tokenizer: TextTokenizer, splits) -> None:  # noqa: ANN001
    model = encoder(tokenizer, adapter_dim=4)
    backbone = [p.detach().clone() for m in model.backbone_modules() for p in m.parameters()]
    restore = frozen(model.backbone_modules())
    try:
        train(model, splits.train, TrainConfig(epochs=1, batch_size=16, max_steps=3, lr=1e-2), progress=False)
    finally:
        restore()
    after = [p for m in model.backbone_modules() for p in m.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(backbone, after, strict=True))
    assert model.adapters is not None and model.adapters.up.weight.abs().sum() > 0  # the adapters learnt


def test_encoder_checkpoints_round_trip(tmp_path: Path, tokenizer: TextTokenizer, splits) -> None:  # noqa: ANN001
    model = encoder(tokenizer, head="palbert")
    save_checkpoint(tmp_path / "c.pt", model, name="t", data={"dataset": "rotten-tomatoes"})
    again, meta = load_checkpoint(tmp_path / "c.pt")
    assert meta["family"] == "encoder" and isinstance(again, MultiExitEncoder)
    x = {k: torch.from_numpy(v) for k, v in splits.test.features(np.arange(3)).items()}
    with torch.no_grad():
        for a, b in zip(model.exits(x), again.exits(x), strict=True):
            assert torch.equal(a, b)


def test_the_worked_example_in_the_docs_exports_a_users_own_model(tmp_path: Path) -> None:
    import runpy

    example = Path(__file__).resolve().parents[2] / "docs" / "examples" / "own_model.py"
    namespace = runpy.run_path(str(example))
    out = namespace["main"](tmp_path / "own")
    bundle = load_bundle(out)
    assert bundle.manifest.num_stages == 2 and bundle.manifest.stages[0].head == "mine"


def test_offramp_export_takes_a_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from offramp.cli import main

    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    assert main(["export", "--factory", "docs.examples.own_model:factory", "--out", str(tmp_path / "b")]) == 0
    assert load_bundle(tmp_path / "b").manifest.name == "digits-mlp"
    assert main(["export", "--factory", "no_such_module:f", "--out", str(tmp_path / "c")]) == 2
    assert main(["export", "--out", str(tmp_path / "d")]) == 2  # neither a checkpoint nor a factory
