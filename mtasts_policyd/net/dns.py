"""DNS: the `_mta-sts` TXT record (RFC 8461 §3.1), the `_smtp._tls` TLSRPT record (RFC 8460 §3)
and the addresses of hosts we must reach.

The one job here is to turn DNS answers into either data with a TTL or a failure with a kind,
keeping "the domain says no" (NXDOMAIN/NODATA, cacheable for the negative TTL of RFC 2308)
apart from "we could not ask" (timeout, SERVFAIL), which must never be cached as "no policy".
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.rdatatype
import dns.resolver

from mtasts_policyd.core.errors import DnsTemporaryFailure, MtaStsError, NoRecord
from mtasts_policyd.core.limits import limits
from mtasts_policyd.core.sts_record import join_strings
from mtasts_policyd.net import dnswire, udp
from mtasts_policyd.net.base import StsAnswer, TlsRptAnswer, sts_answer, tlsrpt_answer

Found = tuple[list[Any], int]  # an RRset's values (TXT bytes, address text, MX hosts in order) and its TTL


def ip_addresses(names: tuple[str, ...]) -> None:
    """dnspython asks nameservers by address: a host name here would fail every lookup."""
    for name in names:
        try:
            ipaddress.ip_address(name)
        except ValueError:
            raise ValueError(f"{name!r} is not an IP address") from None


@dataclass(frozen=True)
class DnsSettings:
    """Where and how to ask. No nameservers means the system's (/etc/resolv.conf)."""

    nameservers: tuple[str, ...] = field(default=(), metadata=limits(check=ip_addresses))
    port: int = field(default=53, metadata=limits(min=1, max=65535))
    timeout: float = field(default=5.0, metadata=limits(min=0.1, max=300))  # seconds per lookup, retries included


def _negative_ttl_of(cname_ttls: Iterable[int], soa: tuple[int, int] | None) -> int | None:
    """RFC 2308 §5: a negative answer lives for min(SOA TTL, SOA MINIMUM) (`soa`: the first SOA
    RRset of the authority section; None: no negative TTL is known).

    Reached through a CNAME (RFC 8461 §8.2 delegation), the answer is only true while the CNAME
    is, so its TTL bounds the result too (RFC 2308 §6: the CNAME is cached with its own TTL).
    """
    return None if soa is None else min(*soa, *cname_ttls)


def _negative_ttl(response: dns.message.Message | None) -> int | None:
    """_negative_ttl_of a dnspython response."""
    if response is None:
        return None
    cnames = [rrset.ttl for rrset in response.answer if rrset.rdtype == dns.rdatatype.CNAME]
    soa = next(((rrset.ttl, rrset[0].minimum) for rrset in response.authority
                if rrset.rdtype == dns.rdatatype.SOA and len(rrset)), None)
    return _negative_ttl_of(cnames, soa)


def _chain_ttl(ttls: Iterable[int]) -> int:
    """How long a positive answer may be kept: the shortest TTL along its CNAME chain (`ttls`:
    the CNAMEs' and the answer RRset's).

    RFC 1035 §3.2.1 / RFC 2181 §5.2: each RRset may be cached for its own TTL only. Through a
    CNAME (RFC 8461 §8.2) the answer depends on the alias as much as on the target, so the
    target's longer TTL must not outlive the alias: the owner may repoint it meanwhile.
    """
    return min(ttls)


def _answer_ttl(answer: dns.resolver.Answer) -> int:
    """_chain_ttl of a dnspython answer; 0 without an answer RRset."""
    if answer.rrset is None:
        return 0
    return _chain_ttl([*(cname.ttl for cname in answer.chaining_result.cnames), answer.rrset.ttl])


R = TypeVar("R", dns.resolver.Resolver, dns.asyncresolver.Resolver)


def _configured(kind: type[R], settings: DnsSettings) -> R:
    """A resolver of `kind` (sync or asyncio) asking where `settings` say, within its timeout."""
    if settings.nameservers:
        resolver = kind(configure=False)
        resolver.nameservers = list(settings.nameservers)
    else:
        resolver = kind()
    resolver.port = settings.port
    resolver.lifetime = settings.timeout
    resolver.timeout = min(settings.timeout, 2.0)
    return resolver


# The failures of a question, one text each, whichever path asked (dnspython or net/udp.py).

def _nxdomain(name: str, ttl: int | None) -> NoRecord:
    return NoRecord(f"{name} does not exist (NXDOMAIN)", ttl=ttl)


def _nodata(name: str, rdtype: str, ttl: int | None) -> NoRecord:
    return NoRecord(f"{name} has no {rdtype} record", ttl=ttl)


def _yxdomain(name: str) -> NoRecord:
    return NoRecord(f"{name} is too long after CNAME expansion")


def _no_server(name: str, rdtype: str, exc: Exception) -> DnsTemporaryFailure:
    return DnsTemporaryFailure(f"{name} {rdtype}: no server answered ({_short(exc)})")


def _timed_out(name: str, rdtype: str) -> DnsTemporaryFailure:
    return DnsTemporaryFailure(f"{name} {rdtype}: timed out")


