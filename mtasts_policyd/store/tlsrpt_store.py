"""The TLSRPT counts store: sessions per UTC day, policy and outcome, and where each log was read to.

Why SQLite and one transaction per batch: RFC 8460 reports are sums over a day, and the issue asks
that reading a log twice, or restarting the reader anywhere (SIGKILL included), never counts a line
twice and never loses one. So the counts of a batch of lines, the lines not understood, our own
local events and the reader's position after the batch (with the sessions still open at that
point, see ops/tlsrpt_ingest.py) are written together or not at all. A reader that dies before
the commit reads the batch again; one that dies after it goes on from the stored position.

A file of its own (`tlsrpt.store`, default `tlsrpt.sqlite3` beside the policy cache): the daemon's
cache is pruned and repaired by rules of its own, and report counts must not share its fate.
Nothing here knows a log format; rows are core/tlsrpt_report.SessionCount per day.
"""

from __future__ import annotations

import datetime
import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from mtasts_policyd.core.tlsrpt_report import PolicyType, ReportPolicy, ResultType, SessionCount
from mtasts_policyd.store.sqlite import DIRECTORY_MODE, FILE_MODE, connect

FILE_NAME = "tlsrpt.sqlite3"
SCHEMA_VERSION = 1

_SCHEMA = (
    # One row per day and distinct outcome; `sessions` is the sum. result '' = success.
    """CREATE TABLE IF NOT EXISTS sessions (
        day TEXT NOT NULL, policy_domain TEXT NOT NULL, policy_type TEXT NOT NULL,
        policy_string TEXT NOT NULL, mx_host TEXT NOT NULL, result TEXT NOT NULL,
        sending_ip TEXT NOT NULL, receiving_mx TEXT NOT NULL, receiving_ip TEXT NOT NULL,
        reason_code TEXT NOT NULL, sessions INTEGER NOT NULL,
        PRIMARY KEY (day, policy_domain, policy_type, policy_string, mx_host, result, sending_ip,
                     receiving_mx, receiving_ip, reason_code))""",
    # Lines a reader did not understand: counted, with the last one as an example.
    """CREATE TABLE IF NOT EXISTS unparsed (
        day TEXT NOT NULL, source TEXT NOT NULL, lines INTEGER NOT NULL, example TEXT NOT NULL,
        PRIMARY KEY (day, source))""",
    # Events that are ours, not the receiver's (e.g. our policy map was unreachable): never reported.
    """CREATE TABLE IF NOT EXISTS local_events (
        day TEXT NOT NULL, kind TEXT NOT NULL, count INTEGER NOT NULL, PRIMARY KEY (day, kind))""",
    # Where each source was read to; `state` is the reader's own (open sessions), opaque here.
    """CREATE TABLE IF NOT EXISTS positions (
        source TEXT PRIMARY KEY, file_id TEXT NOT NULL, head TEXT NOT NULL, offset INTEGER NOT NULL,
        state TEXT NOT NULL, updated_at REAL NOT NULL)""",
    # Reports `tlsrpt build` wrote: one row per day and domain (a rebuild replaces it), for metrics.
    """CREATE TABLE IF NOT EXISTS built (
        day TEXT NOT NULL, policy_domain TEXT NOT NULL, report_id TEXT NOT NULL, built_at REAL NOT NULL,
        PRIMARY KEY (day, policy_domain))""",
    # One row per report and rua (`tlsrpt send`): sent (never again), pending (retry at
    # next_attempt) or given-up; first_attempt bounds the retries (ops/tlsrpt_send.py).
    """CREATE TABLE IF NOT EXISTS deliveries (
        report_id TEXT NOT NULL, rua TEXT NOT NULL, day TEXT NOT NULL, state TEXT NOT NULL,
        attempts INTEGER NOT NULL, first_attempt REAL NOT NULL, next_attempt REAL NOT NULL,
        last_error TEXT NOT NULL, sent_at REAL, PRIMARY KEY (report_id, rua))""",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
)


class TlsRptStoreError(Exception):
    """The store file cannot be opened or written: one line for the operator."""


def default_store_path(cache_path: str) -> str:
    """`tlsrpt.sqlite3` in the directory of the policy cache (README "Configuration")."""
    return os.path.join(os.path.dirname(os.path.abspath(cache_path)), FILE_NAME)


@dataclass(frozen=True)
class Position:
    """Where a source was read to: the file (device:inode and a digest of its first line, so a
    rotated or truncated file is noticed), the byte offset after the last complete line taken, and
    the reader's state at that offset."""

    source: str
    file_id: str
    head: str
    offset: int
    state: str = "{}"


@dataclass(frozen=True)
class Delivery:
    """What is known of one report's delivery to one rua (RFC 8460 §5: each rua gets it once)."""

    report_id: str
    rua: str
    day: str
    state: str  # sent, pending, given-up
    attempts: int
    first_attempt: float
    next_attempt: float
    last_error: str = ""
    sent_at: float | None = None


