"""The Postfix 3.7 log parser for TLSRPT, on lines the real Postfix wrote.

tests/data/postfix-3.7-tls.log was recorded from Postfix 3.7.11 (Debian 12) at smtp_tls_loglevel = 1,
run by tests/e2e (the same instance and world as test_tlsrpt_postfix_e2e.py) against MX hosts with
each TLS behaviour of tests/rig/smtp_server.py, for domains x-<mode>-<behaviour>.e2e.test whose
policy is enforce, testing or absent, plus x-enforce-fallback (MX 1 misnamed, MX 2 valid) and one
delivery while the policy map was unreachable. The e2e test checks the same mapping against a live
Postfix, so a Postfix that logs differently fails there, not only here.
"""

from __future__ import annotations

import datetime
from collections import defaultdict

import pytest

from mtasts_policyd.core.tlsrpt_report import ResultType
from mtasts_policyd.ops.tlsrpt_postfix import (
    Evidence,
    LocalEvent,
    PostfixSessions,
    Session,
    Unparsed,
    parse_syslog,
    verification_result,
)
from tests.conftest import ROOT

pytestmark = pytest.mark.fast  # pure: no sockets, no processes

RECORDED = ROOT / "tests" / "data" / "postfix-3.7-tls.log"
NOW = datetime.datetime(2025, 12, 1, tzinfo=datetime.UTC)
UTC = datetime.UTC

V, T, U, F = Evidence.VERIFIED, Evidence.TRUSTED, Evidence.UNTRUSTED, Evidence.FAILED
HANDSHAKE = (F, ResultType.VALIDATION_FAILURE, "tls-handshake-failure")
NOT_OFFERED = (F, ResultType.STARTTLS_NOT_SUPPORTED, "")
# What each domain's first delivery attempt(s) in the recording are, session by session.
EXPECTED = {
    # secure (enforce): Postfix verifies chain and name and logs why it failed
    "x-enforce-tls": [(V, None, "")],
    "x-enforce-wrong-cert": [(F, ResultType.CERTIFICATE_HOST_MISMATCH, "")],
    "x-enforce-expired": [(F, ResultType.CERTIFICATE_EXPIRED, "")],
    "x-enforce-self-signed": [(F, ResultType.VALIDATION_FAILURE, "self-signed_certificate")],
    "x-enforce-no-starttls": [NOT_OFFERED],
    "x-enforce-starttls-refused": [NOT_OFFERED],
    "x-enforce-handshake-abort": [HANDSHAKE],
    "x-enforce-fallback": [(F, ResultType.CERTIFICATE_HOST_MISMATCH, ""), (V, None, "")],
    # may (testing, no policy): no name check, no reason logged; plaintext is no TLS session
    "x-testing-tls": [(T, None, "")],
    "x-testing-wrong-cert": [(T, None, "")],
    "x-testing-untrusted": [(U, None, "")],
    "x-testing-expired": [(U, None, "")],
    "x-testing-self-signed": [(U, None, "")],
    "x-testing-no-starttls": [],
    "x-testing-starttls-refused": [],
    "x-testing-handshake-abort": [HANDSHAKE, HANDSHAKE],  # deferred; then failed again, sent in plaintext
    "x-nopol-tls": [(T, None, "")],
    "x-nopol-wrong-cert": [(T, None, "")],
    "x-nopol-untrusted": [(U, None, "")],
    "x-nopol-expired": [(U, None, "")],
    "x-nopol-self-signed": [(U, None, "")],
    "x-nopol-no-starttls": [],
    "x-nopol-starttls-refused": [],
    "x-nopol-handshake-abort": [HANDSHAKE, HANDSHAKE],
}


def run(lines: list[str], parser: PostfixSessions | None = None) -> list:
    parser = parser or PostfixSessions()
    events = []
    for text in lines:
        line = parse_syslog(text, NOW, UTC)
        assert line is not None, text
        events += list(parser.feed(line))
    return events


