"""`mtasts-policyd cache ...`: list, show, forget, export and import cached policies.

The command line of ops/cachetool: each action opens the daemon's SQLite cache file from the
configuration (next to any running daemon: reads never block in WAL mode), hands the open cache
to the operation, and prints what it returns.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import sqlite3
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any, TextIO

from mtasts_policyd.commands.common import command_with_actions
from mtasts_policyd.core.names import to_alabel
from mtasts_policyd.core.policy import Mode
from mtasts_policyd.ops import cachetool
from mtasts_policyd.ops.views import branch_text_lines, printable, text_lines
from mtasts_policyd.runtime.config import Config
from mtasts_policyd.runtime.daemon import CacheMissing, cache_path, open_level, redacted, require_cache
from mtasts_policyd.store.base import CacheWriteError
from mtasts_policyd.store.cache import PolicyCache
from mtasts_policyd.store.codec import ExportFormatError, document_records
from mtasts_policyd.store.entry import Entry, EntryState
from mtasts_policyd.store.redis import RedisLevel
from mtasts_policyd.store.shared import IgnoredEntry, SharedUnavailable

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
    action = command_with_actions(sub, "cache", "list, show, forget, export and import cached policies",
                                  DESCRIPTION, EPILOG)

    p = action("list", list_command, "one line per cached domain",
               "One line per cached domain: state, policy id, expiry (UTC), last lookup and last failure kind.")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--mode", choices=[m.value for m in Mode],
                   help="only domains whose cached policy has this mode (usable or expired)")
    p.add_argument("--state", choices=[s.value for s in EntryState], help="only domains in this state")

    p = action("show", show_command, "everything cached for domains",
               "Everything the cache holds for each DOMAIN. Exits 1 if one is not cached.")
    p.add_argument("domains", nargs="+", metavar="DOMAIN")
    p.add_argument("--json", action="store_true", help="one JSON object per line, per domain")

    p = action("forget", forget_command, "delete domains from the cache",
               "Delete each DOMAIN from the cache; the next lookup asks DNS and HTTPS again. Exits 1 if a "
               "domain was not cached.")
    p.add_argument("domains", nargs="+", metavar="DOMAIN")

    p = action("export", export_command, "write the cache as JSON",
               "Write every cached entry, raw policy bodies included, as one JSON document that `cache "
               "import` reads.")
    p.add_argument("file", nargs="?", default="-", metavar="FILE", help="output file (default: -, stdout)")

    p = action("import", import_command, "merge a JSON export into the cache",
               "Merge an export into the cache. A stored entry whose policy was fetched at the same time or "
               "later than the imported one is kept. Every record is validated (domain name, policy body, TXT "
               "record); invalid records are reported and skipped, and make the exit status 1.")
    p.add_argument("file", metavar="FILE", help="export to read (- for stdin)")
    p.add_argument("--dry-run", action="store_true", help="validate and count, write nothing")


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


@contextlib.contextmanager
def _shared(config: Config) -> Iterator[RedisLevel | None]:
    """The fleet's shared cache when `cache.redis` is configured (README "Fleet (Redis)"), else None."""
    level = open_level(config)
    try:
        yield level
    finally:
        if level is not None:
            level.close()


def _shared_entry(level: RedisLevel, domain: str, now: float) -> Entry | None:
    """The shared entry, or None (missing, or not usable: said on stderr)."""
    try:
        return level.get(domain, now)
    except IgnoredEntry as exc:
        _fail(f"{domain}: the shared entry is not used by the daemons ({exc})")
        return None


def _shared_name(config: Config) -> str:
    redis = config.cache.redis
    return f"the shared cache at {redacted(redis.url if redis else '')}"


# ----- list and show ---------------------------------------------------------------------------


def _table(rows: list[list[str]], out: TextIO) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip(), file=out)


def list_command(args: argparse.Namespace, config: Config) -> int:
    try:
        with _shared(config) as level:
            if level is not None:
                now = time.time()
                found = [_shared_entry(level, domain, now) for domain in level.domains()]
                entries = [entry for entry in found if entry is not None]
                print(f"{_shared_name(config)}: {len(entries)} domains", file=sys.stderr)
            else:
                with _open(config) as cache:
                    entries = list(cache.entries())
    except SharedUnavailable as exc:
        _fail(str(exc))
        return 1
    except (CacheToolError, sqlite3.Error) as exc:
        _fail(str(exc))
        return 1
    rows = cachetool.listing(entries, time.time(), args.mode, args.state)
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
    for line in text_lines(info, skip=("domain", "policy_body", "policy_body_encoding", "dane")):
        print(line)
    print("\n".join(branch_text_lines(info["dane"])) if info["dane"] else "  dane: -")
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
        with _shared(config) as level, contextlib.ExitStack() as stack:
            cache = stack.enter_context(_open(config)) if level is None else None
            now = time.time()
            for name, domain in zip(args.domains, domains):
                entry = cache.reload(domain) if cache is not None else \
                    _shared_entry(level, domain, now) if level is not None else None
                if entry is None:
                    where = f" in {_shared_name(config)}" if level is not None else ""
                    _fail(f"{domain} is not cached{where}" + (f" (as {name!r})" if name != domain else ""))
                    status = 1
                    continue
                info = cachetool.details(entry, now)
                if args.json:
                    print(json.dumps(info))
                else:
                    _print_details(info)
    except (CacheToolError, SharedUnavailable) as exc:
        _fail(str(exc))
        return 1
    return status


