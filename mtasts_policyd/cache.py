"""The policy cache: SQLite on disk (survives restarts and crashes), an LRU in memory in front.

RFC 8461 §5.1 makes the cache part of the protocol: a cached policy is used until max_age after
its fetch, whatever DNS and HTTPS say meanwhile. So the disk copy is the truth and the memory
layer only saves SQLite reads. Disk trouble is logged and survived: the daemon keeps answering
from memory rather than failing lookups (losing the disk copy costs fetches, not mail).
"""

from __future__ import annotations

import itertools
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

import cachetools

from .errors import Failure, FailureKind, InvalidPolicy
from .policy import Policy, parse_policy

log = logging.getLogger("mtasts_policyd.cache")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS policies (
    domain          TEXT PRIMARY KEY,
    txt_record      TEXT,
    policy_id       TEXT,
    policy_body     BLOB,
    fetched_at      REAL,
    txt_expires_at  REAL NOT NULL DEFAULT 0,
    negative_until  REAL NOT NULL DEFAULT 0,
    failure_kind    TEXT,
    failure_detail  TEXT,
    failure_at      REAL,
    failures        INTEGER NOT NULL DEFAULT 0,
    retry_after     REAL NOT NULL DEFAULT 0,
    last_lookup     REAL NOT NULL DEFAULT 0,
    mx_hosts        TEXT,
    mx_expires_at   REAL NOT NULL DEFAULT 0,
    version         INTEGER NOT NULL DEFAULT 1
)
"""
_COLUMNS = ("domain", "txt_record", "policy_id", "policy_body", "fetched_at", "txt_expires_at", "negative_until",
            "failure_kind", "failure_detail", "failure_at", "failures", "retry_after", "last_lookup", "mx_hosts", "mx_expires_at", "version")


WAL_SIZE_LIMIT = 16 * 1024 * 1024  # bytes the WAL file is truncated to after a checkpoint
PRUNE_BATCH = 2000  # rows read per step of a prune scan
DELETE_BATCH = 200  # rows deleted (or pages freed) per transaction: the lock is held that long


@dataclass(frozen=True)
class PruneSettings:
    """Which rows no longer serve (README "Cache size"); the values are the `cache` config keys."""

    prune_after: float = 30 * 86400  # a row not looked up for this long goes, unless its policy is usable
    negative_grace: float = 86400  # a row without a policy goes this long after its TTL and back-off end
    max_negative_entries: int = 100_000  # rows without a policy beyond this go, least recently used first


@dataclass(frozen=True)
class Entry:
    """What we know about one domain. Immutable: updates replace the whole entry."""

    domain: str
    txt_record: str | None = None  # the STSv1 TXT record the cached policy was fetched for
    policy_id: str | None = None
    policy_body: bytes | None = None
    policy: Policy | None = None  # parsed from policy_body; not stored
    fetched_at: float | None = None
    txt_expires_at: float = 0.0  # the TXT id is trusted until then (its DNS TTL, bounded)
    negative_until: float = 0.0  # "no policy" (no or invalid record) is known until then
    failure: Failure | None = None  # the last failure, kept for query/logs until a success
    failure_at: float | None = None
    failures: int = 0  # consecutive failures, for back-off
    retry_after: float = 0.0  # no network for this domain before then
    last_lookup: float = 0.0
    mx_hosts: tuple[str, ...] | None = None  # MX host names, looked up for policies with "*." patterns
    mx_expires_at: float = 0.0
    version: int = 0  # the stored row's version when read (0: not stored); writes check it

    @property
    def expires_at(self) -> float | None:
        """RFC 8461 §3.2/§5.1: a policy may be used until max_age after its fetch."""
        if self.policy is None or self.fetched_at is None:
            return None
        return self.fetched_at + self.policy.max_age

    def usable_policy(self, now: float) -> Policy | None:
        expires = self.expires_at
        return self.policy if expires is not None and now < expires else None


def _to_row(e: Entry) -> tuple[object, ...]:
    return (e.domain, e.txt_record, e.policy_id, e.policy_body, e.fetched_at, e.txt_expires_at, e.negative_until,
            e.failure.kind.value if e.failure else None, e.failure.detail if e.failure else None,
            e.failure_at, e.failures, e.retry_after, e.last_lookup,
            " ".join(e.mx_hosts) if e.mx_hosts is not None else None, e.mx_expires_at, e.version)


def _from_row(row: tuple) -> Entry:
    values = dict(zip(_COLUMNS, row))
    kind, detail = values.pop("failure_kind"), values.pop("failure_detail")
    mx_hosts = values.pop("mx_hosts")
    body = values["policy_body"]
    policy = None
    if body is not None:
        try:
            policy = parse_policy(bytes(body))
        except InvalidPolicy:
            log.warning("cache domain=%s stored policy no longer parses; ignored", values["domain"])
    failure = Failure(FailureKind(kind), detail or "") if kind else None
    return Entry(policy=policy, failure=failure, mx_hosts=tuple(mx_hosts.split()) if mx_hosts is not None else None,
                 **values)


def default_cache_path() -> str:
    """root: /var/lib/mtasts-policyd; others: the XDG state directory."""
    if os.geteuid() == 0:
        base = "/var/lib/mtasts-policyd"
    else:
        state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
        base = os.path.join(state, "mtasts-policyd")
    return os.path.join(base, "cache.sqlite3")


class CacheWriteError(Exception):
    """A write did not reach the disk (raised only by a cache opened with strict=True)."""


class PolicyCache:
    """Thread-safe; one SQLite connection behind a lock (writes are rare, reads mostly hit memory)."""

    def __init__(self, path: str | None, memory_entries: int = 100_000, *, strict: bool = False) -> None:
        """strict: writes that fail raise CacheWriteError. The daemon survives disk trouble by
        logging and answering from memory; a command that edits the file must report it instead."""
        self.path = path
        self.strict = strict
        self.memory_entries = memory_entries
        self._memory: cachetools.LRUCache[str, Entry] = cachetools.LRUCache(maxsize=memory_entries)
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._data_version: int | None = None
        self._checked_at = 0.0
        self.inserted = 0  # rows this process added (the daemon prunes after many: prune())
        if path is not None:
            self._open(path)

    def _open(self, path: str) -> None:
        try:
            directory = os.path.dirname(os.path.abspath(path))
            os.makedirs(directory, mode=0o750, exist_ok=True)
            db = sqlite3.connect(path, timeout=5.0, check_same_thread=False, isolation_level=None)
            # A new file gives pruned pages back to the OS (prune()); only possible before the first
            # table is created, so an older file keeps reusing its free pages instead.
            db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            db.execute("PRAGMA journal_mode=WAL")  # readers never block the writer; crash-safe
            db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")  # the WAL shrinks back after bursts
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(_SCHEMA)
            self._db = db
            self._data_version = db.execute("PRAGMA data_version").fetchone()[0]
        except (sqlite3.Error, OSError) as exc:
            log.error("cache path=%s cannot be opened (%s); running with memory only", path, exc)
            self._db = None

    @property
    def memory_size(self) -> int:
        return len(self._memory)

    @property
    def persistent(self) -> bool:
        return self._db is not None

    def _sync_with_disk(self) -> None:
        """Forget memory copies when another process (the warmer, `cache forget`) wrote the file."""
        now = time.monotonic()
        if self._db is None or now - self._checked_at < 1.0:
            return
        self._checked_at = now
        try:
            version = self._db.execute("PRAGMA data_version").fetchone()[0]
        except sqlite3.Error:
            return
        if version != self._data_version:
            self._data_version = version
            self._memory.clear()

    def get(self, domain: str) -> Entry | None:
        with self._lock:
            self._sync_with_disk()
            entry = self._memory.get(domain)
            if entry is not None or self._db is None:
                return entry
            return self._read(domain)

    def reload(self, domain: str) -> Entry | None:
        """The stored entry, bypassing memory: after a write conflict, what the other writer left."""
        with self._lock:
            self._memory.pop(domain, None)
            return self._read(domain) if self._db is not None else None

    def _read(self, domain: str) -> Entry | None:
        assert self._db is not None
        try:
            row = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM policies WHERE domain = ?",
                                   (domain,)).fetchone()
        except sqlite3.Error as exc:
            log.warning("cache read domain=%s failed: %s", domain, exc)
            return None
        if row is None:
            return None
        entry = _from_row(row)
        self._memory[domain] = entry
        return entry

    def put(self, entry: Entry) -> Entry | None:
        """Store `entry` if the row is still at the version it was read at; None on a conflict.

        Several processes share the file (the daemon, the warmer, `cache` commands): a write
        based on a stale read must not silently replace what another process stored meanwhile.
        """
        stored = replace(entry, version=entry.version + 1)
        with self._lock:
            if self._db is not None:
                try:
                    if not self._write(stored, entry.version):
                        return None
                except sqlite3.Error as exc:
                    if self.strict:
                        raise CacheWriteError(f"cannot write {entry.domain}: {exc}") from None
                    log.error("cache write domain=%s failed: %s; kept in memory only", entry.domain, exc)
            self._memory[entry.domain] = stored
            return stored

    def _write(self, stored: Entry, read_version: int) -> bool:
        assert self._db is not None
        row = _to_row(stored)
        if read_version == 0:
            try:
                self._db.execute(f"INSERT INTO policies ({', '.join(_COLUMNS)}) "
                                 f"VALUES ({', '.join('?' * len(_COLUMNS))})", row)
            except sqlite3.IntegrityError:
                return False  # another process stored this domain first
            self.inserted += 1
            return True
        # last_lookup is batched in by touch() without a version bump: never move it backwards.
        assignments = ", ".join("last_lookup = MAX(last_lookup, ?)" if column == "last_lookup" else f"{column} = ?"
                                for column in _COLUMNS[1:])
        cursor = self._db.execute(f"UPDATE policies SET {assignments} WHERE domain = ? AND version = ?",
                                  (*row[1:], stored.domain, read_version))
        return cursor.rowcount == 1

    def touch(self, seen: dict[str, float]) -> None:
        """Record when domains were last looked up (batched: lookups must not each write to disk)."""
        with self._lock:
            for domain, when in seen.items():
                entry = self._memory.get(domain)
                if entry is not None:
                    self._memory[domain] = replace(entry, last_lookup=when)
            if self._db is None or not seen:
                return
            try:
                self._db.executemany(
                    "UPDATE policies SET last_lookup = ? WHERE domain = ? AND last_lookup < ?",
                    [(when, domain, when) for domain, when in seen.items()],
                )
            except sqlite3.Error as exc:
                log.error("cache write of lookup times failed: %s", exc)

    def delete(self, domain: str) -> bool:
        with self._lock:
            found = self._memory.pop(domain, None) is not None
            if self._db is not None:
                try:
                    found = self._db.execute("DELETE FROM policies WHERE domain = ?", (domain,)).rowcount > 0 or found
                except sqlite3.Error as exc:
                    if self.strict:
                        raise CacheWriteError(f"cannot delete {domain}: {exc}") from None
                    log.error("cache delete domain=%s failed: %s", domain, exc)
            return found

    def entries(self) -> Iterator[Entry]:
        """All stored entries (disk when there is one, else memory), in domain order."""
        with self._lock:
            if self._db is None:
                rows = None
                snapshot = sorted(self._memory.values(), key=lambda e: e.domain)
            else:
                rows = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM policies ORDER BY domain").fetchall()
        if rows is None:
            yield from snapshot
        else:
            yield from (_from_row(row) for row in rows)

    def prune(self, now: float, settings: PruneSettings, pause: float = 0.005) -> int:
        """Delete the rows that no longer serve; return how many. See PruneSettings for the rules.

        The file is scanned on a read-only connection of its own (WAL: nobody waits for it), and
        rows are deleted in small batches under the lock, each only if its row version is still the
        one seen (another process may have refreshed it meanwhile), so lookups wait at most one
        batch. Freed pages go back to the OS on a file created with incremental auto-vacuum.
        """
        if self._db is None or self.path is None:
            return 0
        try:
            reader = sqlite3.connect(f"file:{os.path.abspath(self.path)}?mode=ro", uri=True, timeout=5.0)
        except sqlite3.Error as exc:
            log.warning("cache prune: cannot open %s to read: %s", self.path, exc)
            return 0
        deleted = 0
        try:
            deleted += self._delete(self._expired(reader, now, settings), pause)
            deleted += self._delete(self._least_recent_negative(reader, settings.max_negative_entries), pause)
            if deleted:
                self._give_back_pages(pause)
        except sqlite3.Error as exc:
            log.warning("cache prune stopped after %d rows: %s", deleted, exc)
        finally:
            reader.close()
        if deleted:
            log.info("cache pruned rows=%d", deleted)
        return deleted

    @staticmethod
    def _expired(reader: sqlite3.Connection, now: float, settings: PruneSettings) -> Iterator[tuple[str, int]]:
        """(domain, version) of rows past use: no policy and past TTL and back-off plus the grace,
        or not looked up for prune_after with no usable policy. RFC 8461 §5.1: a usable policy is
        never pruned, however long ago it was looked up."""
        last = 0
        unused = now - settings.prune_after
        while True:
            rows = reader.execute(
                "SELECT rowid, domain, version, policy_body IS NULL, MAX(negative_until, retry_after), "
                "MAX(last_lookup, COALESCE(fetched_at, 0)) FROM policies WHERE rowid > ? ORDER BY rowid LIMIT ?",
                (last, PRUNE_BATCH)).fetchall()
            if not rows:
                return
            for rowid, domain, version, no_policy, known_until, used_at in rows:
                if no_policy and known_until + settings.negative_grace < now:
                    yield domain, version
                elif not no_policy and used_at < unused:
                    row = reader.execute(f"SELECT {', '.join(_COLUMNS)} FROM policies WHERE rowid = ?",
                                         (rowid,)).fetchone()
                    if row is not None and _from_row(row).usable_policy(now) is None:
                        yield domain, version
            last = rows[-1][0]

    @staticmethod
    def _least_recent_negative(reader: sqlite3.Connection, limit: int) -> Iterator[tuple[str, int]]:
        """Rows without a policy beyond `limit`, least recently looked up (or resolved) first."""
        count = reader.execute("SELECT COUNT(*) FROM policies WHERE policy_body IS NULL").fetchone()[0]
        if count <= limit:
            return
        used = "MAX(last_lookup, COALESCE(failure_at, 0))"
        cutoff = reader.execute(f"SELECT {used} AS used FROM policies WHERE policy_body IS NULL "
                                "ORDER BY used LIMIT 1 OFFSET ?", (count - limit - 1,)).fetchone()[0]
        excess, last = count - limit, 0
        while excess > 0:
            rows = reader.execute(f"SELECT rowid, domain, version FROM policies WHERE rowid > ? AND "
                                  f"policy_body IS NULL AND {used} <= ? ORDER BY rowid LIMIT ?",
                                  (last, cutoff, min(excess, PRUNE_BATCH))).fetchall()
            if not rows:
                return
            for _, domain, version in rows:
                yield domain, version
            excess -= len(rows)
            last = rows[-1][0]

    def _delete(self, rows: Iterator[tuple[str, int]], pause: float) -> int:
        deleted = 0
        while True:
            batch = list(itertools.islice(rows, DELETE_BATCH))
            if not batch:
                return deleted
            with self._lock:
                if self._db is None:
                    return deleted  # closed meanwhile (shutdown)
                self._db.execute("BEGIN")
                try:
                    for domain, version in batch:
                        if self._db.execute("DELETE FROM policies WHERE domain = ? AND version = ?",
                                            (domain, version)).rowcount:
                            deleted += 1
                            self._memory.pop(domain, None)
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
            time.sleep(pause)  # let lookups and writers in between batches

    def _give_back_pages(self, pause: float) -> None:
        while True:
            with self._lock:
                if self._db is None or not self._db.execute("PRAGMA freelist_count").fetchone()[0] \
                        or not self._db.execute("PRAGMA auto_vacuum").fetchone()[0]:
                    return
                self._db.executescript(f"PRAGMA incremental_vacuum({DELETE_BATCH});")  # steps it to the end
            time.sleep(pause)

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