@dataclass
class Batch:
    """What one transaction adds: session counts, unparsed lines, local events, and the position."""

    position: Position
    sessions: list[tuple[datetime.date, SessionCount]] = field(default_factory=list)
    unparsed: dict[datetime.date, tuple[int, str]] = field(default_factory=dict)  # day -> (lines, example)
    local: dict[tuple[datetime.date, str], int] = field(default_factory=dict)

    def add_unparsed(self, day: datetime.date, line: str) -> None:
        lines, _ = self.unparsed.get(day, (0, ""))
        self.unparsed[day] = (lines + 1, line[:500])

    def add_local(self, day: datetime.date, kind: str) -> None:
        self.local[(day, kind)] = self.local.get((day, kind), 0) + 1

    @property
    def empty(self) -> bool:
        return not (self.sessions or self.unparsed or self.local)


@dataclass(frozen=True)
class Totals:
    """Sums over all days: sessions by result ("success" or the result type), unparsed lines by
    source, local events by kind, reports built (distinct day and domain), and report deliveries
    (one per report and rua) by state: sent, pending (failed, retried later), given-up."""

    sessions: dict[str, int]
    unparsed: dict[str, int]
    local: dict[str, int]
    reports_built: int
    deliveries: dict[str, int] = field(default_factory=dict)


