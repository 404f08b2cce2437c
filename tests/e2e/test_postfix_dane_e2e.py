"""Real Postfix 3.7 on the DNSSEC world: DANE takes precedence over MTA-STS (RFC 8461 §2, issue 9).

Postfix itself does DANE (RFC 7672) once its TLS policy for a destination is `dane-only` or `dane`,
with `smtp_dns_support_level = dnssec` (contrib/postfix/main.cf). A policy-map answer replaces the
default level for its destination, so the answer must say DANE where DANE applies. Two sources of
that answer, same expected outcomes:

- `fixed-map`: a texthash table before the daemon's socketmap, answering issue 9's verdict for the
  DANE domains (`dane-only` for the bogus one too: Postfix's own TLSA lookup then fails). It shows
  that the world and contrib are right on their own, whatever the daemon answers;
- `daemon`: contrib as shipped, the daemon answering (skipped until it answers DANE, see
  tests/e2e/daemon_dane.py).

Then what Postfix does with a mapped `dane-only` / `dane` under each setting of
smtp_dns_support_level and smtp_tls_security_level: the MTA's behaviour is the fact recorded here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import SocketmapClient
from tests.e2e.postfix_mta import PostfixInstance
from tests.e2e.test_postfix_e2e import DEFERRAL_TIMEOUT, explain, new_marker, wait_delivered, wait_status
from tests.e2e.world import DANE_SCENARIOS, INSECURE_MX, MISMATCH, Scenario, World, temp_dir

SOCKETMAP = "socketmap:inet:127.0.0.1:8461:postfix"  # contrib's
FIXED, DAEMON = "fixed-map", "daemon"
CASES = DANE_SCENARIOS + [INSECURE_MX]
# Postfix's deferral reasons (4.7.5) for the DANE failures, as Postfix 3.7 words them.
NOT_VERIFIED = "Server certificate not verified"  # the log says "no matching DANE TLSA records"
TLSA_ERROR = "TLSA lookup error for {host}:25"  # the TLSA lookup failed (bogus: SERVFAIL)
CONFIG_PROBLEM = "client TLS configuration problem"  # a TEMP answer, or dane-only without dnssec
NO_TLSA = "no TLSA records found"


def texthash(directory: Path, table: dict[str, str]) -> str:
    """A texthash table (read when smtp(8) opens it; one smtp(8) per delivery here) for Postfix."""
    path = directory / "tls_policy"
    path.write_text("".join(f"{domain} {answer}\n" for domain, answer in table.items()))
    os.chmod(path, 0o644)
    return f"texthash:{path}"


def fixed_answers() -> dict[str, str]:
    """Issue 9's verdicts as a static table: `temp` cannot be written there, so the bogus domain
    gets `dane-only` and Postfix meets the bogus TLSA record itself."""
    return {s.domain: "dane-only" if s.dane == "temp" else s.dane for s in CASES if s.dane is not None}


class Mailed:
    """A Postfix instance and the message it was given for each case: name -> (recipient, marker)."""

    def __init__(self, postfix: PostfixInstance, world: World, cases: list[Scenario]) -> None:
        self.postfix = postfix
        self.world = world
        self.sent: dict[str, tuple[str, str]] = {}
        for scenario in cases:
            marker = new_marker(scenario.name)
            rcpt = f"{marker}@{scenario.domain}"
            postfix.send(rcpt, marker)
            self.sent[scenario.name] = (rcpt, marker)

    def delivered(self, scenario: Scenario, host: str, *, sni: bool = False) -> None:
        """The case's message reached `host`, nothing else, with TLS (and SNI: the host name; Postfix
        sends it for DANE and `servername=hostname`, not for "may"), and Postfix logged it sent."""
        rcpt, marker = self.sent[scenario.name]
        received = wait_delivered(self.world, self.postfix, marker)
        assert set(received) == {host}, f"{scenario.name}: received by {set(received)}\n{explain(self.postfix, rcpt)}"
        assert received[host][0].tls, scenario.name
        assert not sni or received[host][0].sni == host, scenario.name
        status = wait_status(self.postfix, rcpt, "sent", timeout=10)
        assert status is not None and status.relay is not None and status.relay.startswith(f"{host}["), \
            explain(self.postfix, rcpt)

    def deferred(self, scenario: Scenario, *reasons: str) -> None:
        """The case's message is deferred (4.7.5) for one of `reasons` and reached no sink."""
        rcpt, marker = self.sent[scenario.name]
        status = wait_status(self.postfix, rcpt, "deferred", timeout=DEFERRAL_TIMEOUT)
        assert status is not None and status.status == "deferred", explain(self.postfix, rcpt)
        assert status.dsn == "4.7.5" and status.reason in reasons, status.line
        assert self.world.received(marker) == {}, f"{scenario.name}: delivered despite DANE"

    def refused_by_dane(self, host: str) -> bool:
        """Postfix logged that `host`'s certificate matched none of its TLSA records."""
        return bool(self.postfix.log_lines("server certificate verification failed for", f"{host}[",
                                           "no matching DANE TLSA records"))