def by_domain(events: list) -> dict[str, list[tuple]]:
    found: dict[str, list[tuple]] = defaultdict(list)
    for event in events:
        if isinstance(event, Session):
            found[event.domain.removesuffix(".e2e.test")].append((event.evidence, event.result, event.reason))
    return found


def test_recorded_postfix_log_gives_one_result_per_session():
    events = run(RECORDED.read_text().splitlines())
    found = by_domain(events)
    untrusted = found.pop("x-enforce-untrusted")
    assert len(untrusted) == 1 and untrusted[0][:2] == (F, ResultType.CERTIFICATE_NOT_TRUSTED)
    assert untrusted[0][2].startswith("untrusted issuer /O=mtasts-policyd test CA")  # the reason code
    assert {domain: found.get(domain, []) for domain in EXPECTED} == EXPECTED
    assert set(found) <= set(EXPECTED)
    assert [e.kind for e in events if isinstance(e, LocalEvent)] == ["policy-map-error"]
    assert [e for e in events if isinstance(e, Unparsed)] == []


def test_sessions_carry_the_mx_host_ip_and_time_of_their_tls_line():
    sessions = [e for e in run(RECORDED.read_text().splitlines()) if isinstance(e, Session)]
    fallback = [s for s in sessions if s.domain == "x-enforce-fallback.e2e.test"]
    assert [(s.mx_host, s.mx_ip) for s in fallback] == [
        ("mx1.x-enforce-fallback.e2e.test", "127.0.0.46"), ("mx2.x-enforce-fallback.e2e.test", "127.0.0.47")]
    assert datetime.datetime.fromtimestamp(fallback[0].when, UTC).isoformat() == "2025-11-30T09:58:11+00:00"


def test_state_saved_anywhere_gives_the_same_sessions():
    """The reader stores the open sessions with its position: stopping after any line and going on
    with a new parser from the saved state gives the same sessions as reading in one go."""
    lines = RECORDED.read_text().splitlines()
    whole = by_domain(run(lines))
    for cut in range(len(lines) + 1):
        first = PostfixSessions()
        events = run(lines[:cut], first)
        events += run(lines[cut:], PostfixSessions(state=first.state()))
        assert by_domain(events) == whole, cut


Q = "Dec  1 10:00:0{} mail postfix/smtp[4242]: "


def test_more_recipients_of_one_delivery_are_one_session():
    lines = [Q.format(1) + "4D2B1216C87: to=<a@two.example>, relay=mx.two.example[192.0.2.25]:25, delay=0.2, "
             "delays=0/0/0.1/0, dsn=4.7.4, status=deferred (TLS is required, but was not offered by host "
             "mx.two.example[192.0.2.25])",
             Q.format(1) + "4D2B1216C87: to=<b@two.example>, relay=mx.two.example[192.0.2.25]:25, delay=0.2, "
             "delays=0/0/0.1/0, dsn=4.7.4, status=deferred (TLS is required, but was not offered by host "
             "mx.two.example[192.0.2.25])"]
    sessions = [e for e in run(lines) if isinstance(e, Session)]
    assert [(s.domain, s.result, s.mx_host, s.mx_ip) for s in sessions] == [
        ("two.example", ResultType.STARTTLS_NOT_SUPPORTED, "mx.two.example", "192.0.2.25")]


