"""`offramp compare`'s protocol: choices made on validation only, the criterion picked there, MuE's
row reusing joint's model, paired bootstrap intervals and claim verdicts, resume after interruption."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="compare trains models (export extra)")

from model_export import compare  # noqa: E402
from model_export.compare import BUDGETS, Bootstrap, Row, RunResult, pack, unpack, verdict  # noqa: E402


def run(correct: dict[str, dict[float, tuple[float, np.ndarray] | None]], own: str = "max_prob",
        recipe: str = "joint", seed: int = 0, full: np.ndarray | None = None) -> RunResult:
    n = next((len(v[1]) for c in correct.values() for v in c.values() if v is not None), 10)
    cells = {crit: {str(b): None if v is None else {"val": v[0], "compute": b - 0.01, "correct": pack(v[1]),
                                                    "thresholds": [0.5]}
                    for b, v in per.items()} for crit, per in correct.items()}
    return RunResult(dataset="d", recipe=recipe, head="shared", seed=seed, criterion=own, seconds=1.0, mflops=1.0,
                     test_samples=n, exit_accuracy=[0.5, 0.9], full_correct=pack(np.ones(n, bool) if full is None
                                                                                 else full), cells=cells)


def test_pack_round_trips_any_length() -> None:
    for n in (1, 7, 8, 9, 1275):
        bits = np.random.default_rng(n).random(n) < 0.5
        assert (unpack(pack(bits), n) == bits).all()


def test_validation_picks_the_criterion_and_the_test_split_does_not() -> None:
    good_on_test, bad_on_test = np.ones(50, bool), np.zeros(50, bool)
    r = run({"max_prob": {0.5: (0.80, good_on_test)}, "entropy": {0.5: (0.85, bad_on_test)},
             "margin": {0.5: None}})
    row = Row("d", "joint", "shared", [r])
    assert row.choice(r, 0.5)[0] == "entropy"  # type: ignore[index]  # best on validation, worse on test
    correct = row.correct(0.5)
    assert correct is not None and correct.mean() == 0.0
    tie = run({"entropy": {0.5: (0.8, good_on_test)}, "max_prob": {0.5: (0.8, bad_on_test)}})
    assert Row("d", "joint", "shared", [tie]).choice(tie, 0.5)[0] == "max_prob"  # type: ignore[index]  # own wins


def test_mue_is_the_joint_shared_model_served_with_similarity() -> None:
    assert compare.training_runs([("joint", "shared"), ("mue", "shared"), ("dmpo", "dmpo")]) == [
        ("joint", "shared"), ("dmpo", "dmpo")]
    r = run({"max_prob": {0.5: (0.9, np.ones(20, bool))}, "similarity": {0.5: (0.7, np.zeros(20, bool))}})
    rows = compare.build_rows([r], [("joint", "shared"), ("mue", "shared")])
    assert [(x.label, x.criteria(0.5)) for x in rows] == [("joint/shared", "max_prob"), ("mue/shared", "similarity")]
    assert rows[0].runs == rows[1].runs  # one training, two rows


def test_a_budget_missing_for_one_seed_has_no_cell() -> None:
    a = run({"max_prob": {0.3: (0.9, np.ones(10, bool))}}, seed=0)
    b = run({"max_prob": {0.3: None}}, seed=1)
    assert Row("d", "joint", "shared", [a, b]).correct(0.3) is None


def test_bootstrap_is_paired_and_verdicts_need_the_interval_on_one_side() -> None:
    rng = np.random.default_rng(0)
    n = 400
    boot = Bootstrap(n, replicates=500)
    base = rng.random((3, n)) < 0.8
    same = boot.replicates(base) - boot.replicates(base.copy())
    assert np.allclose(same, 0.0)  # paired: the same resamples for both sides
    better = base | (rng.random((3, n)) < 0.5)  # strictly more right answers
    assert verdict(boot.replicates(better) - boot.replicates(base), 0.0)[0] == "holds"
    assert verdict(boot.replicates(base) - boot.replicates(better), 0.0)[0] == "fails"
    noisy = rng.random((3, n)) < 0.8  # independent, same rate: the interval straddles 0
    assert verdict(boot.replicates(noisy) - boot.replicates(base), 0.0)[0] == "undecided"
    lo, hi = boot.interval(boot.replicates(base))
    assert lo < base.mean() < hi and hi - lo < 0.1


def test_compare_trains_once_per_training_resumes_and_writes_the_report(tmp_path: Path) -> None:
    rows = [("joint", "linear"), ("joint", "shared"), ("mue", "shared"), ("dmpo", "dmpo"), ("lgvit", "lgvit"),
            ("met", "linear")]
    results, out, img = tmp_path / "runs.jsonl", tmp_path / "recipes.md", tmp_path / "img"
    kw = {"datasets": ["digits"], "seeds": (0, 1), "max_steps": 3, "variant": "tiny", "progress": False,
          "pairs": rows}
    compare.run_compare(out, img, results, **kw)  # type: ignore[arg-type]
    lines = results.read_text().splitlines()
    assert len(lines) == 5 * 2  # MuE's row trains nothing of its own
    saved = [json.loads(line) for line in lines]
    assert {(s["recipe"], s["head"]) for s in saved} == {(r, h) for r, h in rows if r != "mue"}
    for s in saved:  # every budget tried for every usable criterion, chosen on validation
        assert set(next(iter(s["cells"].values()))) == {str(b) for b in BUDGETS}
    text = out.read_text()
    assert "Objective: test accuracy within each compute budget" in text
    assert "mue/shared (the joint/shared model)" in text
    for claim in ("DMPO", "MuE", "LGViT", "MET"):
        assert f"- {claim} " in text, claim
    assert (img / "recipes-digits.png").stat().st_size > 10_000
    assert "![digits](" in text
    compare.run_compare(out, img, results, **kw)  # type: ignore[arg-type]  # resumes: nothing new to train
    assert results.read_text().splitlines() == lines


def test_intervals_cover_the_seeds_variation_too() -> None:
    """Two rows with the same mean: one whose seeds agree, one whose seeds differ widely. Resampling
    the seeds makes the second one's interval wider; the pairing still cancels identical rows."""
    rng = np.random.default_rng(3)
    n = 300
    boot = Bootstrap(n, replicates=1000)
    base = rng.random(n) < 0.7
    steady = np.stack([base, base, base])
    shaky = np.stack([rng.random(n) < 0.5, rng.random(n) < 0.7, rng.random(n) < 0.9])
    width = {name: np.subtract(*boot.interval(boot.replicates(c))[::-1]) for name, c in
             (("steady", steady), ("shaky", shaky))}
    assert width["shaky"] > 1.5 * width["steady"]
    assert np.allclose(boot.replicates(shaky) - boot.replicates(shaky.copy()), 0.0)


