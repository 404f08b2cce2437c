"""Plain-data views of decisions, policies, failures and times, shared by `query`, `cache` and `warm`.

One rendering per idea, so the same policy or failure reads the same in every command's output
(JSON lines, or `text_lines` for people).
"""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING, Any

from mtasts_policyd.core.errors import Failure
from mtasts_policyd.core.policy import Policy

if TYPE_CHECKING:
    from mtasts_policyd.resolution.resolver import Decision, PolicyResolver


def iso_time(value: float | None) -> str | None:
    """ISO 8601 UTC to the second; None for unset (None or 0)."""
    if not value:
        return None
    return datetime.datetime.fromtimestamp(value, datetime.timezone.utc).isoformat(timespec="seconds")


def policy_fields(policy: Policy | None) -> dict[str, Any]:
    return {"mode": policy.mode.value if policy else None,
            "mx": list(policy.mx) if policy else [],
            "max_age": policy.max_age if policy else None}


def failure_fields(failure: Failure | None) -> dict[str, Any] | None:
    if failure is None:
        return None
    return {"kind": failure.kind.value, "detail": failure.detail,
            "tlsrpt_result_type": failure.kind.tlsrpt_result_type}


def decision_view(key: str, decision: Decision | None, answer: str, resolver: PolicyResolver) -> dict[str, Any]:
    """Everything known about one looked-up key, as plain data (`query`'s output, README
    "Command line"): the answer, the decision's reasons, the cached entry and the trust store."""
    result: dict[str, Any] = {"key": key, "answer": answer}
    if decision is None:
        result["reason"] = "not-a-policy-domain"
        return result
    if decision.override is not None:
        o = decision.override
        result.update({"domain": decision.domain, "reason": decision.reason, "cache": decision.state.value,
                       "override": {"action": o.action, "reason": o.reason, "expires_at": iso_time(o.expires_at)}})
        if decision.policy is not None:
            result.update({"mode": decision.policy.mode.value, "mx": list(decision.policy.mx)})
        return result
    entry = resolver.cache.get(decision.domain)
    policy = decision.policy
    shown = policy or (entry.policy if entry else None)  # the usable policy, else the expired one
    result.update({
        "domain": decision.domain,
        "reason": decision.reason,
        "cache": decision.state.value,
        "txt_record": entry.txt_record if entry else None,
        "policy_id": decision.policy_id,
        **policy_fields(shown),
        "fetched_at": iso_time(decision.fetched_at),
        "expires_at": iso_time(decision.expires_at),
        "usable": policy is not None,
        "failure": failure_fields(decision.failure),
        "retry_after": iso_time(entry.retry_after) if entry else None,
        "warnings": list(shown.warnings) if shown else [],
        "trust_store": resolver.trust.fields(),  # what verifies (or verified) the policy host
    })
    return result


def printable(text: str) -> str:
    """Escape control characters: bodies, records and details come from other people's servers."""
    return "".join(c if c.isprintable() or c == "\t" else repr(c)[1:-1] for c in text)


# Lists of names read best on one line; lists of sentences (warnings) need a clear separator.
_NAME_LISTS = frozenset({"mx", "mx_hosts"})


def text_value(key: str, value: Any) -> str:
    """One value of a plain-data view as a human reads it: never a Python repr."""
    if value is None or value == "" or value == [] or value == {}:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict) and "kind" in value:  # a failure (failure_fields)
        tlsrpt = value.get("tlsrpt_result_type")
        return f"{value['kind']}: {value.get('detail', '')}" + (f" (TLSRPT {tlsrpt})" if tlsrpt else "")
    if isinstance(value, dict):
        return ", ".join(f"{k} {text_value(k, v)}" for k, v in value.items())
    if isinstance(value, list):
        return (" " if key in _NAME_LISTS else "; ").join(printable(str(item)) for item in value)
    return printable(str(value))


def text_lines(info: dict[str, Any], skip: tuple[str, ...] = ()) -> list[str]:
    """`  key: value` lines for every field of a view but `skip`, empty values shown as "-"."""
    return [f"  {key}: {text_value(key, value)}" for key, value in info.items() if key not in skip]