@contextlib.contextmanager
def _dns_errors(name: str, rdtype: str) -> Iterator[None]:
    """Turn dnspython's exceptions into the taxonomy: "the domain says no" (NoRecord, with the
    RFC 2308 negative TTL) apart from "we could not ask" (DnsTemporaryFailure)."""
    try:
        yield
    except dns.resolver.NXDOMAIN as exc:
        responses = list(exc.responses().values())
        raise _nxdomain(name, _negative_ttl(responses[0] if responses else None)) from None
    except dns.resolver.NoAnswer as exc:
        raise _nodata(name, rdtype, _negative_ttl(exc.response())) from None
    except dns.resolver.YXDOMAIN:
        raise _yxdomain(name) from None
    except dns.resolver.NoNameservers as exc:
        raise _no_server(name, rdtype, exc) from None
    except dns.resolver.LifetimeTimeout:
        raise _timed_out(name, rdtype) from None
    except dns.exception.DNSException as exc:
        raise DnsTemporaryFailure(f"{name} {rdtype}: {_short(exc)}") from None


def _reply_found(reply: dnswire.Reply, name: str, rdtype: str) -> Found:
    """A reply of net/udp.py (rcode NOERROR, NXDOMAIN or YXDOMAIN) as `_answer_found` maps a
    dnspython answer, and with the same failures as `_dns_errors`."""
    if reply.rcode == dnswire.YXDOMAIN:
        raise _yxdomain(name)
    if reply.rcode == dnswire.NXDOMAIN:
        raise _nxdomain(name, _negative_ttl_of(reply.cname_ttls, reply.soa))
    if not reply.rrs:
        raise _nodata(name, rdtype, _negative_ttl_of(reply.cname_ttls, reply.soa))
    ttl = _chain_ttl(reply.chain_ttls)
    return (_mx_order(reply.rrs), ttl) if rdtype == "MX" else (list(reply.rrs), ttl)


def _answer_found(answer: dns.resolver.Answer, rdtype: str) -> Found:
    """A dnspython answer's values (as dnswire.Reply.rrs has them, MX hosts in order) and TTL."""
    if rdtype == "TXT":
        return _txt_rrs(answer)
    if rdtype == "MX":
        return _mx_of(answer)
    return [rdata.address for rdata in answer], _answer_ttl(answer)


def _stub_of(resolver: dns.asyncresolver.Resolver) -> udp.Stub | None:
    """net/udp.py's stub asking what `resolver` would ask, where and as it would; None when only
    dnspython can (a nameserver that is not a plain IP address, TSIG, EDNS options, other flags,
    SERVFAIL retries, a cache)."""
    if (resolver.keyname is not None or resolver.flags is not None or resolver.ednsoptions
            or resolver.retry_servfail or resolver.cache is not None):
        return None
    servers = []
    for address in resolver.nameservers:
        each = udp.server(address, resolver.nameserver_ports.get(address, resolver.port)) \
            if isinstance(address, str) else None
        if each is None:
            return None
        servers.append(each)
    return udp.Stub(tuple(servers), timeout=resolver.timeout, lifetime=resolver.lifetime, edns=resolver.edns,
                    payload=resolver.payload, ednsflags=resolver.ednsflags, rotate=resolver.rotate)


def _txt_rrs(answer: dns.resolver.Answer) -> tuple[list[bytes], int]:
    """A TXT answer's RRs and its TTL. RFC 8461 §3.1, RFC 8460 §3: the strings of one RR are
    joined with nothing between them."""
    return [join_strings(rdata.strings) for rdata in answer], _answer_ttl(answer)


