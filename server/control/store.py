"""Policy store: the live exit policy of each model, persisted, versioned, with its change history.

Settings are read once; thresholds change while traffic flows, so they live here. A store keeps,
per model, the current policy (criterion, thresholds, version) and every change with its time,
version and source. `update` is a compare-and-set: with `expected_version` it fails with 412 when
someone else changed the policy first, so two operators cannot silently overwrite each other.

`FilePolicyStore` keeps one JSON file per model in the state directory. Writes are atomic (temp
file, fsync, rename, fsync of the directory): a crash leaves the old or the new file, never half
of one. Updates are serialised by a thread lock and an `flock` on a per-model lock file, so
several processes on one host (or one shared volume with working locks) can share a directory.
A Redis-backed store for replicas on several hosts can implement the same `PolicyStore` protocol.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from server.bundle import Manifest
from server.errors import BundleError, PreconditionFailed, StateError, first_line
from server.files import atomic_write, fsync_dir
from server.policy import ExitPolicy

log = logging.getLogger("offramp.store")

STATE_FORMAT = 1
MAX_HISTORY = 1000  # oldest changes are dropped beyond this; the log keeps every one

SOURCE_DEFAULT = "bundle-default"
SOURCE_STARTUP = "startup"
SOURCE_PUT = "admin:PUT"
SOURCE_CALIBRATE = "admin:calibrate"
SOURCE_SEED = "replica-seed (the store had no policy)"

# A stored version as JSON: the fields of ExitPolicy (criterion, thresholds, version, updated_at, source).
POLICY_JSON: TypeAdapter[ExitPolicy] = TypeAdapter(ExitPolicy)


class PolicyStore(Protocol):
    """Where live policies are kept. Implementations must make `update` an atomic compare-and-set.

    Every policy a store returns carries its `version`, `updated_at` and `source`.
    """

    def load(self, model: str, default: ExitPolicy, source: str = SOURCE_DEFAULT) -> ExitPolicy:
        """The current policy; a model seen for the first time starts from `default` (version 1)."""
        ...

    def get(self, model: str) -> ExitPolicy | None:
        """The current policy, or None for a model never stored."""
        ...

    def update(self, model: str, policy: ExitPolicy, source: str,
               expected_version: int | None = None) -> ExitPolicy:
        """Store `policy`'s criterion and thresholds as the next version. Raises PreconditionFailed
        when `expected_version` is given and is not the current version."""
        ...

    def history(self, model: str) -> list[ExitPolicy]:
        """Every change, oldest first."""
        ...

    def startup_policy(self, manifest: Manifest) -> ExitPolicy:
        """The policy the model starts serving with (see `startup_policy`)."""
        ...


class _StateFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: int = STATE_FORMAT
    model: str
    current: ExitPolicy
    history: list[ExitPolicy]


class FilePolicyStore:
    """One `<model>.policy.json` per model under `state_dir`."""

    def __init__(self, state_dir: str | Path):
        self.state_dir = Path(state_dir)
        if self.state_dir.exists() and not self.state_dir.is_dir():
            raise StateError(f"state_dir {self.state_dir} is a file, not a directory: point OFFRAMP_STATE_DIR "
                             "(--state-dir) at a directory, or move the file away")
        self._lock = threading.Lock()

    def startup_policy(self, manifest: Manifest) -> ExitPolicy:
        return startup_policy(self, manifest)

    def path(self, model: str) -> Path:
        if not model or "/" in model or model in (".", ".."):
            raise ValueError(f"invalid model name for the state directory: {model!r}")
        return self.state_dir / f"{model}.policy.json"

    # -- the protocol ------------------------------------------------------------------------------

    def load(self, model: str, default: ExitPolicy, source: str = SOURCE_DEFAULT) -> ExitPolicy:
        with self._locked(model):
            state = self._read(model)
            if state is not None:
                return state.current
            record = default.with_version(1, source)
            self._write(model, _StateFile(model=model, current=record, history=[record]))
        log.info("policy of %s initialised (%s): %s", model, source, record.describe())
        return record

    def get(self, model: str) -> ExitPolicy | None:
        with self._locked(model):
            state = self._read(model)
        return None if state is None else state.current

    def update(self, model: str, policy: ExitPolicy, source: str,
               expected_version: int | None = None) -> ExitPolicy:
        with self._locked(model):
            state = self._read(model)
            current = 0 if state is None else state.current.version
            if expected_version is not None and expected_version != current:
                raise stale(model, current, expected_version)
            record = policy.with_version(current + 1, source)
            history = (([] if state is None else state.history) + [record])[-MAX_HISTORY:]
            self._write(model, _StateFile(model=model, current=record, history=history))
        log.info("policy of %s changed by %s: %s", model, source, record.describe())
        return record

    def history(self, model: str) -> list[ExitPolicy]:
        with self._locked(model):
            state = self._read(model)
        return [] if state is None else list(state.history)

    # -- files -------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self, model: str) -> Iterator[None]:
        """Serialise access to one model's file: threads by the lock, processes by flock."""
        path = self.path(model)
        if path.is_dir():
            raise StateError(f"{path} is a directory where the policy file of {model} belongs: remove it, "
                             "or point OFFRAMP_STATE_DIR (--state-dir) elsewhere")
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            lock_file = open(path.with_name(path.name + ".lock"), "a")  # noqa: SIM115 - closed below
        except OSError as err:
            raise StateError(f"cannot use the state directory {self.state_dir} ({err.strerror}): make it "
                             "writable by this user, or point OFFRAMP_STATE_DIR (--state-dir) elsewhere") from None
        with self._lock, lock_file:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)

    def _read(self, model: str) -> _StateFile | None:
        """The state file, or None when absent. A corrupt file is moved aside and reported."""
        path = self.path(model)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            state = _StateFile.model_validate_json(raw)
            if (state.format != STATE_FORMAT or state.model != model or not state.history
                    or state.current.version < 1):
                raise ValueError(f"format {state.format}, model {state.model!r}, version "
                                 f"{state.current.version}, {len(state.history)} history entries")
            return state
        except (ValidationError, ValueError) as err:
            aside = path.with_name(f"{path.name}.corrupt-{datetime.now(timezone.utc):%Y%m%dT%H%M%S%fZ}")
            os.replace(path, aside)
            fsync_dir(self.state_dir)
            log.error(
                "CORRUPT policy state file %s (%s): moved it to %s; %s falls back to its bundle's "
                "default policy and the stored history is lost", path, first_line(err), aside, model,
            )
            return None

    def _write(self, model: str, state: _StateFile) -> None:
        atomic_write(self.path(model), (state.model_dump_json(indent=2) + "\n").encode())