class TlsRptStore:
    """The store on one SQLite file (WAL: `show` and `build` read while `ingest` writes)."""

    def __init__(self, path: str, *, create: bool = True) -> None:
        """create False: the file must exist (`show` and `build` must not make an empty store where
        the ingest does not write, and then report nothing, forever)."""
        self.path = path
        self._lock = threading.Lock()
        try:
            if create:
                os.makedirs(os.path.dirname(os.path.abspath(path)), mode=DIRECTORY_MODE, exist_ok=True)
                try:
                    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE))
                except FileExistsError:
                    pass
            elif not os.path.exists(path):
                raise TlsRptStoreError(f"no TLSRPT store at {path} (wrong tlsrpt.store or --config? "
                                       f"`tlsrpt ingest` creates it)")
            self._db = connect(path)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            for statement in _SCHEMA:
                self._db.execute(statement)
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        except (sqlite3.Error, OSError) as exc:
            raise TlsRptStoreError(f"cannot open TLSRPT store {path}: {exc}") from None

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> TlsRptStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----- the reader's side ----------------------------------------------------------------------

    def position(self, source: str) -> Position | None:
        row = self._db.execute("SELECT source, file_id, head, offset, state FROM positions WHERE source = ?",
                               (source,)).fetchone()
        return Position(*row) if row else None

    def commit(self, batch: Batch, now: float) -> None:
        """Add the batch and move the position, in one transaction (module docstring)."""
        self._transaction(lambda: self._write(batch, now))

    def record(self, sessions: list[tuple[datetime.date, SessionCount]]) -> None:
        """Add counts that no log position goes with: the daemon's own policy failures
        (ops/tlsrpt_policy.py), written from its worker threads."""
        self._transaction(lambda: self._add_sessions(sessions))

    def built(self, day: datetime.date, domain: str, report_id: str, now: float) -> None:
        """`tlsrpt build` wrote the report of `domain` for `day` (counted once however often rebuilt)."""
        def write() -> None:
            self._db.execute("INSERT OR REPLACE INTO built VALUES (?, ?, ?, ?)", (day.isoformat(), domain, report_id, now))
        self._transaction(write)

    def _transaction(self, work: Callable[[], None]) -> None:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    work()
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise TlsRptStoreError(f"cannot write TLSRPT store {self.path}: {exc}") from None

    def _add_sessions(self, sessions: list[tuple[datetime.date, SessionCount]]) -> None:
        self._db.executemany(
            "INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE "
            "SET sessions = sessions + excluded.sessions",
            [(day.isoformat(), *_key(count), count.sessions) for day, count in sessions])

    def _write(self, batch: Batch, now: float) -> None:
        self._add_sessions(batch.sessions)
        self._db.executemany(
            "INSERT INTO unparsed VALUES (?, ?, ?, ?) ON CONFLICT DO UPDATE "
            "SET lines = lines + excluded.lines, example = excluded.example",
            [(day.isoformat(), batch.position.source, lines, example)
             for day, (lines, example) in batch.unparsed.items()])
        self._db.executemany(
            "INSERT INTO local_events VALUES (?, ?, ?) ON CONFLICT DO UPDATE SET count = count + excluded.count",
            [(day.isoformat(), kind, count) for (day, kind), count in batch.local.items()])
        p = batch.position
        self._db.execute("INSERT OR REPLACE INTO positions VALUES (?, ?, ?, ?, ?, ?)",
                         (p.source, p.file_id, p.head, p.offset, p.state, now))

    # ----- the reports' side ----------------------------------------------------------------------

    def sessions(self, day: datetime.date, domain: str | None = None) -> list[SessionCount]:
        """The day's counts (of one policy domain), in a stable order."""
        query = ("SELECT policy_domain, policy_type, policy_string, mx_host, result, sending_ip, receiving_mx, "
                 "receiving_ip, reason_code, sessions FROM sessions WHERE day = ?")
        args: list[str] = [day.isoformat()]
        if domain is not None:
            query += " AND policy_domain = ?"
            args.append(domain)
        return [_count(row) for row in self._db.execute(query + " ORDER BY 1, 2, 3, 4, 5, 6, 7, 8, 9", args)]

    def domains(self, day: datetime.date) -> list[str]:
        """Policy domains with sessions on `day`, sorted."""
        return [row[0] for row in self._db.execute(
            "SELECT DISTINCT policy_domain FROM sessions WHERE day = ? ORDER BY 1", (day.isoformat(),))]

    def unparsed(self, day: datetime.date) -> dict[str, tuple[int, str]]:
        """Per source: lines not understood on `day`, and the last of them."""
        return {source: (lines, example) for source, lines, example in self._db.execute(
            "SELECT source, lines, example FROM unparsed WHERE day = ? ORDER BY 1", (day.isoformat(),))}

    def local_events(self, day: datetime.date) -> dict[str, int]:
        return dict(self._db.execute("SELECT kind, count FROM local_events WHERE day = ? ORDER BY 1",
                                     (day.isoformat(),)).fetchall())

    def totals(self) -> Totals:
        """Everything counted so far, over all days: the metrics (README "TLSRPT", Metrics)."""
        try:
            return Totals(
                dict(self._db.execute("SELECT CASE result WHEN '' THEN 'success' ELSE result END, SUM(sessions) "
                                      "FROM sessions GROUP BY 1 ORDER BY 1").fetchall()),
                dict(self._db.execute("SELECT source, SUM(lines) FROM unparsed GROUP BY 1 ORDER BY 1").fetchall()),
                dict(self._db.execute("SELECT kind, SUM(count) FROM local_events GROUP BY 1 ORDER BY 1").fetchall()),
                self._db.execute("SELECT COUNT(*) FROM built").fetchone()[0],
                dict(self._db.execute("SELECT state, COUNT(*) FROM deliveries GROUP BY 1 ORDER BY 1").fetchall()))
        except sqlite3.Error as exc:
            raise TlsRptStoreError(f"cannot read TLSRPT store {self.path}: {exc}") from None

    # ----- deliveries (`tlsrpt send`) ---------------------------------------------------------------

    def delivery(self, report_id: str, rua: str) -> Delivery | None:
        row = self._db.execute(
            "SELECT report_id, rua, day, state, attempts, first_attempt, next_attempt, last_error, sent_at "
            "FROM deliveries WHERE report_id = ? AND rua = ?", (report_id, rua)).fetchone()
        return Delivery(*row) if row else None

    def record_delivery(self, delivery: Delivery) -> None:
        """Store the outcome of an attempt (committed at once: a sent report is never sent again)."""
        with self._lock:
            try:
                with self._db:
                    self._db.execute("INSERT OR REPLACE INTO deliveries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                     (delivery.report_id, delivery.rua, delivery.day, delivery.state,
                                      delivery.attempts, delivery.first_attempt, delivery.next_attempt,
                                      delivery.last_error, delivery.sent_at))
            except sqlite3.Error as exc:
                raise TlsRptStoreError(f"cannot write TLSRPT store {self.path}: {exc}") from None

    def deliveries(self, day: datetime.date) -> list[Delivery]:
        return [Delivery(*row) for row in self._db.execute(
            "SELECT report_id, rua, day, state, attempts, first_attempt, next_attempt, last_error, sent_at "
            "FROM deliveries WHERE day = ? ORDER BY 1, 2", (day.isoformat(),))]

    def positions(self) -> Iterator[Position]:
        for row in self._db.execute("SELECT source, file_id, head, offset, state FROM positions ORDER BY 1"):
            yield Position(*row)


def _key(count: SessionCount) -> tuple[str, ...]:
    p = count.policy
    return (p.policy_domain, p.policy_type.value, json.dumps(list(p.policy_string)), json.dumps(list(p.mx_host)),
            count.result.value if count.result else "", count.sending_ip, count.receiving_mx, count.receiving_ip,
            count.reason_code)


def _count(row: tuple[str, str, str, str, str, str, str, str, str, int]) -> SessionCount:
    domain, ptype, strings, mx, result, sending_ip, receiving_mx, receiving_ip, reason, sessions = row
    policy = ReportPolicy(PolicyType(ptype), domain, tuple(json.loads(strings)), tuple(json.loads(mx)))
    return SessionCount(policy, ResultType(result) if result else None, sending_ip, receiving_mx, receiving_ip,
                        reason, sessions)
