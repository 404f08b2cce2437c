"""`mtasts-policyd tlsrpt ingest|build|send|show`: RFC 8460 reports from the MTA's log.

Here: the options, the stores opened from the configuration (the daemon's cache for the policy in
force, `tlsrpt.store` for the counts), the output lines and the exit status (README "TLSRPT (in
progress)"). The work is in ops/tlsrpt_ingest.py, ops/tlsrpt_build.py and ops/tlsrpt_send.py.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import IO, Any

from mtasts_policyd.commands.common import command_with_actions
from mtasts_policyd.core.tlsrpt_report import ReportIdentity, build_report
from mtasts_policyd.net.dns import DnsDiscovery
from mtasts_policyd.net.https import tls_context
from mtasts_policyd.net.trust import trust_store
from mtasts_policyd.ops.tlsrpt_build import build_day, report_identity, sender_address
from mtasts_policyd.ops.tlsrpt_exim import EximIngest
from mtasts_policyd.ops.tlsrpt_ingest import FOLLOW_INTERVAL, PostfixIngest, SourceAddresses, policy_from_cache
from mtasts_policyd.ops.tlsrpt_journal import JournalIngest, journalctl_argv
from mtasts_policyd.ops.tlsrpt_send import DkimKey, Sender, send_report, sendmail_command
from mtasts_policyd.runtime.config import Config
from mtasts_policyd.runtime.daemon import CacheMissing, require_cache, tlsrpt_store_path
from mtasts_policyd.store.cache import PolicyCache
from mtasts_policyd.store.tlsrpt_store import TlsRptStore, TlsRptStoreError

DESCRIPTION = """\
TLSRPT (RFC 8460) aggregate reports from the MTA's log. `ingest` counts the TLS sessions of a
Postfix log (smtp_tls_loglevel = 1), an Exim main log or Postfix's journal per UTC day, policy
domain, policy and result; `build` writes one report file per policy domain that publishes a valid
_smtp._tls record; `send` delivers them to every rua (https POST, mailto through the local MTA),
once each, retrying for a day; `show` prints the counts of a day.
"""

EPILOG = """\
examples:
  mtasts-policyd tlsrpt ingest --postfix-log /var/log/mail.log
  mtasts-policyd tlsrpt ingest --postfix-log /var/log/mail.log --follow
  mtasts-policyd tlsrpt ingest --journal --follow
  mtasts-policyd tlsrpt ingest --exim-log /var/log/exim4/mainlog
  mtasts-policyd tlsrpt build --day 2025-11-30 --output /var/lib/mtasts-policyd/reports
  mtasts-policyd tlsrpt send --day 2025-11-30 --dry-run
  mtasts-policyd tlsrpt send --day yesterday      (hourly: sends what is due, retries the rest)
  mtasts-policyd tlsrpt show --day 2025-11-30 --domain example.com
