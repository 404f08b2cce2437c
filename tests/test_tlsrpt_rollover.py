"""Day rollover (issue 10): sessions either side of 00:00 UTC are two days' counts and two reports.

The clock is injected (PostfixIngest's `clock`, build_day's `clock`); nothing sleeps. The lines are
the real Postfix 3.7 recording's successful session (tests/test_tlsrpt_postfix.py), restamped to
just before and just after midnight at the turn of a year, the hardest turn for syslog stamps
without a year.
"""

from __future__ import annotations

import datetime
import gzip
import json

from mtasts_policyd.core.tlsrpt_report import ReportIdentity
from mtasts_policyd.ops.tlsrpt_build import build_day
from mtasts_policyd.ops.tlsrpt_ingest import PostfixIngest, SourceAddresses
from mtasts_policyd.store.tlsrpt_store import TlsRptStore
from tests.fakes import FakeDiscovery
from tests.test_tlsrpt_ingest import LINES, UTC, policies

DOMAIN = "x-enforce-tls.e2e.test"
SESSION = [line.split(" sender ", 1)[1] for line in LINES
           if "postfix/smtp[17984]" in line and ("Verified TLS" in line or "x-enforce-tls" in line)]
BEFORE = datetime.date(2025, 12, 31)
AFTER = datetime.date(2026, 1, 1)


def stamped(stamp: str, pid: int) -> str:
    return "".join(f"{stamp} sender {rest.replace('[17984]', f'[{pid}]')}" for rest in SESSION)


def test_sessions_either_side_of_midnight_utc_are_counted_and_reported_on_their_own_day(tmp_path):
    assert len(SESSION) == 2  # the TLS line and the delivery line of one smtp(8) process
    log = tmp_path / "mail.log"
    log.write_text(stamped("Dec 31 23:59:59", 100) + stamped("Jan  1 00:00:01", 101) + stamped("Jan  1 00:00:02", 102))
    # read 30 s after midnight, in the new year: "Dec 31" is last year's (tlsrpt_postfix.parse_syslog)
    now = datetime.datetime(2026, 1, 1, 0, 0, 30, tzinfo=UTC)
    discovery = FakeDiscovery()
    discovery.set(f"_smtp._tls.{DOMAIN}", "TXT", "v=TLSRPTv1; rua=mailto:tlsrpt@e2e.test")
    identity = ReportIdentity("Example Org", "mailto:postmaster@reporter.example", "reporter.example")
    with TlsRptStore(str(tmp_path / "tlsrpt.sqlite3")) as store:
        PostfixIngest(store, policies, SourceAddresses(("192.0.2.1",)), clock=lambda: now, tz=UTC).ingest(str(log))
        assert [c.sessions for c in store.sessions(BEFORE, DOMAIN)] == [1]
        assert [c.sessions for c in store.sessions(AFTER, DOMAIN)] == [2]
        reports = {}
        for day in (BEFORE, AFTER):
            [built] = build_day(store, day, identity, discovery, str(tmp_path), clock=lambda: now.timestamp())
            assert built.outcome == "built", built.detail
            reports[day] = json.loads(gzip.decompress(open(built.path, "rb").read()))
    # RFC 8460 §4.4 date-range: the UTC day of the report, and only that day
    assert reports[BEFORE]["date-range"] == {"start-datetime": "2025-12-31T00:00:00Z",
                                             "end-datetime": "2025-12-31T23:59:59Z"}
    assert reports[AFTER]["date-range"] == {"start-datetime": "2026-01-01T00:00:00Z",
                                            "end-datetime": "2026-01-01T23:59:59Z"}
    assert [p["summary"]["total-successful-session-count"] for p in reports[BEFORE]["policies"]] == [1]
    assert [p["summary"]["total-successful-session-count"] for p in reports[AFTER]["policies"]] == [2]
    assert reports[BEFORE]["report-id"] != reports[AFTER]["report-id"]
