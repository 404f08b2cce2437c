"""Several processes on one cache file (daemon, warmer, cache commands): no lost updates."""

from __future__ import annotations

from mtasts_policyd.core.policy import Mode
from mtasts_policyd.store.entry import Entry
from tests.bodies import TESTING_ONE_MX
from tests.conftest import stored_entry
from tests.test_cache_health import refusing_cache


def test_stale_writer_does_not_overwrite_newer_policy(rig, make_resolver, clock, tmp_path):
    domain = rig.domain()
    rig.publish(domain, ttl=60)
    path = tmp_path / "shared.sqlite3"
    daemon, warmer = make_resolver(path), make_resolver(path)
    assert daemon.resolve(domain).decision.policy_id == "1"  # the daemon now holds id 1 in memory
    clock.advance(61)
    rig.publish(domain, TESTING_ONE_MX, id="2", ttl=60)
    assert warmer.resolve(domain, refetch=True).decision.policy_id == "2"
    # The daemon refreshes from its stale copy and fails: its write must not bring back id 1.
    rig.dns.fault(f"_mta-sts.{domain}", "servfail")
    try:
        decision = daemon.resolve(domain).decision
    finally:
        rig.dns.fault(f"_mta-sts.{domain}", None)
    assert decision.policy_id == "2" and decision.mode is Mode.TESTING
    stored = stored_entry(path, domain)
    assert stored.policy_id == "2" and stored.policy.mode is Mode.TESTING


def test_later_result_wins_when_nobody_fetched_newer(rig, make_resolver, clock, tmp_path):
    domain = rig.domain()
    path = tmp_path / "shared.sqlite3"
    first, second = make_resolver(path), make_resolver(path)
    first.resolve(domain)  # no record: negative entry
    second.resolve(domain)
    rig.publish(domain)
    clock.advance(3600)
    assert first.resolve(domain).decision.mode is Mode.ENFORCE  # first's copy was stale; merged and stored
    assert stored_entry(path, domain).policy.mode is Mode.ENFORCE


def test_conflicting_insert_is_detected(tmp_path, open_cache):
    path = str(tmp_path / "c.sqlite3")
    a, b = open_cache(path), open_cache(path)
    assert a.put(Entry("x.test")) is not None
    assert b.put(Entry("x.test")) is None  # b thought the row did not exist
    current = b.reload("x.test")
    assert current.version == 1
    assert b.put(current) is not None and a.reload("x.test").version == 2


def test_batched_lookup_time_is_never_moved_back(tmp_path, open_cache):
    # The daemon records lookup times in batches without a version bump; a writer that read the
    # row before that must not put an older lookup time back (the warmer selects by it).
    path = str(tmp_path / "c.sqlite3")
    warmer, daemon = open_cache(path), open_cache(path)
    warmer.put(Entry("x.test", last_lookup=100.0))
    read = warmer.reload("x.test")
    daemon.touch({"x.test": 200.0})
    assert warmer.put(read) is not None
    assert stored_entry(path, "x.test").last_lookup == 200.0


def test_write_failures_raise_only_in_strict_mode(tmp_path, open_cache):
    # The daemon survives a disk that refuses writes (memory answers on); `cache import` and
    # `cache forget` must report it. refusing_cache makes SQLite refuse writes like a read-only disk.
    import pytest

    from mtasts_policyd.store.base import CacheWriteError

    lenient = refusing_cache(str(tmp_path / "a.sqlite3"))
    assert lenient.put(Entry("x.test")) is not None and lenient.get("x.test") is not None
    strict = refusing_cache(str(tmp_path / "b.sqlite3"), strict=True)
    with pytest.raises(CacheWriteError, match="cannot write x.test"):
        strict.put(Entry("x.test"))
    with pytest.raises(CacheWriteError, match="cannot delete x.test"):
        strict.delete("x.test")
    lenient.close()
    strict.close()
