"""TLSRPT for DANE end to end: a real DANE-validating Postfix 3.7 (contrib's main.cf:
smtp_tls_security_level = dane, smtp_dns_support_level = dnssec; the daemon answering issue 9's
`dane-only`) on the DNSSEC world (tests/rig/dnssec.py, unbound validating), delivering to signed
domains with TLSA records and a valid TLSRPT record; `tlsrpt ingest` and `tlsrpt build` on its log.

RFC 8460 §4.4: a session to an MX host authenticated (or refused) by DANE is reported under the
policy-type `tlsa`, the host's TLSA records as policy-string, the host as mx-host; §4.3.2.1: a
TLSA RRset none of whose records matches is `tlsa-invalid`. A bogus TLSA RRset (§4.3.2.2
`dnssec-invalid`) is not seen by Postfix at all: the daemon answers TEMP and Postfix logs a policy
table lookup error, which `ingest` counts as our own local event (README "TLSRPT", known limits).
"""

from __future__ import annotations

import json
import uuid

import pytest

from tests.e2e.postfix_mta import PostfixInstance
from tests.e2e.tlsrpt_grid import RUA_HOST, RUA_PATH, SENDING_IP, Commands, days, write_config
from tests.e2e.world import OTHER_KEY, Mx, Scenario, World, spki_sha256, temp_dir

ENFORCE = "version: STSv1\nmode: enforce\nmx: *.{d}\nmax_age: 86400\n"
# Signed zones of their own (<name>.test), MTA-STS enforce too: DANE takes precedence (RFC 8461 §2).
MATCH = Scenario("trpt-dane-match", ENFORCE, (Mx("mx", "untrusted", tlsa="match"),), "mx", tls_required=True,
                 signed=True, dane="dane-only", by_dane=True)
MISMATCH = Scenario("trpt-dane-mismatch", ENFORCE, (Mx("mx", "tls", tlsa="mismatch"),), None, signed=True,
                    dane="dane-only")
# The TLSA RRset is bogus (RFC 4035 §5.3): the daemon answers TEMP (issue 9), Postfix defers
# without a session.
BOGUS = Scenario("trpt-dane-bogus", ENFORCE, (Mx("mx", "tls", tlsa="bogus"),), None, signed=True, dane="temp")
CASES = (MATCH, MISMATCH, BOGUS)


@pytest.fixture(scope="module")
def dane_reports(world: World, policyd):
    """Both domains mailed once (a deferral deleted at once), the log ingested, the day built."""
    directory = temp_dir("mtasts-tlsrpt-dane-")
    for scenario in CASES:
        world.publish(scenario)
        world.set(f"_smtp._tls.{scenario.domain}", "TXT", f"v=TLSRPTv1; rua=https://{RUA_HOST}{RUA_PATH}/dane")
    world.publish_signed()
    postfix = PostfixInstance().start()
    try:
        assert postfix.postconf("smtp_tls_security_level") == "dane"
        rcpts = {scenario.domain: f"u{uuid.uuid4().hex[:8]}@{scenario.domain}" for scenario in CASES}
        for rcpt in rcpts.values():
            postfix.send(rcpt, uuid.uuid4().hex)
        assert postfix.settle(list(rcpts.values()), timeout=60), postfix.log()[-4000:]
        attempts = {domain: len(postfix.statuses(rcpt)) for domain, rcpt in rcpts.items()}
    finally:
        postfix.stop()
    commands = Commands(write_config(world, directory), directory / "reports")
    ingested = commands.ingest("--postfix-log", postfix.log_path)
    reports, _ = commands.build()
    yield postfix, attempts, ingested, reports, commands
    postfix.remove()


def tlsa_policy(world: World, scenario: Scenario, record: str) -> dict:
    host = scenario.host(scenario.mx[0])
    return {"policy-type": "tlsa", "policy-string": [record], "policy-domain": scenario.domain, "mx-host": [host]}


def test_dane_authenticated_sessions_are_tlsa_successes(world: World, dane_reports):
    """The MX's certificate is from a CA nobody trusts and its TLSA record (DANE-EE, 3 1 1) matches:
    delivered by DANE alone, reported as a `tlsa` success with that record."""
    postfix, attempts, ingested, reports, commands = dane_reports
    assert ingested["unparsed"] == 0, commands.outputs
    host = MATCH.host(MATCH.mx[0])
    assert postfix.log_lines("Verified TLS connection established to", f"{host}[")
    [entry] = reports[MATCH.domain]["policies"]
    assert entry == {"policy": tlsa_policy(world, MATCH, f"3 1 1 {spki_sha256(world.sinks[host])}"),
                     "summary": {"total-successful-session-count": attempts[MATCH.domain],
                                 "total-failure-session-count": 0}}


def test_a_tlsa_mismatch_is_tlsa_invalid(world: World, dane_reports):
    """RFC 8460 §4.3.2.1 tlsa-invalid: the TLSA RRset (secure) matches no certificate of the host;
    Postfix refuses the host although its certificate is PKIX-valid for MTA-STS."""
    postfix, attempts, _, reports, commands = dane_reports
    host = MISMATCH.host(MISMATCH.mx[0])
    assert postfix.log_lines("server certificate verification failed for", f"{host}[")
    [entry] = reports[MISMATCH.domain]["policies"]
    n = attempts[MISMATCH.domain]
    assert n >= 1
    assert entry["policy"] == tlsa_policy(world, MISMATCH, f"3 1 1 {OTHER_KEY}")
    assert entry["summary"] == {"total-successful-session-count": 0, "total-failure-session-count": n}
    [detail] = entry["failure-details"]
    assert {k: v for k, v in detail.items() if k != "failure-reason-code"} == {
        "result-type": "tlsa-invalid", "sending-mta-ip": SENDING_IP, "receiving-mx-hostname": host,
        "receiving-ip": world.sinks[host].host, "failed-session-count": n}, (detail, postfix.log_lines(host))


def test_a_bogus_tlsa_rrset_is_a_local_event_not_a_session(world: World, dane_reports):
    """What happens today, recorded: the daemon's TEMP answer for the bogus RRset is, in Postfix's
    log, the same as an unreachable map (`policy table lookup error`): no session is counted and no
    report made for the domain; the run counts it as the local event policy-map-error."""
    postfix, _, _, reports, commands = dane_reports
    assert postfix.log_lines("policy table lookup error", BOGUS.domain)
    assert BOGUS.domain not in reports
    shown = [json.loads(commands.run("show", "--day", day.isoformat(), "--json")) for day in days()]
    assert not any(entry["domain"] == BOGUS.domain for document in shown for entry in document["domains"])
    assert sum(document["local_events"].get("policy-map-error", 0) for document in shown) >= 1
