"""The DNS questions of DANE for one next-hop domain (RFC 7672 §2.2), asked through a validating
resolver (net/dnssec.py), answered as the plain values the decision reads (core/dane.py).

Order and concurrency: the MX RRset first (it names the hosts), then for every host at once its
A, AAAA and `_25._tcp.<host>` TLSA questions; only a host reached through a secure CNAME chain
costs one more question afterwards (the TLSA records at the chain's end, RFC 7672 §2.2.3).
A question that fails is recorded as a LookupFailure, not raised: whether it matters is the
decision's rule (answers/dane.py), e.g. the TLSA lookup of an insecure host does not.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import dns.rdtypes.ANY.TLSA

from mtasts_policyd.core.dane import (
    AddressState,
    DaneInputs,
    HostState,
    LookupFailure,
    MxKind,
    MxState,
    Tlsa,
    TlsaState,
    tlsa_name,
)
from mtasts_policyd.core.errors import DnsTemporaryFailure
from mtasts_policyd.core.names import mail_hosts
from mtasts_policyd.net.dnssec import (
    DnssecAnswer,
    DnssecDenial,
    DnssecQuestions,
    DnssecResult,
)

MAX_IN_FLIGHT = 16  # questions at once per domain: a domain with many MX hosts must not flood the resolver


async def dane_inputs(resolver: DnssecQuestions, domain: str) -> DaneInputs:
    """MX, then addresses and TLSA of every MX host, for `domain` (a cleaned A-label name)."""
    domain = domain.rstrip(".").lower()
    gate = asyncio.Semaphore(MAX_IN_FLIGHT)

    async def ask(name: str, rdtype: str) -> DnssecResult | LookupFailure:
        async with gate:
            try:
                return await resolver.query(name, rdtype)
            except DnsTemporaryFailure as exc:
                return LookupFailure(name, rdtype, exc.detail)

    mx = _mx_state(domain, await ask(domain, "MX"))
    if isinstance(mx, LookupFailure) or mx.kind is MxKind.NULL:
        return DaneInputs(domain, mx)
    hosts = await asyncio.gather(*(_host_state(host, ask) for host in mx.hosts))
    return DaneInputs(domain, mx, tuple(hosts))


def _mx_state(domain: str, result: DnssecResult | LookupFailure) -> MxState | LookupFailure:
    if isinstance(result, LookupFailure):
        return result
    if isinstance(result, DnssecDenial):
        # No MX RRset: the domain itself is the host (if it does not exist at all, its address
        # lookups say so).
        return MxState(MxKind.IMPLICIT, result.secure, mail_hosts(domain, None), result.ttl)
    exchanges = sorted(result.rrset, key=lambda rdata: rdata.preference)  # RFC 5321 §5.1
    hosts = mail_hosts(domain, [rdata.exchange.to_text() for rdata in exchanges])
    if not hosts:  # RFC 7505 §3: "0 ." alone, the domain accepts no mail
        return MxState(MxKind.NULL, result.secure, (), result.ttl)
    return MxState(MxKind.RECORDS, result.secure, hosts, result.ttl)


Ask = Callable[[str, str], Awaitable[DnssecResult | LookupFailure]]


async def _host_state(host: str, ask: Ask) -> HostState:
    a, aaaa, tlsa = await asyncio.gather(ask(host, "A"), ask(host, "AAAA"), ask(tlsa_name(host), "TLSA"))
    address = _address_state(host, a, aaaa)
    tlsa_state = _tlsa_state(tlsa)
    if isinstance(address, AddressState) and address.secure and address.canonical != host:
        # RFC 7672 §2.2.3: through a secure CNAME chain, the TLSA base domain is first the name at
        # its end; only if that has no TLSA records (authenticated denial) the MX host name.
        expanded = _tlsa_state(await ask(tlsa_name(address.canonical), "TLSA"))
        if not (isinstance(expanded, TlsaState) and expanded.secure and not expanded.records):
            tlsa_state = expanded
    return HostState(host, address, tlsa_state)


def _address_state(host: str, *results: DnssecResult | LookupFailure) -> AddressState | LookupFailure:
    """A and AAAA as one state: a failure of either is a failure (the host's security is unknown)."""
    known: list[DnssecResult] = []
    for result in results:
        if isinstance(result, LookupFailure):
            return result
        known.append(result)
    answers = [r for r in known if isinstance(r, DnssecAnswer)]
    addresses = tuple(rdata.address for answer in answers for rdata in answer.rrset)
    canonical = answers[0].canonical.rstrip(".").lower() if answers else host
    return AddressState(all(r.secure for r in known), addresses, canonical, min(r.ttl for r in known))


def _tlsa_state(result: DnssecResult | LookupFailure) -> TlsaState | LookupFailure:
    if isinstance(result, LookupFailure):
        return result
    records: tuple[Tlsa, ...] = ()
    if isinstance(result, DnssecAnswer):
        records = tuple(Tlsa(rdata.usage, rdata.selector, rdata.mtype, rdata.cert) for rdata in result.rrset
                        if isinstance(rdata, dns.rdtypes.ANY.TLSA.TLSA))
    return TlsaState(result.name, result.secure, records, result.ttl)
