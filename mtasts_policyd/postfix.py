"""Decision -> Postfix TLS policy (smtp_tls_policy_maps result syntax, postconf(5)). Pure.

Replies are chosen on purpose: Postfix defers mail on any lookup error (TEMP/PERM/TIMEOUT or an
unreachable map), so only a usable enforce policy yields a policy; everything without one is
NOTFOUND, which lets Postfix go on with its main.cf default (typically "may" or "dane").
"""

from __future__ import annotations

from dataclasses import dataclass

from .policy import Mode
from .resolution import Decision


@dataclass(frozen=True)
class MapOptions:
    """Per socketmap name, so one daemon serves Postfix instances of different versions."""

    testing_as_enforce: bool = False  # answer testing policies as if they were enforce
    sts_attributes: bool = False  # Postfix >= 3.10: policy_type=sts ... (TLSRPT; MX skipping in >= 3.10.5)
    servername: bool = True  # servername=hostname needs Postfix >= 3.4


def postfix_match(pattern: str) -> str:
    """MTA-STS "*.example.net" is Postfix ".example.net" (which Postfix reads as any depth)."""
    return pattern[1:] if pattern.startswith("*.") else pattern


def tls_policy(decision: Decision, options: MapOptions) -> str | None:
    """The policy text for an OK reply, or None for NOTFOUND."""
    policy = decision.policy
    if policy is None:
        return None
    if not (policy.mode is Mode.ENFORCE or (policy.mode is Mode.TESTING and options.testing_as_enforce)):
        return None  # RFC 8461 §5: testing and none do not change delivery
    parts = ["secure", "match=" + ":".join(postfix_match(p) for p in policy.mx)]
    if options.servername:
        parts.append("servername=hostname")  # RFC 8461 §7.1: SNI is the MX host name
    if options.sts_attributes:
        parts += ["policy_type=sts", f"policy_domain={decision.domain}"]
        parts += [f"mx_host_pattern={p}" for p in policy.mx]
        parts += [f"{{ policy_string = {line} }}" for line in policy.lines]
    return " ".join(parts)
