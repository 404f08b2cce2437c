"""Operator overrides: the day a big provider publishes a broken policy. Pure, no I/O.

An override replaces what MTA-STS discovery would say for one domain until it expires: either
"ignore" (deliver as if the domain had no policy) or "enforce" (use the policy written here).
Each carries a reason, shown in `query`, in the decision log line and in the metrics, so nobody
wonders later why a domain behaves unlike its published policy.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from mtasts_policyd.core.names import to_alabel
from mtasts_policyd.core.policy import Mode, Policy, mx_pattern


class OverrideError(ValueError):
    pass


@dataclass(frozen=True)
class Override:
    domain: str
    action: str  # "ignore" or "enforce"
    policy: Policy | None  # the forced policy for "enforce"
    reason: str
    expires_at: float | None  # epoch seconds; None: until removed from the configuration

    def active(self, now: float) -> bool:
        return self.expires_at is None or now < self.expires_at


def _expiry(text: str | None, domain: str) -> float | None:
    if text is None:
        return None
    try:
        when = datetime.datetime.fromisoformat(str(text))
    except ValueError:
        raise OverrideError(f"override {domain}: expires must be an ISO date or date-time, not {text!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return when.timestamp()


def make_override(domain: str, action: str, mx: tuple[str, ...] = (), reason: str = "",
                  expires: str | None = None, mode: str = "enforce") -> Override:
    """Validate one configured override; OverrideError says what is wrong in operator terms."""
    name = to_alabel(domain)
    if name is None:
        raise OverrideError(f"override {domain!r}: not a domain name")
    if not reason.strip():
        raise OverrideError(f"override {name}: a reason is required")
    if action == "ignore":
        return Override(name, action, None, reason, _expiry(expires, name))
    if action != "enforce":
        raise OverrideError(f"override {name}: action must be ignore or enforce, not {action!r}")
    patterns = []
    for value in mx:
        pattern = mx_pattern(value)  # the policy file's rule (RFC 8461 §3.2), "*.com" included
        if pattern is None:
            raise OverrideError(f"override {name}: mx {value!r} is not a host name pattern")
        patterns.append(pattern)
    if not patterns:
        raise OverrideError(f"override {name}: enforce needs at least one mx pattern")
    try:
        policy_mode = Mode(mode)
    except ValueError:
        raise OverrideError(f"override {name}: mode must be enforce or testing, not {mode!r}") from None
    lines = ("version: STSv1", f"mode: {policy_mode.value}", *(f"mx: {p}" for p in patterns), "max_age: 86400")
    policy = Policy(policy_mode, tuple(patterns), 86400, lines)
    return Override(name, action, policy, reason, _expiry(expires, name))
