"""net/dnssec.py against a real validating resolver (the DNSSEC world) and against servers that
misbehave: every question ends as an answer, a denial (each with `secure` and its TTL) or a
DnsTemporaryFailure, never as a guess."""

from __future__ import annotations

import asyncio
import socket
import threading

import dns.flags
import dns.message
import dns.rcode
import pytest

from mtasts_policyd.core.errors import DnsTemporaryFailure
from mtasts_policyd.net.dns import DnsSettings
from mtasts_policyd.net.dnssec import (EDNS_PAYLOAD, Denial, DnssecAnswer, DnssecDenial, DnssecResolver,
                                       DnssecResult, ProbeTarget, probe)
from tests.dane.conftest import resolver_settings
from tests.rig import DnsServer
from tests.rig.dnssec import DnssecWorld


def ask(resolver: DnssecResolver, name: str, rdtype: str) -> DnssecResult:
    return asyncio.run(resolver.query(name, rdtype))


def test_secure_answer_with_its_ttl(world: DnssecWorld, resolver: DnssecResolver) -> None:
    zone = world.zone()
    world.set(f"mx.{zone.name}", "A", "127.0.0.20", "127.0.0.21", ttl=120)
    world.publish()
    result = ask(resolver, f"mx.{zone.name}", "A")
    assert isinstance(result, DnssecAnswer) and result.secure
    assert sorted(rdata.address for rdata in result.rrset) == ["127.0.0.20", "127.0.0.21"]
    assert 100 <= result.ttl <= 120 and result.canonical == f"mx.{zone.name}"


def test_insecure_answer(world: DnssecWorld, resolver: DnssecResolver) -> None:
    zone = world.zone(signed=False)
    world.set(f"{zone.name}", "MX", f"10 mx.{zone.name}")
    world.publish()
    result = ask(resolver, zone.name, "MX")
    assert isinstance(result, DnssecAnswer) and not result.secure
    assert [rdata.exchange.to_text() for rdata in result.rrset] == [f"mx.{zone.name}"]


def test_cname_chain_ttl_is_the_minimum_along_it(world: DnssecWorld, resolver: DnssecResolver) -> None:
    """RFC 2181 §5.2: the answer holds only while every link does; AD covers the whole chain."""
    zone = world.zone()
    world.set(f"mx.{zone.name}", "A", "127.0.0.22", ttl=900)
    world.set(f"alias.{zone.name}", "CNAME", f"mx.{zone.name}", ttl=90)
    world.publish()
    result = ask(resolver, f"alias.{zone.name}", "A")
    assert isinstance(result, DnssecAnswer) and result.secure
    assert result.canonical == f"mx.{zone.name}" and 70 <= result.ttl <= 90


@pytest.mark.parametrize("signed", [True, False])
def test_nxdomain_and_nodata_with_security_and_negative_ttl(world: DnssecWorld, resolver: DnssecResolver,
                                                            signed: bool) -> None:
    zone = world.zone(signed=signed)
    world.set(f"mx.{zone.name}", "A", "127.0.0.23")
    world.publish()
    nxdomain = ask(resolver, f"_25._tcp.mx.{zone.name}", "TLSA")
    nodata = ask(resolver, f"mx.{zone.name}", "AAAA")
    assert isinstance(nxdomain, DnssecDenial) and nxdomain.kind is Denial.NXDOMAIN
    assert isinstance(nodata, DnssecDenial) and nodata.kind is Denial.NODATA
    for denial in (nxdomain, nodata):
        assert denial.secure is signed  # RFC 4035 §5.4: only a signed zone proves the denial
        assert 40 <= denial.ttl <= world.negative_ttl  # RFC 2308 §5: min(SOA TTL, MINIMUM)


def test_dname_overflow_is_an_unauthenticated_uncached_nxdomain(world: DnssecWorld,
                                                                resolver: DnssecResolver) -> None:
    """RFC 6672 §2.2: YXDOMAIN (the DNAME substitution is too long) names nothing; it stays inside
    the three outcomes instead of escaping as another exception."""
    zone = world.zone()
    world.set(f"d.{zone.name}", "DNAME", ".".join(["x" * 60] * 3 + ["w" * 30, zone.name]))
    world.publish()
    result = ask(resolver, "y" * 60 + f".d.{zone.name}", "A")
    assert result == DnssecDenial(result.name, "A", Denial.NXDOMAIN, 0, False)


def test_bogus_data_is_a_temporary_failure_saying_why(world: DnssecWorld, resolver: DnssecResolver) -> None:
    zone = world.zone()
    world.set(f"_25._tcp.mx.{zone.name}", "TLSA", "3 1 1 " + "aa" * 32)
    world.bogus(f"_25._tcp.mx.{zone.name}", "TLSA", "3 1 1 " + "bb" * 32)
    world.publish()
    with pytest.raises(DnsTemporaryFailure) as failure:
        ask(resolver, f"_25._tcp.mx.{zone.name}", "TLSA")
    assert "SERVFAIL" in failure.value.detail and "DNSSEC Bogus" in failure.value.detail  # RFC 8914 EDE 6


