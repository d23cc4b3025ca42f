"""Exit policies: validation on the way in, immutability, and the outputs a criterion needs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from server.bundle import load_bundle
from server.policy import ExitPolicy
from tests.fakes import build_onnx_bundle, fake_manifest


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory):
    return load_bundle(build_onnx_bundle(tmp_path_factory.mktemp("policy") / "b")).manifest


def _without(manifest, output: str):
    stages = [s.model_copy(update={"outputs": [t for t in s.outputs if t.name != output]})
              for s in manifest.stages]
    return manifest.model_copy(update={"stages": stages})


def test_from_json_values_and_back() -> None:
    spec = ExitPolicy(criterion="entropy", thresholds=[0.2, None, 1])
    policy = spec.with_version(3).checked(fake_manifest(stages=4))
    assert policy == ExitPolicy("entropy", (0.2, None, 1.0), 3)
    assert policy.same_as(ExitPolicy(criterion="entropy", thresholds=[0.2, None, 1.0]))
    assert policy.threshold(1) is None and policy.threshold(3) is None  # the last stage always answers
    assert policy.describe() == "v3 entropy [0.2, null, 1]"


def test_validation_lists_every_problem_at_once() -> None:
    with pytest.raises(ValueError) as err:
        ExitPolicy(criterion="max_prob", thresholds=[1.5, None, 0.3], version=-1).checked(fake_manifest(stages=3))
    message = str(err.value)
    assert "expected 2 thresholds" in message and "threshold 0 = 1.5" in message and "version" in message
    bogus = ExitPolicy(criterion="wild", thresholds=[0.5], version=1)
    with pytest.raises(ValueError, match="unknown criterion"):
        bogus.checked(fake_manifest(stages=2))


def test_policies_are_immutable_snapshots() -> None:
    policy = ExitPolicy("max_prob", (0.9,), 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.version = 2  # type: ignore[misc]
    assert policy.with_version(2) == ExitPolicy("max_prob", (0.9,), 2) and policy.version == 1


def test_criteria_need_the_outputs_they_read(manifest, tmp_path: Path) -> None:
    gate = ExitPolicy("gate", (0.5, None), 1)
    sim = ExitPolicy("similarity", (None, 0.9), 1)
    assert gate.problems_for(manifest) == [] and sim.problems_for(manifest) == []
    assert ExitPolicy("q_exit", (0.5, 0.5), 1).problems_for(_without(manifest, "gate")) == [
        "criterion 'q_exit' needs a 'gate' output; stages [0, 1] have none"]
    assert "stages [1] have none" in sim.problems_for(_without(manifest, "similarity"))[0]
    assert ExitPolicy("max_prob", (0.5, 0.5), 1).problems_for(_without(manifest, "gate")) == []
    with pytest.raises(ValueError, match="'gate' output"):
        ExitPolicy(criterion="gate", thresholds=[0.5, 0.5], version=1).checked(_without(manifest, "gate"))
