"""Questions to a validating resolver, each answered with what DNSSEC says about it.

Trust model (issue 9): the daemon does not validate DNSSEC itself. It asks the resolver the
operator configured (the one the MTA uses, on loopback) with DO and AD set (RFC 6840 §5.7-5.8:
AD in a query asks for the AD bit back without needing DO; DO keeps resolvers that want it happy)
in EDNS0 with a 1232-byte payload (the DNS flag day 2020 size: no fragmentation), retries over
TCP when the answer is truncated (RFC 7766 §5), and believes the AD bit (RFC 4035 §3.2.3: set only
when every RRset in the answer and authority sections validated).

Every question ends in one of three ways, kept apart on purpose:
- `DnssecAnswer`: records (at the end of any CNAME chain), the TTL they may be kept (the minimum
  along the chain) and `secure` (AD);
- `DnssecDenial`: NXDOMAIN or NODATA, `secure` (an authenticated denial, RFC 4035 §5.4) and the
  RFC 2308 negative TTL;
- `DnsTemporaryFailure` raised: SERVFAIL (what a validating resolver answers for bogus data and
  lame servers), REFUSED, a timeout: nothing is known.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

import dns.asyncresolver
import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rdatatype
import dns.resolver
import dns.rrset

from mtasts_policyd.core.errors import DnsTemporaryFailure
from mtasts_policyd.net.dns import (
    DnsSettings,
    _answer_ttl,
    _configured,
    _dns_errors,
    _negative_ttl,
)

EDNS_PAYLOAD = 1232  # DNS flag day 2020: fits one unfragmented datagram on any path
MAX_DETAIL = 200


class Denial(enum.Enum):
    NXDOMAIN = "nxdomain"  # the name does not exist
    NODATA = "nodata"  # the name exists, but has no records of the type asked


@dataclass(frozen=True)
class DnssecAnswer:
    """Records for `name`/`rdtype`. `canonical`: the owner of `rrset` (the end of a CNAME chain,
    `name` itself without one); `ttl`: the minimum TTL along the chain (RFC 2181 §5.2)."""

    name: str
    rdtype: str
    rrset: dns.rrset.RRset
    canonical: str
    ttl: int
    secure: bool


@dataclass(frozen=True)
class DnssecDenial:
    """No records for `name`/`rdtype`. `ttl`: RFC 2308 §5 (min of the SOA TTL and MINIMUM, and of
    any CNAME on the way); 0 when the answer carried no SOA (RFC 2308 §5: do not cache it)."""

    name: str
    rdtype: str
    kind: Denial
    ttl: int
    secure: bool


DnssecResult = DnssecAnswer | DnssecDenial


def absolute(name: str) -> str:
    """Questions are always for absolute names: no search list, no surprise suffix."""
    return name if name.endswith(".") else f"{name}."


class DnssecQuestions(Protocol):
    """What DANE asks of DNS (the seam: DnssecResolver below; tests/fakes.py has one in memory)."""

    async def query(self, name: str, rdtype: str) -> DnssecResult:
        """One question; DnsTemporaryFailure when it gets no usable answer."""
        ...


class DnssecResolver:
    """Asks one validating resolver (DnsSettings: nameservers, port, timeout per question) on the
    running event loop. Safe to share between tasks of one loop."""

    def __init__(self, settings: DnsSettings = DnsSettings()) -> None:
        self.settings = settings
        self._resolver = _configured(dns.asyncresolver.Resolver, settings)
        self._resolver.use_edns(0, dns.flags.DO, EDNS_PAYLOAD)
        self._resolver.flags = dns.flags.RD | dns.flags.AD
        # dnspython retries over TCP on a truncated answer (TC bit) by itself; retry_servfail stays
        # off: SERVFAIL from a validating resolver is its verdict (bogus, lame), not a hiccup.

    async def query(self, name: str, rdtype: str) -> DnssecResult:
        """One question; raises DnsTemporaryFailure when it gets no usable answer."""
        qname = absolute(name)
        with _dns_errors(qname, rdtype):
            try:
                answer = await self._resolver.resolve(qname, rdtype, search=False, raise_on_no_answer=True)
            except dns.resolver.NXDOMAIN as exc:
                responses = list(exc.responses().values())
                return _denial(qname, rdtype, Denial.NXDOMAIN, responses[0] if responses else None)
            except dns.resolver.NoAnswer as exc:
                return _denial(qname, rdtype, Denial.NODATA, exc.response())
            except dns.resolver.YXDOMAIN:
                # RFC 6672 §2.2: a DNAME made the name too long; it names nothing, and dnspython
                # keeps no response to read AD from: an unauthenticated, uncached NXDOMAIN.
                return DnssecDenial(qname, rdtype, Denial.NXDOMAIN, 0, False)
            except dns.resolver.NoNameservers as exc:
                raise DnsTemporaryFailure(f"{qname} {rdtype}: {failure_detail(exc)}") from None
        assert answer.rrset is not None  # raise_on_no_answer
        return DnssecAnswer(qname, rdtype, answer.rrset, answer.canonical_name.to_text(), _answer_ttl(answer),
                            bool(answer.response.flags & dns.flags.AD))


def _denial(name: str, rdtype: str, kind: Denial, response: dns.message.Message | None) -> DnssecDenial:
    secure = response is not None and bool(response.flags & dns.flags.AD)
    return DnssecDenial(name, rdtype, kind, _negative_ttl(response) or 0, secure)


def failure_detail(exc: dns.resolver.NoNameservers) -> str:
    """What each server answered, with the reason a validating resolver gives in an Extended DNS
    Error (RFC 8914: e.g. "DNSSEC Bogus", "No Reachable Authority"), for the operator's log."""
    parts = []
    for server, _tcp, _port, error, response in exc.kwargs.get("errors", []):
        text = str(error)
        if response is not None:
            for option in response.options:
                if isinstance(option, dns.edns.EDEOption):
                    text += f" ({option.to_text()})"
        server = server.removeprefix("Do53:")  # dnspython names plain DNS servers "Do53:ADDRESS@PORT"
        parts.append(f"{server} answered {text}" if response is not None else f"{server}: {text}")
    return "; ".join(parts)[:MAX_DETAIL] or "no server answered"


