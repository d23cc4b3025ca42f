"""Which policy store a server uses, and whether a thread keeps its engine in step with it."""

from __future__ import annotations

import logging

from server.control.redis_store import RedisPolicyStore  # redis-py itself loads when a store is built
from server.control.store import FilePolicyStore, PolicyStore
from server.control.sync import PolicySync
from server.interface import ServingEngine
from server.metrics import Metrics
from server.settings import Settings

log = logging.getLogger("offramp.store")


def build_store(settings: Settings, metrics: Metrics) -> PolicyStore:
    """Redis, shared by a replica set, when `store_url` is set; else the state directory. The
    Redis store keeps a copy of the last policy seen in the state directory."""
    if settings.store_url is None:
        metrics.store_up("file", True)
        return FilePolicyStore(settings.resolved_state_dir)
    store = RedisPolicyStore(  # imports redis-py, the optional `redis` extra
        settings.store_url.get_secret_value(), metrics=metrics, last_known_dir=settings.resolved_state_dir,
    )
    log.info("exit policies live in the shared store %s", store.where)
    return store


FILE_POLL_S = 0.5  # how soon a change through one worker process reaches the others


def build_sync(store: PolicyStore, engine: ServingEngine, settings: Settings) -> PolicySync | None:
    """A `PolicySync` applying the shared store's changes to `engine`: always on Redis; on the state
    directory when several worker processes share it; else None (only this process writes)."""
    if isinstance(store, RedisPolicyStore):
        return PolicySync(store, engine)
    if settings.workers > 1:
        return PolicySync(store, engine, poll_interval_s=FILE_POLL_S)
    return None
