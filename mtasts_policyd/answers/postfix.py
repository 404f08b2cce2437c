"""Decision -> Postfix TLS policy (smtp_tls_policy_maps result syntax, postconf(5)). Pure.

Replies are chosen on purpose: Postfix defers mail on any lookup error (TEMP/PERM/TIMEOUT or an
unreachable map), so only a usable enforce policy yields a policy; everything without one is
NOTFOUND, which lets Postfix go on with its main.cf default (typically "may" or "dane").
"""

from __future__ import annotations

from dataclasses import dataclass

from mtasts_policyd.core.policy import Mode, Policy, mx_matches
from mtasts_policyd.resolution.resolver import Decision

# A name no certificate can carry (RFC 6761 .invalid): the answer when no MX host of the domain
# matches the enforce policy, so that Postfix defers instead of trusting some other name.
NO_MATCHING_MX = "no-mx-matches-the-mta-sts-policy.invalid"


@dataclass(frozen=True)
class MapOptions:
    """Per socketmap name, so one daemon serves Postfix instances of different versions."""

    testing_as_enforce: bool = False  # answer testing policies as if they were enforce
    sts_attributes: bool = False  # Postfix >= 3.10: policy_type=sts ... (TLSRPT; MX skipping in >= 3.10.5)
    servername: bool = True  # servername=hostname needs Postfix >= 3.4
    exact_wildcards: bool = True  # answer "*.x" with the MX hosts that match it, not ".x"


def postfix_match(pattern: str) -> str:
    """MTA-STS "*.example.net" is Postfix ".example.net" (which Postfix reads as any depth)."""
    return pattern[1:] if pattern.startswith("*.") else pattern


def match_names(policy: Policy, mx_hosts: tuple[str, ...] | None, exact_wildcards: bool) -> list[str]:
    """The match= names: policy patterns in order, "*." patterns expanded to matching MX hosts.

    Postfix checks the server certificate against these names. Postfix < 3.10.5 reads ".x" as any
    depth below x, RFC 8461 §4.1 allows one label: the domain's current MX hosts that match the
    wildcard (kept in step with the MX TTL by the resolver) say exactly what is allowed.
    """
    names: list[str] = []
    for pattern in policy.mx:
        if not pattern.startswith("*."):
            candidates = [pattern]
        elif exact_wildcards and mx_hosts is not None:
            candidates = [host for host in mx_hosts if mx_matches(pattern, host)]
        else:
            candidates = [postfix_match(pattern)]  # MX hosts not known (yet): the looser Postfix form
        names += [name for name in candidates if name not in names]
    return names or [NO_MATCHING_MX]


def tls_policy(decision: Decision, options: MapOptions) -> str | None:
    """The policy text for an OK reply, or None for NOTFOUND."""
    policy = decision.policy
    if policy is None:
        return None
    if not (policy.mode is Mode.ENFORCE or (policy.mode is Mode.TESTING and options.testing_as_enforce)):
        return None  # RFC 8461 §5: testing and none do not change delivery
    parts = ["secure", "match=" + ":".join(match_names(policy, decision.mx_hosts, options.exact_wildcards))]
    if options.servername:
        parts.append("servername=hostname")  # RFC 8461 §7.1: SNI is the MX host name
    if options.sts_attributes:
        parts += ["policy_type=sts", f"policy_domain={decision.domain}"]
        parts += [f"mx_host_pattern={p}" for p in policy.mx]
        parts += [f"{{ policy_string = {line} }}" for line in policy.lines]
    return " ".join(parts)
