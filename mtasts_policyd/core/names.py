"""Domain names as the protocol sees them: normalising, validating, IDN to A-labels. Pure.

RFC 8461 §3.2 and §4.1 compare names case-insensitively (RFC 6125 rules) and always as A-labels;
MTAs hand us keys in whatever shape their next-hop syntax allows, so everything is folded here once.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Sequence

import idna

_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


def is_ip_literal(text: str) -> bool:
    """Whether `text` is an IPv4/IPv6 address (RFC 8461 §3.4: address literals have no policy)."""
    if ":" not in text and not text[-1:].isdigit():
        return False  # the common case, without ipaddress's exceptions
    candidate = text.removeprefix("ipv6:")
    try:
        ipaddress.ip_address(candidate)
    except ValueError:
        return False
    return True


def to_alabel(name: str) -> str | None:
    """Lowercase A-label form of a host name without trailing dot, or None if it is not one.

    IDNs are converted with UTS #46 mapping (IDNA 2008), which is what MTAs do for SMTPUTF8
    next hops; names that cannot be converted are not names we can look up.
    """
    name = name.strip().lower()
    # One trailing dot is the root (an absolute name); "a.." or "a.example...." are not names.
    name = name[:-1] if name.endswith(".") else name
    if not name or len(name) > 253:
        return None
    if not name.isascii():
        try:
            name = idna.encode(name, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError):
            return None
    labels = name.split(".")
    if not all(_LABEL.fullmatch(label) for label in labels):
        return None
    if labels[-1].isdigit():  # RFC 1123 §2.1: a top-level label is never all-numeric
        return None
    return name


@functools.lru_cache(maxsize=65536)  # MTAs ask for the same few destinations over and over
def clean_key(key: str) -> str | None:
    """The policy domain for an MTA lookup key, or None when the key can have no policy.

    Postfix sends the next hop verbatim: "Example.COM.", "[mx.example.com]:587",
    ".example.com" (its parent-domain walk, which RFC 8461 §3.4 forbids for MTA-STS) or an
    address literal. Only a plain domain after cleaning gets a policy lookup.
    """
    key = key.strip()
    if not key or key.startswith("."):
        return None
    if key.startswith("["):
        host, bracket, rest = key[1:].partition("]")
        if not bracket or (rest and not re.fullmatch(r":\d+", rest)):
            return None
        key = host
    elif key.count(":") == 1:
        key, _, port = key.partition(":")
        if not port.isdigit():
            return None
    if is_ip_literal(key):
        return None
    return to_alabel(key)


def mail_hosts(domain: str, exchanges: Sequence[str] | None) -> tuple[str, ...]:
    """The hosts that take `domain`'s mail, from its MX exchanges in preference order.

    `exchanges` None: the domain has no MX RRset, so the domain itself is the host (RFC 5321
    §5.1, RFC 7672 §2.2.2). A null MX ("." alone, RFC 7505 §3) means no host at all: `()`.
    Names are folded to lowercase without the root dot; a name listed twice counts once.
    """
    if exchanges is None:
        return (domain,)
    hosts: list[str] = []
    for exchange in exchanges:
        host = exchange.lower()
        host = host[:-1] if host.endswith(".") else host
        if host and host not in hosts:
            hosts.append(host)
    return tuple(hosts)


def policy_host(domain: str) -> str:
    """RFC 8461 §3.3: the host that serves `domain`'s policy, mta-sts.<domain>."""
    return f"mta-sts.{domain}"