# ----- forget ----------------------------------------------------------------------------------


def forget_command(args: argparse.Namespace, config: Config) -> int:
    status = 0
    try:
        domains = _domains(args.domains)
        with _open(config) as cache, _shared(config) as level:
            if level is not None and level.read_only:
                raise CacheToolError("cache.redis.read_only is true: forget the domains from a node that writes "
                                     "to the fleet's Redis")
            for domain in domains:
                try:
                    forgotten = cachetool.forget(cache, domain, time.time())
                except CacheWriteError as exc:
                    _fail(str(exc))
                    status = 1
                    continue
                fleet = ""
                if level is not None:  # README "Fleet (Redis)": for the whole fleet
                    try:
                        shared = _shared_entry(level, domain, time.time())
                        if level.delete(domain) and not forgotten.found:
                            forgotten = cachetool.Forgotten(True, shared.state(time.time()).value if shared
                                                            else "unknown", shared.policy_id if shared else None)
                    except SharedUnavailable as exc:
                        _fail(f"{domain}: not forgotten by the fleet: {exc}")
                        status = 1
                        continue
                    fleet = f" for the whole fleet: {_shared_name(config)} and every node's own cache"
                if not forgotten.found:
                    _fail(f"{domain} was not cached" + (f" here nor in {_shared_name(config)}" if level else ""))
                    status = 1
                    continue
                policy_id = f", policy id {forgotten.policy_id}" if forgotten.policy_id else ""
                print(f"forgot {domain} ({forgotten.state}{policy_id}){fleet}")
                if forgotten.unprotected:
                    print(f"warning: {domain} had a usable enforce policy; until the daemon fetches it "
                          "again (at the next lookup), mail to it is not protected by MTA-STS, and an "
                          "attacker who blocks that fetch can downgrade delivery", file=sys.stderr)
    except CacheToolError as exc:
        _fail(str(exc))
        return 1
    return status


# ----- export ----------------------------------------------------------------------------------


def export_command(args: argparse.Namespace, config: Config) -> int:
    try:
        with _open(config) as cache:
            document = cachetool.export(cache, time.time())
    except (CacheToolError, sqlite3.Error) as exc:
        _fail(str(exc))
        return 1
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
        print(f"exported {len(document['entries'])} entries to {args.file}", file=sys.stderr)
    return 0


# ----- import ----------------------------------------------------------------------------------


def _read_records(path: str) -> list[Any]:
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise CacheToolError(f"cannot read {path}: {exc}") from None
    try:
        return document_records(text, path)
    except ExportFormatError as exc:
        raise CacheToolError(str(exc)) from None


def import_command(args: argparse.Namespace, config: Config) -> int:
    try:
        records = _read_records(args.file)
    except CacheToolError as exc:
        _fail(str(exc))
        return 1
    validated = cachetool.validate(records, time.time())
    for number, name, why in validated.invalid:
        _fail(f"invalid record #{number}{f' ({name!r})' if name is not None else ''}: {printable(why)}")
    invalid = len(validated.invalid)
    if args.dry_run:
        print(f"dry run: {len(validated.entries)} valid, {invalid} invalid; nothing written")
        return 1 if invalid else 0
    try:
        with _open(config, create=True) as cache:
            counts, errors = cachetool.import_entries(cache, validated.entries)
    except CacheToolError as exc:
        _fail(str(exc))
        return 1
    for error in errors:
        _fail(error)
    if counts["conflict"]:
        _fail(f"{counts['conflict']} entries kept changing under us (a busy daemon?) and were not imported")
    if counts["failed"]:
        _fail(f"{counts['failed']} entries could not be written")
    print(f"imported {counts['imported']}, kept {counts['kept']} (the cache had the same or a newer fetch), "
          f"invalid {invalid}" + "".join(f", {key} {counts[key]}" for key in ("conflict", "failed") if counts[key]))
    return 1 if invalid or counts["conflict"] or counts["failed"] else 0
