"""A policy replayed on calibration data, stage by stage, exactly as the engine runs it.

Pure numpy over `calibration.npz`: `server.control.calibrate.simulate` reports on it and
`server.conformal` conditions its quantiles on where each sample exits.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from server.bundle import Calibration
from server.exits import ExitState, decide, lookup, softmax


def stage_array(array: np.ndarray | None, stage: int) -> np.ndarray | None:
    return None if array is None else array[stage]


def check_replayable(calibration: Calibration, criterion: str, num_stages: int) -> None:
    """ValueError unless `criterion` can be replayed on this calibration data for a model of `num_stages`."""
    stages = calibration.logits.shape[0]
    if stages != num_stages:
        raise ValueError(f"calibration data has {stages} stages, the model has {num_stages}")
    if calibration.labels.shape[0] == 0:
        raise ValueError("calibration data has no samples")
    reads = lookup(criterion).reads
    if reads is not None and getattr(calibration, reads) is None:
        raise ValueError(f"criterion {criterion!r} needs the calibration array {reads!r}, which this bundle lacks")


def replay(calibration: Calibration, criterion: str, thresholds: Sequence[float | None],
           num_stages: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(exit stage, answer) of every calibration sample under the policy (one threshold per early
    exit, None disabling it): the first exit whose decision lets it leave, else the last stage.
    ValueError when it cannot be replayed (`check_replayable`; `num_stages`: the model's, default
    the calibration data's) or the thresholds do not fit."""
    num_stages = calibration.logits.shape[0] if num_stages is None else num_stages
    check_replayable(calibration, criterion, num_stages)
    if len(thresholds) != num_stages - 1:
        raise ValueError(f"expected {num_stages - 1} thresholds (one per early exit), got {len(thresholds)}")
    n = calibration.labels.shape[0]
    stage_of = np.full(n, num_stages - 1, np.int64)
    answer = np.zeros(n, np.int64)
    active = np.arange(n)
    state = ExitState.initial(n)
    for s in range(num_stages - 1):
        gate, sim = stage_array(calibration.gate, s), stage_array(calibration.similarity, s)
        mask, labels, state = decide(
            criterion, thresholds[s], calibration.logits[s][active], state,
            None if gate is None else gate[active], None if sim is None else sim[active],
        )
        stage_of[active[mask]], answer[active[mask]] = s, labels[mask]
        active, state = active[~mask], state.take(np.flatnonzero(~mask))
    answer[active] = softmax(calibration.logits[-1][active]).argmax(axis=-1)
    return stage_of, answer
