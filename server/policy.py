"""The exit policy of a model: one immutable, versioned type, from the manifest to the live engine.

The same `ExitPolicy` is the bundle's default (`manifest.default_policy`, version 0: not stored
yet), a stored version with its provenance (`updated_at`, `source`, what the policy stores keep
and the admin API shows) and the live snapshot the engine swaps atomically (one reference
assignment): a batch reads the reference once when it starts, so every decision in that batch
uses one consistent snapshot even while an operator moves the thresholds.

`problems_for(manifest)` is the one validation, run where a policy enters the server (admin
change, store read, startup); what passes it is trusted from there on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from server.exits import CRITERIA, lookup, validate_thresholds

if TYPE_CHECKING:
    from server.bundle import Manifest


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class ExitPolicy:
    """Criterion and one threshold per early exit (`None` disables that exit), with a version.

    `updated_at` and `source` say when and by what this version was set; they do not take part in
    equality (two replicas holding the same version hold the same policy).
    """

    criterion: str
    thresholds: tuple[float | None, ...]
    version: int = 0
    updated_at: str = field(default="", compare=False)
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        # Lists (JSON, pydantic) become tuples; whole numbers become floats. Anything else is left
        # for `problems_for` to name, so that a bad value is reported rather than coerced.
        values = tuple(float(t) if isinstance(t, int) and not isinstance(t, bool) else t for t in self.thresholds)
        object.__setattr__(self, "thresholds", values)

    def problems_for(self, manifest: Manifest) -> list[str]:
        """Why this policy cannot run on `manifest`'s stages (empty when it can): an unknown
        criterion, the wrong number of thresholds, a threshold out of range, a negative version,
        or a criterion reading a stage output the stages do not have."""
        num_stages = manifest.num_stages
        problems = validate_thresholds(self.criterion, list(self.thresholds), num_stages)
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 0:
            problems.append(f"version must be a non-negative integer, got {self.version!r}")
        if problems and problems[0].startswith("unknown criterion"):
            return problems
        info = lookup(self.criterion)
        missing = info.missing_at(lambda k, name: manifest.stages[k].has_output(name), num_stages)
        if missing:
            problems.append(f"criterion {self.criterion!r} needs a {info.reads!r} output; "
                            f"stages {missing} have none")
        return problems

    def checked(self, manifest: Manifest) -> ExitPolicy:
        """This policy, or `ValueError` listing every problem at once."""
        problems = self.problems_for(manifest)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def threshold(self, stage: int) -> float | None:
        """Threshold of the exit after `stage`; `None` for a disabled exit and for the last stage."""
        return self.thresholds[stage] if stage < len(self.thresholds) else None

    def with_version(self, version: int, source: str | None = None) -> ExitPolicy:
        """The same thresholds as another version; with `source`, stamped with the time too."""
        if source is None:
            return dataclasses.replace(self, version=version)
        return dataclasses.replace(self, version=version, updated_at=now_iso(), source=source)

    def same_as(self, other: ExitPolicy) -> bool:
        """The same criterion and thresholds, whatever the versions."""
        return (self.criterion, self.thresholds) == (other.criterion, other.thresholds)

    def to_dict(self) -> dict[str, Any]:
        """As the admin API shows it: patience thresholds as integers, the way operators write them."""
        thresholds: list[Any] = list(self.thresholds)
        info = CRITERIA.get(self.criterion)
        if info is not None and info.integer:
            thresholds = [None if t is None else int(t) for t in thresholds]
        return {"criterion": self.criterion, "thresholds": thresholds, "version": self.version,
                "updated_at": self.updated_at, "source": self.source}

    def describe(self) -> str:
        shown = ", ".join("null" if t is None else f"{t:g}" for t in self.thresholds)
        return f"v{self.version} {self.criterion} [{shown}]"

