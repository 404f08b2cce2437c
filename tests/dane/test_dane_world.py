"""Each row of issue 9's decision table on the real DNSSEC world: nsd serves signed (and unsigned,
bogus, lame) zones, unbound validates, net/dane_lookup.py asks through net/dnssec.py, and
answers/dane.py decides."""

from __future__ import annotations

import asyncio

from mtasts_policyd.answers.dane import DaneDecision, Verdict, decide, exim_reply, socketmap_answer
from mtasts_policyd.core.dane import DaneInputs, HostState, MxKind, MxState, TlsaState, tlsa_name
from mtasts_policyd.net.dane_lookup import dane_inputs
from mtasts_policyd.net.dnssec import DnssecResolver, DnssecResult
from tests.dane.daemon_world import PKIX_TLSA, TLSA, mail_host
from tests.dane.daemon_world import set_mx as mx
from tests.rig.dnssec import DnssecWorld, Zone


def one_mx(world: DnssecWorld, label: str, *tlsa: str, signed: bool = True) -> tuple[Zone, str, str]:
    """A fresh zone whose domain has one MX host (in the zone) with `tlsa`: (zone, host, domain)."""
    zone = world.zone(label=label, signed=signed)
    host = f"mx.{zone.name}"
    mail_host(world, host, *tlsa)
    return zone, host, mx(world, zone, host)


def lookup(world: DnssecWorld, resolver: DnssecResolver, domain: str) -> DaneInputs:
    """Publish what the test set up, then ask everything DANE needs about `domain`."""
    world.publish()
    return asyncio.run(dane_inputs(resolver, domain))


def decision(world: DnssecWorld, resolver: DnssecResolver, domain: str) -> DaneDecision:
    return decide(lookup(world, resolver, domain))


# ----- DANE only ------------------------------------------------------------------------------


def test_signed_mx_and_tlsa_everywhere_is_dane_only(world: DnssecWorld, resolver: DnssecResolver) -> None:
    zone = world.zone(label="daneonly")
    mail_host(world, f"mx1.{zone.name}", TLSA, ttl=900)
    mail_host(world, f"mx2.{zone.name}", TLSA, "2 0 1 " + "6b" * 32, ttl=900)
    world.set(tlsa_name(f"mx2.{zone.name}"), "TLSA", TLSA, ttl=200)  # the shortest TTL decides
    domain = mx(world, zone, f"mx1.{zone.name}", f"mx2.{zone.name}", ttl=900)
    result = decision(world, resolver, domain)
    assert result.verdict is Verdict.DANE_ONLY, result.reason
    assert socketmap_answer(result) == "OK dane-only" and exim_reply(result) == "dane-only"
    assert 150 <= result.ttl <= 200


def test_no_mx_the_domain_itself_with_tlsa_is_dane_only(world: DnssecWorld, resolver: DnssecResolver) -> None:
    """RFC 7672 §2.2.2: no MX RRset (authenticated NODATA): the domain is the host."""
    zone = world.zone(label="nomx")
    domain = zone.domain
    mail_host(world, domain, TLSA)
    inputs = lookup(world, resolver, domain)
    assert isinstance(inputs.mx, MxState) and inputs.mx.kind is MxKind.IMPLICIT
    assert decide(inputs).verdict is Verdict.DANE_ONLY


def test_mx_host_through_a_secure_cname_uses_tlsa_at_the_chain_end(world: DnssecWorld,
                                                                   resolver: DnssecResolver) -> None:
    """RFC 7672 §2.2.3: the TLSA base domain is the name the secure CNAME chain ends at."""
    zone, provider = world.zone(label="alias"), world.zone(label="provider")
    mail_host(world, f"smtp.{provider.name}", TLSA)
    world.set(f"mx.{zone.name}", "CNAME", f"smtp.{provider.name}")
    domain = mx(world, zone, f"mx.{zone.name}")
    inputs = lookup(world, resolver, domain)
    tlsa = inputs.hosts[0].tlsa
    assert isinstance(tlsa, TlsaState) and tlsa.name == tlsa_name(f"smtp.{provider.name}")
    assert decide(inputs).verdict is Verdict.DANE_ONLY


