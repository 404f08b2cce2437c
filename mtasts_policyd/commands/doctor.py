"""`mtasts-policyd doctor`: run the checks of ops/doctor.py on this configuration and print them.

The exit code is 1 when there is a problem, else 0 (README "Doctor").
"""

from __future__ import annotations

import argparse
from typing import Any

from mtasts_policyd.commands.common import add_common_options
from mtasts_policyd.frontends.listeners import parse_address
from mtasts_policyd.net.trust import trust_store
from mtasts_policyd.ops.doctor import (
    DEBIAN_EXIM_CONFIGS,
    EXIM_BINARIES,
    Listeners,
    check_cache,
    check_exim,
    check_listeners,
    check_postfix,
    check_resolver,
    check_trust_store,
    default_exim_config,
    find_exim,
)
from mtasts_policyd.runtime.config import Config
from mtasts_policyd.runtime.daemon import cache_path


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "doctor", help="check the live setup (daemon, trust store, resolver, cache, Postfix, Exim)",
        description="Check that the daemon of this configuration answers on its listeners, that the trust "
                    "store has CAs, the resolver answers and the cache directory is writable; with --postfix "
                    "and --exim, that the MTA is configured to ask it. Prints one line per check "
                    "('ok', 'warning' or 'problem', saying what to change), then a summary.",
        epilog="exit status: 0 no problem (warnings allowed), 1 problems, 2 usage error")
    add_common_options(parser)
    parser.add_argument("--postfix", dest="postfix_check", action="store_true",
                        help="check Postfix's main.cf through postconf")
    parser.add_argument("--postconf-dir", metavar="DIR",
                        help="Postfix configuration directory (postconf -c DIR); implies --postfix")
    parser.add_argument("--exim", dest="exim_check", action="store_true",
                        help="check the Exim configuration")
    parser.add_argument("--exim-config", metavar="FILE",
                        help=f"Exim configuration file (default: {' or '.join(DEBIAN_EXIM_CONFIGS)}); "
                             "implies --exim")
    parser.add_argument("--exim-binary", metavar="PATH",
                        help=f"Exim binary for 'exim -C FILE -bV' (default: {' or '.join(EXIM_BINARIES)})")
    parser.set_defaults(handler=doctor)


def listeners_of(config: Config) -> Listeners:
    return Listeners(socketmap=tuple(map(parse_address, config.socketmap.listen)),
                     maps=tuple(config.socketmap.maps), exim=tuple(map(parse_address, config.exim.listen)))


def doctor(args: argparse.Namespace, config: Config) -> int:
    listeners = listeners_of(config)
    store = trust_store(config.fetch.ca_file)
    findings = [*check_listeners(listeners), *check_trust_store(store), *check_resolver(config.dns),
                *check_cache(cache_path(config))]
    if args.postfix_check or args.postconf_dir:
        findings += check_postfix(listeners, store, args.postconf_dir, config.dane.mode)
    if args.exim_check or args.exim_config:
        findings += check_exim(listeners.exim, args.exim_config or default_exim_config(),
                               args.exim_binary or find_exim())
    for finding in findings:
        print(finding)
    problems = sum(f.level == "problem" for f in findings)
    warnings = sum(f.level == "warning" for f in findings)
    print(f"doctor: {problems} problem{'s' * (problems != 1)}, {warnings} warning{'s' * (warnings != 1)}")
    return 1 if problems else 0
