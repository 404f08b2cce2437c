"""Plain-data views of decisions, policies, failures and times, shared by `query`, `cache` and `warm`.

One rendering per idea, so the same policy or failure reads the same in every command's output
(JSON lines, or `text_lines` for people).
"""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING, Any

from mtasts_policyd.core.dane import HostState, LookupFailure, MxKind, TlsaState
from mtasts_policyd.core.dane_verdict import DaneBranch
from mtasts_policyd.core.errors import Failure
from mtasts_policyd.core.policy import Policy

if TYPE_CHECKING:
    from mtasts_policyd.resolution.dane import DaneGate
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
        if resolver.dane is not None:
            result["dane"] = dane_view(decision, resolver.dane)  # an override answers as configured
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
    if resolver.dane is not None:
        result["dane"] = dane_view(decision, resolver.dane)
    return result


# ----- DANE ----------------------------------------------------------------------------------------


def dane_view(decision: Decision, gate: DaneGate) -> dict[str, Any]:
    """DANE for one decision (`query`): the mode and the resolver's state, the verdict the answer
    applied (None: the MTA-STS answer alone), and the cached branch per MX host."""
    view: dict[str, Any] = {**gate.status()}
    view.pop("checked_at", None)
    applied = decision.dane_applied
    view["applied"] = applied.verdict.value if applied is not None else None
    if applied is not None and applied is not (decision.dane.decision if decision.dane else None):
        view["applied_reason"] = applied.reason  # a verdict of the gate's own (require, degraded)
    if decision.dane is not None:
        view.update(branch_view(decision.dane))
    return view


def branch_view(branch: DaneBranch) -> dict[str, Any]:
    """A cached DANE branch as plain data: verdict, why, how long, the MX RRset and every MX host."""
    mx = branch.inputs.mx
    return {
        "verdict": branch.verdict.value,
        "reason": branch.decision.reason,
        "ttl": branch.decision.ttl,
        "decided_at": iso_time(branch.decided_at),
        "expires_at": iso_time(branch.expires_at),
        "mx": {"failure": mx.detail} if isinstance(mx, LookupFailure) else {
            "kind": mx.kind.value, "secure": mx.secure, "hosts": list(mx.hosts), "ttl": mx.ttl},
        "hosts": [host_view(host) for host in branch.inputs.hosts],
    }


def mx_secure(branch: DaneBranch) -> bool | None:
    """Whether the MX RRset (or its authenticated absence) came with AD; None when it failed."""
    mx = branch.inputs.mx
    return None if isinstance(mx, LookupFailure) else mx.secure


def host_view(host: HostState) -> dict[str, Any]:
    """One MX host: whether its addresses are secure, its TLSA records and which are usable, TTLs."""
    address, tlsa = host.address, host.tlsa
    view: dict[str, Any] = {"host": host.host}
    if isinstance(address, LookupFailure):
        view["address"] = {"failure": address.detail}
    else:
        view["address"] = {"secure": address.secure, "addresses": list(address.addresses), "ttl": address.ttl}
    view["tlsa"] = tlsa_view(tlsa)
    return view


def tlsa_status(tlsa: TlsaState | LookupFailure | None) -> str:
    """secure, secure-none (authenticated: no TLSA), insecure, failed, or not-asked."""
    if tlsa is None:
        return "not-asked"
    if isinstance(tlsa, LookupFailure):
        return "failed"
    return tlsa.status.value


def tlsa_view(tlsa: TlsaState | LookupFailure | None) -> dict[str, Any]:
    view: dict[str, Any] = {"status": tlsa_status(tlsa)}
    if isinstance(tlsa, LookupFailure):
        view["failure"] = tlsa.detail
    elif tlsa is not None:
        view.update({"name": tlsa.name, "ttl": tlsa.ttl, "records": [
            {"record": str(record), "usable": record.usable, "unusable_reason": record.unusable_reason}
            for record in tlsa.records]})
    return view


def tlsa_summary(host: HostState) -> str:
    """One MX host's TLSA in a few words (survey cells, `query` lines): "mx.example: secure, 1 of 2 usable"."""
    tlsa = host.tlsa
    status = tlsa_status(tlsa)
    if isinstance(tlsa, TlsaState) and tlsa.records:
        status += f", {len(tlsa.usable)} of {len(tlsa.records)} usable"
    if isinstance(host.address, LookupFailure):
        status = "address lookup failed"
    elif not host.address.addresses:
        status = "no address"
    elif not host.address.secure:
        status += " (address insecure: not used)"
    return f"{host.host}: {status}"


def dane_text_lines(view: dict[str, Any]) -> list[str]:
    """The DANE part of `query`'s human output, one fact per line."""
    state = f"mode {view['mode']}, resolver {view['state']}"
    lines = [f"  dane: {view.get('applied') or 'not applied (MTA-STS answer alone)'} ({state})"]
    if view.get("applied_reason"):
        lines.append(f"  dane_applied_reason: {printable(view['applied_reason'])}")
    if view.get("state") == "degraded":
        lines.append(f"  dane_probe: {printable(str(view.get('detail', '')))}")
    return lines + branch_text_lines(view)


def branch_text_lines(view: dict[str, Any]) -> list[str]:
    """A cached DANE branch (branch_view) for people: verdict, MX RRset, each MX host and TLSA record."""
    if "verdict" not in view:
        return []
    lines = []
    lines.append(f"  dane_verdict: {view['verdict']} ({printable(view['reason'])}), ttl {view['ttl']}s, "
                 f"decided {view['decided_at']}, expires {view['expires_at']}")
    mx = view["mx"]
    if "failure" in mx:
        lines.append(f"  dane_mx: failed: {printable(mx['failure'])}")
    else:
        kind = {MxKind.IMPLICIT.value: "no MX: the domain itself", MxKind.NULL.value: "null MX"}.get(mx["kind"], "")
        what = kind or " ".join(mx["hosts"])
        lines.append(f"  dane_mx: {'secure' if mx['secure'] else 'insecure'} ttl {mx['ttl']}s: {printable(what)}")
    for host in view["hosts"]:
        address = host["address"]
        where = (f"failed: {address['failure']}" if "failure" in address else
                 f"{'secure' if address['secure'] else 'insecure'} {' '.join(address['addresses']) or '-'} "
                 f"ttl {address['ttl']}s")
        tlsa = host["tlsa"]
        lines.append(f"  dane_host: {host['host']} address {printable(where)}; tlsa {tlsa['status']}"
                     + (f" ttl {tlsa['ttl']}s" if "ttl" in tlsa else "")
                     + (f": {printable(tlsa['failure'])}" if "failure" in tlsa else ""))
        for record in tlsa.get("records", []):
            usable = "usable" if record["usable"] else f"unusable: {record['unusable_reason']}"
            lines.append(f"  dane_tlsa: {host['host']} {record['record']} {usable}")
    return lines


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
