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
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from server.bundle import Manifest, PolicySpec
from server.errors import BundleError, PreconditionFailed
from server.policy import ExitPolicy

log = logging.getLogger("offramp.store")

STATE_FORMAT = 1
MAX_HISTORY = 1000  # oldest changes are dropped beyond this; the log keeps every one

SOURCE_DEFAULT = "bundle-default"
SOURCE_STARTUP = "startup"
SOURCE_PUT = "admin:PUT"
SOURCE_CALIBRATE = "admin:calibrate"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class PolicyRecord:
    """One version of a model's policy: what it is, when it was set, and by what."""

    criterion: str
    thresholds: tuple[float | None, ...]
    version: int
    updated_at: str
    source: str

    @property
    def spec(self) -> PolicySpec:
        return PolicySpec(criterion=self.criterion, thresholds=list(self.thresholds))  # type: ignore[arg-type]

    def to_dict(self) -> dict:
        data = asdict(self)
        data["thresholds"] = list(self.thresholds)
        return data


class PolicyStore(Protocol):
    """Where live policies are kept. Implementations must make `update` an atomic compare-and-set."""

    def load(self, model: str, default: PolicySpec) -> PolicyRecord:
        """The current policy; a model seen for the first time starts from `default` (version 1)."""
        ...

    def get(self, model: str) -> PolicyRecord | None:
        """The current policy, or None for a model never stored."""
        ...

    def update(
        self, model: str, spec: PolicySpec, source: str, expected_version: int | None = None
    ) -> PolicyRecord:
        """Store `spec` as the next version. Raises PreconditionFailed when `expected_version`
        is given and is not the current version."""
        ...

    def history(self, model: str) -> list[PolicyRecord]:
        """Every change, oldest first."""
        ...

    def startup_policy(self, manifest: Manifest) -> ExitPolicy:
        """The policy the model starts serving with (see `startup_policy`)."""
        ...


class _StoredPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    criterion: str
    thresholds: list[float | None]
    version: int = Field(ge=1)
    updated_at: str
    source: str

    def record(self) -> PolicyRecord:
        thresholds = tuple(self.thresholds)
        return PolicyRecord(self.criterion, thresholds, self.version, self.updated_at, self.source)


class _StateFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: int = STATE_FORMAT
    model: str
    current: _StoredPolicy
    history: list[_StoredPolicy]


def _stored(record: PolicyRecord) -> _StoredPolicy:
    return _StoredPolicy.model_validate(record.to_dict())


class FilePolicyStore:
    """One `<model>.policy.json` per model under `state_dir`."""

    def __init__(self, state_dir: str | Path):
        self.state_dir = Path(state_dir)
        if self.state_dir.exists() and not self.state_dir.is_dir():
            raise ValueError(f"state_dir {self.state_dir} exists and is not a directory")
        self._lock = threading.Lock()

    def startup_policy(self, manifest: Manifest) -> ExitPolicy:
        return startup_policy(self, manifest)

    def path(self, model: str) -> Path:
        if not model or "/" in model or model in (".", ".."):
            raise ValueError(f"invalid model name for the state directory: {model!r}")
        return self.state_dir / f"{model}.policy.json"

    # -- the protocol ------------------------------------------------------------------------------

    def load(self, model: str, default: PolicySpec) -> PolicyRecord:
        with self._locked(model):
            state = self._read(model)
            if state is not None:
                return state.current.record()
            record = PolicyRecord(default.criterion, tuple(default.thresholds), 1, now_iso(), SOURCE_DEFAULT)
            self._write(model, _StateFile(model=model, current=_stored(record), history=[_stored(record)]))
            log.info("policy of %s initialised from the bundle default: %s", model, _describe(record))
            return record

    def get(self, model: str) -> PolicyRecord | None:
        with self._locked(model):
            state = self._read(model)
        return None if state is None else state.current.record()

    def update(
        self, model: str, spec: PolicySpec, source: str, expected_version: int | None = None
    ) -> PolicyRecord:
        with self._locked(model):
            state = self._read(model)
            current = 0 if state is None else state.current.version
            if expected_version is not None and expected_version != current:
                raise PreconditionFailed(
                    f"policy of {model} is at version {current}, not {expected_version}: "
                    "read it again and retry"
                )
            record = PolicyRecord(spec.criterion, tuple(spec.thresholds), current + 1, now_iso(), source)
            history = (([] if state is None else state.history) + [_stored(record)])[-MAX_HISTORY:]
            self._write(model, _StateFile(model=model, current=_stored(record), history=history))
        log.info("policy of %s changed by %s: %s", model, source, _describe(record))
        return record

    def history(self, model: str) -> list[PolicyRecord]:
        with self._locked(model):
            state = self._read(model)
        return [] if state is None else [h.record() for h in state.history]

    # -- files -------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self, model: str) -> Iterator[None]:
        """Serialise access to one model's file: threads by the lock, processes by flock."""
        path = self.path(model)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with self._lock, open(path.with_name(path.name + ".lock"), "a") as lock_file:
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
            if state.format != STATE_FORMAT or state.model != model or not state.history:
                raise ValueError(
                    f"format {state.format}, model {state.model!r}, {len(state.history)} history entries")
            return state
        except (ValidationError, ValueError) as err:
            aside = path.with_name(f"{path.name}.corrupt-{datetime.now(timezone.utc):%Y%m%dT%H%M%S%fZ}")
            os.replace(path, aside)
            _fsync_dir(self.state_dir)
            log.error(
                "CORRUPT policy state file %s (%s): moved it to %s; %s falls back to its bundle's "
                "default policy and the stored history is lost", path, _first_line(err), aside, model,
            )
            return None

    def _write(self, model: str, state: _StateFile) -> None:
        path = self.path(model)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        data = (state.model_dump_json(indent=2) + "\n").encode()
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(self.state_dir)


def startup_policy(store: PolicyStore, manifest: Manifest) -> ExitPolicy:
    """The policy a model starts with: the stored one, else the bundle default.

    A stored policy this bundle cannot run (the bundle was replaced by one with other stages) is
    reported loudly and replaced by the bundle default as a new version, so the server starts.
    """
    model = manifest.name
    record = store.load(model, manifest.default_policy)
    try:
        return ExitPolicy.for_manifest(record.spec, version=record.version, manifest=manifest)
    except (ValueError, ValidationError) as err:
        log.error("stored policy %s of %s does not fit this bundle (%s): using the bundle default",
                  _describe(record), model, _first_line(err))
        default = manifest.default_policy
        try:
            ExitPolicy.for_manifest(default, version=record.version + 1, manifest=manifest)
        except ValueError as bad:
            raise BundleError(f"{model}: the manifest's default_policy cannot run on its stages: {bad}") \
                from bad
        source = f"{SOURCE_STARTUP}:{SOURCE_DEFAULT} (stored policy did not fit)"
        record = store.update(model, default, source)
        return ExitPolicy.for_manifest(record.spec, version=record.version, manifest=manifest)


def _fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _describe(record: PolicyRecord) -> str:
    shown = ", ".join("null" if t is None else f"{t:g}" for t in record.thresholds)
    return f"v{record.version} {record.criterion} [{shown}]"
