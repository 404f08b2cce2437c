"""Command-line pieces every subcommand shares; a module of its own so that subcommand modules
import it without importing `main` (which imports them for its COMMANDS list): the common options,
argument types, and the configuration with the flags applied (`serve` re-reads it on SIGHUP)."""

from __future__ import annotations

import argparse
import dataclasses

from mtasts_policyd.runtime.config import LOG_LEVELS, Config, checked, load
from mtasts_policyd.runtime.daemon import FRONT_ENDS


def add_common_options(parser: argparse.ArgumentParser) -> None:
    """--config, --cache, --log-level: every subcommand shares them, so cron and daemon share a cache."""
    parser.add_argument("--config", metavar="FILE", help="YAML configuration file (default: none, embedded defaults)")
    parser.add_argument("--cache", metavar="PATH", help="SQLite cache file (overrides cache.path)")
    parser.add_argument("--log-level", choices=LOG_LEVELS,
                        help="log verbosity (overrides log_level; default info)")


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
    if getattr(args, "metrics", None):
        config = dataclasses.replace(config, metrics=dataclasses.replace(config.metrics, listen=args.metrics))
    if args.log_level:
        config = dataclasses.replace(config, log_level=args.log_level)
    return checked(config)