def started(request: pytest.FixtureRequest, directory: Path, settings: dict[str, str]) -> PostfixInstance:
    """A Postfix instance on contrib's main.cf with `settings`, stopped (and removed unless a test
    failed) when the module is done."""
    instance = PostfixInstance(extra_main_cf=settings).start()
    failed_before = request.session.testsfailed

    def finish() -> None:
        instance.stop()
        if request.session.testsfailed == failed_before:
            instance.remove()
    request.addfinalizer(finish)
    return instance


@pytest.fixture(scope="module", params=[FIXED, DAEMON])
def dane_mail(request: pytest.FixtureRequest, world: World, policyd) -> Iterator[Mailed]:
    """Contrib's Postfix with its answers from a fixed table or from the daemon, one message per case."""
    directory = temp_dir("mtasts-dane-map-")
    settings = {"smtp_tls_policy_maps": f"{texthash(directory, fixed_answers())}, {SOCKETMAP}"} \
        if request.param == FIXED else {}
    postfix = started(request, directory, settings)
    assert postfix.postconf("smtp_dns_support_level") == "dnssec"  # contrib's, as shipped
    assert postfix.postconf("smtp_tls_security_level") == "dane"
    yield Mailed(postfix, world, CASES)


@pytest.mark.parametrize("scenario", DANE_SCENARIOS, ids=lambda s: s.name)
def test_dane_takes_precedence(dane_mail: Mailed, scenario: Scenario) -> None:
    """RFC 8461 §2, RFC 7672: a TLSA record that does not match defers even where MTA-STS would
    deliver; a matching one delivers, even with a certificate no CA vouches for; a bogus TLSA RRset
    defers; signed domains without TLSA and unsigned ones are MTA-STS's (enforce holds)."""
    if scenario.delivered_to is None:
        host = scenario.host(scenario.mx[0])
        dane_mail.deferred(scenario, NOT_VERIFIED, TLSA_ERROR.format(host=host), CONFIG_PROBLEM)
        assert dane_mail.refused_by_dane(host) == (scenario.name == "dane-mismatch")
        return
    host = f"{scenario.delivered_to}.{scenario.domain}"
    dane_mail.delivered(scenario, host, sni=scenario.by_dane or scenario.dane is None)
    if scenario.by_dane or scenario.dane is None:
        # "Verified": DANE-EE matched (dane-*), or the chain and a match= name (MTA-STS "secure").
        assert dane_mail.postfix.log_lines("Verified TLS connection established to", f"{host}["), \
            explain(dane_mail.postfix, dane_mail.sent[scenario.name][0])
    if scenario.name == "dane-twomx":
        # The preferred MX is in the MTA-STS policy and has a PKIX-valid certificate, but its TLSA
        # record does not match: refused by DANE, and the next MX (no TLSA) took the mail.
        refused = f"mx1.{scenario.domain}"
        assert dane_mail.refused_by_dane(refused)
        assert not [m for m in dane_mail.world.sinks[refused].messages
                    if dane_mail.sent[scenario.name][1].encode() in m.data]


def test_dane_for_hosts_of_an_unsigned_mx_record(dane_mail: Mailed) -> None:
    """Issue 9: an insecure MX RRset naming a host with a signed TLSA record is `dane`. Postfix uses
    that TLSA record with contrib's settings (smtp_tls_dane_insecure_mx_policy = dane, derived from
    smtp_tls_security_level = dane): the certificate does not match it, so deferred."""
    assert dane_mail.postfix.postconf_expanded("smtp_tls_dane_insecure_mx_policy") == "dane"
    dane_mail.deferred(INSECURE_MX, NOT_VERIFIED)
    assert dane_mail.refused_by_dane(INSECURE_MX.host(INSECURE_MX.mx[0]))


def test_daemon_answers_dane_per_issue_table(world: World, policyd) -> None:
    """The socketmap answers of issue 9's table for the world's domains (contract: `OK dane-only`,
    `OK dane`, `TEMP <reason>`, else the MTA-STS answer unchanged)."""
    client = SocketmapClient(8461)
    try:
        for scenario in CASES:
            answer = client.ask(scenario.domain)
            assert answer is not None, scenario.name
            if scenario.dane == "temp":
                assert answer.startswith("TEMP "), (scenario.name, answer)
            elif scenario.dane is not None:
                assert answer == f"OK {scenario.dane}", (scenario.name, answer)
            elif scenario.policy is not None:
                assert answer == f"OK secure match=mx.{scenario.domain} servername=hostname", (scenario.name, answer)
    finally:
        client.close()


