"""Pruning the SQLite cache (README "Cache size"): rows that no longer serve are deleted, so a
flood of unique no-policy domains cannot grow the file without bound, while a usable policy is
never pruned (RFC 8461 §5.1). Real SQLite files throughout; the daemon and `warm` prune too.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path

from mtasts_policyd.core.errors import Failure, FailureKind
from mtasts_policyd.core.policy import parse_policy
from mtasts_policyd.store.base import PruneSettings
from mtasts_policyd.store.cache import PolicyCache
from mtasts_policyd.store.entry import Entry
from tests.bodies import ENFORCE
from tests.conftest import SocketmapClient, write_config
from tests.test_warm import run_warm

DAY = 86400.0
NOW = 1_800_000_000.0
SETTINGS = PruneSettings(prune_after=30 * DAY, negative_grace=3600, max_negative_entries=1000)
NO_RECORD = Failure(FailureKind.NO_RECORD, "_mta-sts.x. does not exist (NXDOMAIN)")


def rows(path: Path) -> set[str]:
    with sqlite3.connect(path) as db:
        return {row[0] for row in db.execute("SELECT domain FROM policies")}


def negative(domain: str, until: float, used: float = 0.0) -> Entry:
    return Entry(domain, negative_until=until, failure=NO_RECORD, failure_at=until - 3600, last_lookup=used)


def policy(domain: str, fetched_at: float, max_age: int, used: float) -> Entry:
    body = ENFORCE.format(d=domain).replace("max_age: 86400", f"max_age: {max_age}").encode()
    return Entry(domain, txt_record="v=STSv1; id=1", policy_id="1", policy_body=body, policy=parse_policy(body),
                 fetched_at=fetched_at, txt_expires_at=fetched_at + 3600, last_lookup=used)


def test_rows_past_use_are_pruned_and_usable_policies_never(tmp_path):
    path = tmp_path / "cache.sqlite3"
    cache = PolicyCache(str(path))
    for entry in [
        negative("fresh-negative.test", NOW + 600),  # within its TTL
        negative("grace-negative.test", NOW - 600),  # past its TTL, within the grace
        negative("old-negative.test", NOW - 7200),  # past TTL and grace: gone
        Entry("backing-off.test", failure=Failure(FailureKind.DNS_TEMPORARY, "timed out"), failure_at=NOW - 60,
              failures=3, retry_after=NOW + 240),  # still backing off: the back-off must hold
        Entry("failed-long-ago.test", failure=Failure(FailureKind.FETCH_ERROR, "500"), failure_at=NOW - 3 * DAY,
              failures=1, retry_after=NOW - 2 * DAY),  # gone
        # RFC 8461 §5.1: a usable policy is used until it expires, looked up lately or not.
        policy("usable-unused.test", NOW - 40 * DAY, 31557600, used=NOW - 40 * DAY),
        policy("expired-unused.test", NOW - 40 * DAY, 86400, used=NOW - 40 * DAY),  # gone
        policy("expired-used.test", NOW - 40 * DAY, 86400, used=NOW - DAY),  # kept for prune_after
    ]:
        assert cache.put(entry) is not None
    assert cache.prune(NOW, SETTINGS, pause=0) == 3
    assert rows(path) == {"fresh-negative.test", "grace-negative.test", "backing-off.test",
                          "usable-unused.test", "expired-used.test"}
    assert cache.get("old-negative.test") is None  # gone from memory too
    assert cache.get("usable-unused.test").usable_policy(NOW) is not None
    assert cache.prune(NOW, SETTINGS, pause=0) == 0
    cache.close()


def test_flood_of_unique_no_policy_domains_keeps_rows_and_file_bounded(tmp_path):
    # Every flood domain is still within its negative TTL: only the cap (max_negative_entries)
    # bounds them, least recently looked up first; the file's size stops growing.
    path = tmp_path / "cache.sqlite3"
    cache = PolicyCache(str(path))
    keeper = policy("keeper.test", NOW - DAY, 31557600, used=NOW - 90 * DAY)
    cache.put(keeper)
    sizes = []
    for round in range(5):
        for n in range(5000):
            used = NOW + round * 5000 + n
            cache.put(negative(f"f{round}-{n}.flood.test", NOW + 3600, used=used))
        cache.prune(NOW, SETTINGS, pause=0)
        kept = rows(path)
        assert len(kept) == SETTINGS.max_negative_entries + 1
        assert "keeper.test" in kept
        assert {f"f{round}-{n}.flood.test" for n in range(4000, 5000)} <= kept  # the most recent ones
        sizes.append(os.path.getsize(path) + os.path.getsize(f"{path}-wal"))
    assert max(sizes[1:]) <= sizes[0] * 1.2, sizes
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA freelist_count").fetchone()[0] < 50  # free pages were given back
    cache.close()


def test_prune_lets_lookups_in_between_batches(tmp_path):
    # Pruning deletes in small batches: a reader of the cache never waits for the whole prune.
    path = tmp_path / "cache.sqlite3"
    cache = PolicyCache(str(path))
    for n in range(20000):
        cache.put(negative(f"old{n}.test", NOW - DAY))
    cache.put(negative("live.test", NOW + 3600))
    longest = 0.0
    done = threading.Event()

    def lookups() -> None:
        nonlocal longest
        while not done.is_set():
            started = time.perf_counter()
            assert cache.get("live.test") is not None
            longest = max(longest, time.perf_counter() - started)
            time.sleep(0.001)

    reader = threading.Thread(target=lookups)
    reader.start()
    started = time.perf_counter()
    try:
        assert cache.prune(NOW, SETTINGS) == 20000
    finally:
        done.set()
        reader.join(timeout=10)
    assert longest < (time.perf_counter() - started) / 4, longest  # a batch, not the whole prune
    assert rows(path) == {"live.test"}
    cache.close()


def test_daemon_prunes_a_flood_of_no_policy_domains(rig, start_daemon, tmp_path):
    path = tmp_path / "daemon.sqlite3"
    cap = 100
    daemon = start_daemon(cache_path=path, cache={"max_negative_entries": cap})
    domains = [rig.domain("none") for _ in range(600)]  # no records published: no-record, cached

    def ask(part: list[str]) -> None:
        client = SocketmapClient(daemon.port, timeout=30)
        for domain in part:
            assert client.ask(domain) == "NOTFOUND "

    threads = [threading.Thread(target=ask, args=(domains[i::6],)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    deadline = time.monotonic() + 20  # the daemon looks every 5 s at how many rows were added
    while len(rows(path)) > 2 * cap:
        assert time.monotonic() < deadline, len(rows(path))
        time.sleep(0.2)
    while "cache pruned rows=" not in daemon.logs():  # logged after the freed pages go back: a moment later
        assert time.monotonic() < deadline, "no 'cache pruned rows=' in the daemon's log"
        time.sleep(0.2)
    assert daemon.process.poll() is None


def test_warm_prunes_the_cache(rig, tmp_path):
    path = tmp_path / "warm.sqlite3"
    cache = PolicyCache(str(path))
    now = time.time()
    cache.put(negative("expired-long-ago.test", now - 2 * DAY))
    cache.put(negative("fresh.test", now + 600))
    cache.close()
    config = write_config(rig, tmp_path, path, create_cache=False, name="warm.yaml")
    result = run_warm(config, "--jitter", "0", "--all")
    assert result.returncode == 0, result.stderr
    assert rows(path) == {"fresh.test"}
