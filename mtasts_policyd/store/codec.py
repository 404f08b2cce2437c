"""How an Entry is written down, in one module: as a SQLite row, and as a record of a JSON export.

The row codec trusts what it reads back (this program wrote it) except the policy body, which is
parsed again: a body that no longer parses (a stricter parser after an upgrade) is ignored, not
applied. The export codec trusts nothing: `entry_from_record` checks every field of a record from
a file an operator may have edited, and says why one is refused (ValueError).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
from collections.abc import Iterable
from typing import Any

from mtasts_policyd.core.dane import (
    AddressState,
    DaneInputs,
    HostState,
    LookupFailure,
    MxKind,
    MxState,
    Tlsa,
    TlsaState,
)
from mtasts_policyd.core.dane_verdict import DaneBranch, DaneDecision, Verdict
from mtasts_policyd.core.errors import (
    Failure,
    FailureKind,
    InvalidPolicy,
    InvalidRecord,
)
from mtasts_policyd.core.names import to_alabel
from mtasts_policyd.core.policy import parse_policy
from mtasts_policyd.core.sts_record import parse_sts_record, valid_id
from mtasts_policyd.store.entry import Entry

log = logging.getLogger("mtasts_policyd.cache")  # the cache's log lines, wherever they are written

# ----- SQLite rows -----------------------------------------------------------------------------

# The DANE branch's five columns (added to older files by sqlite.py's migration): the verdict and its
# reason, when it was decided and until when it holds (pruning reads these without JSON), and what it
# was decided on (the MX, address and TLSA lookups, as JSON), which `query` shows per MX host.
DANE_COLUMNS = ("dane_verdict", "dane_reason", "dane_decided_at", "dane_expires_at", "dane_inputs")
COLUMNS = ("domain", "txt_record", "policy_id", "policy_body", "fetched_at", "txt_expires_at", "negative_until",
           "failure_kind", "failure_detail", "failure_at", "failures", "retry_after", "last_lookup", "mx_hosts",
           "mx_expires_at", *DANE_COLUMNS, "version")


def to_row(e: Entry) -> tuple[object, ...]:
    """The values of COLUMNS for an entry (the parsed policy is not stored: its body is)."""
    return (e.domain, e.txt_record, e.policy_id, e.policy_body, e.fetched_at, e.txt_expires_at, e.negative_until,
            e.failure.kind.value if e.failure else None, e.failure.detail if e.failure else None,
            e.failure_at, e.failures, e.retry_after, e.last_lookup,
            " ".join(e.mx_hosts) if e.mx_hosts is not None else None, e.mx_expires_at, *dane_columns(e.dane),
            e.version)


def from_row(row: tuple) -> Entry:
    """The entry a row of COLUMNS holds; a stored body that no longer parses gives no policy, a
    stored DANE branch that does not read back no branch (it is asked again)."""
    values = dict(zip(COLUMNS, row))
    kind, detail = values.pop("failure_kind"), values.pop("failure_detail")
    mx_hosts = values.pop("mx_hosts")
    dane = dane_from_columns(values["domain"], *(values.pop(column) for column in DANE_COLUMNS))
    body = values["policy_body"]
    policy = None
    if body is not None:
        try:
            policy = parse_policy(bytes(body))
        except InvalidPolicy:
            log.warning("cache domain=%s stored policy no longer parses; ignored", values["domain"])
    failure = Failure(FailureKind(kind), detail or "") if kind else None
    return Entry(policy=policy, failure=failure, mx_hosts=tuple(mx_hosts.split()) if mx_hosts is not None else None,
                 dane=dane, **values)


# ----- the DANE branch in a row ----------------------------------------------------------------



def dane_columns(branch: DaneBranch | None) -> tuple[object, ...]:
    """The values of DANE_COLUMNS (NULLs and 0 without a branch)."""
    if branch is None:
        return None, None, None, 0.0, None
    return (branch.verdict.value, branch.decision.reason, branch.decided_at, branch.expires_at,
            json.dumps(dane_inputs_json(branch.inputs), separators=(",", ":")))


def dane_from_columns(domain: str, verdict: str | None, reason: str | None, decided_at: float | None,
                      expires_at: float, inputs: str | None) -> DaneBranch | None:
    """The branch DANE_COLUMNS hold, or None (none stored, or written by a version this one cannot read)."""
    if verdict is None or decided_at is None or inputs is None:
        return None
    try:
        decision = DaneDecision(domain, Verdict(verdict), max(round(expires_at - decided_at), 0), reason or "")
        return DaneBranch(decision, dane_inputs_from_json(domain, json.loads(inputs)), decided_at)
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("cache domain=%s stored DANE branch unreadable (%s); asked again", domain, exc)
        return None


def _failure_json(failure: LookupFailure) -> dict[str, Any]:
    return {"failure": {"name": failure.name, "rdtype": failure.rdtype, "detail": failure.detail}}


def _failure_from(data: dict[str, Any]) -> LookupFailure:
    failure = data["failure"]
    return LookupFailure(str(failure["name"]), str(failure["rdtype"]), str(failure["detail"]))


def dane_inputs_json(inputs: DaneInputs) -> dict[str, Any]:
    """What the DANE decision read, as JSON (TLSA data in hex)."""
    mx = inputs.mx
    hosts = []
    for host in inputs.hosts:
        address, tlsa = host.address, host.tlsa
        hosts.append({
            "host": host.host,
            "address": _failure_json(address) if isinstance(address, LookupFailure) else {
                "secure": address.secure, "addresses": list(address.addresses), "canonical": address.canonical,
                "ttl": address.ttl},
            "tlsa": None if tlsa is None else _failure_json(tlsa) if isinstance(tlsa, LookupFailure) else {
                "name": tlsa.name, "secure": tlsa.secure, "ttl": tlsa.ttl,
                "records": [[r.usage, r.selector, r.matching, r.data.hex()] for r in tlsa.records]},
        })
    return {"mx": _failure_json(mx) if isinstance(mx, LookupFailure) else {
        "kind": mx.kind.value, "secure": mx.secure, "hosts": list(mx.hosts), "ttl": mx.ttl}, "hosts": hosts}


def dane_inputs_from_json(domain: str, data: dict[str, Any]) -> DaneInputs:
    """dane_inputs_json read back; KeyError, ValueError or TypeError when it is not one."""
    raw_mx = data["mx"]
    mx: MxState | LookupFailure = _failure_from(raw_mx) if "failure" in raw_mx else MxState(
        MxKind(raw_mx["kind"]), bool(raw_mx["secure"]), tuple(map(str, raw_mx["hosts"])), int(raw_mx["ttl"]))
    hosts = []
    for raw in data["hosts"]:
        a, t = raw["address"], raw["tlsa"]
        address: AddressState | LookupFailure = _failure_from(a) if "failure" in a else AddressState(
            bool(a["secure"]), tuple(map(str, a["addresses"])), str(a["canonical"]), int(a["ttl"]))
        tlsa: TlsaState | LookupFailure | None = None if t is None else _failure_from(t) if "failure" in t \
            else TlsaState(str(t["name"]), bool(t["secure"]),
                           tuple(Tlsa(int(u), int(s), int(m), bytes.fromhex(d)) for u, s, m, d in t["records"]),
                           int(t["ttl"]))
        hosts.append(HostState(str(raw["host"]), address, tlsa))
    return DaneInputs(domain, mx, tuple(hosts))


# ----- JSON export and import ------------------------------------------------------------------

EXPORT_FORMAT = "mtasts-policyd-cache"
EXPORT_VERSION = 1
FUTURE_SLACK = 300  # seconds of clock skew tolerated in an imported fetched_at

# Record keys of an export, and the Entry defaults a missing key stands for.
RECORD_KEYS = ("domain", "txt_record", "policy_id", "policy_body", "policy_body_encoding", "fetched_at",
               "txt_expires_at", "negative_until", "failure", "failure_at", "failures", "retry_after",
               "last_lookup", "mx_hosts", "mx_expires_at")


class ExportFormatError(ValueError):
    """A document that is not a cache export this version reads (one line for the operator)."""


def body_fields(body: bytes | None) -> dict[str, Any]:
    """A raw policy body as JSON: text when it is UTF-8, else base64 (the export keeps it exact)."""
    if body is None:
        return {"policy_body": None}
    try:
        return {"policy_body": body.decode("utf-8"), "policy_body_encoding": "text"}
    except UnicodeDecodeError:
        return {"policy_body": base64.b64encode(body).decode("ascii"), "policy_body_encoding": "base64"}


def export_record(entry: Entry) -> dict[str, Any]:
    """One entry, exactly: times are seconds since the epoch, the body is the raw policy file."""
    record: dict[str, Any] = {"domain": entry.domain, "txt_record": entry.txt_record, "policy_id": entry.policy_id}
    record.update(body_fields(bytes(entry.policy_body) if entry.policy_body is not None else None))
    record.update({
        "fetched_at": entry.fetched_at,
        "txt_expires_at": entry.txt_expires_at,
        "negative_until": entry.negative_until,
        "failure": {"kind": entry.failure.kind.value, "detail": entry.failure.detail} if entry.failure else None,
        "failure_at": entry.failure_at,
        "failures": entry.failures,
        "retry_after": entry.retry_after,
        "last_lookup": entry.last_lookup,
        "mx_hosts": list(entry.mx_hosts) if entry.mx_hosts is not None else None,
        "mx_expires_at": entry.mx_expires_at,
    })
    return record


def export_document(entries: Iterable[Entry], now: float) -> dict[str, Any]:
    """The whole export: a format name and version that `import` checks, and one record per entry."""
    return {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "exported_at": now,
            "entries": [export_record(entry) for entry in entries]}


def document_records(text: str, name: str) -> list[Any]:
    """The records of an export document (not yet validated: see entry_from_record); `name` (the
    file) goes into the ExportFormatError that says why the document is not one."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ExportFormatError(f"{name} is not JSON: {exc}") from None
    if not isinstance(document, dict) or document.get("format") != EXPORT_FORMAT:
        raise ExportFormatError(f"{name} is not an mtasts-policyd cache export (no \"format\": \"{EXPORT_FORMAT}\")")
    if document.get("version") != EXPORT_VERSION:
        raise ExportFormatError(f"{name} has export format version {document.get('version')!r}; "
                                f"this version reads {EXPORT_VERSION}")
    entries = document.get("entries")
    if not isinstance(entries, list):
        raise ExportFormatError(f"{name}: \"entries\" must be a list")
    return entries


