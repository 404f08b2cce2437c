"""The `mtasts-policyd` command: serve, query."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from mtasts_policyd import __version__
from mtasts_policyd.answers.postfix import tls_policy
from mtasts_policyd.commands import survey, warm
from mtasts_policyd.commands.common import add_common_options
from mtasts_policyd.core.names import clean_key
from mtasts_policyd.ops import cachetool, doctor
from mtasts_policyd.ops.views import (
    failure_fields,
    iso_time,
    policy_fields,
    printable,
    text_lines,
)
from mtasts_policyd.resolution.resolver import Decision, PolicyResolver
from mtasts_policyd.runtime import signals
from mtasts_policyd.runtime.config import Config, checked, load
from mtasts_policyd.runtime.daemon import (
    CacheMissing,
    build_resolver,
    require_cache,
    run,
)

DESCRIPTION = """\
MTA-STS (RFC 8461) policy daemon for Postfix (socketmap) and Exim (${readsocket}).

It discovers a destination domain's _mta-sts TXT record, fetches its policy over HTTPS, keeps it
in a disk-backed cache for max_age, and tells the MTA how to deliver: for an enforce policy,
verified TLS to an MX that matches the policy; otherwise, nothing (the MTA's own default).
Runs without a config file: socketmap on 127.0.0.1:8461, Exim line protocol on 127.0.0.1:8462,
SQLite cache in /var/lib/mtasts-policyd (root) or the XDG state directory.
"""

EPILOG = """\
examples:
  mtasts-policyd serve
  mtasts-policyd serve --config /etc/mtasts-policyd.yaml
  mtasts-policyd query gmail.com example.org --json
postfix main.cf:
  smtp_tls_policy_maps = socketmap:inet:127.0.0.1:8461:postfix
exim (see contrib/exim/exim.conf; no fail string: mail defers while the daemon is unreachable):
  ${readsocket{inet:127.0.0.1:8462}{policy $domain\\n}{5s:cache=yes}{}}
"""


def _register_serve(sub: Any) -> None:
    serve = sub.add_parser("serve", help="run the policy daemon",
                           description="Run the daemon. Logs one line per decision to stderr.")
    add_common_options(serve)
    serve.add_argument("--socketmap", metavar="ADDR", action="append",
                       help="socketmap listener HOST:PORT, [IPV6]:PORT or unix:/path; repeatable "
                            "(overrides socketmap.listen; default 127.0.0.1:8461)")
    serve.add_argument("--exim", metavar="ADDR", action="append",
                       help="Exim ${readsocket} listener, same forms; repeatable "
                            "(overrides exim.listen; default 127.0.0.1:8462)")
    serve.add_argument("--metrics", metavar="ADDR",
                       help="serve Prometheus /metrics and /health over HTTP on ADDR; a bare PORT means "
                            "127.0.0.1:PORT (overrides metrics.listen; default: no metrics listener)")
    serve.set_defaults(handler=_serve)


def _register_query(sub: Any) -> None:
    parser = sub.add_parser("query", help="show what the daemon would answer for domains, and why",
                            description="Resolve each DOMAIN through the cache (and the network when "
                                        "nothing usable is cached) and print the answer and its reasons. "
                                        "Exits non-zero only on a usage error.")
    add_common_options(parser)
    parser.add_argument("domains", nargs="+", metavar="DOMAIN")
    parser.add_argument("--json", action="store_true", help="one JSON object per line, per domain")
    parser.add_argument("--map", default=None, help="socketmap name whose answer to show (default: the first)")
    parser.add_argument("--no-cache", action="store_true",
                        help="ask DNS and HTTPS with an empty in-memory cache; the cache file is neither "
                             "read nor created (without it, the cache file must exist: the daemon makes it)")
    parser.set_defaults(handler=query)


# Each subcommand module contributes one register(subparsers) function; the parser it adds sets
# `handler(args, config) -> exit code`.
COMMANDS: list[Callable[[Any], None]] = [_register_serve, _register_query, survey.register, cachetool.register,
                                         warm.register, doctor.register]


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtasts-policyd", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in COMMANDS:
        register(sub)
    return parser


def configure(args: argparse.Namespace) -> Config:
    """The configuration file with the command-line flags applied, every key checked (ConfigError
    naming the key otherwise); the same for start-up and for each SIGHUP."""
    config = load(args.config)
    if args.cache:
        config = dataclasses.replace(config, cache=dataclasses.replace(config.cache, path=args.cache))
    for section in ("socketmap", "exim"):
        listen = getattr(args, section, None)
        if listen:
            replaced = dataclasses.replace(getattr(config, section), listen=tuple(listen))
            config = dataclasses.replace(config, **{section: replaced})
    if getattr(args, "metrics", None):
        config = dataclasses.replace(config, metrics=dataclasses.replace(config.metrics, listen=args.metrics))
    if args.log_level:
        config = dataclasses.replace(config, log_level=args.log_level)
    return checked(config)


def describe(key: str, decision: Decision | None, answer: str, resolver: PolicyResolver) -> dict[str, Any]:
    """Everything `query` knows about one key, as plain data."""
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


def query(args: argparse.Namespace, config: Config) -> int:
    maps = config.socketmap.maps
    name = args.map or next(iter(maps))
    if name not in maps:
        print(f"mtasts-policyd: no socketmap named {name!r} (have: {', '.join(maps)})", file=sys.stderr)
        return 2
    if not args.no_cache:
        try:
            require_cache(config)
        except CacheMissing as exc:
            print(f"mtasts-policyd query: {exc}; or use --no-cache", file=sys.stderr)
            return 1
    resolver = build_resolver(config, memory_only=args.no_cache)
    try:
        for key in args.domains:
            domain = clean_key(key)
            decision = None
            if domain is not None:
                decision = resolver.cached(domain)[0] or resolver.resolve(domain).decision
            policy = tls_policy(decision, maps[name]) if decision is not None else None
            answer = f"OK {policy}" if policy else "NOTFOUND "
            info = describe(key, decision, answer, resolver)
            if args.json:
                print(json.dumps(info))
            else:
                print(f"{printable(key)}: {answer}")
                shown = {field: value for field, value in info.items() if value not in (None, [], "")}
                if "trust_store" in shown:
                    shown["trust_store"] = str(resolver.trust)  # one line: kind, files, number of CAs
                for line in text_lines(shown, skip=("key", "answer")):
                    print(line)
                for note in info.get("trust_store", {}).get("notes", []):
                    print(f"  trust_store_note: {printable(note)}")
    finally:
        resolver.cache.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.handler is not _serve:
        signals.restore_hup()  # only the daemon reloads; for the other commands SIGHUP is a hangup
    try:
        config = configure(args)
    except ValueError as exc:  # ConfigError: one line naming the key, exit status 2 as for usage errors
        print(f"mtasts-policyd {args.command}: {exc}", file=sys.stderr)
        return 2
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JournalFormatter() if stderr_is_journal()
                         else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=config.log_level.upper(), handlers=[handler])
    return int(args.handler(args, config))


class JournalFormatter(logging.Formatter):
    """stderr is the journal (systemd): it stamps the time itself, and a "<N>" prefix sets the priority."""

    PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return f"<{self.PRIORITY.get(record.levelno, 6)}>{super().format(record)}"


def stderr_is_journal() -> bool:
    """systemd sets JOURNAL_STREAM to the device:inode of the stream it connected to the journal."""
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return os.environ.get("JOURNAL_STREAM") == f"{st.st_dev}:{st.st_ino}"


def _serve(args: argparse.Namespace, config: Config) -> int:
    try:
        asyncio.run(run(config, reload=lambda: configure(args)))
    except OSError as exc:
        logging.getLogger("mtasts_policyd").error("cannot start: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