def stale(model: str, current: int, expected: int) -> PreconditionFailed:
    """The 412 of a compare-and-set that lost: someone else changed the policy first."""
    return PreconditionFailed(
        f"policy of {model} is at version {current}, not {expected}: read it again and retry")


def stored_or_seeded(store: PolicyStore, model: str, running: ExitPolicy) -> ExitPolicy:
    """The stored policy of `model`. The one seeding rule: a store that has none (first use, or a
    Redis that restarted empty) is seeded with the policy this replica is *running*, never with the
    bundle default, whichever call comes first (admin read, change, calibration, replica sync), so
    that an emptied store never resets the fleet. (At start-up the running policy is the default.)"""
    return store.load(model, running, source=SOURCE_SEED)


def startup_policy(store: PolicyStore, manifest: Manifest) -> ExitPolicy:
    """The policy a model starts with: the stored one, else the bundle default.

    A stored policy this bundle cannot run (the bundle was replaced by one with other stages) is
    reported loudly and replaced by the bundle default as a new version, so the server starts.
    """
    model = manifest.name
    record = store.load(model, manifest.default_policy)
    problems = record.problems_for(manifest)
    if not problems:
        return record
    log.error("stored policy %s of %s does not fit this bundle (%s): using the bundle default",
              record.describe(), model, problems[0])
    default = manifest.default_policy
    bad = default.problems_for(manifest)
    if bad:
        raise BundleError(f"{model}: the manifest's default_policy cannot run on its stages: {'; '.join(bad)}")
    return store.update(model, default, f"{SOURCE_STARTUP}:{SOURCE_DEFAULT} (stored policy did not fit)")