def test_cname_chain_end_without_tlsa_falls_back_to_the_mx_name(world: DnssecWorld,
                                                                resolver: DnssecResolver) -> None:
    """RFC 7672 §2.2.3: no TLSA at the chain's end (authenticated): the MX host name's TLSA apply."""
    zone = world.zone(label="alias")
    mail_host(world, f"real.{zone.name}")
    world.set(f"mx.{zone.name}", "CNAME", f"real.{zone.name}")
    world.set(tlsa_name(f"mx.{zone.name}"), "TLSA", TLSA)
    domain = mx(world, zone, f"mx.{zone.name}")
    inputs = lookup(world, resolver, domain)
    tlsa = inputs.hosts[0].tlsa
    assert isinstance(tlsa, TlsaState) and tlsa.name == tlsa_name(f"mx.{zone.name}")
    assert decide(inputs).verdict is Verdict.DANE_ONLY


# ----- DANE ---------------------------------------------------------------------------------------


def test_insecure_mx_pointing_at_a_host_with_tlsa_is_dane(world: DnssecWorld, resolver: DnssecResolver) -> None:
    """RFC 7672 §2.2.1: DANE still protects the hosts of an insecure MX RRset, but cannot be
    required for the domain (an attacker could change the MX RRset)."""
    unsigned, provider = world.zone(signed=False, label="unsigned"), world.zone(label="provider")
    mail_host(world, f"mx.{provider.name}", TLSA)
    domain = mx(world, unsigned, f"mx.{provider.name}")
    result = decision(world, resolver, domain)
    assert result.verdict is Verdict.DANE and "MX RRset insecure" in result.reason
    assert socketmap_answer(result) == "OK dane" and exim_reply(result) == "dane"


def test_two_mx_one_with_tlsa_is_dane(world: DnssecWorld, resolver: DnssecResolver) -> None:
    zone = world.zone(label="twomx")
    mail_host(world, f"mx1.{zone.name}", TLSA)
    mail_host(world, f"mx2.{zone.name}")  # authenticated: no TLSA
    domain = mx(world, zone, f"mx1.{zone.name}", f"mx2.{zone.name}")
    assert decision(world, resolver, domain).verdict is Verdict.DANE


def test_only_unusable_tlsa_is_dane(world: DnssecWorld, resolver: DnssecResolver) -> None:
    """RFC 7672 §3.1.3: PKIX usages are unusable; their presence still means TLS is required."""
    _, _, domain = one_mx(world, "unusable", PKIX_TLSA)
    result = decision(world, resolver, domain)
    assert result.verdict is Verdict.DANE and "unusable" in result.reason


# ----- no secure TLSA: the MTA-STS answer stands --------------------------------------------------


def test_signed_zone_with_authenticated_no_tlsa_is_none(world: DnssecWorld, resolver: DnssecResolver) -> None:
    _, _, domain = one_mx(world, "notlsa")
    result = decision(world, resolver, domain)
    assert result.verdict is Verdict.NONE
    assert socketmap_answer(result) is None and exim_reply(result) is None


def test_unsigned_zone_tlsa_is_ignored(world: DnssecWorld, resolver: DnssecResolver) -> None:
    """RFC 7672 §2.2: TLSA records without DNSSEC are not used."""
    _, _, domain = one_mx(world, "unsignedtlsa", TLSA, signed=False)
    assert decision(world, resolver, domain).verdict is Verdict.NONE


def test_null_mx_is_none(world: DnssecWorld, resolver: DnssecResolver) -> None:
    """RFC 7505: "0 ." takes no mail, so there is no TLS policy."""
    zone = world.zone(label="nullmx")
    domain = zone.domain
    world.set(domain, "MX", "0 .")
    inputs = lookup(world, resolver, domain)
    assert isinstance(inputs.mx, MxState) and inputs.mx.kind is MxKind.NULL and inputs.hosts == ()
    assert decide(inputs).verdict is Verdict.NONE