def test_a_reused_connection_is_no_new_session():
    # Postfix >= 3.10 skips reused handshakes too (smtp_tlsrpt_skip_reused_handshakes).
    lines = [Q.format(1) + "Verified TLS connection established to mx.r.example[192.0.2.7]:25: TLSv1.3 with cipher X",
             Q.format(2) + "AAAAAA1: to=<a@r.example>, relay=mx.r.example[192.0.2.7]:25, delay=1, delays=0/0/0/1, "
             "dsn=2.0.0, status=sent (250 ok)",
             Q.format(3) + "BBBBBB2: to=<b@r.example>, relay=mx.r.example[192.0.2.7]:25, conn_use=2, delay=1, "
             "delays=0/0/0/1, dsn=2.0.0, status=sent (250 ok)",
             Q.format(4) + "Verified TLS connection reused to mx.r.example[192.0.2.7]:25: TLSv1.3 with cipher X",
             Q.format(5) + "CCCCCC3: to=<c@r.example>, relay=mx.r.example[192.0.2.7]:25, conn_use=3, delay=1, "
             "delays=0/0/0/1, dsn=2.0.0, status=sent (250 ok)"]
    events = run(lines)
    assert [(e.domain, e.evidence) for e in events if isinstance(e, Session)] == [("r.example", V)]
    assert not [e for e in events if isinstance(e, Unparsed)]


def test_lines_of_other_services_are_ignored_and_unknown_smtp_lines_are_unparsed():
    lines = ["Dec  1 10:00:01 mail postfix/qmgr[7]: AAAAAA1: from=<s@example.org>, size=1, nrcpt=1 (queue active)",
             "Dec  1 10:00:01 mail postfix/local[8]: AAAAAA1: to=<root@mail>, relay=local, delay=0, delays=0/0/0/0, "
             "dsn=2.0.0, status=sent (delivered to mailbox)",
             "Dec  1 10:00:01 mail dovecot[9]: imap-login: Login: user=<x>",
             "Dec  1 10:00:02 mail postfix/smtp[10]: connect to mx.x.example[192.0.2.1]:25: Connection refused",
             "Dec  1 10:00:02 mail postfix/smtp[10]: warning: TLS library problem: error:0A000086",
             "Dec  1 10:00:03 mail postfix/smtp[10]: something Postfix 3.7 never said"]
    events = run(lines)
    assert events == [Unparsed(datetime.datetime(2025, 12, 1, 10, 0, 3, tzinfo=UTC).timestamp(),
                               "postfix/smtp[10]: something Postfix 3.7 never said")]


def test_custom_services_and_instances():
    line = ("Dec  1 10:00:01 mail postfix-out/smtp-tls[11]: Verified TLS connection established to "
            "mx.c.example[192.0.2.9]:25: TLSv1.2")
    status = ("Dec  1 10:00:01 mail postfix-out/smtp-tls[11]: 5Q0ab1CdEfGh: to=<u@C.Example>, "
              "relay=mx.c.example[192.0.2.9]:25, delay=1, delays=0/0/0/1, dsn=2.0.0, status=sent (250 ok)")
    assert run([line, status]) == []  # not a counted service by default
    sessions = run([line, status], PostfixSessions(services=("smtp-tls",)))
    assert [(s.domain, s.evidence) for s in sessions] == [("c.example", V)]  # long queue ids, domain lowercased


def test_a_session_left_open_by_a_dead_process_is_given_up():
    lines = ["Dec  1 08:00:00 mail postfix/smtp[12]: SSL_connect error to mx.d.example[192.0.2.3]:25: lost connection",
             "Dec  1 10:00:00 mail postfix/smtp[12]: Verified TLS connection established to mx.e.example[192.0.2.4]:25: x",
             "Dec  1 10:00:00 mail postfix/smtp[12]: CCCCCC3: to=<u@e.example>, relay=mx.e.example[192.0.2.4]:25, "
             "delay=1, delays=0/0/0/1, dsn=2.0.0, status=sent (250 ok)"]
    events = run(lines)
    assert [type(e).__name__ for e in events] == ["LocalEvent", "Session"]
    assert events[0].kind == "stale-session" and events[1].domain == "e.example"