"""


DAY_HELP = ("the UTC day: YYYY-MM-DD, or today, yesterday, today-N (N days before today, UTC); a timer "
            "sends --day yesterday")


class TlsRptCommandError(Exception):
    """One line on stderr, exit status 1."""


_RELATIVE_DAY = re.compile(r"today(?:-(?P<back>\d{1,3}))?|(?P<yesterday>yesterday)")


def day(text: str, now: datetime.datetime | None = None) -> datetime.date:
    """argparse type for --day: an ISO date, or `today`, `yesterday`, `today-N` (N days before
    today), all UTC days (RFC 8460 §4.4: a report's date-range is in UTC), so that a timer can name
    the day that just ended (contrib/systemd/mtasts-policyd-tlsrpt-send.service)."""
    relative = _RELATIVE_DAY.fullmatch(text)
    if relative:
        back = 1 if relative["yesterday"] else int(relative["back"] or 0)
        today = (now or datetime.datetime.now(datetime.UTC)).astimezone(datetime.UTC).date()
        return today - datetime.timedelta(days=back)
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD, today, yesterday, today-N): {text!r}") from None


def register(sub: Any) -> None:
    """Add `tlsrpt` to the command line (main.COMMANDS)."""
    action = command_with_actions(sub, "tlsrpt", "TLSRPT reports from the MTA's log",
                                  DESCRIPTION, EPILOG)

    p = action("ingest", ingest_command, "count the TLS sessions of a Postfix or Exim log, or the journal",
               "Read a Postfix log (smtp_tls_loglevel = 1), an Exim main log or the journal from where the last run stopped to its last complete "
               "line and count its TLS sessions; the counts and the position are stored together, so a second "
               "run never counts a line twice. Needs the daemon's cache for the policy in force. Exit status 1 "
               "if the log, the cache or the store cannot be used.")
    p.add_argument("--postfix-log", action="append", default=[], metavar="FILE",
                   help="Postfix log file (syslog or maillog_file); repeatable")
    p.add_argument("--exim-log", action="append", default=[], metavar="FILE",
                   help="Exim main log (contrib/exim/exim.conf's log_selector); repeatable")
    p.add_argument("--journal", action="store_true",
                   help="Postfix's records in systemd's journal (journalctl -o json -u 'postfix*'), from the "
                        "stored cursor")
    p.add_argument("--follow", action="store_true",
                   help="keep reading (log rotation handled) until SIGTERM or SIGINT; the position is saved "
                        "with every batch")

    p = action("build", build_command, "write the reports of a day",
               "Write one RFC 8460 report (.json.gz, named per RFC 8460 §5.1) per policy domain with sessions on "
               "DAY that publishes a valid _smtp._tls record. Building a day again gives the same files. Exit "
               "status 1 if a domain's record could not be looked up or a file not written.")
    _day_and_output(p)

    p = action("send", send_command, "deliver the reports of a day to every rua",
               "Build the reports of DAY (as `build` does) and deliver each to every rua of its domain's "
               "_smtp._tls record: https: as a POST (RFC 8460 §5.4), mailto: as the mail of §5.3 through "
               "tlsrpt.sendmail, DKIM-signed when tlsrpt.dkim is set. A rua that has the report never gets it "
               "again; a failed one is retried by a later run after a back-off, for a day. Exit status 1 if "
               "any delivery failed or a report could not be built.")
    _day_and_output(p)
    p.add_argument("--dry-run", action="store_true", help="say what would be sent; send and write nothing")

    p = action("show", show_command, "print the counts of a day",
               "Print the sessions counted on DAY per policy domain and policy: successes, failures by result "
               "type, MX host and reason; then lines not understood and local events (never reported).")
    p.add_argument("--day", type=day, required=True, metavar="DAY", help=DAY_HELP)
    p.add_argument("--domain", metavar="DOMAIN", help="only this policy domain")
    p.add_argument("--json", action="store_true", help="one JSON document (policies as in a report)")


def _day_and_output(p: argparse.ArgumentParser) -> None:
    """--day and --output, as `build` and `send` both take them."""
    p.add_argument("--day", type=day, required=True, metavar="DAY", help=DAY_HELP)
    p.add_argument("--output", metavar="DIR", help="directory for the report files (default: reports/ beside "
                                                    "the store)")


def store_path(config: Config) -> str:
    return tlsrpt_store_path(config)


@contextlib.contextmanager
def _store(config: Config, *, create: bool) -> Iterator[TlsRptStore]:
    try:
        store = TlsRptStore(store_path(config), create=create)
    except TlsRptStoreError as exc:
        raise TlsRptCommandError(str(exc)) from None
    try:
        yield store
    finally:
        store.close()


def _run(name: str, work: Callable[[], int]) -> int:
    try:
        return work()
    except (TlsRptCommandError, TlsRptStoreError, CacheMissing) as exc:
        print(f"mtasts-policyd tlsrpt {name}: {exc}", file=sys.stderr)
        return 1


# ----- ingest ----------------------------------------------------------------------------------


def ingest_command(args: argparse.Namespace, config: Config) -> int:
    def work() -> int:
        given = [bool(args.postfix_log), bool(args.exim_log), args.journal]
        if not any(given):
            raise TlsRptCommandError("nothing to read: give --postfix-log FILE, --exim-log FILE or --journal")
        if sum(given) > 1:
            raise TlsRptCommandError("--postfix-log, --exim-log and --journal are separate readers: run one of each")
        paths = args.postfix_log or args.exim_log
        for path in paths:
            if not args.follow and not os.path.isfile(path):
                raise TlsRptCommandError(f"cannot read {path}: no such file")
        cache = PolicyCache(require_cache(config), config.cache.memory_entries)
        try:
            with _store(config, create=True) as store:
                policies, sources = policy_from_cache(cache), SourceAddresses(config.tlsrpt.sending_ips)
                if args.journal:
                    journal = JournalIngest(store, policies, sources)
                    with _stopped_by_signals(journal.stop):
                        summary = journal.ingest_records(_journal_records(journal, args.follow))
                    print(f"{summary.line()} source=journal", flush=True)
                    return 0
                reader = (EximIngest if args.exim_log else PostfixIngest)(store, policies, sources)
                if args.follow:
                    with _stopped_by_signals(reader.stop):
                        reader.follow(paths,
                                      report=lambda path, summary: print(f"{summary.line()} file={path}", flush=True))
                    return 0
                for path in paths:
                    try:
                        summary = reader.ingest(path)
                    except OSError as exc:
                        raise TlsRptCommandError(f"cannot read {path}: {exc}") from None
                    print(f"{summary.line()} file={path}")
        finally:
            cache.close()
        return 0
    return _run("ingest", work)


@contextlib.contextmanager
def _stopped_by_signals(stop: threading.Event) -> Iterator[None]:
    """SIGTERM and SIGINT set `stop`: the reader ends after its next commit, the position saved."""
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _journal_records(reader: JournalIngest, follow: bool) -> Iterator[str | None]:
    """journalctl's JSON records after the stored cursor; None after a second without one (the
    reader commits then). journalctl is ended when the reader stops."""
    argv = journalctl_argv(reader.cursor(), follow)
    try:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    except OSError as exc:
        raise TlsRptCommandError(f"cannot run {argv[0]}: {exc}") from None
    assert process.stdout is not None
    try:
        for line in _lines_or_idle(process.stdout, reader.stop):
            yield line
    finally:
        if process.poll() is None:
            process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
    if process.returncode not in (0, -signal.SIGTERM) and not reader.stop.is_set():
        raise TlsRptCommandError(f"{' '.join(argv)} exited with status {process.returncode}")


def _lines_or_idle(stream: IO[bytes], stop: threading.Event, idle: float = FOLLOW_INTERVAL) -> Iterator[str | None]:
    """Lines of a pipe; None when none came for `idle` seconds (bounded waits, so `stop` is seen)."""
    rest = b""
    fd = stream.fileno()
    while not stop.is_set():
        ready, _, _ = select.select([fd], [], [], idle)
        if not ready:
            yield None
            continue
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        rest += chunk
        *complete, rest = rest.split(b"\n")
        for line in complete:
            yield line.decode("utf-8", "replace")


# ----- build -----------------------------------------------------------------------------------


def identity(config: Config) -> ReportIdentity:
    settings = config.tlsrpt
    try:
        return report_identity(settings.sender, settings.organization_name, settings.contact_info, socket.getfqdn())
    except ValueError as exc:
        raise TlsRptCommandError(str(exc)) from None


def _output(args: argparse.Namespace, config: Config) -> str:
    return args.output or os.path.join(os.path.dirname(os.path.abspath(store_path(config))), "reports")


def _warn_unfinished(name: str, when: datetime.date) -> None:
    if when >= datetime.datetime.now(datetime.UTC).date():
        print(f"mtasts-policyd tlsrpt {name}: {when} is not over (UTC): its reports are not complete yet",
              file=sys.stderr)


def build_command(args: argparse.Namespace, config: Config) -> int:
    def work() -> int:
        who = identity(config)
        _warn_unfinished("build", args.day)
        with _store(config, create=False) as store:
            results = build_day(store, args.day, who, DnsDiscovery(config.dns), _output(args, config))
        for result in results:
            if result.report is not None:
                policies = result.report.policies
                print(f"built domain={result.domain} file={result.path} report_id={result.report.report_id} "
                      f"successful={sum(p.successful for p in policies)} failed={sum(p.failed for p in policies)} "
                      f"rua={','.join(result.rua)}")
            else:
                print(f"{result.outcome} domain={result.domain} detail={result.detail}")
        outcomes = [r.outcome for r in results]
        print(f"build: {args.day}: {outcomes.count('built')} built, {outcomes.count('skipped')} skipped "
              f"(no valid TLSRPT record), {outcomes.count('failed')} failed")
        return 1 if "failed" in outcomes else 0
    return _run("build", work)


# ----- send ------------------------------------------------------------------------------------


def sender(config: Config, who: ReportIdentity) -> Sender:
    """How report mail and posts leave, from `tlsrpt:` (README "TLSRPT")."""
    settings = config.tlsrpt
    key = None
    if settings.dkim is not None:
        try:
            with open(settings.dkim.key_file, "rb") as handle:
                key = DkimKey(settings.dkim.domain, settings.dkim.selector, handle.read())
        except OSError as exc:
            raise TlsRptCommandError(f"cannot read tlsrpt.dkim.key_file: {exc}") from None
    try:
        context = tls_context(trust_store(config.fetch.ca_file))
        command = sendmail_command(settings.sendmail)
    except (OSError, ValueError) as exc:
        raise TlsRptCommandError(str(exc)) from None
    address = sender_address(settings.sender, socket.getfqdn())
    return Sender(address, who.submitter, command, key, context, settings.https_timeout)


def send_command(args: argparse.Namespace, config: Config) -> int:
    def work() -> int:
        who = identity(config)
        how = sender(config, who)
        _warn_unfinished("send", args.day)
        outcomes: list[str] = []
        with _store(config, create=False) as store:
            built = build_day(store, args.day, who, DnsDiscovery(config.dns), _output(args, config),
                              write=not args.dry_run)
            for result in built:
                if result.report is None:
                    print(f"{result.outcome} domain={result.domain} detail={result.detail}")
                    outcomes.append(f"build-{result.outcome}")
                    continue
                for sent in send_report(store, result.report, result.domain, result.rua, how,
                                        datetime.datetime.now(datetime.UTC), dry_run=args.dry_run):
                    print(f"{sent.outcome} domain={sent.domain} report_id={sent.report_id} rua={sent.rua}"
                          + (f" detail={sent.detail}" if sent.detail else ""))
                    outcomes.append(sent.outcome)
        names = ("sent", "would-send", "already-sent", "waiting", "failed", "given-up", "build-skipped",
                 "build-failed")
        print(f"send: {args.day}: " + ", ".join(f"{name} {outcomes.count(name)}" for name in names))
        return 1 if {"failed", "given-up", "build-failed"} & set(outcomes) else 0
    return _run("send", work)


# ----- show ------------------------------------------------------------------------------------


def show_command(args: argparse.Namespace, config: Config) -> int:
    def work() -> int:
        with _store(config, create=False) as store:
            domains = [args.domain.lower().rstrip(".")] if args.domain else store.domains(args.day)
            who = ReportIdentity("-", "-", "localhost.invalid")  # show prints counts, not a report
            reports = [build_report(who, args.day, domain, store.sessions(args.day, domain)) for domain in domains]
            unparsed, local = store.unparsed(args.day), store.local_events(args.day)
        if args.json:
            document = {"day": args.day.isoformat(),
                        "domains": [{"domain": d, "policies": [p.to_json() for p in r.policies]}
                                    for d, r in zip(domains, reports)],
                        "unparsed": {source: {"lines": n, "example": example} for source, (n, example) in unparsed.items()},
                        "local_events": local}
            print(json.dumps(document, indent=2))
            return 0
        for domain, report in zip(domains, reports):
            if not report.policies:
                print(f"{domain}: no sessions on {args.day}")
            for results in report.policies:
                policy = results.policy
                mode = next((line.partition(": ")[2] for line in policy.policy_string if line.startswith("mode:")), "")
                print(f"{domain} policy={policy.policy_type.value}{' mode=' + mode if mode else ''} "
                      f"successful={results.successful} failed={results.failed}")
                for detail in results.failure_details:
                    print(f"  {detail.result_type.value} sessions={detail.failed_session_count} "
                          f"mx={detail.receiving_mx_hostname} ip={detail.receiving_ip or '-'} "
                          f"from={detail.sending_mta_ip or '-'}"
                          + (f" reason={detail.failure_reason_code}" if detail.failure_reason_code else ""))
        for source, (lines, example) in unparsed.items():
            print(f"unparsed source={source} lines={lines} last={example}")
        for kind, count in local.items():
            print(f"local event={kind} count={count} (ours, not reported)")
        return 0
    return _run("show", work)
