"""Honest cache health (README "Cache health"): a disk that refuses writes is reported, survived
and mended, and nothing the daemon knows is lost.

The daemon tests run a real daemon on a small tmpfs in a mount namespace of its own (`unshare -m`
holds it, the daemons enter it with `nsenter -m`), so that the disk can really fill up, turn
read-only or hold a corrupt file, as root, without touching the machine. Files there are reached
from the test through /proc/PID/root (SQLite, which resolves that link, only through nsenter).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mtasts_policyd.core.policy import parse_policy
from mtasts_policyd.store import sqlite as sqlite_store
from mtasts_policyd.store.cache import PolicyCache
from mtasts_policyd.store.entry import Entry, merge
from tests.bodies import ENFORCE
from tests.conftest import SocketmapClient, free_port, secure, stored_entry
from tests.test_metrics import get, scrape, value

CHECK_INTERVAL = 0.2  # cache.check_interval for these daemons: recovery within a fraction of a second


def wait_for(condition: Callable[[], object], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class MountNamespace:
    """A tmpfs of `size` at `mount`, private to a mount namespace held by a sleeping process."""

    def __init__(self, mount: Path, size: str) -> None:
        self.mount = mount
        mount.mkdir(parents=True, exist_ok=True)
        script = 'mount -t tmpfs -o size="$1",mode=0755 tmpfs "$0" && echo ready && exec sleep 600'
        self.holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script,
                                        str(mount), size], stdout=subprocess.PIPE, text=True)
        assert self.holder.stdout is not None
        assert self.holder.stdout.readline().strip() == "ready"  # bounded: `sleep 600` follows at once

    @property
    def wrapper(self) -> list[str]:
        """Prefix that runs a command inside the namespace (nsenter execs it: same PID)."""
        return ["nsenter", "-t", str(self.holder.pid), "-m", "--"]

    def run(self, *command: str) -> None:
        subprocess.run([*self.wrapper, *command], check=True, timeout=30, capture_output=True)

    def host(self, name: str) -> Path:
        """A file of the tmpfs, for plain file operations from the test process."""
        return Path(f"/proc/{self.holder.pid}/root{self.mount}/{name}")

    def sqlite(self, code: str) -> None:
        """Run Python code with `db` connected to the daemon's cache file, inside the namespace."""
        self.run(sys.executable, "-c", f"import sqlite3; db = sqlite3.connect({str(self.mount / 'cache.sqlite3')!r}); "
                                       f"{code}; db.close()")

    def close(self) -> None:
        self.holder.kill()
        self.holder.wait(timeout=10)


@pytest.fixture
def namespace(tmp_path: Path) -> Iterator[Callable[[str], MountNamespace]]:
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("nsenter") or not shutil.which("chattr"):
        pytest.skip("needs root, unshare, nsenter and chattr")
    made: list[MountNamespace] = []

    def make(size: str = "8m") -> MountNamespace:
        made.append(MountNamespace(tmp_path / f"mnt{len(made)}", size))
        return made[-1]

    yield make
    for ns in made:
        ns.close()


