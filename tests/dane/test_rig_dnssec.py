"""Self-tests of the DNSSEC test world (tests/rig/dnssec.py): each DNSSEC state the DANE tests
build must come out of the real validating resolver as it would from the operator's, so that a
failing DANE test is a daemon bug, not a rig bug."""

from __future__ import annotations

import time

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from tests.rig.dnssec import DnssecWorld


def ad(response: dns.message.Message) -> bool:
    return bool(response.flags & dns.flags.AD)


def addresses(response: dns.message.Message) -> list[str]:
    return sorted(rdata.address for rrset in response.answer if rrset.rdtype == dns.rdatatype.A for rdata in rrset)


def test_secure_answer_comes_with_ad_and_its_signature(world: DnssecWorld) -> None:
    zone = world.zone()
    world.set(f"mx.{zone.name}", "A", "127.0.0.5")
    world.publish()
    response = world.ask(f"mx.{zone.name}", "A")
    assert response.rcode() == dns.rcode.NOERROR and ad(response)  # RFC 4035 §3.2.3
    assert addresses(response) == ["127.0.0.5"]
    assert dns.rdatatype.RRSIG in {rrset.rdtype for rrset in response.answer}  # DO was set: signatures too


def test_root_probe_comes_back_secure(world: DnssecWorld) -> None:
    """The daemon's default probe (". NS") is authenticated in this world: the root is the anchor."""
    name, rdtype = world.probe.split()
    assert ad(world.ask(name, rdtype))


def test_zone_delegated_without_ds_answers_without_ad(world: DnssecWorld) -> None:
    zone = world.zone(signed=False)
    world.set(f"mx.{zone.name}", "A", "127.0.0.6")
    world.publish()
    response = world.ask(f"mx.{zone.name}", "A")
    assert response.rcode() == dns.rcode.NOERROR and not ad(response)
    assert addresses(response) == ["127.0.0.6"]
    # Insecure, not bogus: the parent proves there is no DS (RFC 4035 §5.2), with AD.
    ds = world.ask(zone.name, "DS")
    assert ds.rcode() == dns.rcode.NOERROR and not ds.answer and ad(ds)


def test_rrset_changed_after_signing_is_bogus_servfail(world: DnssecWorld) -> None:
    zone = world.zone()
    world.set(f"mx.{zone.name}", "A", "127.0.0.7")
    world.set(f"ok.{zone.name}", "A", "127.0.0.8")
    world.bogus(f"mx.{zone.name}", "A", "127.0.0.9")
    world.publish()
    # nsd serves the changed data beside the old signature ...
    assert addresses(world.ask_nsd(f"mx.{zone.name}", "A")) == ["127.0.0.9"]
    # ... which the validator rejects (RFC 4035 §5.5: bogus is SERVFAIL), saying why (RFC 8914).
    response = world.ask(f"mx.{zone.name}", "A")
    assert response.rcode() == dns.rcode.SERVFAIL and not response.answer
    assert any(isinstance(o, dns.edns.EDEOption) and o.code == dns.edns.EDECode.DNSSEC_BOGUS
               for o in response.options)
    assert ad(world.ask(f"ok.{zone.name}", "A"))  # the rest of the zone stays secure
    world.set(f"mx.{zone.name}", "A", "127.0.0.7")  # set again: signed as served
    world.publish()
    assert ad(world.ask(f"mx.{zone.name}", "A"))


@pytest.mark.parametrize("answer", ["servfail", "refused"])
def test_lame_child_is_servfail(world: DnssecWorld, answer: str) -> None:
    zone = world.lame(answer=answer)
    world.publish()
    world.fault_server.reset_counts()
    response = world.ask(f"_25._tcp.mx.{zone.name}", "TLSA")
    assert response.rcode() == dns.rcode.SERVFAIL
    assert world.fault_server.count(f"_25._tcp.mx.{zone.name}") >= 1  # the child's server was asked
    # unbound did not give up on nsd for the rest of the world
    assert ad(world.ask("test.", "SOA"))


