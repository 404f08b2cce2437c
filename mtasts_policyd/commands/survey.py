"""`mtasts-policyd survey FILE`: the command line of the survey (ops/survey.py does the work).

Here: the options, the network seams or the daemon's resolver built from the configuration, the
bounded run with its progress bar, where the report and its summary go, and the exit status.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Sequence
from typing import IO, Any

from mtasts_policyd.commands.common import add_common_options, concurrency
from mtasts_policyd.net.dns import DnsDiscovery
from mtasts_policyd.net.dnssec import DnssecResolver, ProbeTarget, probe
from mtasts_policyd.net.https import PolicyFetcher
from mtasts_policyd.ops.domainlist import read_domain_list
from mtasts_policyd.ops.pool import Progress, run_bounded
from mtasts_policyd.ops.survey import (
    DEFAULT_CONCURRENCY,
    FORMATS,
    Surveyor,
    SurveyRow,
    SurveySummary,
    render_csv,
    render_json,
    render_markdown,
    render_summary_csv,
)
from mtasts_policyd.runtime.config import Config
from mtasts_policyd.runtime.daemon import CacheMissing, build_resolver, require_cache


def register(sub: Any) -> None:
    """Add `survey` to the command line (main.COMMANDS)."""
    parser = sub.add_parser(
        "survey", help="report what a list of domains publishes for MTA-STS and TLSRPT",
        description="For each domain in FILE (one per line, '#' comments, '-' for stdin): the _mta-sts "
                    "TXT record, the policy fetch, mode, mx patterns, max_age, whether the real MX hosts "
                    "match the patterns, and the _smtp._tls TLSRPT record; then a summary. Reads no cache "
                    "and writes none unless --update-cache. Exits non-zero only on a usage error.")
    add_common_options(parser)
    parser.add_argument("file", metavar="FILE", help="domains, one per line; '-' reads standard input")
    parser.add_argument("--format", choices=FORMATS, default="markdown",
                        help="markdown table (default), csv (summary on stderr) or json")
    parser.add_argument("--output", metavar="FILE", help="write the report here instead of standard output")
    parser.add_argument("--concurrency", type=concurrency, default=DEFAULT_CONCURRENCY, metavar="N",
                        help=f"domains surveyed at once (default {DEFAULT_CONCURRENCY})")
    parser.add_argument("--update-cache", action="store_true",
                        help="resolve through the daemon's cache (--cache / cache.path) and update it")
    parser.set_defaults(handler=run)


def _surveyor(config: Config, update_cache: bool, stack: contextlib.ExitStack) -> Surveyor:
    """Without --update-cache nothing opens the cache file, so a survey never creates or locks
    the daemon's cache; with it, the daemon's own wiring (same cache path, same settings)."""
    discovery = DnsDiscovery(config.dns)
    dnssec, ttl = dane_resolver(config), config.dane.ttl
    if not update_cache:
        return Surveyor(discovery, fetcher=PolicyFetcher(discovery, config.fetch), dnssec=dnssec, dane_ttl=ttl)
    resolver = build_resolver(config)
    stack.callback(resolver.cache.close)
    return Surveyor(discovery, resolver=resolver, dnssec=dnssec, dane_ttl=ttl)


def dane_resolver(config: Config) -> DnssecResolver | None:
    """The validating resolver to survey DANE with, or None (no DANE columns) when `dane.mode` is off
    or the resolver does not pass the trust probe: without AD every answer reads "insecure", and
    columns saying so would be wrong, not empty (README "Survey")."""
    if config.dane.mode == "off":
        return None
    resolver = DnssecResolver(config.dns)
    result = asyncio.run(probe(resolver, ProbeTarget.parse(config.dane.probe)))
    if not result.validating:
        print(f"mtasts-policyd survey: no DANE columns: {result.detail}", file=sys.stderr)
        return None
    return resolver


def survey_domains(config: Config, domains: Sequence[str], *, update_cache: bool = False,
                   concurrency: int = DEFAULT_CONCURRENCY) -> list[SurveyRow]:
    """Survey `domains` (in order), with a progress bar when stderr is a terminal."""
    with contextlib.ExitStack() as stack:
        surveyor = _surveyor(config, update_cache, stack)
        progress = Progress(sys.stderr, len(domains), bar="survey")
        rows = run_bounded(surveyor.survey, domains, concurrency, lambda _: progress.advance(), name="survey")
        progress.clear()
    return rows


def write_report(output: IO[str], rows: Sequence[SurveyRow], fmt: str) -> None:
    """Markdown and JSON carry their summary; CSV keeps one table and puts the summary on stderr."""
    summary = SurveySummary.of(rows)
    if fmt == "json":
        output.write(render_json(rows, summary))
    elif fmt == "csv":
        output.write(render_csv(rows))
        sys.stderr.write(render_summary_csv(summary))
    else:
        output.write(render_markdown(rows, summary))
    output.flush()


def run(args: argparse.Namespace, config: Config) -> int:
    """The `survey` handler: 0 when every domain was surveyed, 2 on a usage error."""
    with contextlib.ExitStack() as stack:
        try:  # all checked before any network work, so a typo costs nothing
            if args.update_cache:
                require_cache(config)  # only `serve` and `cache import` create the cache
            domains = read_domain_list(args.file)
            output = (stack.enter_context(open(args.output, "w", encoding="utf-8", newline=""))
                      if args.output else sys.stdout)
        except (OSError, ValueError, CacheMissing) as exc:  # DomainListError is a ValueError
            for problem in str(exc).splitlines():
                print(f"mtasts-policyd survey: {problem}", file=sys.stderr)
            return 2
        rows = survey_domains(config, domains, update_cache=args.update_cache, concurrency=args.concurrency)
        write_report(output, rows, args.format)
    return 0
