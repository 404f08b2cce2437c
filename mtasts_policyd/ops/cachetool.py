"""What `mtasts-policyd cache ...` does to a PolicyCache: list, show, forget, export and import.

The command line (commands/cache.py) opens the cache and prints; these functions take the open
cache and return plain data. Every write goes through the cache's versioned put (a write based on
a stale read is detected, not lost), and a running daemon notices another process's writes within
about a second, so `forget` and `import` take effect there without a restart.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from mtasts_policyd.core.errors import InvalidPolicy
from mtasts_policyd.core.policy import parse_policy
from mtasts_policyd.ops.views import branch_view, failure_fields, iso_time, policy_fields
from mtasts_policyd.store.base import CacheWriteError
from mtasts_policyd.store.cache import PolicyCache
from mtasts_policyd.store.codec import body_fields, entry_from_record, export_document
from mtasts_policyd.store.entry import Entry, EntryState, merge, supersedes

# ----- list and show ---------------------------------------------------------------------------


def _body_error(entry: Entry) -> str | None:
    """Why a stored policy body does not parse (any more), or None."""
    if entry.policy_body is None or entry.policy is not None:
        return None
    try:
        parse_policy(bytes(entry.policy_body))
    except InvalidPolicy as exc:
        return exc.detail
    return None


def summary(entry: Entry, now: float) -> dict[str, Any]:
    """The `list` fields of one entry."""
    expires = entry.expires_at if entry.expires_at is not None else entry.negative_until
    return {
        "domain": entry.domain,
        "state": entry.state(now).value,
        "mode": entry.policy.mode.value if entry.policy else None,
        "policy_id": entry.policy_id,
        "expires_at": iso_time(expires),
        "last_lookup": iso_time(entry.last_lookup),
        "failure": entry.failure.kind.value if entry.failure else None,
        "retry_after": iso_time(entry.retry_after) if now < entry.retry_after else None,
    }


def listing(entries: Iterable[Entry], now: float, mode: str | None = None,
            state: str | None = None) -> list[dict[str, Any]]:
    """The `list` fields of the entries whose cached policy has `mode` (usable or expired) and
    whose state is `state` (None: any)."""
    rows = []
    for entry in entries:
        info = summary(entry, now)
        if (mode and info["mode"] != mode) or (state and info["state"] != state):
            continue
        rows.append(info)
    return rows


def details(entry: Entry, now: float) -> dict[str, Any]:
    """Everything the cache holds for one domain (all but the row version), times in UTC."""
    policy = entry.policy
    info: dict[str, Any] = {
        "domain": entry.domain,
        "state": entry.state(now).value,
        "txt_record": entry.txt_record,
        "policy_id": entry.policy_id,
        **policy_fields(policy),
        "fetched_at": iso_time(entry.fetched_at),
        "expires_at": iso_time(entry.expires_at),
        "txt_expires_at": iso_time(entry.txt_expires_at),
        "mx_hosts": list(entry.mx_hosts) if entry.mx_hosts is not None else None,
        "mx_expires_at": iso_time(entry.mx_expires_at),
        "negative_until": iso_time(entry.negative_until),
        "failure": failure_fields(entry.failure),
        "failure_at": iso_time(entry.failure_at),
        "failures": entry.failures,
        "retry_after": iso_time(entry.retry_after),
        "last_lookup": iso_time(entry.last_lookup),
        "warnings": list(policy.warnings) if policy else [],
        "policy_error": _body_error(entry),
        "dane": branch_view(entry.dane) if entry.dane is not None else None,  # the DANE half (README "DANE")
    }
    info.update(body_fields(bytes(entry.policy_body) if entry.policy_body is not None else None))
    return info


# ----- forget ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Forgotten:
    """What `forget` did to one domain."""

    found: bool  # the cache held it
    state: str  # its state before, in the words of `cache list` ("unknown" if not read)
    policy_id: str | None

    @property
    def unprotected(self) -> bool:
        """A usable enforce policy is gone: until the next fetch, an attacker who blocks that fetch
        can downgrade delivery (RFC 8461 §10)."""
        return self.state == EntryState.ENFORCE.value


def forget(cache: PolicyCache, domain: str, now: float) -> Forgotten:
    """Delete one domain (CacheWriteError from a strict cache whose disk refuses it)."""
    entry = cache.reload(domain)
    found = cache.delete(domain)
    return Forgotten(found, entry.state(now).value if entry is not None else "unknown",
                     entry.policy_id if entry is not None else None)


# ----- export and import -----------------------------------------------------------------------


def export(cache: PolicyCache, now: float) -> dict[str, Any]:
    """The whole cache as one export document (one SELECT: a consistent snapshot)."""
    return export_document(cache.entries(), now)


@dataclass
class Validated:
    """The records of an export: the entries to import, and why the others were refused."""

    entries: list[Entry] = field(default_factory=list)
    invalid: list[tuple[int, Any, str]] = field(default_factory=list)  # (number from 1, domain or None, why)


def validate(records: list[Any], now: float) -> Validated:
    result = Validated()
    for number, record in enumerate(records, 1):
        try:
            result.entries.append(entry_from_record(record, now))
        except ValueError as exc:
            name = record.get("domain") if isinstance(record, dict) else None
            result.invalid.append((number, name, str(exc)))
    return result


def import_entry(cache: PolicyCache, entry: Entry, attempts: int = 5) -> str:
    """Write an imported entry unless the cache holds a policy fetched at the same time or later.

    The merge rule of every write (entry.merge: the later policy fetch wins whole), with ties going
    to the stored entry so that importing the same export twice changes nothing. The write is the
    cache's versioned put: if a daemon writes the domain between our read and our write, we read
    again and decide again. Returns "imported", "kept" or "conflict".
    """
    for _ in range(attempts):
        current = cache.reload(entry.domain)
        if current is not None and supersedes(current, entry, ties_to_current=True):
            return "kept"
        if cache.put(merge(current, entry, ties_to_current=True)) is not None:
            return "imported"
    return "conflict"


def import_entries(cache: PolicyCache, entries: Iterable[Entry]) -> tuple[dict[str, int], list[str]]:
    """Import each entry: counts of imported, kept, conflict and failed, and the write errors."""
    counts = {"imported": 0, "kept": 0, "conflict": 0, "failed": 0}
    errors = []
    for entry in entries:
        try:
            counts[import_entry(cache, entry)] += 1
        except CacheWriteError as exc:
            errors.append(str(exc))
            counts["failed"] += 1
    return counts, errors

