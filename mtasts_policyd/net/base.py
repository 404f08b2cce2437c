"""The network seams: what resolution, survey and doctor need from DNS and HTTPS, as Protocols.

Why: the rules above the network (RFC 8461 §3.3, §5.1, §10.2 in resolution; the survey's rows)
are worth testing in milliseconds, and DANE will need the same DNS questions. The way httpx has a
transport base class and a mock transport, `DnsDiscovery` (dnspython, and our own stub on the event loop; dns.py) and `PolicyFetcher`
(http.client on a TLS socket of our own, https.py) are the real implementations and tests/fakes.py has in-memory ones.

The contract every implementation keeps: data comes back with the TTL it may be kept for, and
every failure is one of the taxonomy's exceptions (core/errors.py), "the domain says no"
(`NoRecord`, `InvalidRecord`, with the RFC 2308 negative TTL where known) apart from "we could not
ask" (`DnsTemporaryFailure`); a fetch fails only with `FetchError` or `CertificateInvalid`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from mtasts_policyd.core.errors import MtaStsError
from mtasts_policyd.core.sts_record import StsRecord, select_record
from mtasts_policyd.core.tlsrpt_record import TlsRptRecord, parse_tlsrpt
from mtasts_policyd.net.trust import TrustStore

T = TypeVar("T")


@dataclass(frozen=True)
class StsAnswer:
    record: StsRecord
    ttl: int


@dataclass(frozen=True)
class TlsRptAnswer:
    record: TlsRptRecord
    ttl: int


def _parsed(parse: Callable[[list[bytes]], T], rrs: list[bytes], ttl: int) -> T:
    """`parse(rrs)`; a record that does not parse raises with the RRset's TTL: that is how long
    "no policy" is known (cached like no record)."""
    try:
        return parse(rrs)
    except MtaStsError as exc:
        exc.ttl = ttl
        raise


def sts_answer(rrs: list[bytes], ttl: int) -> StsAnswer:
    """The `_mta-sts` TXT RRset as an answer; each RR's strings already joined with nothing
    between them (RFC 8461 §3.1)."""
    return StsAnswer(_parsed(select_record, rrs, ttl), ttl)


def tlsrpt_answer(rrs: list[bytes], ttl: int) -> TlsRptAnswer:
    """The `_smtp._tls` TXT RRset as an answer (RFC 8460 §3: strings joined as for MTA-STS)."""
    return TlsRptAnswer(_parsed(parse_tlsrpt, rrs, ttl), ttl)


class Discovery(Protocol):
    """The DNS questions of MTA-STS and TLSRPT. Thread-safe; failures as in the module docstring."""

    def sts_record(self, domain: str) -> StsAnswer:
        """RFC 8461 §3.1: the `_mta-sts` TXT record of `domain`."""
        ...

    async def sts_record_async(self, domain: str) -> StsAnswer:
        """sts_record on the running event loop (the daemon's first step of every resolution)."""
        ...

    def tlsrpt_record(self, domain: str) -> TlsRptAnswer:
        """RFC 8460 §3: the `_smtp._tls` TXT record of `domain`."""
        ...

    def mx_hosts(self, domain: str) -> tuple[list[str], int]:
        """MX host names in preference order (lower case, no final dot; the null MX is "."), and
        the answer's TTL; NoRecord when the domain has no MX record (lookup.mail_hosts applies
        RFC 5321 §5.1 and RFC 7505)."""
        ...

    def addresses(self, host: str, families: tuple[str, ...] = ("A", "AAAA")) -> list[str]:
        """IPv4 then IPv6 addresses of `host` (`families`: the record types to ask, in order);
        NoRecord if it has none of them."""
        ...

    async def addresses_async(self, host: str, families: tuple[str, ...] = ("A", "AAAA")) -> list[str]:
        """addresses on the running event loop (the daemon asks the policy host's A records there)."""
        ...

    async def mx_hosts_async(self, domain: str) -> tuple[list[str], int]:
        """mx_hosts on the running event loop (the daemon asks it there, beside the addresses)."""
        ...


class Fetcher(Protocol):
    """The HTTPS GET of a policy (RFC 8461 §3.3). Thread-safe."""

    @property
    def trust(self) -> TrustStore:
        """The CAs the policy hosts are verified against (the start-up log and `query` show it)."""
        ...

    def fetch(self, domain: str, ipv4: list[str] | MtaStsError | None = None) -> bytes:
        """The raw policy body of `domain`; FetchError or CertificateInvalid, nothing else.
        `ipv4`: the policy host's A lookup when the caller already made it (its addresses, or its
        failure); None asks here."""
        ...