@pytest.mark.parametrize("reason,expected", [
    ("num=62:hostname mismatch", (ResultType.CERTIFICATE_HOST_MISMATCH, "")),
    ("certificate has expired", (ResultType.CERTIFICATE_EXPIRED, "")),
    ("untrusted issuer /O=Example CA", (ResultType.CERTIFICATE_NOT_TRUSTED, "untrusted issuer /O=Example CA")),
    # Postfix >= 3.10 reports a new session's self-signed certificate so (its TLSRPT_README, "TLSRPT
    # Status logging": failure_type=validation_failure, failure_reason=self-signed_certificate).
    ("self-signed certificate", (ResultType.VALIDATION_FAILURE, "self-signed_certificate")),
    ("num=20:unable to get local issuer certificate",
     (ResultType.CERTIFICATE_NOT_TRUSTED, "num=20:unable to get local issuer certificate")),
    ("certificate is not yet valid", (ResultType.VALIDATION_FAILURE, "certificate is not yet valid")),
    ("num=24:invalid CA certificate", (ResultType.VALIDATION_FAILURE, "num=24:invalid CA certificate")),
    # RFC 8460 §4.3.2.1 tlsa-invalid: a DANE host whose TLSA records match none of its certificates
    # (Postfix 3.7, level dane/dane-only: tests/e2e/test_tlsrpt_dane_e2e.py).
    ("num=65:no matching DANE TLSA records", (ResultType.TLSA_INVALID, "num=65:no matching DANE TLSA records")),
])
def test_verification_failures_map_to_rfc_8460_result_types(reason, expected):
    # RFC 8460 §4.3.1; the table: other verification errors are validation-failure with the reason.
    assert verification_result(reason) == expected


def test_syslog_time_stamps():
    def when(text: str, now: datetime.datetime = NOW, tz: datetime.tzinfo | None = UTC) -> str:
        line = parse_syslog(text + " mail postfix/smtp[1]: x", now, tz)
        assert line is not None
        return datetime.datetime.fromtimestamp(line.when, UTC).isoformat()

    assert when("Nov 30 09:58:11") == "2025-11-30T09:58:11+00:00"
    assert when("Dec  1 23:30:00") == "2025-12-01T23:30:00+00:00"  # less than a day ahead: clocks differ
    # Read on 1 January: 31 December is last year's.
    assert when("Dec 31 23:59:59", datetime.datetime(2026, 1, 1, 0, 5, tzinfo=UTC)) == "2025-12-31T23:59:59+00:00"
    berlin = datetime.timezone(datetime.timedelta(hours=1))
    assert when("Nov 30 09:58:11", tz=berlin) == "2025-11-30T08:58:11+00:00"  # the machine's local time
    assert when("2025-11-30T09:58:11.123456+01:00") == "2025-11-30T08:58:11.123456+00:00"
    assert parse_syslog("Nov 31 09:58:11 mail postfix/smtp[1]: x", NOW, UTC) is None  # no such day
    assert parse_syslog("-- Journal begins at ...", NOW, UTC) is None


def test_report_deliveries_of_the_tlsrpt_transport_are_not_counted():
    """Issue 10: no session is counted for the report mail itself. contrib/postfix/tlsrpt-master.cf's
    transport logs as postfix/tlsrpt/smtp; the same lines from postfix/smtp are one session."""
    def lines(program: str) -> list[str]:
        return [f"Dec  1 10:00:01 mail {program}[12]: Untrusted TLS connection established to "
                "mx.r.example[192.0.2.7]:25: TLSv1.3",
                f"Dec  1 10:00:01 mail {program}[12]: 6R0ab1CdEfGh: to=<tlsrpt@r.example>, "
                "relay=mx.r.example[192.0.2.7]:25, delay=1, delays=0/0/0/1, dsn=2.0.0, status=sent (250 ok)"]

    assert run(lines("postfix/tlsrpt/smtp")) == []
    assert [s.domain for s in run(lines("postfix/smtp")) if isinstance(s, Session)] == ["r.example"]


