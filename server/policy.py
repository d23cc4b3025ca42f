"""The live exit policy of a model: an immutable, versioned snapshot.

The engine holds one `ExitPolicy` per model and swaps it atomically (one reference assignment);
a batch reads the reference once when it starts, so every decision in that batch uses one
consistent snapshot even while an operator moves the thresholds.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.bundle import GATE, SIMILARITY, Manifest, PolicySpec
from server.exits import NEEDS_GATE, NEEDS_SIMILARITY, validate_thresholds


@dataclass(frozen=True)
class ExitPolicy:
    """Criterion and one threshold per early exit (`None` disables that exit), with a version."""

    criterion: str
    thresholds: tuple[float | None, ...]
    version: int

    @classmethod
    def from_spec(cls, spec: PolicySpec, *, version: int, num_stages: int) -> ExitPolicy:
        """Validate a stored policy for a model of `num_stages` stages.

        Raises `ValueError` listing every problem at once (unknown criterion, wrong number of
        thresholds, thresholds out of range).
        """
        problems = validate_thresholds(spec.criterion, list(spec.thresholds), num_stages)
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            problems.append(f"version must be a non-negative integer, got {version!r}")
        if problems:
            raise ValueError("; ".join(problems))
        thresholds = tuple(None if t is None else float(t) for t in spec.thresholds)
        return cls(criterion=spec.criterion, thresholds=thresholds, version=version)

    @classmethod
    def for_manifest(cls, spec: PolicySpec, *, version: int, manifest: Manifest) -> ExitPolicy:
        """`from_spec`, plus the checks that need the bundle (the stage outputs a criterion reads)."""
        policy = cls.from_spec(spec, version=version, num_stages=manifest.num_stages)
        problems = policy.problems_for(manifest)
        if problems:
            raise ValueError("; ".join(problems))
        return policy

    def to_spec(self) -> PolicySpec:
        return PolicySpec(criterion=self.criterion, thresholds=list(self.thresholds))  # type: ignore[arg-type]

    def threshold(self, stage: int) -> float | None:
        """Threshold of the exit after `stage`; `None` for a disabled exit and for the last stage."""
        return self.thresholds[stage] if stage < len(self.thresholds) else None

    def with_version(self, version: int) -> ExitPolicy:
        return ExitPolicy(self.criterion, self.thresholds, version)

    def problems_for(self, manifest: Manifest) -> list[str]:
        """Why this policy cannot run on `manifest`'s stages (empty when it can).

        Gate criteria read a `gate` output at every early exit (q_exit accumulates them); the
        similarity criterion reads `similarity` from stage 1 on (stage 0 has nothing before it,
        so an exit there never fires under this criterion).
        """
        problems = validate_thresholds(self.criterion, list(self.thresholds), manifest.num_stages)
        early = manifest.stages[:-1]
        if self.criterion in NEEDS_GATE:
            missing = [s.index for s in early if not s.has_output(GATE)]
            if missing:
                problems.append(f"criterion {self.criterion!r} needs a 'gate' output; "
                                f"stages {missing} have none")
        if self.criterion in NEEDS_SIMILARITY:
            missing = [s.index for s in early[1:] if not s.has_output(SIMILARITY)]
            if missing:
                problems.append(f"criterion 'similarity' needs a 'similarity' output; "
                                f"stages {missing} have none")
        return problems

    def describe(self) -> str:
        shown = ", ".join("null" if t is None else f"{t:g}" for t in self.thresholds)
        return f"v{self.version} {self.criterion} [{shown}]"
