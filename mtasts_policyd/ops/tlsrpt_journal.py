"""`tlsrpt ingest --journal`: Postfix's lines from systemd's journal, `journalctl -o json` records.

Why JSON and not `-o short`: each record carries its exact time (`__REALTIME_TIMESTAMP`, µs since
the epoch, UTC: no year to guess, no zone), the program (`SYSLOG_IDENTIFIER`, "postfix/smtp"), the
PID and a cursor. The cursor of the last record of a committed batch is the position (stored in
the same transaction as the counts, store/tlsrpt_store.py), and the next run asks journalctl for
the records `--after-cursor` it: never a record twice, none lost. The lines themselves are
Postfix's, read by the same parser as a log file (ops/tlsrpt_postfix.py).

A record that is not JSON or lacks MESSAGE is counted as unparsed. journald stores a MESSAGE that
is not UTF-8 as an array of bytes; it is decoded with replacement.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from mtasts_policyd.ops.tlsrpt_ingest import IngestSummary, PostfixIngest
from mtasts_policyd.ops.tlsrpt_postfix import LogLine, PostfixSessions
from mtasts_policyd.store.tlsrpt_store import Batch, Position

SOURCE = "journal:postfix"
UNITS = "postfix*"  # Debian's postfix@-.service, postfix.service, multi-instance postfix@NAME


def journalctl_argv(cursor: str | None, follow: bool) -> list[str]:
    """The journalctl command for the records after `cursor` (all of them without one)."""
    argv = ["journalctl", "--no-pager", "-o", "json", "-u", UNITS]
    if cursor:
        argv.append(f"--after-cursor={cursor}")
    if follow:
        argv.append("--follow")
    return argv


def parse_journal(text: str) -> tuple[LogLine | None, str | None]:
    """One `journalctl -o json` record: the log line (None when it is not one) and its cursor."""
    try:
        record = json.loads(text)
    except ValueError:
        return None, None
    if not isinstance(record, dict):
        return None, None
    cursor = record.get("__CURSOR") if isinstance(record.get("__CURSOR"), str) else None
    message = record.get("MESSAGE")
    if isinstance(message, list):  # journald: a MESSAGE that is not UTF-8 is an array of bytes
        try:
            message = bytes(message).decode("utf-8", "replace")
        except (TypeError, ValueError):
            message = None
    program = record.get("SYSLOG_IDENTIFIER")
    pid = record.get("SYSLOG_PID") or record.get("_PID")
    try:
        when = int(record["__REALTIME_TIMESTAMP"]) / 1e6
        pid_number = int(pid) if pid is not None else -1
    except (KeyError, TypeError, ValueError):
        return None, cursor
    if not isinstance(message, str) or not isinstance(program, str) or pid_number < 0:
        return None, cursor
    return LogLine(when, program, pid_number, message), cursor


class JournalIngest(PostfixIngest):
    """Records of `journalctl -o json` into the store, with the cursor as the position."""

    def cursor(self) -> str | None:
        stored = self.store.position(SOURCE)
        return stored.head if stored is not None and stored.head else None

    def ingest_records(self, records: Iterable[str | None]) -> IngestSummary:
        """Read records until the iterable ends; None in it means "nothing more for now" (the
        follower's idle moment): what was read is committed then, so a quiet journal does not hold
        counts back. The counts and the cursor go in one transaction per batch."""
        stored = self.store.position(SOURCE)
        parser = PostfixSessions(state=stored.state if stored else "{}")
        position = Position(SOURCE, "journal", stored.head if stored else "", 0)
        summary = IngestSummary(files=[SOURCE])
        batch, taken = Batch(position), 0
        for text in records:
            if text is not None:
                line, cursor = parse_journal(text)
                summary.lines += 1
                if text.strip():
                    self._log_line(line, text, parser, batch, summary)
                if cursor:
                    batch.position = Position(SOURCE, "journal", cursor, 0)
                taken += 1
            if (text is None and taken) or taken >= self.batch_lines:
                self._commit(batch, 0, parser)
                batch, taken = Batch(batch.position), 0
            if self.stop.is_set():
                break
        self._commit(batch, 0, parser)
        return summary