@pytest.mark.parametrize("answer", ["servfail", "refused"])
def test_lame_server_is_a_temporary_failure(world: DnssecWorld, resolver: DnssecResolver, answer: str) -> None:
    zone = world.lame(answer=answer)
    world.publish()
    with pytest.raises(DnsTemporaryFailure, match="SERVFAIL"):
        ask(resolver, f"_25._tcp.mx.{zone.name}", "TLSA")


@pytest.mark.parametrize("fault, said", [("refused", "REFUSED"), ("servfail", "SERVFAIL"), ("timeout", "timed out")])
def test_resolver_that_refuses_fails_or_stays_silent(fault: str, said: str) -> None:
    """A misconfigured resolver (access control, broken, unreachable): no answer is not "no records"."""
    with DnsServer(lifetime=30) as server:
        server.fault("example.test", fault)
        resolver = DnssecResolver(DnsSettings(nameservers=("127.0.0.1",), port=server.port, timeout=0.5))
        with pytest.raises(DnsTemporaryFailure, match=said):
            ask(resolver, "example.test", "MX")


def test_truncated_answer_is_asked_again_over_tcp(world: DnssecWorld, resolver: DnssecResolver) -> None:
    """RFC 7766 §5: 40 TLSA records do not fit 1232 bytes; the whole RRset comes over TCP."""
    zone = world.zone()
    world.set(f"_25._tcp.mx.{zone.name}", "TLSA", *(f"3 1 1 {i:064x}" for i in range(40)))
    world.publish()
    result = ask(resolver, f"_25._tcp.mx.{zone.name}", "TLSA")
    assert isinstance(result, DnssecAnswer) and result.secure and len(result.rrset) == 40


def test_questions_carry_do_ad_and_a_1232_byte_edns_payload() -> None:
    """The trust model of issue 9: DO and AD set (RFC 6840 §5.7-5.8), EDNS0 with 1232 bytes."""
    seen: list[dns.message.Message] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(10)

        def answer_once() -> None:
            wire, peer = sock.recvfrom(65535)
            query = dns.message.from_wire(wire)
            seen.append(query)
            response = dns.message.make_response(query)
            response.set_rcode(dns.rcode.REFUSED)
            sock.sendto(response.to_wire(), peer)

        thread = threading.Thread(target=answer_once, daemon=True)
        thread.start()
        resolver = DnssecResolver(DnsSettings(nameservers=("127.0.0.1",), port=sock.getsockname()[1], timeout=5))
        with pytest.raises(DnsTemporaryFailure):
            ask(resolver, "example.test", "TLSA")
        thread.join(timeout=10)
    query = seen[0]
    assert query.flags & dns.flags.AD and query.flags & dns.flags.RD
    assert query.edns == 0 and query.payload == EDNS_PAYLOAD and query.ednsflags & dns.flags.DO


# ----- the trust probe --------------------------------------------------------------------


def test_probe_of_a_validating_resolver(world: DnssecWorld, resolver: DnssecResolver) -> None:
    result = asyncio.run(probe(resolver, ProbeTarget.parse(world.probe)))
    assert result.validating, result.detail


def test_probe_of_an_insecure_name_fails(world: DnssecWorld, resolver: DnssecResolver) -> None:
    zone = world.zone(signed=False)
    world.publish()
    result = asyncio.run(probe(resolver, ProbeTarget.parse(f"{zone.name} SOA")))
    assert not result.validating and "without AD" in result.detail


def test_probe_of_a_resolver_that_does_not_validate() -> None:
    """A plain server never sets AD: DANE must be reported degraded, not trusted."""
    with DnsServer(lifetime=30) as server:
        server.set(".", "NS", "a.root-servers.test.")
        plain = DnssecResolver(DnsSettings(nameservers=("127.0.0.1",), port=server.port, timeout=2))
        result = asyncio.run(probe(plain, ProbeTarget.parse(". NS")))
    assert not result.validating and "does not validate" in result.detail


def test_probe_of_an_unreachable_resolver_fails(world: DnssecWorld) -> None:
    zone = world.lame()
    world.publish()
    resolver = DnssecResolver(resolver_settings(world))
    result = asyncio.run(probe(resolver, ProbeTarget.parse(f"{zone.name} SOA")))
    assert not result.validating and "SERVFAIL" in result.detail


@pytest.mark.fast
@pytest.mark.parametrize("text, expected", [(". NS", ". NS"), ("example.com soa", "example.com. SOA"),
                                            ("  test.  DNSKEY ", "test. DNSKEY")])
def test_probe_target_parses(text: str, expected: str) -> None:
    assert str(ProbeTarget.parse(text)) == expected


@pytest.mark.fast
@pytest.mark.parametrize("text", ["", ".", ". NS extra", ". NOSUCHTYPE", "a..b NS"])
def test_probe_target_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="NAME TYPE"):
        ProbeTarget.parse(text)
