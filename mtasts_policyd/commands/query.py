"""`mtasts-policyd query DOMAIN...`: what the daemon would answer, and why (README "Command line")."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from mtasts_policyd.commands.common import add_common_options
from mtasts_policyd.core.names import clean_key
from mtasts_policyd.frontends.socketmap import map_reply
from mtasts_policyd.ops.views import dane_text_lines, decision_view, printable, text_lines
from mtasts_policyd.resolution.resolver import Decision, PolicyResolver
from mtasts_policyd.resolution.service import PolicyService
from mtasts_policyd.runtime.config import Config
from mtasts_policyd.runtime.daemon import CacheMissing, build_dane, build_resolver, require_cache, start_dane


def register(sub: Any) -> None:
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
    resolver.dane = build_dane(config, notes=resolver.cache)
    try:
        decisions = asyncio.run(decide_all(resolver, config, args.domains))
        for key, decision in zip(args.domains, decisions):
            answer = map_reply(decision, maps[name])
            info = decision_view(key, decision, answer, resolver)
            if args.json:
                print(json.dumps(info))
                continue
            print(f"{printable(key)}: {answer}")
            shown = {field: value for field, value in info.items() if value not in (None, [], "")}
            if "trust_store" in shown:
                shown["trust_store"] = str(resolver.trust)  # one line: kind, files, number of CAs
            for line in text_lines(shown, skip=("key", "answer", "dane")):
                print(line)
            for note in info.get("trust_store", {}).get("notes", []):
                print(f"  trust_store_note: {printable(note)}")
            if "dane" in info:
                print("\n".join(dane_text_lines(info["dane"])))
    finally:
        resolver.cache.close()
    return 0


async def decide_all(resolver: PolicyResolver, config: Config, keys: list[str]) -> list[Decision | None]:
    """What the daemon would answer for each key: through its own service (the cache, then the
    network for what is not usable: MTA-STS and DANE at once), DANE's state known first."""
    assert resolver.dane is not None
    await start_dane(resolver.dane, config)
    service = PolicyService(resolver, workers=4)
    try:
        decisions: list[Decision | None] = []
        for key in keys:
            domain = clean_key(key)
            decision = None
            if domain is not None:
                decision = service.cached(domain, refresh=False) or await service.resolve(domain)
            decisions.append(decision)
        return decisions
    finally:
        service.close()
