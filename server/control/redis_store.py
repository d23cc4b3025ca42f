"""Redis-backed policy store: one live exit policy per model, shared by every replica.

A replica set must act as one service: a change through any replica's admin API reaches every
replica within a second and survives restarts of any of them. Per model (the `{model}` hash tag
keeps a model's keys in one Redis Cluster slot):

    offramp:{<model>}:policy    the current record, JSON (criterion, thresholds, version, updated_at, source)
    offramp:{<model>}:history   every change, oldest first (the last MAX_HISTORY)
    offramp:policy:<model>      pub/sub channel: each change publishes its version

`update` is a compare-and-set in one Lua script (read the version, check it, write, append,
publish), so two replicas can never both win the same version and a change is never stored
without its notification. `server.control.sync.PolicySync` keeps one replica's engine in step.

Redis down: the engine keeps the policy it has (requests never wait on Redis), a warning is logged
once per outage, `offramp_policy_store_up{store="redis"}` reads 0, admin calls answer 503 after a
short socket timeout instead of hanging, and the thread reconnects with backoff. A replica that
starts while Redis is down serves the last policy it saw (a copy in its state directory), else
the bundle default, and follows the store once it answers.

redis-py is imported when a store is built, so the server imports without the `redis` extra.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from server.bundle import Manifest
from server.control.store import MAX_HISTORY, POLICY_JSON, SOURCE_DEFAULT, stale, startup_policy
from server.errors import NotReady, first_line
from server.files import atomic_write
from server.metrics import Metrics
from server.policy import ExitPolicy

if TYPE_CHECKING:
    import redis

log = logging.getLogger("offramp.store.redis")

STORE_NAME = "redis"  # the `store` label of offramp_policy_store_up
CAS_ATTEMPTS = 20

# KEYS: current, history. ARGV: the version the new record is based on, the record (JSON),
# history cap, channel. Returns -1 when written, else the current version (nothing written).
CAS_SCRIPT = """
local current = redis.call('GET', KEYS[1])
local version = 0
if current then version = tonumber(cjson.decode(current)['version']) end
if version ~= tonumber(ARGV[1]) then return version end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('RPUSH', KEYS[2], ARGV[2])
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[3]), -1)
redis.call('PUBLISH', ARGV[4], version + 1)
return -1
"""


class StoreUnavailable(NotReady):
    """The policy store did not answer: nothing was read or changed (503)."""


def redacted_url(url: str) -> str:
    """Where the store is, for logs and errors: scheme, host, port, database; never credentials."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return f"unix://{parts.path}"
    try:
        port = str(parts.port or 6379)
    except ValueError:
        port = "?"
    return f"{parts.scheme}://{parts.hostname or 'localhost'}:{port}{parts.path or '/0'}"


