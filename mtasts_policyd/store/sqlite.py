"""The SQLite policy store: one file on disk that survives restarts and crashes, shared with
other processes (the warmer, `cache` commands) in WAL mode.

RFC 8461 §5.1 makes the cache part of the protocol: a cached policy is used until max_age after
its fetch, whatever DNS and HTTPS say meanwhile. So the file is the truth. Disk trouble is
survived, reported and mended: an entry the disk refuses is kept (in memory, remembered as
unsaved) and the daemon keeps answering rather than failing lookups; `persistent` tells the truth
of the last write, and the daemon's periodic `maintain()` writes the unsaved entries again,
reopening (or, if corrupt, setting aside and recreating) the file, so nothing it knows is lost
once the disk is back. See README "Cache health" and "Cache size" (pruning).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import pathlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

from mtasts_policyd.store.base import (
    CacheWriteError,
    Merge,
    Mirror,
    PolicyStore,
    PruneSettings,
    StoreStats,
)
from mtasts_policyd.store.codec import COLUMNS, from_row, to_row
from mtasts_policyd.store.entry import Entry

log = logging.getLogger("mtasts_policyd.cache")  # the cache's log lines, as before the store had a module

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
# Columns added after the first release, each with its definition: a file made by an older version
# gets them when it is opened (_migrate); such a version keeps working on the file afterwards, as
# it names the columns it reads and writes (a row it writes keeps the DANE branch it left alone).
_ADDED_COLUMNS = (
    ("dane_verdict", "TEXT"),
    ("dane_reason", "TEXT"),
    ("dane_decided_at", "REAL"),
    ("dane_expires_at", "REAL NOT NULL DEFAULT 0"),
    ("dane_inputs", "TEXT"),
)
# One row, rewritten by maintain() while the disk is failing, or when nothing was written for
# PROBE_AFTER seconds: a write that succeeds is the only proof that the disk takes writes.
PROBE_AFTER = 300.0
_PROBE_SCHEMA = "CREATE TABLE IF NOT EXISTS probe (id INTEGER PRIMARY KEY CHECK (id = 1), written_at REAL NOT NULL)"
# Small facts kept across restarts beside the entries (store.base.PolicyStore.note).
_NOTES_SCHEMA = "CREATE TABLE IF NOT EXISTS notes (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
# A new cache file is readable by the owner's group (cache tools run by an operator in the service
# group), never by others; SQLite gives its -wal and -shm files the same mode. An existing file's
# mode is left alone.
FILE_MODE = 0o640
DIRECTORY_MODE = 0o750
WAL_SIZE_LIMIT = 16 * 1024 * 1024  # bytes the WAL file is truncated to after a checkpoint
PRUNE_BATCH = 2000  # rows read per step of a prune scan
DELETE_BATCH = 200  # rows deleted (or pages freed) per transaction: the lock is held that long
COUNT_TIME_LIMIT = 1.0  # seconds stats() may spend counting the rows (a scrape of /metrics waits for it)


def default_cache_path() -> str:
    """root: /var/lib/mtasts-policyd; others: the XDG state directory."""
    if os.geteuid() == 0:
        base = "/var/lib/mtasts-policyd"
    else:
        state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
        base = os.path.join(state, "mtasts-policyd")
    return os.path.join(base, "cache.sqlite3")


def connect(path: str) -> sqlite3.Connection:
    """The store's own connection to the file (SqliteStore's `connect`; the store sets it up)."""
    return sqlite3.connect(path, timeout=5.0, check_same_thread=False, isolation_level=None)


def connect_readonly(path: str, timeout: float) -> sqlite3.Connection:
    """A separate read-only connection: it sees the file as a restarted process would, and never
    takes the daemon's connection (or its lock)."""
    return sqlite3.connect(pathlib.Path(path).absolute().as_uri() + "?mode=ro", uri=True, timeout=timeout)


