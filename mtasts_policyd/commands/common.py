"""Command-line pieces every subcommand shares; a module of its own so that subcommand modules
import it without importing `main` (which imports them for its COMMANDS list): the common options,
argument types, and the configuration with the flags applied (`serve` re-reads it on SIGHUP)."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import Any

from mtasts_policyd.runtime.config import LOG_LEVELS, Config, RedisConfig, checked, load
from mtasts_policyd.runtime.daemon import FRONT_ENDS


def add_common_options(parser: argparse.ArgumentParser) -> None:
    """--config, --cache, --log-level: every subcommand shares them, so cron and daemon share a cache."""
    parser.add_argument("--config", metavar="FILE", help="YAML configuration file (default: none, embedded defaults)")
    parser.add_argument("--cache", metavar="PATH", help="SQLite cache file (overrides cache.path)")
    parser.add_argument("--log-level", choices=LOG_LEVELS,
                        help="log verbosity (overrides log_level; default info)")


Handler = Callable[[argparse.Namespace, Config], int]


def command_with_actions(sub: Any, name: str, help: str, description: str,
                         epilog: str) -> Callable[[str, Handler, str, str], argparse.ArgumentParser]:
    """Add a command with actions (`cache list`, `tlsrpt build`); returns a function that adds one
    action with the common options and its handler, and gives its parser for the action's options."""
    command = sub.add_parser(name, help=help, description=description, epilog=epilog,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = command.add_subparsers(dest=f"{name}_command", required=True, metavar="ACTION")

    def action(name: str, handler: Handler, help: str, description: str) -> argparse.ArgumentParser:
        parser = actions.add_parser(name, help=help, description=description)
        add_common_options(parser)
        parser.set_defaults(handler=handler)
        return parser

    return action


def concurrency(text: str) -> int:
    """argparse type for --concurrency: a whole number from 1 to 256."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 1 <= value <= 256:
        raise argparse.ArgumentTypeError(f"must be between 1 and 256: {text!r}")
    return value


def configure(args: argparse.Namespace) -> Config:
    """The configuration file with the command-line flags applied, every key checked (ConfigError
    naming the key otherwise); the same for start-up and for each SIGHUP."""
    config = load(args.config)
    if args.cache:
        config = dataclasses.replace(config, cache=dataclasses.replace(config.cache, path=args.cache))
    for section in (front_end.section for front_end in FRONT_ENDS):  # serve --socketmap, --exim
        listen = getattr(args, section, None)
        if listen:
            replaced = dataclasses.replace(getattr(config, section), listen=tuple(listen))
            config = dataclasses.replace(config, **{section: replaced})
    if getattr(args, "redis", None):  # serve --redis URL
        redis = dataclasses.replace(config.cache.redis or RedisConfig(), url=args.redis)
        config = dataclasses.replace(config, cache=dataclasses.replace(config.cache, redis=redis))
    if getattr(args, "metrics", None):
        config = dataclasses.replace(config, metrics=dataclasses.replace(config.metrics, listen=args.metrics))
    if args.log_level:
        config = dataclasses.replace(config, log_level=args.log_level)
    return checked(config)
