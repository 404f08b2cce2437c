"""Exim 4.96's main log as TLS sessions: the recording of tests/e2e/test_tlsrpt_exim_e2e.py (real
Exim, contrib/exim/exim.conf, MX sinks with each TLS behaviour) read by `tlsrpt ingest --exim-log`."""

from __future__ import annotations

import datetime
from collections import Counter

import pytest

from mtasts_policyd.core.tlsrpt_report import PolicyType, ReportPolicy
from mtasts_policyd.ops.tlsrpt_exim import EximIngest, EximSessions
from mtasts_policyd.ops.tlsrpt_ingest import SourceAddresses
from mtasts_policyd.ops.tlsrpt_postfix import Session
from mtasts_policyd.store.tlsrpt_store import TlsRptStore
from tests.conftest import ROOT

pytestmark = pytest.mark.fast

RECORDED = ROOT / "tests" / "data" / "exim-4.96-tls.log"
UTC = datetime.UTC
DAY = datetime.date(2026, 11, 30)

# What Exim 4.96 logged for each behaviour is the fact (README "TLSRPT"); per mode, the result.
ENFORCE = {"tls": None, "wrong-cert": "certificate-host-mismatch", "untrusted": "certificate-not-trusted",
           "expired": "certificate-not-trusted",  # GnuTLS/Exim: "certificate invalid", as for untrusted
           "self-signed": "certificate-not-trusted", "no-starttls": "starttls-not-supported",
           "starttls-refused": "starttls-not-supported", "handshake-abort": "validation-failure"}
TESTING = {"tls": None, "wrong-cert": "certificate-not-trusted", "untrusted": "certificate-not-trusted",
           "expired": "certificate-not-trusted", "self-signed": "certificate-not-trusted", "no-starttls": "-",
           "starttls-refused": "-", "handshake-abort": "validation-failure"}
NO_POLICY = {**{b: None for b in ENFORCE}, "no-starttls": "-", "starttls-refused": "-",
             "handshake-abort": "validation-failure"}
EXPECTED = {"enforce": ENFORCE, "testing": TESTING, "nopol": NO_POLICY}


def policies(domain: str, when: float, mx_host: str = "") -> ReportPolicy:
    mode = domain.split("-")[1]
    if mode == "nopol":
        return ReportPolicy(PolicyType.NO_POLICY_FOUND, domain)
    return ReportPolicy(PolicyType.STS, domain, ("version: STSv1", f"mode: {mode}", f"mx: *.{domain}",
                                                 "max_age: 86400"), (f"*.{domain}",))


def test_each_recorded_delivery_is_one_session_with_the_mapped_result(tmp_path):
    with TlsRptStore(str(tmp_path / "tlsrpt.sqlite3")) as store:
        summary = EximIngest(store, policies, SourceAddresses(("192.0.2.1",)), tz=UTC).ingest(str(RECORDED))
        found = Counter((c.policy.policy_domain.split(".")[0], c.result.value if c.result else None)
                        for c in store.sessions(DAY) for _ in range(c.sessions))
        assert summary.unparsed == 0 and store.unparsed(DAY) == {}
        rows = {c.policy.policy_domain: c for c in store.sessions(DAY) if c.result}
    want = Counter({(f"xrpt-{mode}-{behaviour}", result): 1 for mode, results in EXPECTED.items()
                    for behaviour, result in results.items() if result != "-"})
    assert found == want
    assert (rows["xrpt-enforce-expired.e2e.test"].reason_code, rows["xrpt-enforce-expired.e2e.test"].receiving_mx,
            rows["xrpt-enforce-expired.e2e.test"].receiving_ip) == (
        "certificate invalid", "mx.xrpt-enforce-expired.e2e.test", "127.0.0.38")
    assert rows["xrpt-nopol-handshake-abort.e2e.test"].reason_code == "tls-handshake-failure"


def test_reading_again_counts_nothing_twice(tmp_path):
    with TlsRptStore(str(tmp_path / "tlsrpt.sqlite3")) as store:
        reader = EximIngest(store, policies, SourceAddresses(("192.0.2.1",)), tz=UTC)
        reader.ingest(str(RECORDED))
        again = reader.ingest(str(RECORDED))
        assert again.lines == 0 and store.position(f"exim:{RECORDED}") is not None


def test_handshake_failure_then_plaintext_is_joined_across_a_restart():
    # The "delivering unencrypted" line has no recipient: its delivery line names the domain, and
    # the parser's state (saved with the position) carries it over a restart between the two.
    lines = [line for line in RECORDED.read_text().splitlines() if "xrpt-nopol-handshake-abort" in line]
    first = EximSessions()
    assert list(first.feed(lines[0], UTC)) == []
    second = EximSessions(first.state())
    [session] = [event for line in lines[1:] for event in second.feed(line, UTC)]
    assert isinstance(session, Session) and session.domain == "xrpt-nopol-handshake-abort.e2e.test"
    assert session.reason == "tls-handshake-failure" and second.state() == '{"pending": {}}'


def test_unknown_tls_lines_and_foreign_lines_are_unparsed():
    parser = EximSessions()
    odd = "2026-11-30 10:32:36 1xXygW-0006Mr-2G TLS something new happened"
    assert [type(e).__name__ for e in parser.feed(odd, UTC)] == ["Unparsed"]
    assert [type(e).__name__ for e in parser.feed("garbage", UTC)] == ["Unparsed"]
    assert list(parser.feed("2026-11-30 10:32:36 1xXygW-0006Mr-2G Completed", UTC)) == []


def test_report_deliveries_of_the_tlsrpt_router_are_not_counted():
    """Issue 10: no session is counted for the report mail itself (contrib/exim: router tlsrpt_reports)."""
    def line(router: str, transport: str) -> str:
        return (f"2026-11-30 10:32:36 1xXygW-0006Mr-2G => tlsrpt@r.example R={router} T={transport} "
                "H=mx.r.example [127.0.0.35] X=TLS1.3:ECDHE_SECP256R1__ECDSA_SECP256R1_SHA256__AES_256_GCM:256 "
                'CV=no DN="O=x" C="250 2.0.0 Ok: queued"')

    assert list(EximSessions().feed(line("tlsrpt_reports", "tlsrpt_smtp"), UTC)) == []
    sessions = [e for e in EximSessions().feed(line("dnslookup", "remote_smtp"), UTC) if isinstance(e, Session)]
    assert [s.domain for s in sessions] == ["r.example"]
