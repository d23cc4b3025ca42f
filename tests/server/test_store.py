"""Policy store: atomic persistence, reload, corrupt files set aside, compare-and-set under threads."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import pytest

from server.control.store import SOURCE_DEFAULT, SOURCE_PUT, FilePolicyStore
from server.errors import PreconditionFailed
from server.policy import ExitPolicy

DEFAULT = ExitPolicy(criterion="max_prob", thresholds=[0.9, 0.8])


def test_first_load_uses_the_default_and_reload_keeps_policy_and_history(tmp_path: Path) -> None:
    store = FilePolicyStore(tmp_path)
    first = store.load("m", DEFAULT)
    assert (first.version, first.source, first.thresholds) == (1, SOURCE_DEFAULT, (0.9, 0.8))
    store.update("m", ExitPolicy(criterion="entropy", thresholds=[0.2, None]), SOURCE_PUT)
    patience = ExitPolicy(criterion="patience", thresholds=[2, 2])
    store.update("m", patience, "admin:calibrate", expected_version=2)

    reopened = FilePolicyStore(tmp_path)  # a restart
    current = reopened.load("m", DEFAULT)
    assert (current.criterion, current.thresholds, current.version) == ("patience", (2.0, 2.0), 3)
    history = reopened.history("m")
    sources = [(1, SOURCE_DEFAULT), (2, SOURCE_PUT), (3, "admin:calibrate")]
    assert [(h.version, h.source) for h in history] == sources
    assert history[1].thresholds == (0.2, None)
    assert not list(tmp_path.glob(".*tmp*"))  # no temp files left behind


def test_stale_expected_version_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    store = FilePolicyStore(tmp_path)
    store.load("m", DEFAULT)
    with pytest.raises(PreconditionFailed, match="version 1, not 7") as err:
        store.update("m", ExitPolicy(criterion="margin", thresholds=[0.5, 0.5]), SOURCE_PUT,
                     expected_version=7)
    assert err.value.status_code == 412
    assert store.get("m").version == 1 and len(store.history("m")) == 1


@pytest.mark.parametrize("content", [b"{not json", b'{"format": 1}', b"", b'{"format": 1, "model": "other", '
                                     b'"current": {}, "history": []}'])
def test_corrupt_file_is_moved_aside_and_default_used(tmp_path: Path, content: bytes, caplog) -> None:
    store = FilePolicyStore(tmp_path)
    store.path("m").write_bytes(content)
    with caplog.at_level(logging.ERROR, logger="offramp.store"):
        record = store.load("m", DEFAULT)
    assert (record.version, record.thresholds) == (1, (0.9, 0.8))
    aside = list(tmp_path.glob("m.policy.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == content
    assert any("CORRUPT" in r.message and str(aside[0]) in r.message for r in caplog.records)
    assert FilePolicyStore(tmp_path).get("m").thresholds == (0.9, 0.8)  # a valid file again


def test_file_is_complete_json_after_every_write(tmp_path: Path) -> None:
    store = FilePolicyStore(tmp_path)
    store.load("m", DEFAULT)
    for i in range(5):
        store.update("m", ExitPolicy(criterion="max_prob", thresholds=[0.5 + i / 10, None]), SOURCE_PUT)
        data = json.loads(store.path("m").read_text())
        assert data["current"]["version"] == i + 2 and len(data["history"]) == i + 2


def test_concurrent_compare_and_set_has_exactly_one_winner_per_version(tmp_path: Path) -> None:
    store = FilePolicyStore(tmp_path)
    store.load("m", DEFAULT)
    rounds, threads_per_round = 5, 8
    for _ in range(rounds):
        version = store.get("m").version
        barrier = threading.Barrier(threads_per_round)
        wins: list[int] = []
        losses: list[int] = []

        def worker(i: int, version: int = version, barrier: threading.Barrier = barrier,
                   wins: list[int] = wins, losses: list[int] = losses) -> None:
            barrier.wait()
            try:
                store.update("m", ExitPolicy(criterion="max_prob", thresholds=[i / 10, None]), SOURCE_PUT,
                             expected_version=version)
                wins.append(i)
            except PreconditionFailed:
                losses.append(i)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(threads_per_round)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(wins) == 1 and len(losses) == threads_per_round - 1
        current = store.get("m")
        assert current.version == version + 1 and current.thresholds == (wins[0] / 10, None)
    assert [h.version for h in store.history("m")] == list(range(1, rounds + 2))


def test_unconditional_updates_from_threads_all_land_in_order(tmp_path: Path) -> None:
    store = FilePolicyStore(tmp_path)
    store.load("m", DEFAULT)
    threads = [threading.Thread(target=store.update, args=("m", DEFAULT, f"t{i}")) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    history = store.history("m")
    assert [h.version for h in history] == list(range(1, 12))
    assert sorted(h.source for h in history[1:]) == sorted(f"t{i}" for i in range(10))