class Run:
    """Daemons on one cache file (in `ns`, if given), with /health and /metrics."""

    def __init__(self, rig, start_daemon, ns: MountNamespace | None = None, directory: Path | None = None) -> None:
        self.rig, self.start_daemon, self.ns = rig, start_daemon, ns
        self.path = (ns.mount if ns else directory or Path()) / "cache.sqlite3"
        self.metrics_port = 0

    def start(self):
        self.metrics_port = free_port()
        daemon = self.start_daemon(cache_path=self.path, wrapper=self.ns.wrapper if self.ns else None,
                                   metrics={"listen": f"127.0.0.1:{self.metrics_port}"},
                                   cache={"check_interval": CHECK_INTERVAL})
        wait_for(lambda: self._health_or_none() is not None, "the metrics listener")
        return daemon

    def _health_or_none(self) -> dict | None:
        try:
            return self.health()
        except OSError:
            return None

    def health(self) -> dict:
        status, _, body = get(self.metrics_port, "/health")
        assert status == 200
        return json.loads(body)

    def gauges(self) -> tuple[float, float]:
        samples = scrape(self.metrics_port)
        return value(samples, "mtasts_cache_persistent"), value(samples, "mtasts_cache_unsaved_entries")

    def degraded(self, unsaved: int) -> bool:
        cache = self.health()["cache"]
        return cache["persistent"] is False and cache["unsaved_entries"] >= unsaved

    def healthy(self) -> bool:
        health = self.health()
        return health["status"] == "ok" and health["cache"]["unsaved_entries"] == 0

    def assert_degraded(self, unsaved: int) -> None:
        wait_for(lambda: self.degraded(unsaved), f"/health degraded with {unsaved} unsaved entries")
        health = self.health()
        assert health["status"] == "degraded"
        persistent, waiting = self.gauges()
        assert persistent == 0 and waiting >= unsaved

    def assert_recovered(self) -> None:
        wait_for(self.healthy, "/health ok with nothing unsaved")
        assert self.gauges() == (1, 0)

    def begin(self):
        """Two published enforce domains; a daemon that has stored the first. (daemon, client, first, second)"""
        before, during = self.rig.domain(), self.rig.domain()
        self.rig.publish(before)
        self.rig.publish(during)
        daemon = self.start()
        client = SocketmapClient(daemon.port)
        assert client.ask(before) == "OK " + secure(before)
        return daemon, client, before, during

    def finish(self, daemon, domains: list[str]) -> None:
        """Recovered with one log line each way; a restart finds every domain on disk."""
        self.assert_recovered()
        one_state_change_each(daemon.logs())
        assert daemon.stop() == 0
        self.restart_finds(domains)

    def restart_finds(self, domains: list[str]) -> None:
        """A new daemon on the same file answers every domain from it: no network at all."""
        for domain in domains:
            self.rig.https.remove(domain)  # a fetch would now fail: only the disk can answer
        before = (len(self.rig.dns.queries), len(self.rig.https.requests))
        daemon = self.start()
        client = SocketmapClient(daemon.port)
        assert [client.ask(d) for d in domains] == ["OK " + secure(d) for d in domains]
        assert (len(self.rig.dns.queries), len(self.rig.https.requests)) == before
        assert self.healthy()


