"""`mtasts-policyd warm`: the command line of the cache warmer (ops/warm.py does the work).

Here: the options, the daemon's cache and resolver built from the configuration, the progress
line, the alert and summary lines and the exit status (README "Cache warmer").
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

from mtasts_policyd.commands.common import add_common_options, concurrency
from mtasts_policyd.ops.domainlist import DomainListError, read_domain_list
from mtasts_policyd.ops.pool import Progress
from mtasts_policyd.ops.warm import (
    DAY,
    Alert,
    AlertKind,
    Summary,
    WarmOptions,
    WarmResult,
    select_domains,
    warm,
)
from mtasts_policyd.runtime.config import Config
from mtasts_policyd.runtime.daemon import (
    CacheMissing,
    attach_fleet,
    build_resolver,
    prune_settings,
    require_cache,
)


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 0: {text!r}")
    return value


def register(sub: Any) -> None:
    """Add `warm` to the command line (main.COMMANDS)."""
    parser = sub.add_parser(
        "warm", help="refresh cached policies before they expire (cron, systemd timer)",
        description="Refresh the policies of recently looked-up domains (RFC 8461 §10.2: fetch again even "
                    "with an unchanged id, so max_age restarts), re-check TXT ids, and resolve hint-list "
                    "domains. Prints a summary line; alerts go to stderr as 'ALERT kind=... domain=... "
                    "detail=...' lines.",
        epilog="exit status: 0 no alerts, 1 alerts (enforce policy not refreshed, enforce downgraded, "
               "mx patterns changed, cache unusable), 2 usage error, 130 interrupted")
    add_common_options(parser)
    parser.add_argument("--recent", type=_non_negative, default=7.0, metavar="DAYS",
                        help="warm cached domains looked up within DAYS (default 7)")
    parser.add_argument("--all", dest="all_policies", action="store_true",
                        help="also every cached domain with a policy, looked up recently or not")
    parser.add_argument("--domains", action="append", default=[], metavar="FILE",
                        help="hint list: one domain per line, '#' comments; '-' is stdin; repeatable")
    parser.add_argument("--concurrency", type=concurrency, default=8, metavar="N",
                        help="domains worked on at once (default 8)")
    parser.add_argument("--jitter", type=_non_negative, default=2.0, metavar="SECONDS",
                        help="random delay of up to SECONDS before each domain (default 2)")
    parser.add_argument("--refetch-after", type=_non_negative, default=43200.0, metavar="SECONDS",
                        help="refetch policies fetched longer ago than this or than half their max_age; "
                             "younger copies only get their TXT id checked (default 43200)")
    parser.add_argument("--force", action="store_true", help="ignore back-off after recent failures")
    parser.add_argument("-v", "--verbose", action="store_true", help="one line per domain on stdout")
    parser.set_defaults(handler=run_warm)


def _unusable_cache(detail: str) -> int:
    """A run that cannot work on the daemon's cache: an error alert, the summary line, exit 1."""
    alert = Alert(AlertKind.ERROR, "-", detail)
    print(alert.line(), file=sys.stderr)
    print(Summary(0, run_alerts=[alert]).line())
    return 1


# With a fleet (README "Fleet (Redis)"): the shared domains due within this many seconds are warmed too.
FLEET_AHEAD = 6 * 3600


def run_warm(args: argparse.Namespace, config: Config) -> int:
    """The `warm` handler: 0 no alerts, 1 alerts, 2 usage error, 130 interrupted."""
    if args.log_level is None:  # a cron job's mail should hold the summary and alerts, not info logs
        logging.getLogger().setLevel(max(logging.WARNING, logging.getLogger().level))
    hints: list[str] = []
    try:  # like `survey`: the same hint list means the same to both commands
        for name in args.domains:
            hints.extend(read_domain_list(name))
    except DomainListError as exc:
        for problem in str(exc).splitlines():
            print(f"mtasts-policyd warm: {problem}", file=sys.stderr)
        return 2
    options = WarmOptions(recent=args.recent * DAY, all_policies=args.all_policies, concurrency=args.concurrency,
                          jitter=args.jitter, force=args.force, refetch_after=args.refetch_after)
    try:
        require_cache(config)
    except CacheMissing as exc:
        return _unusable_cache(f"{exc}; nothing warmed")
    resolver = build_resolver(config)
    try:
        if not resolver.cache.persistent:
            return _unusable_cache(f"cache {resolver.cache.path} cannot be opened; nothing warmed")
        fleet = attach_fleet(config, resolver)
        if fleet is not None:  # README "Fleet (Redis)": the fleet's due domains too, from its index
            hints += fleet.due(time.time() + FLEET_AHEAD)
        domains = select_domains(resolver.cache.entries(), time.time(), options, hints)
        progress = Progress(sys.stderr, len(domains))

        def report(result: WarmResult, done: int, total: int) -> None:
            if result.alerts:
                progress.clear()
                for alert in result.alerts:
                    print(alert.line(), file=sys.stderr, flush=True)
            if args.verbose:
                progress.clear()
                print(result.line(), flush=True)
            progress.advance(result.domain)

        summary = warm(resolver, domains, options, on_result=report)
        progress.clear()
        resolver.cache.prune(time.time(), prune_settings(config))  # README "Cache size"
    finally:
        resolver.cache.close()
        if resolver.fleet is not None:
            resolver.fleet.level.close()
    print(summary.line(), flush=True)
    return summary.exit_code
