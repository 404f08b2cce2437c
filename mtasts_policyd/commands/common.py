"""What every subcommand's command line shares: the common options and argument types."""

from __future__ import annotations

import argparse

from mtasts_policyd.runtime.config import LOG_LEVELS


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