def fill(path: Path) -> None:
    """Write zeros to `path` until the file system is full (unbuffered: nothing left to flush)."""
    with open(path, "wb", buffering=0) as handle:
        for size in (65536, 512):  # then the last partial block
            try:
                while True:
                    handle.write(b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc


def one_state_change_each(logs: str) -> None:
    """One ERROR when the disk fails and one INFO when it is back, not one per write or check."""
    assert logs.count("not persistent:") + logs.count("running with memory only") == 1, logs
    assert logs.count("persistent again") == 1, logs


def test_disk_full_is_reported_survived_and_mended(rig, start_daemon, namespace):
    ns = namespace("8m")
    run = Run(rig, start_daemon, ns)
    daemon, client, before, during = run.begin()
    assert run.healthy() and run.gauges() == (1, 0)
    fill(ns.host("filler"))
    assert client.ask(during) == "OK " + secure(during)  # fetched; the disk refuses it
    run.assert_degraded(unsaved=1)
    fetches = rig.https.count(during)
    assert client.ask(during) == "OK " + secure(during)  # answered from memory, not fetched again
    assert client.ask(before) == "OK " + secure(before)
    assert rig.https.count(during) == fetches and daemon.process.poll() is None
    ns.host("filler").unlink()  # the disk comes back
    run.finish(daemon, [before, during])
    assert "wrote 1 entries that were kept in memory" in daemon.logs()


def immutable_blocks_open_files(directory: Path) -> bool:
    """Whether `chattr +i` stops writes through a descriptor opened before (ext4 does; tmpfs only
    refuses new opens)."""
    probe = directory / "immutable-probe"
    with open(probe, "wb", buffering=0) as handle:
        if subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode != 0:
            return False
        try:
            handle.write(b"x")
            blocked = False
        except OSError:
            blocked = True
        finally:
            subprocess.run(["chattr", "-i", str(probe)], check=True)
    probe.unlink()
    return blocked


def test_read_only_file_is_reported_survived_and_mended(rig, start_daemon, tmp_path):
    # chattr +i: even root cannot write the file any more (a running daemon's files cannot be
    # remounted read-only: the kernel refuses while they are open for writing).
    if os.geteuid() != 0 or not shutil.which("chattr") or not immutable_blocks_open_files(tmp_path):
        pytest.skip("needs root and a file system where chattr +i stops writes to open files")
    run = Run(rig, start_daemon, directory=tmp_path)
    daemon, client, before, during = run.begin()
    files = [str(run.path), f"{run.path}-wal"]  # not -shm: SQLite maps it, and writes to it are loads
    subprocess.run(["chattr", "+i", *files], check=True)
    try:
        assert client.ask(during) == "OK " + secure(during)
        run.assert_degraded(unsaved=1)
        assert client.ask(during) == "OK " + secure(during) and daemon.process.poll() is None
    finally:
        subprocess.run(["chattr", "-i", *files], check=True)
    run.finish(daemon, [before, during])


def test_read_only_file_system_at_start_then_writable(rig, start_daemon, namespace):
    ns = namespace()
    run = Run(rig, start_daemon, ns)
    first, _, before, during = run.begin()
    assert first.stop() == 0
    ns.run("mount", "-o", "remount,ro", str(ns.mount))  # nothing holds a file open now
    daemon = run.start()
    assert "running with memory only" in daemon.logs()
    client = SocketmapClient(daemon.port)
    assert client.ask(during) == "OK " + secure(during)
    run.assert_degraded(unsaved=1)
    assert client.ask(before) == "OK " + secure(before)  # from the network: the file cannot be opened
    ns.run("mount", "-o", "remount,rw", str(ns.mount))
    run.finish(daemon, [before, during])


def test_corrupt_file_is_set_aside_and_everything_written_again(rig, start_daemon, namespace):
    ns = namespace()
    run = Run(rig, start_daemon, ns)
    daemon, client, before, during = run.begin()
    ns.sqlite("db.execute('PRAGMA wal_checkpoint(TRUNCATE)')")  # everything in the main file
    # The directory is made immutable first, so that the repair waits and the degraded state can
    # be seen; then the file's pages are overwritten while the daemon runs.
    ns.run("chattr", "+i", str(ns.mount))
    try:
        size = ns.host("cache.sqlite3").stat().st_size
        with open(ns.host("cache.sqlite3"), "r+b") as handle:
            handle.write(b"this is not a database " * (size // 23))
        run.assert_degraded(unsaved=1)  # `before`, known in memory, waits for a sound file
        assert client.ask(during) == "OK " + secure(during)
        run.assert_degraded(unsaved=2)
        assert client.ask(before) == "OK " + secure(before) and daemon.process.poll() is None
    finally:
        ns.run("chattr", "-i", str(ns.mount))
    run.finish(daemon, [before, during])
    aside = sorted(p.name for p in ns.host("").iterdir() if p.name.startswith("cache.sqlite3.corrupt-"))
    assert len(aside) in (1, 2) and aside[1:] == [f"{aside[0]}-wal"][:len(aside) - 1], aside  # with its WAL
    assert (ns.host(aside[0]).read_bytes()[:23]) == b"this is not a database "  # kept for the operator
    logs = daemon.logs()
    assert "is corrupt" in logs and f"moved aside to {ns.mount / aside[0]}" in logs


def test_new_cache_file_and_directory_modes(rig, start_daemon, tmp_path):
    # 0640: the group (cache tools run by an operator in the service group) may read; others not.
    domain = rig.domain()
    rig.publish(domain)
    path = tmp_path / "state" / "cache.sqlite3"
    umask = os.umask(0o022)  # the daemon inherits the usual umask, which would give 0644
    try:
        daemon = start_daemon(cache_path=path)
    finally:
        os.umask(umask)
    assert SocketmapClient(daemon.port).ask(domain) == "OK " + secure(domain)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in path.parent.iterdir()}
    assert modes == {"cache.sqlite3": 0o640, "cache.sqlite3-wal": 0o640, "cache.sqlite3-shm": 0o640}
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o750
    assert daemon.stop() == 0


def test_existing_cache_file_mode_is_left_alone(rig, start_daemon, tmp_path):
    path = tmp_path / "cache.sqlite3"
    path.touch(mode=0o600)
    os.chmod(path, 0o600)
    daemon = start_daemon(cache_path=path)
    domain = rig.domain()
    rig.publish(domain)
    assert SocketmapClient(daemon.port).ask(domain) == "OK " + secure(domain)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(Path(f"{path}-wal").stat().st_mode) == 0o600
    assert daemon.stop() == 0


# ----- the cache alone, on real files ------------------------------------------------------------


def _enforce(domain: str, fetched_at: float, policy_id: str = "1") -> Entry:
    body = ENFORCE.format(d=domain).encode()
    return Entry(domain, policy_id=policy_id, policy_body=body, policy=parse_policy(body), fetched_at=fetched_at)


def refusing_cache(path: str, *, strict: bool = False) -> PolicyCache:
    """A cache whose first connection to the file refuses writes, as on a read-only file (SQLite
    answers them "not authorized"); the connection maintain() opens instead takes them."""
    opened = 0

    def connect(path: str) -> sqlite3.Connection:
        nonlocal opened
        opened += 1
        db = sqlite_store.connect(path)
        if opened == 1:
            db.set_authorizer(lambda action, table, *_: sqlite3.SQLITE_DENY if action in (
                sqlite3.SQLITE_INSERT, sqlite3.SQLITE_UPDATE, sqlite3.SQLITE_DELETE) and table in (
                "policies", "probe") else sqlite3.SQLITE_OK)
        return db

    return PolicyCache(store=sqlite_store.SqliteStore(path, strict=strict, connect=connect))


def test_refused_write_is_kept_and_written_when_the_disk_takes_it(tmp_path):
    path = str(tmp_path / "c.sqlite3")
    cache = refusing_cache(path)
    kept = cache.put(_enforce("a.test", 1000.0))
    assert kept is not None and kept.version == 0  # the version the disk has (none)
    assert not cache.persistent and cache.unsaved == 1 and cache.get("a.test") == kept
    assert stored_entry(path, "a.test") is None
    cache.maintain(merge)  # reopens the connection (a read-only connection calls for it) and writes
    assert cache.persistent and cache.unsaved == 0
    assert stored_entry(path, "a.test").policy_id == "1"
    cache.close()


def test_first_check_finds_a_file_that_refuses_writes_before_any_write(tmp_path):
    # The check's probe write tells the truth even when the daemon has nothing to write.
    cache = refusing_cache(str(tmp_path / "c.sqlite3"))
    assert cache.persistent  # nothing has been written yet
    cache.maintain(merge)
    assert not cache.persistent and cache.unsaved == 0
    cache.maintain(merge)  # the refusing connection is replaced by a new one, whose probe succeeds
    assert cache.persistent
    cache.close()


def test_unsaved_entry_does_not_replace_a_newer_fetch_by_another_process(tmp_path, open_cache):
    # While our write was refused, the warmer stored a later fetch: the retry merges like any write.
    path = str(tmp_path / "c.sqlite3")
    cache, warmer = refusing_cache(path), open_cache(path)
    cache.put(_enforce("a.test", 1000.0, "old"))
    warmer.put(_enforce("a.test", 2000.0, "new"))
    cache.maintain(merge)
    assert cache.unsaved == 0 and stored_entry(path, "a.test").policy_id == "new"
    assert cache.get("a.test").policy_id == "new"
    cache.close()


def test_deleted_file_is_recreated_with_everything_known(tmp_path, open_cache):
    path = tmp_path / "c.sqlite3"
    cache = PolicyCache(str(path), memory_entries=1)
    cache.put(_enforce("a.test", 1000.0))
    cache.put(_enforce("b.test", 1000.0))  # evicts a.test from memory: only the old file has it
    for name in ("c.sqlite3", "c.sqlite3-wal", "c.sqlite3-shm"):
        (tmp_path / name).unlink()
    cache.maintain(merge)
    assert cache.persistent and cache.unsaved == 0
    fresh = open_cache(path)
    assert fresh.get("a.test").policy_id == "1" and fresh.get("b.test").policy_id == "1"
    cache.close()


def test_corrupt_file_is_set_aside_and_recreated(tmp_path):
    path = tmp_path / "c.sqlite3"
    cache = PolicyCache(str(path))
    cache.put(_enforce("a.test", 1000.0))
    with contextlib.closing(sqlite3.connect(path)) as other:  # the WAL into the file, by another connection
        other.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    with open(path, "r+b") as handle:
        handle.write(b"\xff" * 100)  # the header: "file is not a database"
    cache.maintain(merge)
    assert cache.persistent and cache.unsaved == 0
    assert [p.name.split("-")[0] for p in tmp_path.glob("c.sqlite3.corrupt-*")] == ["c.sqlite3.corrupt"]
    assert stored_entry(path, "a.test").policy_id == "1"
    cache.close()


def test_close_with_unsaved_entries_says_they_are_lost(tmp_path, caplog):
    cache = refusing_cache(str(tmp_path / "c.sqlite3"))
    cache.put(_enforce("a.test", 1000.0))
    cache.close()
    assert "closing with 1 entries the disk did not take" in caplog.text

