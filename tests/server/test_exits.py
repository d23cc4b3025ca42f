"""Exit criteria on hand-made stage outputs: per sample, per stage, with state carried between stages."""

from __future__ import annotations

import numpy as np
import pytest

from server.exits import ExitState, decide, validate_thresholds

SURE = [9.0, 0.0, 0.0, 0.0]  # softmax max ~0.9996
UNSURE = [0.0, 0.0, 0.0, 0.0]  # uniform: max 0.25, normalised entropy 1
SPLIT = [3.0, 3.0, 0.0, 0.0]  # two labels tie: margin 0


def logits(*rows: list[float]) -> np.ndarray:
    return np.array(rows, dtype=np.float32)


def exits(criterion: str, threshold: float | None, rows: np.ndarray, **kw: np.ndarray) -> list[bool]:
    mask, _, _ = decide(criterion, threshold, rows, ExitState.initial(len(rows)), **kw)
    return mask.tolist()


def test_max_prob_margin_and_entropy_decide_per_sample() -> None:
    batch = logits(SURE, UNSURE, SPLIT)
    assert exits("max_prob", 0.9, batch) == [True, False, False]
    assert exits("max_prob", 0.25, batch) == [True, True, True]
    assert exits("margin", 0.5, batch) == [True, False, False]
    assert exits("margin", 0.0, batch) == [True, True, True]
    # entropy exits when the normalised entropy is at most the threshold
    assert exits("entropy", 0.05, batch) == [True, False, False]
    assert exits("entropy", 1.0, batch) == [True, True, True]


def test_labels_are_the_argmax() -> None:
    _, labels, _ = decide("max_prob", 0.5, logits([0, 0, 5, 1], [7, 0, 0, 0]), ExitState.initial(2))
    assert labels.tolist() == [2, 0] and labels.dtype == np.int64


def test_none_disables_an_exit_but_patience_still_counts() -> None:
    batch = logits(SURE, SURE)
    mask, _, state = decide("patience", None, batch, ExitState.initial(2))
    assert mask.tolist() == [False, False]
    mask, _, _ = decide("patience", 2.0, batch, state)
    assert mask.tolist() == [True, True]  # the disabled exit before still counted


def test_patience_needs_the_same_label_k_stages_in_a_row() -> None:
    # sample 0 predicts 0, 0, 0; sample 1 predicts 0, 1, 1; sample 2 predicts 0, 1, 2
    stages = [logits(SURE, SURE, SURE),
              logits(SURE, [0, 9, 0, 0], [0, 9, 0, 0]),
              logits(SURE, [0, 9, 0, 0], [0, 0, 9, 0])]
    state, exited_at = ExitState.initial(3), [None, None, None]
    for k, batch in enumerate(stages):
        mask, _, state = decide("patience", 2.0, batch, state)
        for i in np.flatnonzero(mask):
            exited_at[i] = k if exited_at[i] is None else exited_at[i]
    assert exited_at == [1, 2, None]
    assert state.run.tolist() == [3, 2, 1]


def test_q_exit_accumulates_the_gates_over_stages() -> None:
    state = ExitState.initial(2)
    gate = np.array([0.5, 0.1], np.float32)
    mask, _, state = decide("q_exit", 0.7, logits(UNSURE, UNSURE), state, gate=gate)
    assert mask.tolist() == [False, False]  # q = 0.5, 0.1
    mask, _, state = decide("q_exit", 0.7, logits(UNSURE, UNSURE), state, gate=gate)
    assert mask.tolist() == [True, False]  # q = 0.75, 0.19
    np.testing.assert_allclose(1 - state.survive, [0.75, 0.19])


def test_gate_and_similarity_read_their_outputs() -> None:
    batch = logits(UNSURE, UNSURE, UNSURE)
    assert exits("gate", 0.5, batch, gate=np.array([0.9, 0.5, 0.1], np.float32)) == [True, True, False]
    sim = np.array([0.99, 0.2, np.nan], np.float32)  # NaN (nothing to compare with) never exits
    assert exits("similarity", 0.95, batch, similarity=sim) == [True, False, False]
    assert exits("similarity", -1.0, batch, similarity=sim) == [True, True, False]
    with pytest.raises(ValueError, match="gate"):
        exits("gate", 0.5, batch)
    with pytest.raises(ValueError, match="similarity"):
        exits("similarity", 0.5, batch)


def test_state_rows_follow_the_samples() -> None:
    _, _, state = decide("patience", 1.0, logits(SURE, [0, 9, 0, 0], [0, 0, 9, 0]), ExitState.initial(3))
    picked = ExitState.concat([state.take(np.array([2])), state.take(np.array([0, 1]))])
    assert picked.prev_label.tolist() == [2, 0, 1] and len(picked) == 3


@pytest.mark.parametrize(("criterion", "thresholds", "problem"), [
    ("max_prob", [0.5], "expected 2 thresholds"),
    ("max_prob", [1.5, None], "outside [0, 1]"),
    ("entropy", [-0.1, 0.5], "outside [0, 1]"),
    ("similarity", [-2.0, 0.5], "outside [-1, 1]"),
    ("patience", [1.5, 2.0], "integer"),
    ("patience", [4.0, 2.0], "outside [1, 3]"),
    ("margin", [float("nan"), None], "must be a number"),
    ("margin", [True, None], "must be a number"),
    ("wild", [0.5, 0.5], "unknown criterion"),
])
def test_threshold_validation_names_the_problem(criterion: str, thresholds: list, problem: str) -> None:
    problems = validate_thresholds(criterion, thresholds, 3)
    assert any(problem in p for p in problems), problems


def test_valid_thresholds_have_no_problems() -> None:
    assert validate_thresholds("max_prob", [0.9, None], 3) == []
    assert validate_thresholds("patience", [2, 3.0], 3) == []
    assert validate_thresholds("similarity", [-1.0, 1.0], 3) == []