def _time_field(record: dict[str, Any], key: str) -> float:
    """A stored time that defaults to 0 (never)."""
    value = _optional_time_field(record, key)
    return 0.0 if value is None else value


def _optional_time_field(record: dict[str, Any], key: str) -> float | None:
    value = record.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{key} must be seconds since the epoch, not {value!r}")
    return float(value)


def _text_field(record: dict[str, Any], key: str) -> str | None:
    value = record.get(key)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{key} must be a string or null")
    return value


def entry_from_record(record: Any, now: float) -> Entry:
    """Validate one export record (ValueError says why not) and build the entry it describes."""
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    unknown = sorted(set(record) - set(RECORD_KEYS))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)}")
    name = record.get("domain")
    domain = to_alabel(name) if isinstance(name, str) else None
    if domain is None:
        raise ValueError(f"domain {name!r} is not a domain name")
    policy_id, txt_record = _text_field(record, "policy_id"), _text_field(record, "txt_record")
    if txt_record is not None:
        try:
            parsed = parse_sts_record(txt_record)
        except InvalidRecord as exc:
            raise ValueError(f"txt_record is not a valid STSv1 record: {exc.detail}") from None
        if policy_id is not None and parsed.id != policy_id:
            raise ValueError(f"policy_id {policy_id!r} is not the id of txt_record ({parsed.id!r})")
    elif policy_id is not None and not valid_id(policy_id):
        raise ValueError(f"policy_id: id is not 1-32 letters and digits: {policy_id[:40]!r} (RFC 8461 §3.1)")
    body_text, encoding = _text_field(record, "policy_body"), record.get("policy_body_encoding", "text")
    body, policy = None, None
    if body_text is not None:
        if encoding == "text":
            body = body_text.encode("utf-8")
        elif encoding == "base64":
            try:
                body = base64.b64decode(body_text, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError("policy_body is not valid base64") from None
        else:
            raise ValueError(f"policy_body_encoding must be text or base64, not {encoding!r}")
        try:
            policy = parse_policy(body)
        except InvalidPolicy as exc:
            raise ValueError(f"policy_body is not a valid policy: {exc.detail}") from None
    fetched_at = _optional_time_field(record, "fetched_at")
    if body is not None and fetched_at is None:
        raise ValueError("a policy_body needs fetched_at (its max_age counts from the fetch)")
    if fetched_at is not None and fetched_at > now + FUTURE_SLACK:
        raise ValueError("fetched_at is in the future (it would stretch the policy's max_age)")
    failure = record.get("failure")
    if failure is not None:
        if not isinstance(failure, dict) or set(failure) - {"kind", "detail"}:
            raise ValueError("failure must be null or {\"kind\": ..., \"detail\": ...}")
        try:
            kind = FailureKind(failure.get("kind"))
        except ValueError:
            raise ValueError(f"unknown failure kind {failure.get('kind')!r}") from None
        detail = failure.get("detail", "")
        if not isinstance(detail, str):
            raise ValueError("failure detail must be a string")
        failure = Failure(kind, detail)
    failures = record.get("failures", 0)
    if isinstance(failures, bool) or not isinstance(failures, int) or failures < 0:
        raise ValueError(f"failures must be a count, not {failures!r}")
    mx_hosts = record.get("mx_hosts")
    if mx_hosts is not None:
        if not isinstance(mx_hosts, list) or not all(isinstance(h, str) and to_alabel(h) for h in mx_hosts):
            raise ValueError("mx_hosts must be null or a list of host names")
        mx_hosts = tuple(to_alabel(h) for h in mx_hosts)
    # A record must say something: a record with only a domain (a hand-edited or truncated file)
    # would be counted as imported while it stores an entry that knows nothing.
    if all(record.get(key) in (None, 0) for key in ("policy_body", "negative_until", "failure")):
        raise ValueError("holds nothing to import: no policy_body, negative_until or failure")
    return Entry(domain, txt_record=txt_record, policy_id=policy_id, policy_body=body, policy=policy,
                 fetched_at=fetched_at, txt_expires_at=_time_field(record, "txt_expires_at"),
                 negative_until=_time_field(record, "negative_until"), failure=failure,
                 failure_at=_optional_time_field(record, "failure_at"), failures=failures,
                 retry_after=_time_field(record, "retry_after"), last_lookup=_time_field(record, "last_lookup"),
                 mx_hosts=mx_hosts, mx_expires_at=_time_field(record, "mx_expires_at"))
