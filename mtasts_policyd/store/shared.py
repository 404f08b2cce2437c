"""The fleet's shared level (README "Fleet (Redis)"): what a shared store does, and its rules.

A fleet of daemons shares what each learns about a domain through a second level beside each
node's own cache (memory and SQLite), never instead of it: a node answers from its own cache, asks
the shared level on a local miss or a refresh, and writes what its own resolutions found.

Here, without any I/O: the `SharedLevel` seam (store/redis.py implements it on Redis), how an
entry is written down for it (the export codec, which trusts nothing when reading back, plus the
claimed mode and max_age and an optional HMAC), and the one rule for taking a shared entry into a
node's cache (`adopt`): it may add or refresh what the node knows, never downgrade it
(RFC 8461 §5.1). The write rule is entry.supersedes: a shared copy with a newer policy fetch is
never replaced by an older one.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
from dataclasses import dataclass, replace
from typing import Any, Protocol

from mtasts_policyd.core.policy import Mode
from mtasts_policyd.store.codec import entry_from_record, export_record
from mtasts_policyd.store.entry import Entry, supersedes

FORMAT = 1  # the shared document's version ("v"); another version is ignored, not guessed at


class SharedUnavailable(Exception):
    """The shared level cannot be asked now (down, slow, circuit open): work as a single node."""


class IgnoredEntry(Exception):
    """A shared entry that must not be used; `reason` is a metric label (README "Fleet (Redis)")."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


IGNORED_REASONS = ("unreadable", "mismatch", "signature", "downgrade", "conflict")


class SharedLevel(Protocol):
    """Entries by domain shared by a fleet; thread-safe. Every method may raise SharedUnavailable;
    a read-only level never sends a write (claim, put, delete return without asking)."""

    read_only: bool

    def get(self, domain: str, now: float) -> Entry | None:
        """The shared entry (decoded and checked: IgnoredEntry when it must not be used), or None."""
        ...

    def put(self, entry: Entry, due_at: float) -> bool:
        """Write unless the shared copy's policy fetch is newer (entry.supersedes); False: refused.
        The copy expires at entry.ends_at(); `due_at` orders the warmers' index. Tells the fleet."""
        ...

    def delete(self, domain: str) -> bool:
        """Forget the domain for the whole fleet (and tell the fleet); whether it was there."""
        ...

    def claim(self, domain: str, ttl: float) -> bool:
        """Take the domain's fetch lock for `ttl` seconds; False: another node holds it."""
        ...

    def release(self, domain: str) -> None:
        """Give back a lock this node holds (one that expired and was taken since is left alone)."""
        ...

    def locked(self, domain: str) -> bool:
        """Whether some node holds the domain's fetch lock."""
        ...

    def due(self, until: float, limit: int) -> list[str]:
        """Domains whose shared entries are due by `until`, soonest first, at most `limit`."""
        ...

    def domains(self) -> list[str]:
        """Every domain of the index, in domain order."""
        ...

    def status(self) -> dict[str, Any]:
        """What /health says: {"state": "up|down|read-only", ...}."""
        ...

    def close(self) -> None:
        ...


# ----- the shared document ----------------------------------------------------------------------


def _canonical(document: dict[str, Any]) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _signature(document: dict[str, Any], key: bytes) -> str:
    return hmac.new(key, _canonical(document), hashlib.sha256).hexdigest()


def encode(entry: Entry, hmac_key: bytes | None = None) -> bytes:
    """The shared document of an entry: its export record (body included, exact), the mode and
    max_age it claims (checked against the body when read), and its HMAC-SHA256 with `hmac_key`.
    The DANE branch stays on the node: its verdict rests on the node's own validating resolver."""
    policy = entry.policy
    document: dict[str, Any] = {"v": FORMAT, "record": export_record(entry),
                                "mode": policy.mode.value if policy else None,
                                "max_age": policy.max_age if policy else None}
    if hmac_key is not None:
        document["hmac"] = _signature(document, hmac_key)
    return _canonical(document)


