"""`mtasts-policyd serve`: run the daemon (runtime/daemon.py) until SIGTERM, reloading on SIGHUP."""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any

from mtasts_policyd.commands.common import add_common_options, configure
from mtasts_policyd.runtime.config import Config
from mtasts_policyd.runtime.daemon import run


def register(sub: Any) -> None:
    parser = sub.add_parser("serve", help="run the policy daemon",
                            description="Run the daemon. Logs one line per decision to stderr.")
    add_common_options(parser)
    parser.add_argument("--socketmap", metavar="ADDR", action="append",
                        help="socketmap listener HOST:PORT, [IPV6]:PORT or unix:/path; repeatable "
                             "(overrides socketmap.listen; default 127.0.0.1:8461)")
    parser.add_argument("--exim", metavar="ADDR", action="append",
                        help="Exim ${readsocket} listener, same forms; repeatable "
                             "(overrides exim.listen; default 127.0.0.1:8462)")
    parser.add_argument("--metrics", metavar="ADDR",
                        help="serve Prometheus /metrics and /health over HTTP on ADDR; a bare PORT means "
                             "127.0.0.1:PORT (overrides metrics.listen; default: no metrics listener)")
    parser.add_argument("--redis", metavar="URL",
                        help="share the cache with a fleet on this Redis, e.g. redis://127.0.0.1:6379/0 "
                             "(overrides cache.redis.url; README \"Fleet (Redis)\")")
    parser.set_defaults(handler=serve, reloads=True)


def serve(args: argparse.Namespace, config: Config) -> int:
    try:
        asyncio.run(run(config, reload=lambda: configure(args)))  # SIGHUP: the file and these flags again
    except OSError as exc:
        logging.getLogger("mtasts_policyd").error("cannot start: %s", exc)
        return 1
    return 0
