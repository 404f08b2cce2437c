"""contrib/systemd's units parse, and each ExecStart= names real subcommands and options.

Two checks: `systemd-analyze verify` on a copy of each unit whose ExecStart= points at this
checkout's `mtasts-policyd` (the units name /opt/mtasts-policyd/..., which is not installed here;
skipped where systemd-analyze is missing), and every ExecStart= command line parsed by the real
argparse parser of `mtasts-policyd`, so a renamed option fails here, not on an operator's host.
Also `--day today|yesterday|today-N` of `tlsrpt build/send`, which the send timer relies on.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from mtasts_policyd.commands import tlsrpt
from mtasts_policyd.commands.main import make_parser
from tests.conftest import ROOT

UNITS = ROOT / "contrib" / "systemd"
INSTALLED = "/opt/mtasts-policyd/bin/mtasts-policyd"  # contrib/systemd/README.md's install path
SEND_SERVICE = UNITS / "mtasts-policyd-tlsrpt-send.service"
SEND_TIMER = UNITS / "mtasts-policyd-tlsrpt-send.timer"


def directives(unit: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) in order: systemd's syntax (repeated keys, `#`/`;` comments)."""
    section, found = "", []
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        found.append((section, key.strip(), value.strip()))
    return found


def exec_starts(unit: Path) -> list[list[str]]:
    """The ExecStart= command lines, their `-`/`@`/`+`/`!` prefixes dropped (systemd.service(5))."""
    lines = [value.lstrip("-@+!:") for section, key, value in directives(unit)
             if (section, key) == ("Service", "ExecStart") and value]
    return [shlex.split(line) for line in lines]


@pytest.mark.fast
@pytest.mark.parametrize("unit", sorted(UNITS.glob("*.service")), ids=lambda p: p.name)
def test_each_execstart_is_a_command_line_argparse_accepts(unit: Path) -> None:
    starts = exec_starts(unit)
    assert starts, f"{unit.name} has no ExecStart="
    for argv in starts:
        if argv[0] != INSTALLED:
            continue  # e.g. /bin/kill for ExecReload (not an ExecStart) never lands here
        args = make_parser().parse_args(argv[1:])  # SystemExit (exit status 2) on an unknown option
        assert args.config == "/etc/mtasts-policyd.yaml", unit.name
    assert any(argv[0] == INSTALLED for argv in starts), unit.name


@pytest.mark.fast
def test_the_send_timer_sends_yesterday_and_retries_through_the_day() -> None:
    """Issue 10: the timer builds the day that just ended and sends it, hourly, so that failed
    deliveries are retried when due (README "TLSRPT"); the day before is run too, so its retries
    go on until a day after their first try and end as given-up, loudly."""
    starts = exec_starts(SEND_SERVICE)
    assert [argv[1:4] for argv in starts] == [["tlsrpt", "send", "--config"]] * 2
    assert [argv[argv.index("--day") + 1] for argv in starts] == ["today-2", "yesterday"]
    service = directives(SEND_SERVICE)
    assert ("Service", "Type", "oneshot") in service
    # The first run's failure (a retry due later) must not keep the second from running.
    assert [v for s, k, v in service if k == "ExecStart"][0].startswith("-")
    timer = {(s, k): v for s, k, v in directives(SEND_TIMER)}
    assert timer[("Timer", "OnCalendar")].endswith("UTC")  # days are UTC days (RFC 8460 §4.4)
    assert timer[("Timer", "Persistent")] == "yes" and timer[("Install", "WantedBy")] == "timers.target"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path) -> None:
    command = shutil.which("mtasts-policyd")
    assert command is not None
    for unit in UNITS.glob("*.service"):
        (tmp_path / unit.name).write_text(unit.read_text().replace(INSTALLED, command))
    for unit in UNITS.glob("*.timer"):
        shutil.copyfile(unit, tmp_path / unit.name)
    names = sorted(str(path) for path in tmp_path.iterdir())
    result = subprocess.run(["systemd-analyze", "verify", *names], capture_output=True, text=True, timeout=60,
                            cwd=tmp_path, check=False)
    # Unknown keys and bad values are warnings with exit status 0: none may be printed at all.
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stdout + result.stderr


@pytest.mark.fast
def test_day_names_the_utc_days_a_timer_needs() -> None:
    now = datetime.datetime(2026, 1, 1, 0, 30, tzinfo=datetime.UTC)
    assert tlsrpt.day("yesterday", now) == datetime.date(2025, 12, 31)
    assert tlsrpt.day("today", now) == datetime.date(2026, 1, 1)
    assert tlsrpt.day("today-2", now) == datetime.date(2025, 12, 30)
    assert tlsrpt.day("2025-11-30") == datetime.date(2025, 11, 30)
    for bad in ("tomorrow", "today+1", "today-", "2025-13-01", "yesterday-1"):
        with pytest.raises(argparse.ArgumentTypeError):
            tlsrpt.day(bad, now)


@pytest.mark.fast
def test_day_keywords_reach_the_commands() -> None:
    before = datetime.datetime.now(datetime.UTC).date()
    args = make_parser().parse_args(["tlsrpt", "send", "--day", "yesterday"])
    after = datetime.datetime.now(datetime.UTC).date()
    assert args.day in {before - datetime.timedelta(days=1), after - datetime.timedelta(days=1)}
    for action in ("build", "send"):
        assert "yesterday" in subcommand_help("tlsrpt", action), action


def subcommand_help(*names: str) -> str:
    """`mtasts-policyd NAME ... --help`'s text, without running it."""
    parser = make_parser()
    for name in names:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return parser.format_help()
