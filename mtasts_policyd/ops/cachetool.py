"""`mtasts-policyd cache ...`: list, show, forget, export and import cached policies.

Every action opens the SQLite cache file next to any running daemon: reads never block in WAL
mode, writes go through the cache's versioned put (a write based on a stale read is detected, not
lost), and a running daemon notices another process's writes through PRAGMA data_version within
about a second, so `forget` and `import` take effect there without a restart.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import json
import math
import os
import sqlite3
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any, TextIO

from mtasts_policyd.core.errors import (
    Failure,
    FailureKind,
    InvalidPolicy,
    InvalidRecord,
)
from mtasts_policyd.core.names import to_alabel
from mtasts_policyd.core.policy import Mode, parse_policy
from mtasts_policyd.core.sts_record import parse_sts_record, valid_id
from mtasts_policyd.ops.views import (
    failure_fields,
    iso_time,
    policy_fields,
    printable,
    text_lines,
)
from mtasts_policyd.runtime.config import Config
from mtasts_policyd.runtime.daemon import CacheMissing, cache_path, require_cache
from mtasts_policyd.store.cache import CacheWriteError, Entry, PolicyCache

EXPORT_FORMAT = "mtasts-policyd-cache"
EXPORT_VERSION = 1
STATES = ("enforce", "testing", "none", "no-policy", "failing", "expired")
FUTURE_SLACK = 300  # seconds of clock skew tolerated in an imported fetched_at

# Record keys of an export, and the Entry defaults a missing key stands for.
_RECORD_KEYS = ("domain", "txt_record", "policy_id", "policy_body", "policy_body_encoding", "fetched_at",
                "txt_expires_at", "negative_until", "failure", "failure_at", "failures", "retry_after",
                "last_lookup", "mx_hosts", "mx_expires_at")

DESCRIPTION = """\
Inspect and edit the policy cache, also while the daemon runs (it notices changes within about
a second). Each action takes --config/--cache like serve, so it opens the daemon's cache file.
"""

EPILOG = """\
states (list, show):
  enforce, testing, none  a usable policy in that mode (a later refresh may have failed: see failure)
  no-policy               no (or an invalid) TXT record, cached for the DNS negative TTL
  failing                 nothing usable, and the last attempt failed (back-off until retry_after)
  expired                 the policy's max_age or the negative TTL has passed; the next lookup asks again
examples:
  mtasts-policyd cache list --mode enforce
  mtasts-policyd cache show example.com --json
  mtasts-policyd cache forget example.com
  mtasts-policyd cache export backup.json && mtasts-policyd cache import backup.json
