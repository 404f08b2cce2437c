"""`tlsrpt ingest --follow` and `--journal`: a reader that keeps going, stops on SIGTERM with its
position saved, survives logrotate, and reads journald's JSON records with the cursor as position.

No journald runs in the test namespace, so the journal records are the recorded Postfix 3.7 log
(tests/test_tlsrpt_postfix.py) in `journalctl -o json`'s shape: the fields journald writes for a
syslog line (MESSAGE, SYSLOG_IDENTIFIER, SYSLOG_PID, _PID, __REALTIME_TIMESTAMP, __CURSOR).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import pytest

from mtasts_policyd.ops.tlsrpt_ingest import PostfixIngest, SourceAddresses
from mtasts_policyd.ops.tlsrpt_journal import SOURCE, JournalIngest, journalctl_argv, parse_journal
from mtasts_policyd.ops.tlsrpt_postfix import parse_syslog
from mtasts_policyd.store.tlsrpt_store import TlsRptStore
from tests.conftest import ROOT, cli_command
from tests.test_tlsrpt_cli import DAY as RECORDED_DAY  # the day as a command reads it (year from today)
from tests.test_tlsrpt_cli import setup  # noqa: F401  (fixture)
from tests.test_tlsrpt_ingest import DAY, EXPECTED, LINES, NOW, UTC, policies, totals

BOUND = 30.0  # seconds any wait here may take at most


@pytest.fixture
def store(tmp_path):
    with TlsRptStore(str(tmp_path / "tlsrpt.sqlite3")) as opened:
        yield opened


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + BOUND
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_follow_keeps_reading_through_rotation_and_stops_on_request(store, tmp_path):
    log = tmp_path / "mail.log"
    log.write_text("".join(LINES[:20]))
    reader = PostfixIngest(store, policies, SourceAddresses(("192.0.2.1",)), clock=lambda: NOW, tz=UTC)
    rounds: list[int] = []
    follower = threading.Thread(target=reader.follow, args=([str(log)],),
                                kwargs={"interval": 0.05, "report": lambda path, s: rounds.append(s.lines)})
    follower.start()
    try:
        wait_for(lambda: sum(rounds) == 20, "the first lines")
        with open(log, "a") as handle:
            handle.write("".join(LINES[20:40]))
        wait_for(lambda: sum(rounds) == 40, "appended lines")
        with open(log, "a") as handle:  # written just before logrotate renames the file
            handle.write("".join(LINES[40:60]))
        os.rename(log, f"{log}.1")  # logrotate; the file is missing until syslog reopens
        time.sleep(0.2)
        log.write_text("".join(LINES[60:]))
        wait_for(lambda: sum(rounds) == len(LINES), "the rotated and the new file")
    finally:
        reader.stop.set()
        follower.join(BOUND)
    assert not follower.is_alive()
    assert totals(store) == EXPECTED
    assert store.position(f"postfix:{log}").offset == log.stat().st_size


def test_follow_command_stops_on_sigterm_with_its_position_saved(setup, tmp_path):
    config, log = setup
    lines = open(log).read().splitlines(keepends=True)
    with open(log, "w") as handle:
        handle.write("".join(lines[:50]))
    process = subprocess.Popen(cli_command("tlsrpt", "ingest", "--config", config, "--postfix-log", log,
                                           "--follow"), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        first = process.stdout.readline()  # one line per round that read something
        assert first.startswith("ingest: 50 lines,"), first + process.stderr.read()
        with open(log, "a") as handle:
            handle.write("".join(lines[50:]))
        second = process.stdout.readline()
        assert second.startswith(f"ingest: {len(lines) - 50} lines,"), second
        process.send_signal(signal.SIGTERM)
        assert process.wait(BOUND) == 0, process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(BOUND)
        process.stdout.close()
        process.stderr.close()
    with TlsRptStore(str(tmp_path / "tlsrpt.sqlite3")) as store:
        assert store.position(f"postfix:{os.path.abspath(log)}").offset == os.path.getsize(log)
        assert sum(c.sessions for c in store.sessions(RECORDED_DAY)) == sum(EXPECTED.values())


def journal_records() -> list[str]:
    """The recorded log as `journalctl -o json` prints it (one JSON object per line)."""
    records = []
    for number, text in enumerate(LINES):
        line = parse_syslog(text.rstrip("\n"), NOW, UTC)
        assert line is not None
        records.append(json.dumps({
            "__CURSOR": f"s=0123abcd;i={number + 1:x};b=feed;m={number:x};t=0;x=1",
            "__REALTIME_TIMESTAMP": str(int(line.when * 1_000_000)), "_HOSTNAME": "mail",
            "SYSLOG_FACILITY": "2", "SYSLOG_IDENTIFIER": line.program, "SYSLOG_PID": str(line.pid),
            "_PID": str(line.pid), "PRIORITY": "6", "_SYSTEMD_UNIT": "postfix@-.service", "MESSAGE": line.text}))
    return records


def journal_reader(store) -> JournalIngest:
    return JournalIngest(store, policies, SourceAddresses(("192.0.2.1",)), clock=lambda: NOW, batch_lines=7)


@pytest.mark.parametrize("cut", [1, 33, 64])
def test_journal_records_counted_once_across_a_restart(store, cut):
    records = journal_records()
    summary = journal_reader(store).ingest_records(records[:cut] + [None])
    assert summary.lines == cut
    cursor = journal_reader(store).cursor()
    assert cursor == json.loads(records[cut - 1])["__CURSOR"]
    # the next run asks journalctl for what follows the stored cursor
    assert journalctl_argv(cursor, True) == ["journalctl", "--no-pager", "-o", "json", "-u", "postfix*",
                                             f"--after-cursor={cursor}", "--follow"]
    journal_reader(store).ingest_records(records[cut:])
    assert totals(store) == EXPECTED
    assert store.local_events(DAY) == {"policy-map-error": 1} and store.unparsed(DAY) == {}


def test_journal_odd_records():
    # journald keeps a MESSAGE that is not UTF-8 as an array of bytes; the rest is unparsed.
    raw = list("warning: caf\xe9".encode("latin-1"))
    line, cursor = parse_journal(json.dumps({"__CURSOR": "c1", "__REALTIME_TIMESTAMP": "1764500000000000",
                                             "SYSLOG_IDENTIFIER": "postfix/smtp", "_PID": "7", "MESSAGE": raw}))
    assert line is not None and line.text == "warning: caf\ufffd" and line.pid == 7 and cursor == "c1"
    assert line.when == 1764500000.0
    assert parse_journal("not json") == (None, None)
    assert parse_journal(json.dumps({"__CURSOR": "c2", "MESSAGE": "x"})) == (None, "c2")


def test_journal_unparsed_records_are_counted(store):
    records = journal_records()[:3] + ["{broken", json.dumps({"__CURSOR": "c9", "MESSAGE": "no time"})]
    summary = journal_reader(store).ingest_records(records)
    assert summary.unparsed == 2
    assert sum(n for n, _ in store.unparsed(NOW.date()).values()) == 2
    assert store.position(SOURCE).head == "c9"
