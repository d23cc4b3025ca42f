"""Replica sync: apply the shared store's policy changes to this replica's engine.

On Redis, a thread subscribed to its models' channels (server.control.redis_store) applies a
change within milliseconds, and polls every few seconds as a safety net for notifications lost
while disconnected; Redis down: the engine keeps the policy it has, and the thread reconnects
with backoff. On a state directory shared by several processes of one host (`offramp serve
--workers N`), the thread polls the policy files (`poll_interval_s`).
"""

from __future__ import annotations

import logging
import threading
import time

from server.control.redis_store import RedisPolicyStore, StoreUnavailable
from server.control.store import PolicyStore, stored_or_seeded
from server.interface import ServingEngine

log = logging.getLogger("offramp.store.sync")

MIN_BACKOFF_S = 0.1  # PolicySync reconnects after this, doubling up to max_backoff_s


def _redis_errors(store: PolicyStore) -> tuple[type[Exception], ...]:
    return (store._redis.RedisError,) if isinstance(store, RedisPolicyStore) else ()


class PolicySync:
    """Applies the store's policy changes to this replica's engine (pub/sub, plus polling)."""

    def __init__(self, store: PolicyStore, engine: ServingEngine, *, poll_interval_s: float = 2.0,
                 max_backoff_s: float = 5.0):
        if poll_interval_s <= 0 or max_backoff_s <= 0:
            raise ValueError("poll_interval_s and max_backoff_s must be positive")
        self.store, self.engine = store, engine
        self.poll_interval_s, self.max_backoff_s = poll_interval_s, max_backoff_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._refused: set[tuple[str, int]] = set()
        self._backoff = MIN_BACKOFF_S

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="offramp-policy-sync", daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout_s)

    def refresh(self, model: str) -> bool:
        """Apply the stored policy of `model` when it differs from the engine's; True if applied.

        The engine's policy is read first: the admin API stores a change before it applies it, so a
        stored version older than the engine's means the store was reset, and then the store wins
        (an empty store is seeded with this replica's policy rather than the bundle default).
        """
        live = self.engine.policy(model)
        record = stored_or_seeded(self.store, model, live)
        if record == live:  # same version, criterion and thresholds
            return False
        problems = record.problems_for(self.engine.bundle(model).manifest)
        if problems:
            if (model, record.version) not in self._refused:
                self._refused.add((model, record.version))
                log.error("stored policy %s of %s does not fit this replica's bundle (%s): keeping %s",
                          record.describe(), model, problems[0], live.describe())
            return False
        policy = record
        if record.version < live.version:
            log.warning("the store holds v%d of %s, older than this replica's v%d (was it reset?): "
                        "following the store", record.version, model, live.version)
        self.engine.set_policy(model, policy)
        log.info("%s: applied %s from the policy store (%s)", model, policy.describe(), record.source)
        return True

    def _run(self) -> None:
        transient: tuple[type[Exception], ...] = (StoreUnavailable, OSError, *_redis_errors(self.store))
        while not self._stop.is_set():
            try:
                self._follow()
            except transient as err:
                if isinstance(self.store, RedisPolicyStore) and not isinstance(err, StoreUnavailable):
                    self.store._mark(False, err)
                self._stop.wait(self._backoff)
                self._backoff = min(self._backoff * 2, self.max_backoff_s)
            except Exception:  # a bug must not end the thread for good
                log.exception("policy sync failed; retrying in %.1f s", self.max_backoff_s)
                self._stop.wait(self.max_backoff_s)

    def _follow(self) -> None:
        """Subscribe, catch up on everything, then apply changes as they are announced (Redis);
        else look at the store every `poll_interval_s`."""
        if not isinstance(self.store, RedisPolicyStore):
            while not self._stop.is_set():
                for model in self.engine.model_names():
                    self.refresh(model)
                self._stop.wait(self.poll_interval_s)
            return
        models = {self.store.channel(m): m for m in self.engine.model_names()}
        pubsub = self.store.client.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(*models)
            self._backoff = MIN_BACKOFF_S  # connected: the next outage starts retrying quickly
            next_poll = 0.0
            while not self._stop.is_set():
                if time.monotonic() >= next_poll:  # catch-up after (re)connecting, then the safety net
                    for model in models.values():
                        self.refresh(model)
                    next_poll = time.monotonic() + self.poll_interval_s
                message = pubsub.get_message(timeout=0.25)
                if message is not None and message.get("type") == "message":
                    announced = models.get(message["channel"])
                    if announced is not None:
                        self.refresh(announced)
        finally:
            pubsub.close()