"""


class CacheToolError(Exception):
    """A problem worth one line on stderr and exit status 1."""


# ----- argument parsing ------------------------------------------------------------------------


def register(sub: Any) -> None:
    from mtasts_policyd.commands.main import (
        add_common_options,  # cli imports this module for its COMMANDS list
    )

    cache = sub.add_parser("cache", help="list, show, forget, export and import cached policies",
                           description=DESCRIPTION, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = cache.add_subparsers(dest="cache_command", required=True, metavar="ACTION")

    p = actions.add_parser("list", help="one line per cached domain",
                           description="One line per cached domain: state, policy id, expiry (UTC), last "
                                       "lookup and last failure kind.")
    add_common_options(p)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--mode", choices=[m.value for m in Mode],
                   help="only domains whose cached policy has this mode (usable or expired)")
    p.add_argument("--state", choices=STATES, help="only domains in this state")
    p.set_defaults(handler=list_command)

    p = actions.add_parser("show", help="everything cached for domains",
                           description="Everything the cache holds for each DOMAIN. Exits 1 if one is not cached.")
    add_common_options(p)
    p.add_argument("domains", nargs="+", metavar="DOMAIN")
    p.add_argument("--json", action="store_true", help="one JSON object per line, per domain")
    p.set_defaults(handler=show_command)

    p = actions.add_parser("forget", help="delete domains from the cache",
                           description="Delete each DOMAIN from the cache; the next lookup asks DNS and "
                                       "HTTPS again. Exits 1 if a domain was not cached.")
    add_common_options(p)
    p.add_argument("domains", nargs="+", metavar="DOMAIN")
    p.set_defaults(handler=forget_command)

    p = actions.add_parser("export", help="write the cache as JSON",
                           description="Write every cached entry, raw policy bodies included, as one JSON "
                                       "document that `cache import` reads.")
    add_common_options(p)
    p.add_argument("file", nargs="?", default="-", metavar="FILE", help="output file (default: -, stdout)")
    p.set_defaults(handler=export_command)

    p = actions.add_parser("import", help="merge a JSON export into the cache",
                           description="Merge an export into the cache. A stored entry whose policy was "
                                       "fetched at the same time or later than the imported one is kept. "
                                       "Every record is validated (domain name, policy body, TXT record); "
                                       "invalid records are reported and skipped, and make the exit status 1.")
    add_common_options(p)
    p.add_argument("file", metavar="FILE", help="export to read (- for stdin)")
    p.add_argument("--dry-run", action="store_true", help="validate and count, write nothing")
    p.set_defaults(handler=import_command)


# ----- shared helpers --------------------------------------------------------------------------


def _fail(message: str) -> None:
    print(f"mtasts-policyd cache: {message}", file=sys.stderr)


@contextlib.contextmanager
def _open(config: Config, create: bool = False) -> Iterator[PolicyCache]:
    path = cache_path(config)
    if not create:
        try:
            require_cache(config)
        except CacheMissing as exc:
            raise CacheToolError(str(exc)) from None
    cache = PolicyCache(path, config.cache.memory_entries, strict=True)  # write failures raise
    try:
        if not cache.persistent:
            raise CacheToolError(f"cannot open the cache file {path} (see the error above)")
        yield cache
    finally:
        cache.close()


def _domains(names: list[str]) -> list[str]:
    """A-labels for the command-line names; every name is checked before anything is done."""
    cleaned: list[str] = []
    bad: list[str] = []
    for name in names:
        domain = to_alabel(name)
        (cleaned if domain else bad).append(domain or name)
    if bad:
        raise CacheToolError(f"not a domain name: {', '.join(map(repr, bad))}")
    return cleaned


def state_of(entry: Entry, now: float) -> str:
    """One word for the list: the usable policy's mode, no-policy, failing or expired (see EPILOG)."""
    policy = entry.usable_policy(now)
    if policy is not None:
        return policy.mode.value
    if now < entry.negative_until:
        return "no-policy"
    if entry.failure is not None and (now < entry.retry_after or entry.failure.kind not in (
            FailureKind.NO_RECORD, FailureKind.INVALID_RECORD)):
        return "failing"
    return "expired"


def _body_error(entry: Entry) -> str | None:
    """Why a stored policy body does not parse (any more), or None."""
    if entry.policy_body is None or entry.policy is not None:
        return None
    try:
        parse_policy(bytes(entry.policy_body))
    except InvalidPolicy as exc:
        return exc.detail
    return None


def _body_fields(body: bytes | None) -> dict[str, Any]:
    if body is None:
        return {"policy_body": None}
    try:
        return {"policy_body": body.decode("utf-8"), "policy_body_encoding": "text"}
    except UnicodeDecodeError:
        return {"policy_body": base64.b64encode(body).decode("ascii"), "policy_body_encoding": "base64"}


# ----- list and show ---------------------------------------------------------------------------


def summary(entry: Entry, now: float) -> dict[str, Any]:
    """The `list` fields of one entry."""
    expires = entry.expires_at if entry.expires_at is not None else entry.negative_until
    return {
        "domain": entry.domain,
        "state": state_of(entry, now),
        "mode": entry.policy.mode.value if entry.policy else None,
        "policy_id": entry.policy_id,
        "expires_at": iso_time(expires),
        "last_lookup": iso_time(entry.last_lookup),
        "failure": entry.failure.kind.value if entry.failure else None,
        "retry_after": iso_time(entry.retry_after) if now < entry.retry_after else None,
    }


def details(entry: Entry, now: float) -> dict[str, Any]:
    """Everything the cache holds for one domain (all but the row version), times in UTC."""
    policy = entry.policy
    info: dict[str, Any] = {
        "domain": entry.domain,
        "state": state_of(entry, now),
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
    }
    info.update(_body_fields(bytes(entry.policy_body) if entry.policy_body is not None else None))
    return info


