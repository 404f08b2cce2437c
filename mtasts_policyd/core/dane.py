"""What a DANE lookup of a next-hop domain found, as plain values, and which TLSA records an SMTP
client can use. Pure: no I/O.

Why here (core) and not beside the decision (answers/dane.py): the network layer
(net/dane_lookup.py) fills these values in and may not import the outer answers layer
(README "Layout"); the decision reads them. "secure" always means what the validating resolver
said with the AD bit (RFC 4035 §3.2.3, RFC 6840 §5.8): this daemon does not validate DNSSEC itself.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

SMTP_PORT = 25


def tlsa_name(host: str, port: int = SMTP_PORT) -> str:
    """RFC 6698 §3, RFC 7672 §2.2.3: the TLSA records of an SMTP server live at _25._tcp.<host>."""
    return f"_{port}._tcp.{host.rstrip('.')}."


class TlsaUsage(enum.IntEnum):
    """Certificate usage (RFC 6698 §2.1.1, names of RFC 7218)."""

    PKIX_TA = 0
    PKIX_EE = 1
    DANE_TA = 2
    DANE_EE = 3


# RFC 6698 §2.1.3: the digest length each matching type implies (0, "Full", has no fixed length).
_DIGEST_LENGTHS = {1: 32, 2: 64}


@dataclass(frozen=True)
class Tlsa:
    """One TLSA record (RFC 6698 §2.1): usage, selector, matching type, association data."""

    usage: int
    selector: int
    matching: int
    data: bytes

    @property
    def unusable_reason(self) -> str | None:
        """Why an SMTP client cannot use this record, or None if it can (RFC 7672 §3.1)."""
        # RFC 7672 §3.1.3: PKIX-TA(0) and PKIX-EE(1) depend on a CA list SMTP clients do not share;
        # they are unusable for SMTP. §3.1.1 DANE-EE(3) and §3.1.2 DANE-TA(2) are the usable ones.
        if self.usage not in (TlsaUsage.DANE_TA, TlsaUsage.DANE_EE):
            return f"usage {self.usage} is not DANE-TA(2) or DANE-EE(3) (RFC 7672 §3.1.3)"
        # RFC 6698 §2.1.2: selector Cert(0) or SPKI(1); RFC 7672 §2.2: unsupported parameters make a record unusable.
        if self.selector not in (0, 1):
            return f"selector {self.selector} is not Cert(0) or SPKI(1)"
        # RFC 6698 §2.1.3: matching type Full(0), SHA2-256(1), SHA2-512(2).
        if self.matching not in (0, 1, 2):
            return f"matching type {self.matching} is not Full(0), SHA2-256(1) or SHA2-512(2)"
        # A digest of the wrong length can match nothing: the record is malformed, so unusable (RFC 7672 §2.2).
        expected = _DIGEST_LENGTHS.get(self.matching)
        if expected is not None and len(self.data) != expected:
            return f"matching type {self.matching} needs {expected} bytes of data, not {len(self.data)}"
        if not self.data:
            return "no certificate association data"
        return None

    @property
    def usable(self) -> bool:
        return self.unusable_reason is None

    def __str__(self) -> str:
        return f"{self.usage} {self.selector} {self.matching} {self.data.hex()}"


@dataclass(frozen=True)
class LookupFailure:
    """A question the resolver could not answer: SERVFAIL (what a validating resolver answers for
    bogus data and lame servers), REFUSED, a timeout. Nothing is known; nothing may be cached long.
    `detail` names the question and says what happened (as DnsTemporaryFailure details do)."""

    name: str
    rdtype: str
    detail: str

    def __str__(self) -> str:
        return self.detail


class MxKind(enum.Enum):
    RECORDS = "records"  # an MX RRset with at least one host
    IMPLICIT = "implicit"  # no MX RRset: the domain itself is the host (RFC 5321 §5.1, RFC 7672 §2.2.2)
    NULL = "null"  # only "0 ." (RFC 7505): the domain takes no mail, so it has no TLS policy


@dataclass(frozen=True)
class MxState:
    """The MX lookup of the next-hop domain. `secure`: the MX RRset, or its authenticated denial
    for IMPLICIT, came with AD. `hosts`: preference order, lower case, no final dot."""

    kind: MxKind
    secure: bool
    hosts: tuple[str, ...]
    ttl: int


@dataclass(frozen=True)
class AddressState:
    """A and AAAA of one host together. `secure`: both answers (records or denial) came with AD;
    `canonical`: the name at the end of a CNAME chain (the host itself without one)."""

    secure: bool
    addresses: tuple[str, ...]
    canonical: str
    ttl: int


class TlsaStatus(enum.Enum):
    SECURE = "secure"  # records, with AD
    SECURE_NONE = "secure-none"  # authenticated NXDOMAIN/NODATA: the host publishes no TLSA
    INSECURE = "insecure"  # records or denial without AD: no DANE (RFC 7672 §2.2)


@dataclass(frozen=True)
class TlsaState:
    """The TLSA lookup of one host at `name` (the TLSA base domain chosen, RFC 7672 §2.2.3)."""

    name: str
    secure: bool
    records: tuple[Tlsa, ...]
    ttl: int

    @property
    def status(self) -> TlsaStatus:
        if not self.secure:
            return TlsaStatus.INSECURE
        return TlsaStatus.SECURE if self.records else TlsaStatus.SECURE_NONE

    @property
    def usable(self) -> tuple[Tlsa, ...]:
        return tuple(record for record in self.records if record.usable)


@dataclass(frozen=True)
class HostState:
    """One MX host: its address lookup and its TLSA lookup (None: not asked)."""

    host: str
    address: AddressState | LookupFailure
    tlsa: TlsaState | LookupFailure | None


@dataclass(frozen=True)
class DaneInputs:
    """Everything the DANE decision for `domain` reads (answers/dane.py)."""

    domain: str
    mx: MxState | LookupFailure
    hosts: tuple[HostState, ...] = ()
