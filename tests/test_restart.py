"""The cache survives restarts and crashes: a new daemon answers cached domains with no network."""

from __future__ import annotations

import signal

from tests.bodies import TESTING_ONE_MX
from tests.conftest import SocketmapClient


def lookups(port: int, keys: list[str]) -> list[str | None]:
    client = SocketmapClient(port)
    try:
        return [client.ask(key) for key in keys]
    finally:
        client.close()


def _publish_three(rig):
    enforce, testing, nothing = rig.domain(), rig.domain(), rig.domain()
    rig.publish(enforce)
    rig.publish(testing, TESTING_ONE_MX)
    return [enforce, testing, nothing]


def test_restart_answers_from_disk_with_zero_network(rig, start_daemon, tmp_path):
    keys = _publish_three(rig)
    cache = tmp_path / "restart.sqlite3"
    first = start_daemon(cache_path=cache)
    answers = lookups(first.port, keys)
    assert answers[0].startswith("OK secure") and answers[1:] == ["NOTFOUND ", "NOTFOUND "]
    assert first.stop() == 0  # SIGTERM: a clean, drained stop
    before = (len(rig.dns.queries), len(rig.https.requests))
    second = start_daemon(cache_path=cache, log_level="debug")  # cached answers are logged at debug
    assert lookups(second.port, keys) == answers
    assert (len(rig.dns.queries), len(rig.https.requests)) == before
    assert "cache=hit" in second.logs() and "cache=negative" in second.logs()


def test_crash_loses_nothing_that_was_answered(rig, start_daemon, tmp_path):
    # SIGKILL gives no chance to flush: every answer given must already be on disk (WAL commit).
    keys = _publish_three(rig)
    cache = tmp_path / "crash.sqlite3"
    first = start_daemon(cache_path=cache)
    answers = lookups(first.port, keys)
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(timeout=10)
    first.log.close()
    before = (len(rig.dns.queries), len(rig.https.requests))
    second = start_daemon(cache_path=cache)
    assert lookups(second.port, keys) == answers
    assert (len(rig.dns.queries), len(rig.https.requests)) == before


def test_unwritable_cache_keeps_the_daemon_answering(rig, start_daemon, tmp_path):
    # Disk trouble is logged and survived: the daemon serves from memory.
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the cache directory should be")
    daemon = start_daemon(cache_path=blocked / "cache.sqlite3")
    domain = rig.domain()
    rig.publish(domain)
    assert lookups(daemon.port, [domain, domain])[1].startswith("OK secure")
    assert "running with memory only" in daemon.logs()
