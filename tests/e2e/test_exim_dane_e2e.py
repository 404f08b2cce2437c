"""Real Exim 4.96 with contrib/exim/exim.conf on the DNSSEC world: DANE takes precedence over
MTA-STS (RFC 8461 §2, issue 9).

The daemon's `policy DOMAIN` reply picks the router: `dane-only` -> mtasts_dane_only
(hosts_require_dane), `dane` -> mtasts_dane (hosts_try_dane), `temp` -> mtasts_temp (defer),
`enforce` -> mtasts_enforce (MTA-STS). Exim does the DANE itself, on the AD bit of the resolver
in /etc/resolv.conf (`options trust-ad`). Two sources of the reply, same expected outcomes:

- `stand-in`: a listener answering issue 9's verdict for the DANE domains and relaying everything
  else to the daemon (tests/e2e/stand_in.py), so contrib is shown right on its own;
- `daemon`: the daemon answering (skipped until it answers DANE, see tests/e2e/daemon_dane.py).

Then what Exim itself does in the cases the recipe's choices rest on: the MTA's behaviour is the
fact recorded here.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.exim_mta import EximInstance, Status
from tests.e2e.stand_in import StandIn
from tests.e2e.world import DANE_SCENARIOS, INSECURE_MX, MISMATCH, Scenario, World, temp_dir

DAEMON_EXIM = ("127.0.0.1", 8462)
STAND_IN, DAEMON = "stand-in", "daemon"
BY_NAME = {scenario.name: scenario for scenario in DANE_SCENARIOS}
_serial = itertools.count(1)


def verdict_reply(scenario: Scenario) -> str:
    """Issue 9's Exim reply for the scenario's verdict (the contract: answers/dane.exim_reply)."""
    if scenario.dane == "temp":
        return f"temp DNSSEC lookup failed: _25._tcp.{scenario.host(scenario.mx[0])}. TLSA: SERVFAIL (stand-in)"
    assert scenario.dane is not None
    return scenario.dane


@pytest.fixture(scope="module")
def stand_ins() -> Iterator[list[StandIn]]:
    """Stand-ins started by the tests of this module, stopped at its end."""
    started: list[StandIn] = []
    yield started
    for stand_in in started:
        stand_in.stop()


def stand_in(stand_ins: list[StandIn], replies: dict[str, str]) -> StandIn:
    server = StandIn(replies, DAEMON_EXIM, lifetime=900).start()
    stand_ins.append(server)
    return server


def exim_for(address: str, **options: bool) -> EximInstance:
    """A fresh Exim (its own spool: no retry record of another test decides) asking `address`."""
    return EximInstance(temp_dir("exim-dane-"), address, **options)


def deliver(exim: EximInstance, world: World, scenario: Scenario) -> tuple[Status, dict[str, list]]:
    """Submit one message for the scenario's domain and attempt it at once: the outcome and who got it."""
    tag = f"exim-dane-{scenario.name}-{next(_serial)}"
    rcpt = f"{tag}@{scenario.domain}"
    exim.send(rcpt, tag)
    status = exim.status_of(rcpt)
    assert status is not None, exim.log()
    return status, world.received(tag)


@pytest.fixture(scope="module", params=[STAND_IN, DAEMON])
def dane_exim(request: pytest.FixtureRequest, world: World, policyd, stand_ins) -> EximInstance:
    if request.param == DAEMON:
        return exim_for(f"{DAEMON_EXIM[0]}:{DAEMON_EXIM[1]}")
    replies = {s.domain: verdict_reply(s) for s in DANE_SCENARIOS + [INSECURE_MX] if s.dane is not None}
    return exim_for(stand_in(stand_ins, replies).address)


@pytest.mark.parametrize("scenario", DANE_SCENARIOS, ids=lambda s: s.name)
def test_dane_takes_precedence(dane_exim: EximInstance, world: World, scenario: Scenario) -> None:
    """RFC 8461 §2, RFC 7672: a TLSA record that does not match defers even where MTA-STS would
    deliver; a matching one delivers by DANE (CV=dane), even with a certificate no CA vouches for;
    a bogus TLSA RRset defers (mtasts_temp); signed domains without TLSA and unsigned ones are
    MTA-STS's (mtasts_enforce: verified, CV=yes, or deferred)."""
    status, received = deliver(dane_exim, world, scenario)
    router = {"dane-only": "mtasts_dane_only", "dane": "mtasts_dane", "temp": "mtasts_temp",
              None: "mtasts_enforce"}[scenario.dane]
    assert f" R={router} " in status.line, status.line
    if scenario.delivered_to is None:
        assert status.outcome == "deferred" and received == {}, status.line
        if scenario.name == "dane-mismatch":
            assert "The certificate differs" in status.line
        return
    host = f"{scenario.delivered_to}.{scenario.domain}"
    assert status.outcome == "delivered" and list(received) == [host], status.line
    assert received[host][0].tls
    assert ("CV=dane" if scenario.by_dane else "CV=yes") in status.line, status.line
    if scenario.name == "dane-twomx":
        # mx1 is in the MTA-STS policy with a PKIX-valid certificate, but its TLSA record does not
        # match: hosts_try_dane refused it (no fallback) and mx2, without TLSA, took the mail.
        assert f"DANE attempt failed; TLS connection to mx1.{scenario.domain} [" in dane_exim.log()
        assert f"mx1.{scenario.domain}" not in received