class DnsDiscovery:
    """The `Discovery` seam (base.py) over dnspython. Thread-safe: dnspython's Resolver may be
    shared as long as nobody changes its settings.

    The `_mta-sts` TXT query also has an asyncio form (`sts_record_async`) for the daemon: it is
    the first step of every resolution and the one that hangs for domains whose DNS never
    answers, so on the event loop a flood of those costs sockets and timers, not worker threads.
    The policy host's addresses and the MX hosts have asyncio forms too (`addresses_async`,
    `mx_hosts_async`): the daemon asks them on the loop, at once, before its one hand-off to a
    worker thread (net/lookup.py `look_ahead`; bench/README.md "Cold path" has the figures).
    The asyncio forms ask through net/udp.py's stub, and through dnspython's asyncio resolver
    what the stub leaves (a truncated reply, a name it does not encode, a nameserver that is not
    an IP address). Every form shares one mapping from DNS answers and errors to results
    (`_answer_found` and `_reply_found` over `_chain_ttl`, `_negative_ttl_of`, `_mx_order`; the
    failure texts of `_dns_errors`; base.sts_answer).
    """

    def __init__(self, settings: DnsSettings = DnsSettings()) -> None:
        self._settings = settings
        self._resolver = _configured(dns.resolver.Resolver, settings)
        self._async_resolver: dns.asyncresolver.Resolver | None = None  # made on first use (daemon only)
        self._stub: udp.Stub | None = None  # made with it; None where only dnspython can ask

    def _query(self, name: str, rdtype: str) -> dns.resolver.Answer:
        with _dns_errors(name, rdtype):
            return self._resolver.resolve(name, rdtype, search=False, raise_on_no_answer=True)

    def _txt(self, name: str) -> tuple[list[bytes], int]:
        return _txt_rrs(self._query(name, "TXT"))

    def sts_record(self, domain: str) -> StsAnswer:
        """RFC 8461 §3.1: the policy record of `domain`; CNAMEs are followed by the resolver."""
        return sts_answer(*self._txt(_sts_name(domain)))

    async def _query_async(self, name: str, rdtype: str) -> Found:
        """_query on the running event loop, through net/udp.py's stub (dnspython's asyncio resolver
        for what it leaves): same settings, same results, same errors, all within the lifetime."""
        if self._async_resolver is None:
            self._async_resolver = _configured(dns.asyncresolver.Resolver, self._settings)
            self._stub = _stub_of(self._async_resolver)
        lifetime = self._async_resolver.lifetime
        if self._stub is not None:
            loop = asyncio.get_running_loop()
            start = loop.time()
            try:
                return _reply_found(await self._stub.resolve(name, rdtype), name, rdtype)
            except udp.Fallback:
                lifetime -= loop.time() - start
            except udp.NoServerAnswered as exc:
                raise _no_server(name, rdtype, exc) from None
            except udp.TimedOut:
                raise _timed_out(name, rdtype) from None
        with _dns_errors(name, rdtype):
            return _answer_found(await self._async_resolver.resolve(
                name, rdtype, search=False, raise_on_no_answer=True, lifetime=lifetime), rdtype)

    async def sts_record_async(self, domain: str) -> StsAnswer:
        """sts_record on the running event loop: same settings, same results."""
        return sts_answer(*await self._query_async(_sts_name(domain), "TXT"))

    def tlsrpt_record(self, domain: str) -> TlsRptAnswer:
        """RFC 8460 §3: where `domain` wants TLS reports; failures map exactly as for sts_record."""
        return tlsrpt_answer(*self._txt(f"_smtp._tls.{domain}."))

    def addresses(self, host: str, families: tuple[str, ...] = ("A", "AAAA")) -> list[str]:
        """IPv4 then IPv6 addresses of `host` (`families`: the record types to ask, in order);
        NoRecord if it has none of them."""
        found: list[str] = []
        failure: MtaStsError | None = None
        for rdtype in families:
            try:
                found.extend(rdata.address for rdata in self._query(f"{host}.", rdtype))
            except MtaStsError as exc:
                failure = _worse(failure, exc)
        return _addresses_or_failure(found, failure)

    async def addresses_async(self, host: str, families: tuple[str, ...] = ("A", "AAAA")) -> list[str]:
        """addresses on the running event loop: same settings, same results."""
        found: list[str] = []
        failure: MtaStsError | None = None
        for rdtype in families:
            try:
                found.extend((await self._query_async(f"{host}.", rdtype))[0])
            except MtaStsError as exc:
                failure = _worse(failure, exc)
        return _addresses_or_failure(found, failure)

    def root_servers(self) -> list[str]:
        """The root zone's NS names: `doctor`'s proof that the configured resolver answers at all
        (NoRecord is an answer too; DnsTemporaryFailure is not)."""
        return [rdata.target.to_text() for rdata in self._query(".", "NS")]

    def mx_hosts(self, domain: str) -> tuple[list[str], int]:
        """MX host names in preference order (RFC 5321 §5.1), and how long the answer may be kept."""
        return _mx_of(self._query(f"{domain}.", "MX"))

    async def mx_hosts_async(self, domain: str) -> tuple[list[str], int]:
        """mx_hosts on the running event loop: same settings, same results."""
        return await self._query_async(f"{domain}.", "MX")


def _worse(failure: MtaStsError | None, exc: MtaStsError) -> MtaStsError:
    """Of two failures, the one to report: "could not ask" outweighs "has no such record"."""
    return failure if isinstance(failure, DnsTemporaryFailure) else exc


def _addresses_or_failure(found: list[str], failure: MtaStsError | None) -> list[str]:
    if found:
        return found
    assert failure is not None
    raise failure


def _mx_order(exchanges: Iterable[tuple[int, str]]) -> list[str]:
    """MX host names (preference, name as dnspython writes it) in preference order (RFC 5321 §5.1;
    equal preferences as given), lower case (RFC 8461 §4.1 matches them case-insensitively)."""
    return [host.lower() for _, host in sorted(exchanges, key=lambda exchange: exchange[0])]


def _mx_of(answer: dns.resolver.Answer) -> tuple[list[str], int]:
    """An MX answer's host names in preference order and its TTL."""
    return _mx_order((rdata.preference, rdata.exchange.to_text(omit_final_dot=True)) for rdata in answer), \
        _answer_ttl(answer)


def _sts_name(domain: str) -> str:
    return f"_mta-sts.{domain}."  # RFC 8461 §3.1


def _short(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