def _create_file(path: str) -> None:
    """Create the cache file with FILE_MODE if it does not exist (SQLite would make it 0644)."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE))
    except FileExistsError:
        pass


def _migrate(db: sqlite3.Connection) -> None:
    """Add the columns an older file lacks (_ADDED_COLUMNS). Two processes opening an old file at
    once may both try: the loser's "duplicate column" is the winner's work, not an error."""
    have = {row[1] for row in db.execute("PRAGMA table_info(policies)")}
    for name, definition in _ADDED_COLUMNS:
        if name in have:
            continue
        try:
            db.execute(f"ALTER TABLE policies ADD COLUMN {name} {definition}")
        except sqlite3.OperationalError as exc:
            if "duplicate column" not in str(exc):
                raise
        else:
            log.info("cache added column %s to an older cache file", name)


def _error_code(exc: sqlite3.Error) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF if code is not None else None  # the primary result code


def _is_corrupt(exc: sqlite3.Error) -> bool:
    return _error_code(exc) in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def _needs_reopen(exc: sqlite3.Error) -> bool:
    """Whether the connection itself may be broken (I/O error, read-only, moved, corrupt). A full
    disk or another process holding the lock pass by themselves: the same connection retries."""
    return _error_code(exc) not in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _count_rows(path: str, limit: float = COUNT_TIME_LIMIT) -> int | None:
    """COUNT(*) of the cache table on a separate read-only connection, interrupted after `limit` seconds.

    Its own connection, so the store's (and its lock, which cached lookups take) is never held.
    """
    try:
        db = connect_readonly(path, limit)
    except sqlite3.Error:
        return None

    def interrupt() -> None:
        try:
            db.interrupt()  # thread-safe; also stops COUNT(*)'s single b-tree walk
        except sqlite3.Error:
            pass

    timer = threading.Timer(limit, interrupt)
    timer.start()
    try:
        return int(db.execute("SELECT COUNT(*) FROM policies").fetchone()[0])
    except sqlite3.Error as exc:
        log.debug("metrics: counting cache rows failed: %s", exc)
        return None
    finally:
        timer.cancel()
        db.close()


class SqliteStore(PolicyStore):
    """The PolicyStore on one SQLite file; one connection behind the lock (writes are rare, and
    reads mostly hit the memory layer in front)."""

    def __init__(self, path: str, *, strict: bool = False, memory_entries: int = 100_000,
                 connect: Callable[[str], sqlite3.Connection] = connect) -> None:
        """strict: writes that fail raise CacheWriteError. The daemon survives disk trouble by
        keeping entries in memory until the disk takes them; a command that edits the file must
        report it instead. memory_entries bounds what is kept for the disk beyond the policies
        (see _keep_unsaved). connect: opens the file (the store sets the connection up)."""
        self.path = path
        self.strict = strict
        self.memory_entries = memory_entries
        self.lock = threading.RLock()
        self.mirror: Mirror | None = None
        self._connect = connect
        self._db: sqlite3.Connection | None = None
        self._data_version: int | None = None
        self._checked_at = 0.0
        # Disk health (see "disk health" below): entries and lookup times the disk refused.
        self._unsaved: dict[str, Entry] = {}  # newer than the disk; not subject to LRU eviction
        self._untouched: dict[str, float] = {}  # lookup times not yet written
        self._notes: dict[str, str] = {}  # notes as last set here (answered while the file is unusable)
        self._disk_ok = True  # the last write (or open) succeeded
        self._broken = False  # the connection failed in a way that calls for reopening the file
        self._written_at = -math.inf  # when a write last succeeded (never: the first check probes)
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the file we opened
        self._closed = False
        self._maintaining = threading.Lock()  # one maintain() at a time (the keeper, the last one at exit)
        self.inserted = 0  # rows this process added (the daemon prunes after many: prune())
        self._open(path)

    def _open(self, path: str) -> bool:
        db = None
        try:
            directory = os.path.dirname(os.path.abspath(path))
            os.makedirs(directory, mode=DIRECTORY_MODE, exist_ok=True)
            _create_file(path)
            db = self._connect(path)
            # A new file gives pruned pages back to the OS (prune()); only possible before the first
            # table is created, so an older file keeps reusing its free pages instead.
            db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            db.execute("PRAGMA journal_mode=WAL")  # readers never block the writer; crash-safe
            db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")  # the WAL shrinks back after bursts
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(_SCHEMA)
            _migrate(db)
            db.execute(_PROBE_SCHEMA)
            db.execute(_NOTES_SCHEMA)
            self._data_version = db.execute("PRAGMA data_version").fetchone()[0]
            st = os.stat(path)
        except (sqlite3.Error, OSError) as exc:
            if db is not None:
                db.close()
            self._disk_failed("open", exc)
            return False
        self._db, self._identity, self._broken = db, (st.st_dev, st.st_ino), False
        return True

    @property
    def persistent(self) -> bool:
        """True while answers reach the disk: the file is open and its last write succeeded."""
        return self._db is not None and self._disk_ok

    @property
    def unsaved(self) -> int:
        """Entries known only in memory because the disk refused them; maintain() writes them."""
        return len(self._unsaved)

    def stats(self, *, count_rows: bool = True) -> StoreStats:
        """count_rows: COUNT(*) on a read-only connection of its own, interrupted after
        COUNT_TIME_LIMIT seconds, never under the lock (None if the file is not persistent)."""
        persistent = self.persistent
        rows = _count_rows(self.path) if count_rows and persistent else None
        return StoreStats(rows=rows, persistent=persistent, path=self.path, unsaved=len(self._unsaved))

    def sync(self) -> None:
        """Forget memory copies when another process (the warmer, `cache forget`) wrote the file:
        PRAGMA data_version, at most once a second."""
        now = time.monotonic()
        if self._db is None or now - self._checked_at < 1.0:
            return
        with self.lock:
            if self._db is None:
                return
            self._checked_at = now
            try:
                version = self._db.execute("PRAGMA data_version").fetchone()[0]
            except sqlite3.Error:
                return
            if version != self._data_version:
                self._data_version = version
                if self.mirror is not None:
                    self.mirror.forget_all()

    def get(self, domain: str) -> Entry | None:
        with self.lock:
            entry = self._unsaved.get(domain) if self._unsaved else None  # newer than the disk
            if entry is not None or self._db is None:
                return entry
            return self._read(domain)

    def reload(self, domain: str) -> Entry | None:
        """The stored row, bypassing the unsaved entries: after a write conflict, what the other
        writer left."""
        with self.lock:
            return self._read(domain) if self._db is not None else None

    def _row(self, domain: str) -> Entry | None:
        assert self._db is not None
        row = self._db.execute(f"SELECT {', '.join(COLUMNS)} FROM policies WHERE domain = ?", (domain,)).fetchone()
        return from_row(row) if row is not None else None

    def _read(self, domain: str) -> Entry | None:
        try:
            entry = self._row(domain)
        except sqlite3.Error as exc:
            log.warning("cache read domain=%s failed: %s", domain, exc)
            self._broken = self._broken or _needs_reopen(exc)
            return None
        return entry

    def put(self, entry: Entry) -> Entry | None:
        """Store `entry` if the row is still at the version it was read at; None on a conflict.

        Several processes share the file (the daemon, the warmer, `cache` commands): a write
        based on a stale read must not silently replace what another process stored meanwhile.
        If the disk refuses the write, the entry is kept (in memory, unsaved, at the version it
        was read at) and returned: maintain() writes it when the disk is back.
        """
        stored = replace(entry, version=entry.version + 1)
        with self.lock:
            if self._db is not None:
                try:
                    if not self._write(stored, entry.version):
                        return None
                except sqlite3.Error as exc:
                    if self.strict:
                        raise CacheWriteError(f"cannot write {entry.domain}: {exc}") from None
                    self._disk_failed(f"write domain={entry.domain}", exc)
                else:
                    self._unsaved.pop(entry.domain, None)
                    self._disk_succeeded()
                    return stored
            self._keep_unsaved(entry)
            return entry

    def _write(self, stored: Entry, read_version: int) -> bool:
        assert self._db is not None
        row = to_row(stored)
        if read_version == 0:
            try:
                self._db.execute(f"INSERT INTO policies ({', '.join(COLUMNS)}) "
                                 f"VALUES ({', '.join('?' * len(COLUMNS))})", row)
            except sqlite3.IntegrityError:
                return False  # another process stored this domain first
            self.inserted += 1
            return True
        # last_lookup is batched in by touch() without a version bump: never move it backwards.
        assignments = ", ".join("last_lookup = MAX(last_lookup, ?)" if column == "last_lookup" else f"{column} = ?"
                                for column in COLUMNS[1:])
        cursor = self._db.execute(f"UPDATE policies SET {assignments} WHERE domain = ? AND version = ?",
                                  (*row[1:], stored.domain, read_version))
        return cursor.rowcount == 1

    def touch(self, seen: dict[str, float]) -> None:
        """Record when domains were last looked up (batched: lookups must not each write to disk)."""
        with self.lock:
            for domain, when in seen.items():
                unsaved = self._unsaved.get(domain)
                if unsaved is not None:
                    self._unsaved[domain] = replace(unsaved, last_lookup=max(unsaved.last_lookup, when))
            pending = self._untouched
            for domain, when in seen.items():
                pending[domain] = max(pending.get(domain, 0.0), when)
            while len(pending) > self.memory_entries:  # a hint for the warmer: bounded, oldest dropped
                del pending[next(iter(pending))]
            if self._db is None or not pending:
                return
            try:
                self._db.executemany(
                    "UPDATE policies SET last_lookup = ? WHERE domain = ? AND last_lookup < ?",
                    [(when, domain, when) for domain, when in pending.items()],
                )
            except sqlite3.Error as exc:
                self._disk_failed("write of lookup times", exc)
            else:
                self._untouched = {}
                self._disk_succeeded()

    def note(self, key: str) -> str | None:
        with self.lock:
            if self._db is not None:
                try:
                    row = self._db.execute("SELECT value FROM notes WHERE key = ?", (key,)).fetchone()
                    return row[0] if row is not None else None
                except sqlite3.Error as exc:
                    log.debug("cache note %s not read: %s", key, exc)
            return self._notes.get(key)

    def set_note(self, key: str, value: str) -> None:
        """Best effort: a note the disk refuses is kept in memory only (it is asked again after a restart)."""
        with self.lock:
            self._notes[key] = value
            if self._db is not None:
                try:
                    self._db.execute("INSERT OR REPLACE INTO notes (key, value) VALUES (?, ?)", (key, value))
                except sqlite3.Error as exc:
                    log.debug("cache note %s not written: %s", key, exc)

    def delete(self, domain: str) -> bool:
        with self.lock:
            found = self._unsaved.pop(domain, None) is not None
            if self._db is not None:
                try:
                    found = self._db.execute("DELETE FROM policies WHERE domain = ?", (domain,)).rowcount > 0 or found
                except sqlite3.Error as exc:
                    if self.strict:
                        raise CacheWriteError(f"cannot delete {domain}: {exc}") from None
                    self._disk_failed(f"delete domain={domain}", exc)
            return found

    def entries(self) -> Iterator[Entry]:
        """All stored entries (disk when there is one, else what the memory layer holds) and the
        unsaved ones, in domain order."""
        with self.lock:
            unsaved = dict(self._unsaved)
            if self._db is None:
                rows = None
                held = self.mirror.held() if self.mirror is not None else []
                snapshot = sorted({**{e.domain: e for e in held}, **unsaved}.values(), key=lambda e: e.domain)
            else:
                rows = self._db.execute(f"SELECT {', '.join(COLUMNS)} FROM policies ORDER BY domain").fetchall()
        if rows is None:
            yield from snapshot
            return
        stored = (from_row(row) for row in rows)
        if not unsaved:
            yield from stored
            return
        merged = {e.domain: e for e in stored}
        merged.update(unsaved)
        yield from (merged[domain] for domain in sorted(merged))

    def prune(self, now: float, settings: PruneSettings, pause: float = 0.005) -> int:
        """Delete the rows that no longer serve; return how many. See PruneSettings for the rules.

        The file is scanned on a read-only connection of its own (WAL: nobody waits for it), and
        rows are deleted in small batches under the lock, each only if its row version is still the
        one seen (another process may have refreshed it meanwhile), so lookups wait at most one
        batch. Freed pages go back to the OS on a file created with incremental auto-vacuum.
        """
        if self._db is None:
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
        """(domain, version) of rows past use: no policy and past TTL, back-off and DANE branch plus
        the grace, or not looked up for prune_after with no usable policy. RFC 8461 §5.1: a usable policy is
        never pruned, however long ago it was looked up."""
        last = 0
        unused = now - settings.prune_after
        while True:
            rows = reader.execute(
                "SELECT rowid, domain, version, policy_body IS NULL, "
                "MAX(negative_until, retry_after, dane_expires_at), MAX(last_lookup, COALESCE(fetched_at, 0)) "
                "FROM policies WHERE rowid > ? ORDER BY rowid LIMIT ?",
                (last, PRUNE_BATCH)).fetchall()
            if not rows:
                return
            for rowid, domain, version, no_policy, known_until, used_at in rows:
                if no_policy and known_until + settings.negative_grace < now:
                    yield domain, version
                elif not no_policy and used_at < unused:
                    row = reader.execute(f"SELECT {', '.join(COLUMNS)} FROM policies WHERE rowid = ?",
                                         (rowid,)).fetchone()
                    if row is not None and from_row(row).usable_policy(now) is None:
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
            with self.lock:
                if self._db is None:
                    return deleted  # closed meanwhile (shutdown)
                self._db.execute("BEGIN")
                try:
                    for domain, version in batch:
                        if self._db.execute("DELETE FROM policies WHERE domain = ? AND version = ?",
                                            (domain, version)).rowcount:
                            deleted += 1
                            if self.mirror is not None:
                                self.mirror.forget(domain)
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
            time.sleep(pause)  # let lookups and writers in between batches

    def _give_back_pages(self, pause: float) -> None:
        while True:
            with self.lock:
                if self._db is None or not self._db.execute("PRAGMA freelist_count").fetchone()[0] \
                        or not self._db.execute("PRAGMA auto_vacuum").fetchone()[0]:
                    return
                self._db.executescript(f"PRAGMA incremental_vacuum({DELETE_BATCH});")  # steps it to the end
            time.sleep(pause)

    def close(self) -> None:
        with self.lock:
            self._closed = True
            if self._unsaved:
                log.error("cache path=%s closing with %d entries the disk did not take; they are lost",
                          self.path, len(self._unsaved))
            if self._db is not None:
                self._db.close()
                self._db = None

    # ----- disk health: the truth of the last write, and maintain() to mend it -----------------

    def _disk_failed(self, action: str, exc: BaseException) -> None:
        """A write (or open) failed: report it once per change of state, not per write."""
        if isinstance(exc, sqlite3.Error) and _needs_reopen(exc):
            self._broken = True
        if not self._disk_ok:
            log.debug("cache path=%s %s failed: %s", self.path, action, exc)
            return
        self._disk_ok = False
        if action == "open":
            log.error("cache path=%s cannot be opened (%s); running with memory only", self.path, exc)
        else:
            log.error("cache path=%s not persistent: %s failed (%s); answers are kept in memory and written "
                      "when the disk takes them again", self.path, action, exc)

    def _disk_succeeded(self) -> None:
        self._written_at = time.monotonic()
        if not self._disk_ok:
            self._disk_ok = True
            log.info("cache path=%s persistent again: writes succeed", self.path)

    def _keep_unsaved(self, entry: Entry) -> None:
        """Remember an entry the disk did not take. Policies are always kept (RFC 8461 §5.1: a
        cached policy must not be lost); "no policy" entries, which one DNS query recreates,
        only up to memory_entries."""
        if entry.policy is None and entry.domain not in self._unsaved and len(self._unsaved) >= self.memory_entries:
            return
        self._unsaved[entry.domain] = entry

    def maintain(self, merge: Merge) -> None:
        """The daemon's periodic check, off the event loop (README "Cache health").

        1. Look at the file as a restarted process would (a separate read-only connection): gone,
           replaced, emptied or corrupt means what our connection still writes would be lost.
        2. Reopen when that happened or the connection failed: every entry the old connection can
           still read, and every entry in memory, becomes unsaved; a corrupt file is moved aside
           to `<path>.corrupt-<time>` and a fresh one is created.
        3. Write the unsaved entries (a conflict with another writer is settled by `merge`, as for
           any write), or one probe row while the disk is failing or after PROBE_AFTER seconds
           without a write.
        """
        if self._closed:
            return
        with self._maintaining:
            self._maintain(self.path, merge)

    def _maintain(self, path: str, merge: Merge) -> None:
        problem, corrupt = self._inspect(path)
        with self.lock:
            reopen = problem is not None or self._db is None or self._broken
            rows = self._detach(problem) if reopen and not self._closed else []
        if rows:
            self._adopt(rows)
        if reopen:
            with self.lock:
                if self._closed or not self._reattach(path, corrupt):
                    return
                for key, value in list(self._notes.items()):  # a recreated file has lost them
                    self.set_note(key, value)
        written = self._write_unsaved(merge)
        if self._untouched:
            self.touch({})  # lookup times the disk refused before
        with self.lock:
            quiet = time.monotonic() - self._written_at >= PROBE_AFTER
            if not written and (quiet or not self._disk_ok) and self._db is not None and not self._closed:
                try:
                    self._db.execute("INSERT OR REPLACE INTO probe (id, written_at) VALUES (1, ?)", (time.time(),))
                except sqlite3.Error as exc:
                    self._disk_failed("probe write", exc)
                else:
                    self._disk_succeeded()

    def _inspect(self, path: str) -> tuple[str | None, bool]:
        """(what happened to the file, whether it is corrupt); (None, False) when it looks sound."""
        if self._db is None:
            return None, False  # nothing of ours to lose; _reattach looks at the file as it opens it
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return "the file is gone", False
        except OSError as exc:
            return f"the file cannot be examined ({exc})", False
        if (st.st_dev, st.st_ino) != self._identity:
            return "the file was replaced", False
        try:
            check = connect_readonly(path, timeout=5.0)
        except sqlite3.Error:
            return None, False
        try:
            if check.execute("SELECT 1 FROM sqlite_master WHERE name = 'policies'").fetchone() is None:
                return "the file lost its table (emptied or truncated)", False
            result = [row[0] for row in check.execute("PRAGMA quick_check(5)")]
            if result != ["ok"]:
                return f"the file is corrupt ({'; '.join(result)})", True
        except sqlite3.Error as exc:
            if _is_corrupt(exc):
                return f"the file is corrupt ({exc})", True
            return None, False  # busy or unreadable now: no verdict
        finally:
            check.close()
        return None, False

    def _detach(self, problem: str | None) -> list[tuple]:
        """Close our connection (lock held). When the file's content was lost, return the rows the
        old connection can still read and make every entry in memory unsaved."""
        rows: list[tuple] = []
        if problem is not None:
            self._disk_failed("check", OSError(problem))
            if self._db is not None:
                try:
                    for row in self._db.execute(f"SELECT {', '.join(COLUMNS)} FROM policies"):
                        rows.append(row)
                except sqlite3.Error as exc:
                    log.warning("cache path=%s salvaged %d rows before %s", self.path, len(rows), exc)
            # Versions belong to the old file: version 0 makes every write an insert, and a row
            # the new file already has a conflict that `merge` settles. The memory layer forgets
            # its copies (at the old versions): lookups read the unsaved ones instead.
            held = self.mirror.held() if self.mirror is not None else []
            known = {entry.domain: replace(entry, version=0) for entry in held}
            known.update((domain, replace(entry, version=0)) for domain, entry in self._unsaved.items())
            self._unsaved = known
            if self.mirror is not None:
                self.mirror.forget_all()
        if self._db is not None:
            try:
                self._db.close()
            except sqlite3.Error:
                pass
            self._db = None
        return rows

    def _adopt(self, rows: list[tuple]) -> None:
        """Salvaged rows become unsaved entries, below what memory knows (parsed without the lock)."""
        salvaged = []
        for row in rows:
            try:
                salvaged.append(from_row(row))
            except (ValueError, TypeError) as exc:
                log.warning("cache path=%s salvaged row %r unreadable: %s", self.path, row[:1], exc)
        with self.lock:
            for entry in salvaged:
                self._unsaved.setdefault(entry.domain, replace(entry, version=0))

    def _reattach(self, path: str, corrupt: bool) -> bool:
        """Open the file again (lock held); a corrupt one is moved aside first and recreated."""
        if corrupt and not self._set_aside(path):
            return False
        if self._open(path):
            return True
        if os.path.exists(path) and self._open_error_is_corrupt(path) and self._set_aside(path):
            return self._open(path)
        return False

    def _open_error_is_corrupt(self, path: str) -> bool:
        try:
            check = connect_readonly(path, timeout=5.0)
            try:
                check.execute("SELECT 1 FROM sqlite_master").fetchone()
            finally:
                check.close()
        except sqlite3.Error as exc:
            return _is_corrupt(exc)
        return False

    def _set_aside(self, path: str) -> bool:
        """Move a corrupt file (and its WAL) to `<path>.corrupt-<UTC time>`, for the operator."""
        aside = f"{path}.corrupt-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        serial = 1
        while os.path.exists(aside):
            serial += 1
            aside = f"{path}.corrupt-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{serial}"
        try:
            os.rename(path, aside)
            if os.path.exists(path + "-wal"):
                os.rename(path + "-wal", aside + "-wal")
            if os.path.exists(path + "-shm"):
                os.unlink(path + "-shm")  # an index of the WAL, rebuilt from it
        except OSError as exc:
            self._disk_failed("moving the corrupt file aside", exc)
            return False
        log.error("cache path=%s is corrupt: moved aside to %s; a fresh file gets every entry in memory",
                  path, aside)
        return True

    def _write_unsaved(self, merge: Merge) -> int:
        """Write the unsaved entries, one transaction each; stop at the first disk failure."""
        written = 0
        for domain in list(self._unsaved):
            with self.lock:
                entry = self._unsaved.get(domain)
                if entry is None or self._db is None or self._closed:
                    continue
                try:
                    for _ in range(5):
                        stored = replace(entry, version=entry.version + 1)
                        if self._write(stored, entry.version):
                            del self._unsaved[domain]
                            if self.mirror is not None:
                                self.mirror.stored(stored)
                            written += 1
                            break
                        entry = merge(self._row(domain), entry)  # another writer was first
                    else:
                        log.error("cache domain=%s kept changing under us; left unsaved", domain)
                except sqlite3.Error as exc:
                    self._disk_failed(f"write domain={domain}", exc)
                    break
                self._disk_succeeded()
        if written:
            log.info("cache path=%s wrote %d entries that were kept in memory; %d still waiting",
                     self.path, written, len(self._unsaved))
        return written