def _table(rows: list[list[str]], out: TextIO) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip(), file=out)


def list_command(args: argparse.Namespace, config: Config) -> int:
    try:
        with _open(config) as cache:
            entries = list(cache.entries())
    except (CacheToolError, sqlite3.Error) as exc:
        _fail(str(exc))
        return 1
    now = time.time()
    rows = []
    for entry in entries:
        info = summary(entry, now)
        if (args.mode and info["mode"] != args.mode) or (args.state and info["state"] != args.state):
            continue
        rows.append(info)
    if args.json:
        for info in rows:
            print(json.dumps(info))
        return 0
    if not rows:
        print("no cached domains" + (" match" if args.mode or args.state else ""), file=sys.stderr)
        return 0
    table = [["DOMAIN", "STATE", "POLICY ID", "EXPIRES (UTC)", "LAST LOOKUP (UTC)", "LAST FAILURE"]]
    for info in rows:
        table.append([printable(str(info[key] or "-"))
                      for key in ("domain", "state", "policy_id", "expires_at", "last_lookup", "failure")])
    _table(table, sys.stdout)
    return 0


def _print_details(info: dict[str, Any]) -> None:
    print(info["domain"])
    for line in text_lines(info, skip=("domain", "policy_body", "policy_body_encoding")):
        print(line)
    body = info["policy_body"]
    if body is None:
        print("  policy_body: -")
    elif info["policy_body_encoding"] == "base64":
        print(f"  policy_body: not UTF-8, {len(base64.b64decode(body))} bytes (base64 in --json)")
    else:
        print("  policy_body:")
        for line in body.splitlines() or [""]:
            print(f"    | {printable(line)}")


def show_command(args: argparse.Namespace, config: Config) -> int:
    status = 0
    try:
        domains = _domains(args.domains)
        with _open(config) as cache:
            now = time.time()
            for name, domain in zip(args.domains, domains):
                entry = cache.reload(domain)
                if entry is None:
                    _fail(f"{domain} is not cached" + (f" (as {name!r})" if name != domain else ""))
                    status = 1
                    continue
                info = details(entry, now)
                if args.json:
                    print(json.dumps(info))
                else:
                    _print_details(info)
    except CacheToolError as exc:
        _fail(str(exc))
        return 1
    return status


# ----- forget ----------------------------------------------------------------------------------


def forget_command(args: argparse.Namespace, config: Config) -> int:
    status = 0
    try:
        domains = _domains(args.domains)
        with _open(config) as cache:
            for domain in domains:
                entry = cache.reload(domain)
                try:
                    found = cache.delete(domain)
                except CacheWriteError as exc:
                    _fail(str(exc))
                    status = 1
                    continue
                if not found:
                    _fail(f"{domain} was not cached")
                    status = 1
                else:
                    state = state_of(entry, time.time()) if entry is not None else "unknown"
                    policy_id = f", policy id {entry.policy_id}" if entry is not None and entry.policy_id else ""
                    print(f"forgot {domain} ({state}{policy_id})")
                    if state == "enforce":
                        print(f"warning: {domain} had a usable enforce policy; until the daemon fetches it "
                              "again (at the next lookup), mail to it is not protected by MTA-STS, and an "
                              "attacker who blocks that fetch can downgrade delivery", file=sys.stderr)
    except CacheToolError as exc:
        _fail(str(exc))
        return 1
    return status


# ----- export ----------------------------------------------------------------------------------


def export_record(entry: Entry) -> dict[str, Any]:
    """One entry, exactly: times are seconds since the epoch, the body is the raw policy file."""
    record: dict[str, Any] = {"domain": entry.domain, "txt_record": entry.txt_record, "policy_id": entry.policy_id}
    record.update(_body_fields(bytes(entry.policy_body) if entry.policy_body is not None else None))
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