def test_insecure_host_with_a_lame_tlsa_server_is_none(world: DnssecWorld, resolver: DnssecResolver) -> None:
    """RFC 7672 §2.2.2: an insecure host's TLSA lookup is not needed, so its failure does not defer."""
    _, host, domain = one_mx(world, "insecurelame", signed=False)
    world.lame(f"_tcp.{host}", signed=False)
    assert decision(world, resolver, domain).verdict is Verdict.NONE


# ----- TEMP: a lookup the decision needs failed ---------------------------------------------------


def test_bogus_mx_is_temp(world: DnssecWorld, resolver: DnssecResolver) -> None:
    zone, _, domain = one_mx(world, "bogusmx", TLSA)
    world.bogus(domain, "MX", f"10 evil.{zone.name}")
    result = decision(world, resolver, domain)
    assert result.verdict is Verdict.TEMP and f"{domain}. MX" in result.reason and "DNSSEC Bogus" in result.reason
    assert socketmap_answer(result).startswith("TEMP DNSSEC lookup failed: ")
    assert exim_reply(result).startswith("temp DNSSEC lookup failed: ")


def test_bogus_tlsa_is_temp(world: DnssecWorld, resolver: DnssecResolver) -> None:
    _, host, domain = one_mx(world, "bogustlsa", TLSA)
    world.bogus(tlsa_name(host), "TLSA", "3 1 1 " + "00" * 32)
    result = decision(world, resolver, domain)
    assert result.verdict is Verdict.TEMP and "TLSA" in result.reason


def test_lame_tlsa_server_is_temp(world: DnssecWorld, resolver: DnssecResolver) -> None:
    """The host is secure, its TLSA records sit in a delegated child whose server answers SERVFAIL."""
    _, host, domain = one_mx(world, "lametlsa")
    world.lame(f"_tcp.{host}")
    result = decision(world, resolver, domain)
    assert result.verdict is Verdict.TEMP and tlsa_name(host) in result.reason


def test_bogus_address_of_an_mx_host_is_temp(world: DnssecWorld, resolver: DnssecResolver) -> None:
    zone = world.zone(label="bogusa")
    mail_host(world, f"mx1.{zone.name}", TLSA)
    mail_host(world, f"mx2.{zone.name}", TLSA)
    world.bogus(f"mx2.{zone.name}", "A", "127.0.0.66")
    domain = mx(world, zone, f"mx1.{zone.name}", f"mx2.{zone.name}")
    result = decision(world, resolver, domain)
    assert result.verdict is Verdict.TEMP and f"mx2.{zone.name} A" in result.reason


# ----- the questions asked -------------------------------------------------------------------------


class CountingResolver(DnssecResolver):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.asked: list[tuple[str, str]] = []

    async def query(self, name: str, rdtype: str) -> DnssecResult:
        self.asked.append((name.rstrip(".").lower(), rdtype))
        return await super().query(name, rdtype)


def test_one_mx_question_then_a_aaaa_and_tlsa_per_host(world: DnssecWorld, resolver: DnssecResolver) -> None:
    zone, null = world.zone(label="count"), world.zone(label="countnull")
    mail_host(world, f"mx1.{zone.name}", TLSA)
    mail_host(world, f"mx2.{zone.name}")
    domain = mx(world, zone, f"mx1.{zone.name}", f"mx2.{zone.name}")
    world.set(null.name, "MX", "0 .")
    world.publish()
    counting = CountingResolver(resolver.settings)
    inputs = asyncio.run(dane_inputs(counting, domain))
    assert counting.asked[0] == (domain, "MX")
    assert sorted(counting.asked[1:]) == sorted(
        (name, rdtype) for host in ("mx1", "mx2")
        for name, rdtype in ((f"{host}.{domain}", "A"), (f"{host}.{domain}", "AAAA"),
                             (tlsa_name(f"{host}.{domain}").rstrip("."), "TLSA")))
    assert [h.host for h in inputs.hosts] == [f"mx1.{domain}", f"mx2.{domain}"]  # preference order
    assert all(isinstance(h, HostState) for h in inputs.hosts)
    counting.asked.clear()
    asyncio.run(dane_inputs(counting, null.name))
    assert counting.asked == [(null.name.rstrip("."), "MX")]  # null MX: nothing more to ask