def decode(raw: bytes | str, domain: str, now: float, hmac_key: bytes | None = None) -> Entry:
    """An entry read from the shared level, trusting nothing (IgnoredEntry says why not): the
    export codec re-parses the body with the policy parser and checks every field; the claimed
    mode and max_age must be the body's, the domain the key's, the HMAC right."""
    try:
        document = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise IgnoredEntry("unreadable", f"not JSON: {exc}") from None
    if not isinstance(document, dict) or document.get("v") != FORMAT:
        raise IgnoredEntry("unreadable", "not a shared entry of this version")
    if hmac_key is not None:
        claimed = document.pop("hmac", None)
        if not isinstance(claimed, str) or not hmac.compare_digest(claimed, _signature(document, hmac_key)):
            raise IgnoredEntry("signature", "HMAC missing or wrong")
    try:
        entry = entry_from_record(document.get("record"), now)
    except ValueError as exc:
        raise IgnoredEntry("unreadable", str(exc)) from None
    if entry.domain != domain:
        raise IgnoredEntry("mismatch", f"entry for {entry.domain} under the key of {domain}")
    policy = entry.policy
    claims = (policy.mode.value, policy.max_age) if policy else (None, None)
    if (document.get("mode"), document.get("max_age")) != claims:
        raise IgnoredEntry("mismatch", f"claims mode={document.get('mode')} max_age={document.get('max_age')}, "
                           f"the body says mode={claims[0]} max_age={claims[1]}")
    return entry


# ----- the invalidation channel ------------------------------------------------------------------

FORGET_WINDOW = 60.0  # seconds a signed "forget" is taken after it was sent (a replay later is not)


class Notice(enum.Enum):
    """What a message on the channel says about a domain."""

    WRITTEN = "written"  # a node wrote it: read the shared entry (checked as any other read)
    FORGOTTEN = "forgotten"  # `cache forget`: every node drops its copy
    FORGED = "forged"  # a "forget" that is not signed with the fleet's key, or too old: ignored


def _forget_signature(domain: str, node: str, stamp: int, key: bytes) -> str:
    return hmac.new(key, f"forget {domain} {node} {stamp}".encode(), hashlib.sha256).hexdigest()


def forget_message(domain: str, node: str, now: float, hmac_key: bytes | None = None) -> str:
    """The channel message of `cache forget`: "<domain> <node> forget <unix time> [<HMAC>]"."""
    stamp = int(now)
    text = f"{domain} {node} forget {stamp}"
    return text if hmac_key is None else f"{text} {_forget_signature(domain, node, stamp, hmac_key)}"


def read_notice(text: str, now: float, hmac_key: bytes | None = None) -> tuple[str, str, Notice]:
    """(domain, node, notice) of a channel message. A write notice needs no signature: it only
    makes a node read the shared entry, which is checked like any read. A forget drops a node's
    copy, enforce policies included, so with `hmac_key` it must carry the fleet's signature and be
    at most FORGET_WINDOW old: whoever can publish to Redis must not make the fleet forget."""
    domain, node, action, *rest = text.split(" ") + ["", ""]
    if action != "forget":
        return domain, node, Notice.WRITTEN
    if hmac_key is None:
        return domain, node, Notice.FORGOTTEN
    stamp, signature = rest[0], rest[1]
    if not stamp.isdigit() or abs(now - int(stamp)) > FORGET_WINDOW or not hmac.compare_digest(
            signature, _forget_signature(domain, node, int(stamp), hmac_key)):
        return domain, node, Notice.FORGED
    return domain, node, Notice.FORGOTTEN


# ----- taking a shared entry into a node's cache -----------------------------------------------