# ----- what Postfix 3.7 does with mapped DANE levels under each setting --------------------------

SETTINGS = {  # name -> (main.cf settings over contrib's, smtp_tls_dane_insecure_mx_policy that results)
    "contrib": ({}, "dane"),
    "dnssec-may": ({"smtp_tls_security_level": "may"}, "may"),
    "nodnssec-dane": ({"smtp_dns_support_level": ""}, "dane"),
    "nodnssec-may": ({"smtp_dns_support_level": "", "smtp_tls_security_level": "may"}, "may"),
}
SIGNED_NO_TLSA = next(s for s in DANE_SCENARIOS if s.name == "signed-notlsa")
DANE_MISMATCH = next(s for s in DANE_SCENARIOS if s.name == "dane-mismatch")
# case -> (domain, mapped answer); every MX host here has a PKIX-valid certificate.
FACT_CASES = {
    "dane-only, TLSA mismatch": (DANE_MISMATCH, "dane-only"),
    "dane, TLSA mismatch": (MISMATCH[0], "dane"),
    "dane, unsigned MX record, TLSA mismatch": (INSECURE_MX, "dane"),
    "dane-only, no TLSA": (SIGNED_NO_TLSA, "dane-only"),
    "MTA-STS secure, TLSA mismatch": (MISMATCH[1], "secure match=mx.{d} servername=hostname"),
}
SENT, DEFERRED_DNSSEC_OFF = "sent", "deferred: dnssec lookups disabled"
EXPECTED = {  # case -> outcome per setting (contrib, dnssec-may, nodnssec-dane, nodnssec-may)
    "dane-only, TLSA mismatch": (NOT_VERIFIED, NOT_VERIFIED, DEFERRED_DNSSEC_OFF, DEFERRED_DNSSEC_OFF),
    "dane, TLSA mismatch": (NOT_VERIFIED, NOT_VERIFIED, SENT, SENT),
    "dane, unsigned MX record, TLSA mismatch": (NOT_VERIFIED, SENT, SENT, SENT),
    "dane-only, no TLSA": (NO_TLSA, NO_TLSA, DEFERRED_DNSSEC_OFF, DEFERRED_DNSSEC_OFF),
    "MTA-STS secure, TLSA mismatch": (SENT, SENT, SENT, SENT),
}


@pytest.fixture(scope="module", params=list(SETTINGS))
def settings_mail(request: pytest.FixtureRequest, world: World) -> Iterator[tuple[str, Mailed]]:
    """A Postfix instance per setting whose only policy map is a table answering FACT_CASES."""
    directory = temp_dir("mtasts-dane-facts-")
    table = {scenario.domain: answer.format(d=scenario.domain) for scenario, answer in FACT_CASES.values()}
    extra, _ = SETTINGS[request.param]
    postfix = started(request, directory, {**extra, "smtp_tls_policy_maps": texthash(directory, table)})
    yield request.param, Mailed(postfix, world, [scenario for scenario, _ in FACT_CASES.values()])


@pytest.mark.parametrize("case", list(FACT_CASES))
def test_postfix_37_dane_levels_under_each_setting(settings_mail: tuple[str, Mailed], case: str) -> None:
    """Postfix's behaviour, recorded: without smtp_dns_support_level = dnssec a mapped `dane-only`
    defers everything ("dane-only configured with dnssec lookups disabled") and a mapped `dane`
    is `may` (the mismatching TLSA record is not looked at); with it, both use the TLSA records.
    smtp_tls_dane_insecure_mx_policy follows smtp_tls_security_level (Postfix >= 3.6), so only with
    `dane` there are TLSA records of hosts under an unsigned MX record used. A `secure` (MTA-STS)
    entry replaces DANE: delivered to a host whose TLSA record does not match (issue 9's bug,
    which is why the daemon must answer DANE itself)."""
    setting, mail = settings_mail
    scenario, answer = FACT_CASES[case]
    expected = EXPECTED[case][list(SETTINGS).index(setting)]
    assert mail.postfix.postconf_expanded("smtp_tls_dane_insecure_mx_policy") == SETTINGS[setting][1]
    if expected == SENT:
        mail.delivered(scenario, scenario.host(scenario.mx[0]))
    elif expected == DEFERRED_DNSSEC_OFF:
        mail.deferred(scenario, CONFIG_PROBLEM)
        assert mail.postfix.log_lines(f"{scenario.domain}: {answer} configured with dnssec lookups disabled")
    else:
        mail.deferred(scenario, expected)
        assert mail.refused_by_dane(scenario.host(scenario.mx[0])) == (expected == NOT_VERIFIED)
    if answer == "dane" and setting.startswith("nodnssec"):  # "may", saying why
        assert mail.postfix.log_lines(f"{scenario.domain}: dane configured with dnssec lookups disabled")