class RedisPolicyStore:
    """`PolicyStore` on Redis (see the module docstring for the layout)."""

    name = STORE_NAME

    def __init__(self, url: str, *, metrics: Metrics | None = None, last_known_dir: str | Path | None = None,
                 timeout_s: float = 1.0, prefix: str = "offramp"):
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ModuleNotFoundError as err:
            raise ImportError("a redis:// store_url needs the redis client: pip install 'offramp[redis]'") \
                from err
        self._redis = redis
        self.where = redacted_url(url)
        # Short timeouts and one immediate retry (a pooled connection may predate a Redis restart):
        # an admin call with Redis down answers 503 in about a second instead of hanging.
        self.client: redis.Redis = redis.Redis.from_url(
            url, decode_responses=True, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1), health_check_interval=30,
        )
        self._cas = self.client.register_script(CAS_SCRIPT)
        self.prefix = prefix
        self.metrics = metrics
        self.last_known_dir = None if last_known_dir is None else Path(last_known_dir)
        self._up: bool | None = None
        self._lock = threading.Lock()
        self._remembered: dict[str, int] = {}

    def key(self, model: str, what: str) -> str:
        return f"{self.prefix}:{{{model}}}:{what}"

    def channel(self, model: str) -> str:
        return f"{self.prefix}:policy:{model}"

    # -- the protocol ------------------------------------------------------------------------------

    def load(self, model: str, default: ExitPolicy, source: str = SOURCE_DEFAULT) -> ExitPolicy:
        record = self.get(model)
        if record is not None:
            return record
        first = default.with_version(1, source)
        if self._write(model, first, base=0) == -1:
            log.info("policy of %s initialised in %s (%s): %s", model, self.where, source, first.describe())
            return self._seen(model, first)
        record = self.get(model)  # another replica initialised it first
        if record is None:
            raise StoreUnavailable(f"policy of {model} in {self.where} vanished while initialising it")
        return record

    def get(self, model: str) -> ExitPolicy | None:
        with self._calling("read the policy of " + model):
            raw = self.client.get(self.key(model, "policy"))
        record = None if raw is None else self._parse(model, raw)
        return None if record is None else self._seen(model, record)

    def update(self, model: str, policy: ExitPolicy, source: str,
               expected_version: int | None = None) -> ExitPolicy:
        for _ in range(CAS_ATTEMPTS):
            current = self.get(model)
            base = 0 if current is None else current.version
            if expected_version is not None and expected_version != base:
                raise stale(model, base, expected_version)
            record = policy.with_version(base + 1, source)
            found = self._write(model, record, base)
            if found == -1:
                log.info("policy of %s changed by %s: %s", model, source, record.describe())
                return self._seen(model, record)
            if expected_version is not None:
                raise stale(model, found, expected_version)
        raise StoreUnavailable(f"policy of {model} changed {CAS_ATTEMPTS} times while updating it: retry")

    def history(self, model: str) -> list[ExitPolicy]:
        with self._calling("read the policy history of " + model):
            raws = self.client.lrange(self.key(model, "history"), 0, -1)
        records = []
        for raw in raws:
            try:
                records.append(self._decode(raw))
            except ValueError as err:  # ValidationError is one
                log.error("skipping a CORRUPT history entry of %s in %s: %s", model, self.where,
                          first_line(err))
        return records

    # -- replicas ----------------------------------------------------------------------------------

    def startup_policy(self, manifest: Manifest) -> ExitPolicy:
        """`server.control.store.startup_policy`; with Redis down, the last policy this replica saw (version
        kept, so the store's record replaces it only when they differ), else the bundle default as
        version 0, which any stored version replaces. The server starts either way."""
        try:
            return startup_policy(self, manifest)
        except StoreUnavailable as err:
            model = manifest.name
            policy = self.last_known(model)
            if policy is None or policy.problems_for(manifest):
                policy = manifest.default_policy.with_version(0).checked(manifest)
            what = "the bundle default" if policy.version == 0 else "the last policy this replica saw"
            log.warning("%s; %s starts with %s, %s, and follows the store once it answers",
                        err.message, model, what, policy.describe())
            return policy

    def last_known(self, model: str) -> ExitPolicy | None:
        path = self._last_known_path(model)
        if path is None or not path.is_file():
            return None
        try:
            return self._decode(path.read_bytes())
        except (OSError, ValueError) as err:
            log.warning("ignoring the unreadable last-known policy %s: %s", path, first_line(err))
            return None

    def close(self) -> None:
        self.client.close()

    # -- internals ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _calling(self, what: str) -> Iterator[None]:
        """Turn redis-py errors into a 503 and keep the up/down state (and its gauge) current."""
        try:
            yield
        except self._redis.RedisError as err:
            self._mark(False, err)
            raise StoreUnavailable(f"policy store {self.where} unreachable, could not {what}: "
                                   f"{first_line(err)}") from err
        self._mark(True)

    @staticmethod
    def _decode(raw: str | bytes) -> ExitPolicy:
        record = POLICY_JSON.validate_json(raw)
        if record.version < 1:
            raise ValueError(f"stored version {record.version} is not positive")
        return record

    def _write(self, model: str, record: ExitPolicy, base: int) -> int:
        data = POLICY_JSON.dump_json(record).decode()
        keys = [self.key(model, "policy"), self.key(model, "history")]
        with self._calling("change the policy of " + model):
            return int(self._cas(keys=keys, args=[base, data, MAX_HISTORY, self.channel(model)]))

    def _parse(self, model: str, raw: str) -> ExitPolicy | None:
        """The stored record; a corrupt one is renamed aside and reported, as the file store does."""
        try:
            return self._decode(raw)
        except ValueError as err:
            aside = self.key(model, f"policy.corrupt-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
            with self._calling("move aside the corrupt policy of " + model):
                self.client.rename(self.key(model, "policy"), aside)
            log.error("CORRUPT policy of %s in %s (%s): renamed it to %s; the next read starts from a "
                      "default", model, self.where, first_line(err), aside)
            return None

    def _seen(self, model: str, record: ExitPolicy) -> ExitPolicy:
        """Keep a copy of each new version read, so a restart during an outage resumes from it."""
        path = self._last_known_path(model)
        if path is None or self._remembered.get(model) == record.version:
            return record
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, POLICY_JSON.dump_json(record))
            self._remembered[model] = record.version
        except OSError as err:  # only the outage fallback suffers: say so, carry on
            log.warning("cannot keep the last-known policy of %s in %s: %s", model, path, err)
        return record

    def _last_known_path(self, model: str) -> Path | None:
        if self.last_known_dir is None or not model or "/" in model or model in (".", ".."):
            return None
        return self.last_known_dir / f"{model}.redis-last-known.json"

    def _mark(self, up: bool, err: Exception | None = None) -> None:
        with self._lock:
            was, self._up = self._up, up
        if self.metrics is not None:
            self.metrics.store_up(STORE_NAME, up)
        if not up and was is not False:
            log.warning("policy store %s unreachable (%s): serving the last policy; admin changes answer "
                        "503 until it is back", self.where, first_line(err) if err else "?")
        elif up and was is False:
            log.warning("policy store %s reachable again", self.where)
