"""The end-to-end world itself (world.py): the machine's resolver validates, the unsigned MTA-STS
zone and the signed DANE zones answer as the scenarios say, so that an MTA's outcome in the other
tests is the MTA's doing, not the world's."""

from __future__ import annotations

import socket
import uuid
from pathlib import Path

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.resolver

from tests.e2e.world import DANE_SCENARIOS, FACT_SCENARIOS, INSECURE_MX, OTHER_KEY, ZONE, World, spki_sha256


def ask(name: str, rdtype: str) -> dns.message.Message:
    """One question with DO and AD to the machine's resolver (what /etc/resolv.conf names)."""
    query = dns.message.make_query(name, rdtype, want_dnssec=True, payload=1232)
    query.flags |= dns.flags.AD
    return dns.query.udp(query, "127.0.0.1", port=53, timeout=5)


def ad(response: dns.message.Message) -> bool:
    return bool(response.flags & dns.flags.AD)


def tlsa(response: dns.message.Message) -> list[str]:
    return sorted(r.to_text() for rrset in response.answer if rrset.rdtype == dns.rdatatype.TLSA for r in rrset)


def test_the_machine_resolver_is_the_validating_one(world: World) -> None:
    """resolv.conf names 127.0.0.1 with trust-ad (glibc >= 2.31 hands the AD bit on only then);
    the resolver there validates: the signed root and test. come back with AD."""
    text = Path("/etc/resolv.conf").read_text()
    assert "nameserver 127.0.0.1" in text.splitlines() and "trust-ad" in text.split()
    assert ad(ask(".", "NS")) and ad(ask("test.", "NS"))
    assert world.signed.resolver_port == 53


def test_e2e_zone_is_insecure_and_changes_are_seen_at_once(world: World) -> None:
    """e2e.test is delegated without DS (RFC 4035 §5.2: insecure, answers without AD) and unbound
    asks the rig DnsServer behind it every time, so the scenarios change it at will."""
    name = f"change-{uuid.uuid4().hex[:8]}.{ZONE}"
    world.dns.set(name, "A", "127.0.0.200", ttl=3600)
    first = ask(name, "A")
    assert first.rcode() == dns.rcode.NOERROR and not ad(first)
    world.dns.set(name, "A", "127.0.0.201", ttl=3600)
    assert [r.address for rrset in ask(name, "A").answer for r in rrset] == ["127.0.0.201"]
    no_ds = ask(f"{ZONE}.", "DS")
    assert no_ds.rcode() == dns.rcode.NOERROR and not no_ds.answer and ad(no_ds)  # proven unsigned
    # The system resolver library (what the MTAs and the daemon use) sees it too.
    assert [r.address for r in dns.resolver.resolve(name, "A")] == ["127.0.0.201"]
    assert socket.gethostbyname(name) == "127.0.0.201"


def test_dane_scenarios_publish_what_they_say(world: World) -> None:
    """Each DANE scenario's MX hosts: a secure address, and a TLSA RRset that matches the sink's key,
    matches another key, or is bogus (SERVFAIL from the validator); the unsigned one has an insecure
    TLSA RRset; the signed ones without TLSA have an authenticated denial. The insecure-MX case has
    an unsigned MX record naming a host with a signed TLSA record."""
    for scenario in DANE_SCENARIOS + FACT_SCENARIOS:
        assert ad(ask(scenario.domain, "MX")) == scenario.signed, scenario.name
        for mx in scenario.mx:
            host = scenario.host(mx)
            assert ad(ask(host, "A")) == World.is_signed(host), host
            answer = ask(f"_25._tcp.{host}", "TLSA")
            if mx.tlsa == "bogus":
                assert answer.rcode() == dns.rcode.SERVFAIL, host
                continue
            assert answer.rcode() in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN), host
            assert ad(answer) == World.is_signed(host), host
            expected = {"match": [f"3 1 1 {spki_sha256(world.sinks[host])}"], "mismatch": [f"3 1 1 {OTHER_KEY}"],
                        None: []}[mx.tlsa]
            assert tlsa(answer) == expected, host
    assert not ad(ask(INSECURE_MX.domain, "MX")) and ad(ask(INSECURE_MX.host(INSECURE_MX.mx[0]), "A"))
    assert spki_sha256(world.sinks["mx.dane-match.test"]) != OTHER_KEY