def test_results_load_the_last_of_a_duplicate_and_skip_a_cut_last_line(tmp_path: Path) -> None:
    a, b = run({"max_prob": {0.5: (0.8, np.ones(5, bool))}}), run({"max_prob": {0.5: (0.9, np.zeros(5, bool))}})
    path = tmp_path / "runs.jsonl"
    from dataclasses import asdict

    path.write_text(json.dumps(asdict(a)) + "\n" + json.dumps(asdict(b)) + "\n" + '{"dataset": "d", "rec')
    loaded = compare.load_results(path)
    assert len(loaded) == 1 and loaded[0].cells["max_prob"]["0.5"]["val"] == 0.9  # type: ignore[index]
    path.write_text('{"broken\n' + json.dumps(asdict(a)) + "\n")
    with pytest.raises(ValueError, match="line 1 is not a saved run"):
        compare.load_results(path)


def test_a_rerun_with_other_settings_is_refused_before_it_trains(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    results = tmp_path / "runs.jsonl"
    saved = run({"max_prob": {0.5: (0.8, np.ones(5, bool))}})
    saved.dataset, saved.settings = "digits", {"epochs": 20, "max_steps": None, "train_limit": None,
                                               "variant": "demo", "freeze_backbone": False}
    from dataclasses import asdict

    results.write_text(json.dumps(asdict(saved)) + "\n")
    trained = []
    monkeypatch.setattr("model_export.recipes.train_recipe", lambda *a, **k: trained.append(a))
    with pytest.raises(ValueError, match="digits were trained with other settings"):
        compare.run_compare(tmp_path / "r.md", tmp_path / "img", results, datasets=["digits"], epochs=5,
                            pairs=[("joint", "shared")])
    assert not trained


def test_rows_with_different_seeds_are_refused(tmp_path: Path) -> None:
    from dataclasses import asdict

    a, b = run({"max_prob": {0.5: (0.8, np.ones(5, bool))}}, seed=0), run({"max_prob": {0.5: (0.8, np.ones(5, bool))}},
                                                                           seed=1, recipe="pabee")
    results = tmp_path / "runs.jsonl"
    results.write_text("".join(json.dumps(asdict(r)) + "\n" for r in (a, b)))
    with pytest.raises(ValueError, match="trained with different seeds"):
        compare.run_compare(tmp_path / "r.md", tmp_path / "img", results, datasets=["d"], train=False,
                            pairs=[("joint", "shared"), ("pabee", "shared")])
