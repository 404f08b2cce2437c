"""The TLSRPT counts store on real SQLite files: sums, positions in the same transaction, reopening."""

from __future__ import annotations

import datetime
import os
import stat

import pytest

from mtasts_policyd.core.tlsrpt_report import PolicyType, ReportPolicy, ResultType, SessionCount
from mtasts_policyd.ops.metrics import tlsrpt_families
from mtasts_policyd.store.tlsrpt_store import Batch, Delivery, Position, TlsRptStore, TlsRptStoreError, default_store_path

DAY = datetime.date(2025, 3, 1)
STS = ReportPolicy(PolicyType.STS, "example.com", ("version: STSv1", "mode: enforce", "mx: mx.example.com",
                                                  "max_age: 86400"), ("mx.example.com",))
NONE = ReportPolicy(PolicyType.NO_POLICY_FOUND, "example.net")


def ok(policy: ReportPolicy, n: int = 1) -> SessionCount:
    return SessionCount(policy, None, "192.0.2.1", f"mx.{policy.policy_domain}", "198.51.100.25", "", n)


def failed(policy: ReportPolicy, result: ResultType, n: int = 1, reason: str = "") -> SessionCount:
    return SessionCount(policy, result, "192.0.2.1", f"mx.{policy.policy_domain}", "198.51.100.25", reason, n)


def batch(offset: int, *counts: SessionCount, day: datetime.date = DAY, state: str = "{}") -> Batch:
    return Batch(Position("postfix:/var/log/mail.log", "1:2", "abc", offset, state),
                 sessions=[(day, count) for count in counts])


def test_default_path_is_beside_the_cache():
    assert default_store_path("/var/lib/mtasts-policyd/cache.sqlite3") == "/var/lib/mtasts-policyd/tlsrpt.sqlite3"


def test_counts_sum_per_day_and_outcome_and_survive_reopening(tmp_path):
    path = str(tmp_path / "state" / "tlsrpt.sqlite3")
    with TlsRptStore(path) as store:
        store.commit(batch(100, ok(STS, 2), failed(STS, ResultType.CERTIFICATE_EXPIRED), ok(NONE)), now=1.0)
        store.commit(batch(200, ok(STS, 3), failed(STS, ResultType.CERTIFICATE_EXPIRED, 4),
                           failed(STS, ResultType.VALIDATION_FAILURE, reason="tls-handshake-failure")), now=2.0)
        store.commit(batch(250, ok(STS), day=DAY + datetime.timedelta(days=1)), now=3.0)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640  # like the cache: no world access
    with TlsRptStore(path, create=False) as store:
        assert store.sessions(DAY, "example.com") == [
            ok(STS, 5), failed(STS, ResultType.CERTIFICATE_EXPIRED, 5),
            failed(STS, ResultType.VALIDATION_FAILURE, reason="tls-handshake-failure")]
        assert store.sessions(DAY, "example.net") == [ok(NONE)]
        assert store.domains(DAY) == ["example.com", "example.net"]
        assert store.domains(DAY + datetime.timedelta(days=1)) == ["example.com"]
        assert store.position("postfix:/var/log/mail.log") == Position("postfix:/var/log/mail.log", "1:2", "abc", 250)
        assert store.position("exim:/var/log/exim4/mainlog") is None


def test_unparsed_lines_and_local_events_are_kept_per_day(tmp_path):
    with TlsRptStore(str(tmp_path / "t.sqlite3")) as store:
        first = batch(10)
        first.add_unparsed(DAY, "garbage 1")
        first.add_unparsed(DAY, "garbage 2")
        first.add_local(DAY, "policy-map-error")
        assert not first.empty
        store.commit(first, now=1.0)
        second = batch(20)
        second.add_unparsed(DAY, "garbage 3")
        second.add_local(DAY, "policy-map-error")
        store.commit(second, now=2.0)
        assert store.unparsed(DAY) == {"postfix:/var/log/mail.log": (3, "garbage 3")}
        assert store.local_events(DAY) == {"policy-map-error": 2}
        assert store.sessions(DAY) == []  # never reported