# ----- what Exim 4.96 does in the cases the recipe rests on (stand-in replies) ------------------


def test_exim_uses_dane_only_under_a_signed_mx_record(world: World, policyd, stand_ins) -> None:
    """Exim's behaviour, recorded: an unsigned MX record naming a host whose signed TLSA record does
    not match, answered `dane`: Exim 4.96 does not use DANE there (its DANE needs DNSSEC-secure MX,
    address and TLSA records) and delivers with verified TLS (CV=yes), where Postfix with
    smtp_tls_dane_insecure_mx_policy = dane defers (test_postfix_dane_e2e)."""
    exim = exim_for(stand_in(stand_ins, {INSECURE_MX.domain: "dane"}).address)
    status, received = deliver(exim, world, INSECURE_MX)
    host = INSECURE_MX.host(INSECURE_MX.mx[0])
    assert status.outcome == "delivered" and " R=mtasts_dane " in status.line and "CV=yes" in status.line
    assert list(received) == [host]


def test_exim_bounces_dane_only_without_tlsa(world: World, policyd, stand_ins) -> None:
    """Exim's behaviour, recorded: `dane-only` for a domain whose MX host has no TLSA record (an
    authenticated denial: the domain withdrew DANE after the answer was given) makes
    hosts_require_dane fail the address permanently ("tlsa lookup FAIL"), a bounce, where Postfix
    defers. contrib/exim/README.md says so."""
    scenario = BY_NAME["signed-notlsa"]
    exim = exim_for(stand_in(stand_ins, {scenario.domain: "dane-only"}).address)
    status, received = deliver(exim, world, scenario)
    assert status.outcome == "bounced" and "DANE error: tlsa lookup FAIL" in status.line, status.line
    assert received == {}


def test_mtasts_transport_keeps_dane_precedence(world: World, policyd, stand_ins) -> None:
    """Exim's behaviour, recorded: an `enforce` reply for a domain whose MX has a signed TLSA record
    that does not match: mtasts_smtp's hosts_try_dane makes Exim use DANE and defer, although the
    certificate passes MTA-STS (RFC 8461 §2 holds on this path too)."""
    scenario = BY_NAME["dane-mismatch"]
    exim = exim_for(stand_in(stand_ins, {scenario.domain: f"enforce mx.{scenario.domain}"}).address)
    status, received = deliver(exim, world, scenario)
    assert status.outcome == "deferred" and " R=mtasts_enforce T=mtasts_smtp " in status.line, status.line
    assert "The certificate differs" in status.line and received == {}


def test_fail_open_does_not_open_on_temp(world: World, policyd, stand_ins) -> None:
    """MTASTS_FAIL_OPEN delivers as without a policy only while the daemon cannot be reached; a
    `temp` reply (a lookup DANE needs failed) still defers."""
    scenario = BY_NAME["dane-bogus"]
    exim = exim_for(stand_in(stand_ins, {scenario.domain: verdict_reply(scenario)}).address, fail_open=True)
    status, received = deliver(exim, world, scenario)
    assert status.outcome == "deferred" and " R=mtasts_temp " in status.line, status.line
    assert "mtasts-policyd: temp DNSSEC lookup failed" in status.line and received == {}


def test_without_trust_ad_exim_loses_dane(world: World, policyd, stand_ins) -> None:
    """Exim's behaviour, recorded: without `options trust-ad` in /etc/resolv.conf glibc (>= 2.31)
    clears the AD bit, so every answer looks insecure to Exim: a `dane` domain whose TLSA record
    does not match is delivered (DANE silently lost), and `dane-only` fails ("not DNSSEC")."""
    resolv = Path("/etc/resolv.conf")
    original = resolv.read_text()
    exim = exim_for(stand_in(stand_ins, {MISMATCH[0].domain: "dane", BY_NAME["dane-match"].domain: "dane-only"})
                    .address)
    resolv.write_text(original.replace(" trust-ad", ""))
    try:
        lost, lost_received = deliver(exim, world, MISMATCH[0])
        required, required_received = deliver(exim, world, BY_NAME["dane-match"])
    finally:
        resolv.write_text(original)
    assert lost.outcome == "delivered" and " R=mtasts_dane " in lost.line and "CV=dane" not in lost.line, lost.line
    assert list(lost_received) == [MISMATCH[0].host(MISMATCH[0].mx[0])]
    assert required.outcome == "bounced" and "not DNSSEC" in required.line, required.line
    assert required_received == {}
    # With trust-ad back, the same reply defers the mismatching domain again.
    again, again_received = deliver(exim, world, MISMATCH[0])
    assert again.outcome == "deferred" and "The certificate differs" in again.line and again_received == {}