def test_reused_tls_session_with_an_untrusted_certificate_is_certificate_not_trusted():
    """Postfix (tls_client.c) logs no reason for a resumed TLS session whose certificate failed
    before; Postfix >= 3.10 reports it as certificate_not_trusted (TLSRPT_README)."""
    lines = [Q.format(1) + "mx.u.example[192.0.2.8]:25: re-using session with untrusted certificate, "
             "look for details earlier in the log",
             Q.format(1) + "Untrusted TLS connection established to mx.u.example[192.0.2.8]:25: TLSv1.3 with cipher X",
             Q.format(2) + "DDDDDD4: Server certificate not verified",
             Q.format(2) + "DDDDDD4: to=<a@u.example>, relay=mx.u.example[192.0.2.8]:25, delay=1, delays=0/0/0/1, "
             "dsn=4.7.5, status=deferred (Server certificate not verified)"]
    events = run(lines)
    assert [(e.domain, e.evidence, e.result, e.reason) for e in events] == [
        ("u.example", F, ResultType.CERTIFICATE_NOT_TRUSTED, "")]


# Postfix >= 3.10 with smtp_tlsrpt_enable = yes logs its own verdict per TLS handshake (its
# TLSRPT_README, "TLSRPT Status logging"); it is taken as the session's result, so a report built
# from a 3.10 log says what Postfix's own reporter would.
def test_postfix_310_tlsrpt_lines_are_the_sessions_result():
    lines = [
        # a failure Postfix 3.7 would have logged differently: 3.10's verdict wins
        Q.format(1) + "certificate verification failed for mx.a.example[192.0.2.1]:25: self-signed certificate",
        Q.format(1) + "TLSRPT: status=failure, domain=a.example, receiving_mx=mx.a.example[192.0.2.1], "
        "failure_type=certificate_not_trusted, failure_reason=some_reason",
        Q.format(1) + "Untrusted TLS connection established to mx.a.example[192.0.2.1]:25: TLSv1.3 with cipher X",
        Q.format(2) + "AAAAAA1: Server certificate not verified",
        # the next MX of the same delivery: success
        Q.format(3) + "TLSRPT: status=success, domain=a.example, receiving_mx=mx2.a.example[192.0.2.2]",
        Q.format(3) + "Verified TLS connection established to mx2.a.example[192.0.2.2]:25: TLSv1.3 with cipher X",
        Q.format(4) + "AAAAAA1: to=<u@a.example>, relay=mx2.a.example[192.0.2.2]:25, delay=1, delays=0/0/0/1, "
        "dsn=2.0.0, status=sent (250 ok)",
        # STARTTLS not offered: one session, from the TLSRPT line, not two
        Q.format(5) + "TLSRPT: status=failure, domain=b.example, receiving_mx=mx.b.example[192.0.2.3], "
        "failure_type=starttls_not_supported",
        Q.format(6) + "BBBBBB2: to=<u@b.example>, relay=mx.b.example[192.0.2.3]:25, delay=1, delays=0/0/0/1, "
        "dsn=4.7.4, status=deferred (TLS is required, but was not offered by host mx.b.example[192.0.2.3])",
    ]
    events = run(lines)
    assert [(e.domain, e.mx_host, e.mx_ip, e.evidence, e.result, e.reason) for e in events] == [
        ("a.example", "mx.a.example", "192.0.2.1", F, ResultType.CERTIFICATE_NOT_TRUSTED, "some_reason"),
        ("a.example", "mx2.a.example", "192.0.2.2", V, None, ""),
        ("b.example", "mx.b.example", "192.0.2.3", F, ResultType.STARTTLS_NOT_SUPPORTED, ""),
    ]


def test_a_postfix_310_tlsrpt_line_with_an_unknown_failure_type_is_unparsed_not_guessed():
    line = Q.format(1) + ("TLSRPT: status=failure, domain=c.example, receiving_mx=mx.c.example[192.0.2.4], "
                          "failure_type=something_new")
    events = run([line])
    assert len(events) == 1 and isinstance(events[0], Unparsed)