# ----- the trust probe ----------------------------------------------------------------


@dataclass(frozen=True)
class ProbeTarget:
    """What the probe asks: a name and a type that a validating resolver answers with AD
    (issue 9 `dane.probe`, default ". NS": the root zone is signed)."""

    name: str
    rdtype: str

    @classmethod
    def parse(cls, text: str) -> ProbeTarget:
        """"NAME TYPE", e.g. ". NS" or "example.com. SOA"; ValueError says what is wrong."""
        words = text.split()
        if len(words) != 2:
            raise ValueError(f"{text!r} is not 'NAME TYPE' (e.g. '. NS')")
        try:
            name = dns.name.from_text(words[0]).to_text()
            rdtype = dns.rdatatype.RdataType.make(words[1].upper())
        except (dns.exception.DNSException, ValueError) as exc:
            raise ValueError(f"{text!r} is not 'NAME TYPE': {exc}") from None
        return cls(name, dns.rdatatype.to_text(rdtype))

    def __str__(self) -> str:
        return f"{self.name} {self.rdtype}"


@dataclass(frozen=True)
class ProbeResult:
    """Whether the resolver validates: the probe came back with AD (records or an authenticated
    denial). `detail` says what happened, for logs and `/health`."""

    validating: bool
    detail: str


async def probe(resolver: DnssecQuestions, target: ProbeTarget) -> ProbeResult:
    """Ask `target`; a resolver that does not validate (or a path that strips AD) answers without AD."""
    try:
        result = await resolver.query(target.name, target.rdtype)
    except DnsTemporaryFailure as exc:
        return ProbeResult(False, f"{target}: {exc.detail}")
    what = "answer" if isinstance(result, DnssecAnswer) else result.kind.value
    if result.secure:
        return ProbeResult(True, f"{target}: {what} with AD")
    return ProbeResult(False, f"{target}: {what} without AD: the resolver does not validate DNSSEC")


def resolver_addresses(settings: DnsSettings) -> tuple[str, ...]:
    """The addresses questions go to: `dns.nameservers`, else /etc/resolv.conf's (empty if it
    cannot be read)."""
    if settings.nameservers:
        return settings.nameservers
    try:
        return tuple(str(server) for server in dns.resolver.Resolver().nameservers)
    except dns.exception.DNSException:
        return ()