def test_authenticated_nxdomain_and_nodata(world: DnssecWorld) -> None:
    zone = world.zone()
    world.set(f"mx.{zone.name}", "A", "127.0.0.10")
    world.publish()
    nxdomain = world.ask(f"_25._tcp.mx.{zone.name}", "TLSA")
    assert nxdomain.rcode() == dns.rcode.NXDOMAIN and ad(nxdomain)  # RFC 4035 §5.4: NSEC proves it
    nodata = world.ask(f"mx.{zone.name}", "AAAA")
    assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer and ad(nodata)
    soa = [rrset for rrset in nodata.authority if rrset.rdtype == dns.rdatatype.SOA]
    assert soa and soa[0][0].minimum == world.negative_ttl  # RFC 2308 §5: what the negative TTL comes from


def test_cname_chains_are_followed(world: DnssecWorld) -> None:
    secure, insecure = world.zone(), world.zone(signed=False)
    world.set(f"mx.{secure.name}", "A", "127.0.0.11")
    world.set(f"alias.{secure.name}", "CNAME", f"mx.{secure.name}")
    world.set(f"mx.{insecure.name}", "A", "127.0.0.12")
    world.set(f"out.{secure.name}", "CNAME", f"mx.{insecure.name}")
    world.publish()
    inside = world.ask(f"alias.{secure.name}", "A")
    assert [rrset.rdtype for rrset in inside.answer if rrset.rdtype != dns.rdatatype.RRSIG] == \
        [dns.rdatatype.CNAME, dns.rdatatype.A]
    assert addresses(inside) == ["127.0.0.11"] and ad(inside)
    across = world.ask(f"out.{secure.name}", "A")
    assert addresses(across) == ["127.0.0.12"] and not ad(across)  # one insecure link: no AD


def test_a_change_is_seen_when_publish_returns(world: DnssecWorld) -> None:
    """publish() returns once nsd serves the new serial and unbound forgot the old answer: the
    bound is publish()'s own (READY_TIMEOUT), no sleeping in tests."""
    zone = world.zone()
    world.set(f"mx.{zone.name}", "A", "127.0.0.13", ttl=3600)
    world.publish()
    assert addresses(world.ask(f"mx.{zone.name}", "A")) == ["127.0.0.13"]  # now cached for an hour
    world.set(f"mx.{zone.name}", "A", "127.0.0.14", ttl=3600)
    world.publish()
    assert addresses(world.ask(f"mx.{zone.name}", "A")) == ["127.0.0.14"]
    world.remove(f"mx.{zone.name}")
    world.publish()
    gone = world.ask(f"mx.{zone.name}", "A")
    assert gone.rcode() == dns.rcode.NXDOMAIN and ad(gone)


def test_a_signed_zone_can_be_made_insecure_and_secure_again(world: DnssecWorld) -> None:
    zone = world.zone()
    world.set(f"mx.{zone.name}", "A", "127.0.0.15")
    world.publish()
    assert ad(world.ask(f"mx.{zone.name}", "A"))
    world.set_signed(zone, False)
    world.publish()
    response = world.ask(f"mx.{zone.name}", "A")
    assert addresses(response) == ["127.0.0.15"] and not ad(response)
    world.set_signed(zone, True)
    world.publish()
    assert ad(world.ask(f"mx.{zone.name}", "A"))


def test_large_answers_are_truncated_over_udp_and_whole_over_tcp(world: DnssecWorld) -> None:
    zone = world.zone()
    world.set(f"_25._tcp.mx.{zone.name}", "TLSA", *(f"3 1 1 {i:064x}" for i in range(40)))
    world.publish()
    udp = world.ask(f"_25._tcp.mx.{zone.name}", "TLSA")
    assert udp.flags & dns.flags.TC  # 40 records do not fit 1232 bytes
    tcp = world.ask(f"_25._tcp.mx.{zone.name}", "TLSA", tcp=True)
    assert len(tcp.find_rrset(tcp.answer, tcp.question[0].name, 1, dns.rdatatype.TLSA)) == 40 and ad(tcp)


def test_world_is_loopback_only_on_high_ports(world: DnssecWorld) -> None:
    assert world.nsd_port > 1024 and world.resolver_port > 1024
    with pytest.raises(ValueError, match="loopback"):
        DnssecWorld("192.0.2.1")


def test_world_stops_itself_after_its_lifetime() -> None:
    short = DnssecWorld(lifetime=2).start()
    try:
        deadline = time.monotonic() + 60
        assert short.running
        while short.running:
            assert time.monotonic() < deadline, "nsd or unbound outlived the world's lifetime"
            time.sleep(0.1)
        assert not short.directory.exists()
    finally:
        short.stop()
