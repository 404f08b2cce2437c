"""The DANE decision for one next-hop domain (issue 9; RFC 8461 §2, RFC 7672): from what DNSSEC
says about it to a verdict, how long that verdict holds, and the verdict as cached (`DaneBranch`).
Pure: the lookups are net/dane_lookup.py's job, the replies answers/dane.py's.

Why in core and not beside the replies: the resolution layer decides and caches the verdict, and
may not import the outer answers layer (README "Layout").

RFC 8461 §2: a sender that supports DANE must never let MTA-STS override a failing DANE validation.
Postfix replaces its DANE level by a found policy-map entry, so the answer for a domain with DANE
must itself say "dane" (or "dane-only"), and a DNS state that cannot be known must defer (TEMP),
never fall back to the MTA-STS answer. Only where no MX host has secure TLSA records does the
MTA-STS answer stand unchanged.

| DNS state | verdict |
|---|---|
| MX lookup failed (SERVFAIL = bogus or lame, timeout, REFUSED) | TEMP |
| an address or TLSA lookup needed for the decision failed | TEMP |
| MX RRset secure, every MX host secure with at least one usable TLSA | DANE_ONLY |
| some MX host has a secure TLSA RRset, but not the row above | DANE |
| no MX host has a secure TLSA RRset (authenticated denial, or insecure) | NONE |
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from mtasts_policyd.core.dane import (
    AddressState,
    DaneInputs,
    HostState,
    LookupFailure,
    MxKind,
    TlsaState,
)
from mtasts_policyd.core.limits import limits

MAX_REASON = 200  # a TEMP reason ends up in one log line of the MTA


class Verdict(enum.Enum):
    DANE_ONLY = "dane-only"  # Postfix "dane-only": DANE authentication required for every MX host
    DANE = "dane"  # Postfix "dane": DANE where the host has usable TLSA, else opportunistic TLS
    NONE = "none"  # DANE does not apply: the MTA-STS answer unchanged
    TEMP = "temp"  # DNSSEC state unknown: defer, never a silent downgrade to MTA-STS


@dataclass(frozen=True)
class DaneTtl:
    """How long a verdict may be kept: the minimum TTL of the records that decided it, clamped to
    [min, max], so a domain that publishes TLSA is seen within its DNS TTL (issue 9); a TEMP
    verdict is kept `temp` seconds only (the next mail asks again)."""

    min: int = field(default=60, metadata=limits(min=0, max=86400))
    max: int = field(default=3600, metadata=limits(min=1, max=86400))
    temp: int = field(default=5, metadata=limits(min=0, max=60))


@dataclass(frozen=True)
class DaneDecision:
    """The verdict for one domain, how long it holds, and why (for logs and `query`)."""

    domain: str
    verdict: Verdict
    ttl: int
    reason: str


def decide(inputs: DaneInputs, ttl: DaneTtl = DaneTtl()) -> DaneDecision:
    """The decision table of the module docstring for one next-hop domain."""
    domain, mx = inputs.domain, inputs.mx

    def verdict(kind: Verdict, reason: str, ttls: list[int]) -> DaneDecision:
        return DaneDecision(domain, kind, min(max(min(ttls), ttl.min), ttl.max), reason)

    if isinstance(mx, LookupFailure):
        # RFC 7672 §2.1.1: a bogus or indeterminate answer (SERVFAIL) is a failure, not "no DANE".
        return _temp(domain, mx, ttl)
    if mx.kind is MxKind.NULL:
        # RFC 7505 §3: a null MX takes no mail; there is no TLS policy to give.
        return verdict(Verdict.NONE, "null MX: the domain takes no mail", [mx.ttl])
    ttls = [mx.ttl]
    secure_tlsa: list[HostState] = []  # hosts with a secure TLSA RRset
    usable: list[HostState] = []  # hosts with a secure TLSA RRset holding at least one usable record
    candidates = 0  # hosts with addresses: the ones a delivery can reach
    for host in inputs.hosts:
        address = host.address
        if isinstance(address, LookupFailure):
            return _temp(domain, address, ttl)  # is the host secure? cannot know: defer
        ttls.append(address.ttl)
        if not address.addresses:
            continue  # no address (authenticated or not): not a candidate for delivery
        candidates += 1
        tlsa = _needed_tlsa(address, host.tlsa)
        if isinstance(tlsa, LookupFailure):
            # RFC 7672 §2.1.1, §2.2: a failed TLSA lookup of a secure host is not "no TLSA".
            return _temp(domain, tlsa, ttl)
        if tlsa is None:
            continue
        ttls.append(tlsa.ttl)
        if tlsa.secure and tlsa.records:
            secure_tlsa.append(host)
            if tlsa.usable:
                usable.append(host)
    if not candidates:
        return verdict(Verdict.NONE, "no MX host has an address", ttls)
    # RFC 7672 §2.2.1: only a secure MX RRset lets DANE be required for the domain as a whole;
    # every reachable host must then offer usable TLSA (RFC 7672 §3.1), else some hosts are only
    # opportunistic and "dane" is the honest answer.
    if mx.secure and len(usable) == candidates:
        return verdict(Verdict.DANE_ONLY, f"MX secure, {candidates} of {candidates} hosts with usable TLSA", ttls)
    if secure_tlsa:
        why = _why_not_dane_only(mx.secure, candidates, len(secure_tlsa), len(usable))
        return verdict(Verdict.DANE, f"{len(secure_tlsa)} of {candidates} hosts with secure TLSA ({why})", ttls)
    return verdict(Verdict.NONE, "no MX host has a secure TLSA RRset", ttls)


def _needed_tlsa(address: AddressState, tlsa: TlsaState | LookupFailure | None) -> TlsaState | LookupFailure | None:
    """The TLSA lookup that counts for a host, or None when it does not.

    RFC 7672 §2.2.2: TLSA records only apply to a host whose address records are secure; for an
    insecure host they are not used, so its TLSA lookup (even a failed one) is not needed.
    """
    if not address.secure:
        return None
    if isinstance(tlsa, TlsaState) and not tlsa.secure:
        return None  # RFC 7672 §2.2: insecure TLSA records are ignored
    return tlsa


def _why_not_dane_only(mx_secure: bool, candidates: int, secure: int, usable: int) -> str:
    if not mx_secure:
        return "MX RRset insecure"
    if usable < secure:
        return "only unusable TLSA at some hosts"
    return f"{candidates - secure} hosts without secure TLSA"


def _temp(domain: str, failure: LookupFailure, ttl: DaneTtl) -> DaneDecision:
    return temp_decision(domain, f"DNSSEC lookup failed: {failure}", ttl)


def temp_decision(domain: str, reason: str, ttl: DaneTtl = DaneTtl()) -> DaneDecision:
    """A TEMP verdict: the DNSSEC state of the domain cannot be known now; kept `ttl.temp` seconds."""
    return DaneDecision(domain, Verdict.TEMP, ttl.temp, _one_line(reason))


def _one_line(text: str) -> str:
    """A reason fit for one reply line: printable ASCII, no line breaks, bounded."""
    clean = "".join(c if " " <= c <= "~" else " " for c in text)
    return " ".join(clean.split())[:MAX_REASON]


@dataclass(frozen=True)
class DaneBranch:
    """The DANE half of what is cached for a domain, beside the MTA-STS half: the decision, what
    it was decided on (`query` shows it per MX host) and when. It holds `decision.ttl` seconds."""

    decision: DaneDecision
    inputs: DaneInputs
    decided_at: float

    @property
    def verdict(self) -> Verdict:
        return self.decision.verdict

    @property
    def expires_at(self) -> float:
        return self.decided_at + self.decision.ttl