@dataclass(frozen=True)
class Horizons:
    """How far ahead of now a shared entry may promise anything, in seconds: the node's own bounds
    (resolver settings negative_ttl_max, txt_ttl_max, backoff_max). A shared copy, tampered with
    or written by a node configured otherwise, never holds a node off the network longer than the
    node itself would: a back-off a year ahead would keep it from refreshing an enforce policy
    until that policy expired into "no policy" (a downgrade, RFC 8461 §5.1)."""

    negative: float = 3600.0
    txt: float = 3600.0  # the TXT id's and the MX hosts' DNS TTL
    backoff: float = 3600.0


def _within(entry: Entry, now: float, horizons: Horizons) -> Entry:
    """The entry with every promise into the future cut at the node's horizons."""
    return replace(entry, negative_until=min(entry.negative_until, now + horizons.negative),
                   txt_expires_at=min(entry.txt_expires_at, now + horizons.txt),
                   mx_expires_at=min(entry.mx_expires_at, now + horizons.txt),
                   retry_after=min(entry.retry_after, now + horizons.backoff))


def adopt(local: Entry | None, remote: Entry, now: float, horizons: Horizons = Horizons()) -> Entry | None:
    """What the node's cache becomes with `remote` (at the local version, to be written with the
    cache's version check), or None when `remote` adds nothing. IgnoredEntry("downgrade") when it
    would replace the node's usable enforce policy with testing, none or no policy before that
    policy expires (RFC 8461 §5.1): only the node's own network refresh may do that.

    The newer policy fetch wins whole (entry.supersedes, the write rule too); for the same fetch,
    the later observations are taken: TXT id checks, MX lookups, negative TTLs and back-offs (one
    node's failed fetch is not repeated by every node). The node's DANE branch and lookup time stay.
    Nothing is promised beyond the node's `horizons`.
    """
    remote = _within(remote, now, horizons)
    if local is None:
        return replace(remote, dane=None, version=0)
    if supersedes(remote, local):  # a newer policy fetch (or a policy where the node had none)
        _no_downgrade(local, remote, now)
        return replace(remote, dane=local.dane, last_lookup=max(local.last_lookup, remote.last_lookup),
                       version=local.version)
    if supersedes(local, remote):
        return None  # the node's copy is newer: the shared one tells it nothing
    if local.fetched_at is not None and (remote.policy_id, remote.policy_body) != (local.policy_id, local.policy_body):
        raise IgnoredEntry("conflict", "another policy under the same fetch time")
    merged = local
    if remote.txt_expires_at > local.txt_expires_at:
        merged = replace(merged, txt_expires_at=remote.txt_expires_at, txt_record=remote.txt_record or merged.txt_record)
    if remote.mx_expires_at > local.mx_expires_at:
        merged = replace(merged, mx_hosts=remote.mx_hosts, mx_expires_at=remote.mx_expires_at)
    if remote.negative_until > local.negative_until and local.usable_policy(now) is None:
        merged = replace(merged, negative_until=remote.negative_until)
    if (remote.failure_at or 0.0) > (local.failure_at or 0.0) or remote.retry_after > local.retry_after:
        merged = replace(merged, failure=remote.failure, failure_at=remote.failure_at, failures=remote.failures,
                         retry_after=max(remote.retry_after, local.retry_after))
    if merged is local:
        return None
    _no_downgrade(local, merged, now)
    return replace(merged, version=local.version)


def _no_downgrade(local: Entry, remote: Entry, now: float) -> None:
    """RFC 8461 §5.1: a usable enforce policy stays in force until it expires, whatever anyone else says."""
    mine = local.usable_policy(now)
    if mine is None or mine.mode is not Mode.ENFORCE:
        return
    theirs = remote.usable_policy(now)
    if theirs is None or theirs.mode is not Mode.ENFORCE:
        raise IgnoredEntry("downgrade", f"would replace enforce (id={local.policy_id}) with "
                           f"{theirs.mode.value if theirs else 'no policy'} before it expires")