def export_command(args: argparse.Namespace, config: Config) -> int:
    try:
        with _open(config) as cache:
            records = [export_record(entry) for entry in cache.entries()]  # one SELECT: a consistent snapshot
    except (CacheToolError, sqlite3.Error) as exc:
        _fail(str(exc))
        return 1
    document = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "exported_at": time.time(),
                "entries": records}
    text = json.dumps(document, indent=1) + "\n"
    if args.file == "-":
        sys.stdout.write(text)
    else:
        try:  # write-then-rename: a failed export never leaves half a file
            directory = os.path.dirname(os.path.abspath(args.file))
            fd, temporary = tempfile.mkstemp(dir=directory, prefix=".export-")
            with os.fdopen(fd, "w") as out:
                out.write(text)
            os.replace(temporary, args.file)
        except OSError as exc:
            _fail(f"cannot write {args.file}: {exc}")
            return 1
        print(f"exported {len(records)} entries to {args.file}", file=sys.stderr)
    return 0


# ----- import ----------------------------------------------------------------------------------


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
    unknown = sorted(set(record) - set(_RECORD_KEYS))
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


def store(cache: PolicyCache, entry: Entry, attempts: int = 5) -> str:
    """Write an imported entry unless the cache holds a policy fetched at the same time or later.

    The rule of resolution.merge (the later policy fetch wins whole), with ties going to the stored
    entry so that importing the same export twice changes nothing. The write is the cache's
    versioned put: if a daemon writes the domain between our read and our write, we read again and
    decide again. Returns "imported", "kept" or "conflict".
    """
    for _ in range(attempts):
        current = cache.reload(entry.domain)
        if current is not None and (current.fetched_at or 0.0) >= (entry.fetched_at or 0.0):
            return "kept"
        candidate = replace(entry, version=current.version if current else 0,
                            last_lookup=max(entry.last_lookup, current.last_lookup if current else 0.0))
        if cache.put(candidate) is not None:
            return "imported"
    return "conflict"


def _read_document(path: str) -> list[Any]:
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        document = json.loads(text)
    except (OSError, UnicodeDecodeError) as exc:
        raise CacheToolError(f"cannot read {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise CacheToolError(f"{path} is not JSON: {exc}") from None
    if not isinstance(document, dict) or document.get("format") != EXPORT_FORMAT:
        raise CacheToolError(f"{path} is not an mtasts-policyd cache export (no \"format\": \"{EXPORT_FORMAT}\")")
    if document.get("version") != EXPORT_VERSION:
        raise CacheToolError(f"{path} has export format version {document.get('version')!r}; "
                             f"this version reads {EXPORT_VERSION}")
    entries = document.get("entries")
    if not isinstance(entries, list):
        raise CacheToolError(f"{path}: \"entries\" must be a list")
    return entries


def import_command(args: argparse.Namespace, config: Config) -> int:
    try:
        records = _read_document(args.file)
    except CacheToolError as exc:
        _fail(str(exc))
        return 1
    now = time.time()
    valid: list[Entry] = []
    invalid = 0
    for number, record in enumerate(records, 1):
        try:
            valid.append(entry_from_record(record, now))
        except ValueError as exc:
            invalid += 1
            name = record.get("domain") if isinstance(record, dict) else None
            _fail(f"invalid record #{number}{f' ({name!r})' if name is not None else ''}: {printable(str(exc))}")
    counts = {"imported": 0, "kept": 0, "conflict": 0, "failed": 0}
    if args.dry_run:
        print(f"dry run: {len(valid)} valid, {invalid} invalid; nothing written")
        return 1 if invalid else 0
    try:
        with _open(config, create=True) as cache:
            for entry in valid:
                try:
                    counts[store(cache, entry)] += 1
                except CacheWriteError as exc:
                    _fail(str(exc))
                    counts["failed"] += 1
    except CacheToolError as exc:
        _fail(str(exc))
        return 1
    if counts["conflict"]:
        _fail(f"{counts['conflict']} entries kept changing under us (a busy daemon?) and were not imported")
    if counts["failed"]:
        _fail(f"{counts['failed']} entries could not be written")
    print(f"imported {counts['imported']}, kept {counts['kept']} (the cache had the same or a newer fetch), "
          f"invalid {invalid}" + "".join(f", {key} {counts[key]}" for key in ("conflict", "failed") if counts[key]))
    return 1 if invalid or counts["conflict"] or counts["failed"] else 0