def test_a_failed_batch_changes_nothing(tmp_path):
    """The position moves only with the counts: a write that fails half-way is rolled back."""
    with TlsRptStore(str(tmp_path / "t.sqlite3")) as store:
        store.commit(batch(100, ok(STS)), now=1.0)
        broken = batch(200, ok(STS, 5))
        broken.position = Position("postfix:/var/log/mail.log", "1:2", "abc", object(), "{}")  # type: ignore[arg-type]
        with pytest.raises(TlsRptStoreError, match="cannot write"):
            store.commit(broken, now=2.0)  # the sessions were inserted, then the position failed
        assert store.sessions(DAY) == [ok(STS)]
        assert store.position("postfix:/var/log/mail.log").offset == 100
        store.commit(batch(300, ok(STS)), now=3.0)  # and the store goes on working
        assert store.sessions(DAY) == [ok(STS, 2)]


def test_a_missing_store_is_an_error_for_readers(tmp_path):
    path = tmp_path / "nowhere" / "tlsrpt.sqlite3"
    with pytest.raises(TlsRptStoreError, match="no TLSRPT store"):
        TlsRptStore(str(path), create=False)
    assert not path.parent.exists()


def test_a_file_that_is_not_a_database_is_a_clear_error(tmp_path):
    path = tmp_path / "tlsrpt.sqlite3"
    path.write_bytes(b"not a database at all, " * 100)
    with pytest.raises(TlsRptStoreError, match="cannot open TLSRPT store"):
        TlsRptStore(str(path))


def test_readers_see_commits_of_another_connection(tmp_path):
    path = str(tmp_path / "t.sqlite3")
    with TlsRptStore(path) as writer, TlsRptStore(path, create=False) as reader:
        writer.commit(batch(1, ok(NONE)), now=1.0)
        assert reader.sessions(DAY) == [ok(NONE)]
        writer.commit(batch(2, ok(NONE)), now=2.0)
        assert reader.sessions(DAY) == [ok(NONE, 2)]
        assert [p.offset for p in reader.positions()] == [2]


def test_totals_for_metrics(tmp_path):
    # README "Metrics": sessions by result, unparsed lines by source, local events, reports built
    # (a rebuilt report is one report).
    with TlsRptStore(str(tmp_path / "tlsrpt.sqlite3")) as store:
        b = batch(10, ok(STS, 2), failed(STS, ResultType.CERTIFICATE_EXPIRED), ok(NONE))
        b.add_unparsed(DAY, "garbage")
        b.add_local(DAY, "policy-map-error")
        store.commit(b, now=1.0)
        store.commit(batch(20, ok(STS), day=DAY + datetime.timedelta(days=1)), now=2.0)
        store.record([(DAY, failed(NONE, ResultType.STS_POLICY_FETCH_ERROR))])
        for _ in range(2):
            store.built(DAY, "example.com", "20250301.example.com@r.example", now=3.0)
        totals = store.totals()
    assert totals.sessions == {"success": 4, "certificate-expired": 1, "sts-policy-fetch-error": 1}
    assert totals.unparsed == {"postfix:/var/log/mail.log": 1}
    assert totals.local == {"policy-map-error": 1}
    assert totals.reports_built == 1
    assert totals.deliveries == {}


def test_totals_count_deliveries_by_state(tmp_path):
    # README "Metrics" (issue 10: reports sent/failed): one delivery per report and rua, by its
    # latest state; a pending delivery that is sent later counts once, as sent.
    with TlsRptStore(str(tmp_path / "tlsrpt.sqlite3")) as store:
        rid = "20250301.example.com@r.example"
        store.record_delivery(Delivery(rid, "mailto:a@example.com", "2025-03-01", "pending", 1, 1.0, 61.0, "421"))
        store.record_delivery(Delivery(rid, "mailto:a@example.com", "2025-03-01", "sent", 2, 1.0, 61.0, "", 61.0))
        store.record_delivery(Delivery(rid, "https://r.example.com/", "2025-03-01", "pending", 1, 1.0, 61.0, "503"))
        store.record_delivery(Delivery(rid, "mailto:b@example.com", "2025-03-01", "given-up", 9, 1.0, 9e9, "550"))
        totals = store.totals()
    assert totals.deliveries == {"sent": 1, "pending": 1, "given-up": 1}
    families = {name: samples for name, _, _, samples in tlsrpt_families(totals)}
    assert families["mtasts_tlsrpt_report_deliveries"] == [({"state": "sent"}, 1), ({"state": "pending"}, 1),
                                                           ({"state": "given-up"}, 1)]
