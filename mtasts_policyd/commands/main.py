"""The `mtasts-policyd` command: the parser of every subcommand, the configuration, the logging."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from mtasts_policyd import __version__
from mtasts_policyd.commands import cache, doctor, query, serve, survey, tlsrpt, warm
from mtasts_policyd.commands.common import configure
from mtasts_policyd.runtime import signals

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


# Each subcommand module contributes one register(subparsers) function; the parser it adds sets
# `handler(args, config) -> exit code`.
COMMANDS: list[Callable[[Any], None]] = [serve.register, query.register, survey.register, cache.register,
                                         warm.register, doctor.register, tlsrpt.register]


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtasts-policyd", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in COMMANDS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "reloads", False):
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


if __name__ == "__main__":
    sys.exit(main())
