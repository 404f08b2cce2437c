"""`tlsrpt ingest`: read an MTA log from where the last run stopped and count its TLS sessions.

The parser (tlsrpt_postfix.py) says what each session was; this module adds what a report needs
and the log does not say, and keeps the reading exact:
- the policy in force for the domain at the session's time, from the daemon's cache: a DANE
  verdict dane-only or dane held then, and the session's MX host has usable TLSA records, is
  `tlsa` with those records and the host (RFC 8460 §4.4; RFC 8461 §2: DANE comes first); else an
  enforce or testing MTA-STS policy is `sts` with its lines and mx patterns; mode none, no policy
  or a domain the cache does not know is `no-policy-found`;
- the result type where it depends on that policy: a session at Postfix's opportunistic level
  ("may": what the daemon answers for testing policies) whose certificate chain did not verify is
  `certificate-not-trusted` under an sts policy, and a success without a policy (opportunistic TLS
  has nothing to validate against);
- the sending IP: `tlsrpt.sending_ips` (the first of the receiving IP's family), else the source
  address the routing table picks for the receiving IP (a connected UDP socket: no packet is sent);
- positions: the counts of a batch of lines and the offset after its last complete line (with the
  parser's open sessions) go into the store in one transaction (store/tlsrpt_store.py). A file
  whose device, inode or first line changed was rotated or truncated: the rest of the old file is
  read from `<path>.1` when that is the file we were reading, then the new one from its start.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import socket
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol

from mtasts_policyd.core.dane import TlsaState
from mtasts_policyd.core.dane_verdict import DaneBranch, Verdict
from mtasts_policyd.core.policy import Mode, Policy
from mtasts_policyd.core.tlsrpt_report import PolicyType, ReportPolicy, ResultType, SessionCount
from mtasts_policyd.ops.tlsrpt_postfix import (
    Event,
    Evidence,
    LocalEvent,
    LogLine,
    PostfixSessions,
    Session,
    parse_syslog,
)
from mtasts_policyd.store.cache import PolicyCache
from mtasts_policyd.store.tlsrpt_store import Batch, Position, TlsRptStore

log = logging.getLogger("mtasts_policyd.tlsrpt")

BATCH_LINES = 2000  # lines per transaction
FOLLOW_INTERVAL = 1.0  # seconds between looks at a followed file's end
HEAD_BYTES = 65536  # the first line (at most this much) identifies a file across runs
UNTRUSTED_REASON = "untrusted-tls-connection"  # Postfix "may": the chain did not verify (no reason logged)

PolicyLookup = Callable[[str, float, str], ReportPolicy]  # (policy domain, session time, MX host)
Clock = Callable[[], datetime.datetime]


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def utc_day(when: float) -> datetime.date:
    return datetime.datetime.fromtimestamp(when, datetime.UTC).date()


def policy_from_cache(cache: PolicyCache) -> PolicyLookup:
    """The policy in force for a domain at a time, as the daemon's cache knows it (module docstring).
    A policy fetched after the session stands in for the one before it, which the cache no longer has."""

    def lookup(domain: str, when: float, mx_host: str = "") -> ReportPolicy:
        entry = cache.get(domain)
        tlsa = tlsa_policy(domain, entry.dane, mx_host, when) if entry is not None else None
        if tlsa is not None:
            return tlsa
        policy = None
        if entry is not None and entry.policy is not None:
            policy = entry.usable_policy(when)
            if policy is None and entry.fetched_at is not None and entry.fetched_at > when:
                policy = entry.policy
        return report_policy(domain, policy) or ReportPolicy(PolicyType.NO_POLICY_FOUND, domain)

    return lookup


def report_policy(domain: str, policy: Policy | None) -> ReportPolicy | None:
    """The `sts` policy member for an MTA-STS policy in force; None for no active policy."""
    if policy is None or policy.mode is Mode.NONE:  # RFC 8461 §5: none is no active policy
        return None
    return ReportPolicy(PolicyType.STS, domain, policy.lines, policy.mx)


def tlsa_policy(domain: str, branch: DaneBranch | None, mx_host: str, when: float) -> ReportPolicy | None:
    """RFC 8460 §4.4 `tlsa` policy of a session with `mx_host`: the DANE verdict (dane-only or dane)
    held at `when` (a decision made after the session stands in for the one before it, as a later
    policy fetch does), and the host had usable TLSA records (RFC 7672 §3.1); policy-string is those
    records in presentation form, mx-host the host. None: DANE did not apply to that session."""
    if branch is None or branch.verdict not in (Verdict.DANE_ONLY, Verdict.DANE) or when >= branch.expires_at:
        return None
    host = mx_host.lower().rstrip(".")
    for state in branch.inputs.hosts:
        if state.host == host and isinstance(state.tlsa, TlsaState) and state.tlsa.secure and state.tlsa.usable:
            return ReportPolicy(PolicyType.TLSA, domain, tuple(str(record) for record in state.tlsa.usable), (host,))
    return None


class SourceAddresses:
    """The sending MTA's IP for a receiving IP (RFC 8460 §4.4 sending-mta-ip)."""

    def __init__(self, configured: tuple[str, ...] = ()) -> None:
        self.configured = configured
        self._known: dict[str, str] = {}

    def __call__(self, receiving_ip: str) -> str:
        if receiving_ip not in self._known:
            self._known[receiving_ip] = self._find(receiving_ip)
        return self._known[receiving_ip]

    def _find(self, receiving_ip: str) -> str:
        v6 = ":" in receiving_ip
        for ip in self.configured:
            if (":" in ip) == v6:
                return ip
        try:
            with socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.connect((receiving_ip, 25))  # UDP connect: a route lookup, no packet sent
                return str(probe.getsockname()[0])
        except OSError:
            return self.configured[0] if self.configured else ""


def session_result(session: Session, policy: ReportPolicy) -> tuple[ResultType | None, str]:
    """The RFC 8460 result of a session under a policy: None is success (module docstring)."""
    if session.evidence is Evidence.FAILED:
        return session.result, session.reason
    if session.evidence is Evidence.UNTRUSTED and policy.policy_type is not PolicyType.NO_POLICY_FOUND:
        return ResultType.CERTIFICATE_NOT_TRUSTED, UNTRUSTED_REASON
    return None, ""


@dataclass
class IngestSummary:
    """What a run read and counted, for the command's summary line."""

    lines: int = 0
    results: Counter[str] = field(default_factory=Counter)  # "success" or the result type
    unparsed: int = 0
    local: Counter[str] = field(default_factory=Counter)
    files: list[str] = field(default_factory=list)

    @property
    def sessions(self) -> int:
        return sum(self.results.values())

    def line(self) -> str:
        results = ", ".join(f"{name} {n}" for name, n in sorted(self.results.items())) or "none"
        local = ", ".join(f"{name} {n}" for name, n in sorted(self.local.items())) or "none"
        return (f"ingest: {self.lines} lines, {self.sessions} sessions ({results}), unparsed {self.unparsed}, "
                f"local events ({local})")


@dataclass(frozen=True)
class FileId:
    file_id: str  # device:inode
    head: str  # digest of the first complete line ("" while there is none)
    size: int


def file_id(path: str) -> FileId:
    with open(path, "rb") as handle:
        st = os.fstat(handle.fileno())
        first = handle.readline(HEAD_BYTES)
    head = hashlib.sha256(first).hexdigest()[:32] if first.endswith(b"\n") or len(first) == HEAD_BYTES else ""
    return FileId(f"{st.st_dev}:{st.st_ino}", head, st.st_size)


class Sessions(Protocol):
    """A log format's parser: its open sessions as plain data, saved with the position."""

    def state(self) -> str: ...


class PostfixIngest:
    """Reads one Postfix log file into the store (see the module docstring); EximIngest
    (ops/tlsrpt_exim.py) reads Exim's main log the same way."""

    KIND = "postfix"  # the position's source is "KIND:PATH"

    def __init__(self, store: TlsRptStore, policies: PolicyLookup, sources: SourceAddresses, *,
                 clock: Clock = utc_now, tz: datetime.tzinfo | None = None, batch_lines: int = BATCH_LINES) -> None:
        self.store = store
        self.policies = policies
        self.sources = sources
        self.clock = clock
        self.tz = tz
        self.batch_lines = batch_lines
        self.stop = threading.Event()  # set (SIGTERM): a read ends after its next commit

    def ingest(self, path: str) -> IngestSummary:
        """Read `path` to its last complete line; the counts and the position are committed together."""
        path = os.path.abspath(path)
        source = f"{self.KIND}:{path}"
        summary = IngestSummary()
        current = file_id(path)
        stored = self.store.position(source)
        parser = self._parser(stored.state if stored else "{}")
        start = 0
        if stored is not None:
            if (stored.file_id, stored.head) == (current.file_id, current.head) and stored.offset <= current.size:
                start = stored.offset
            else:
                self._rest_of_rotated(path, stored, source, parser, summary)
                log.info("tlsrpt ingest file=%s rotated or truncated: reading from its start", path)
        self._read(path, current, start, source, parser, summary, final=False)
        return summary

    def _rest_of_rotated(self, path: str, stored: Position, source: str, parser: Sessions,
                         summary: IngestSummary) -> None:
        """logrotate renamed the file we were reading to `<path>.1`: take its last lines first."""
        rotated = f"{path}.1"
        try:
            old = file_id(rotated)
        except OSError:
            return
        if (old.file_id, old.head) == (stored.file_id, stored.head) and stored.offset <= old.size:
            self._read(rotated, old, stored.offset, source, parser, summary, final=True)

    def _read(self, path: str, ident: FileId, start: int, source: str, parser: Sessions,
              summary: IngestSummary, *, final: bool) -> None:
        """Lines from `start`; `final`: the file no longer grows, so a last line without LF counts."""
        summary.files.append(path)
        with open(path, "rb") as handle:
            handle.seek(start)
            batch = Batch(Position(source, ident.file_id, ident.head, start))
            offset, taken = start, 0
            for raw in _lines(handle, final):
                offset += len(raw)
                self._line(raw.decode("utf-8", "replace").rstrip("\r\n"), parser, batch, summary)
                taken += 1
                if taken % self.batch_lines == 0:
                    self._commit(batch, offset, parser)
                    batch = Batch(batch.position)
                    if self.stop.is_set():  # the position is saved: the next run goes on from here
                        return
            self._commit(batch, offset, parser)

    def _commit(self, batch: Batch, offset: int, parser: Sessions) -> None:
        p = batch.position
        batch.position = Position(p.source, p.file_id, p.head, offset, parser.state())
        self.store.commit(batch, self.clock().timestamp())

    def follow(self, paths: list[str], interval: float = FOLLOW_INTERVAL,
               report: Callable[[str, IngestSummary], None] | None = None) -> None:
        """`ingest --follow`: read every file to its end, then again every `interval` seconds (a bounded
        wait on `stop`), until `stop` is set (SIGTERM). Rotation is what `ingest` handles: the next
        round sees the new file and reads the rest of `<path>.1` first; a file missing for a while
        (between logrotate's rename and syslog's reopen) is waited for. Every batch is committed
        with its position, so the follower stops, or dies, anywhere without a line lost or twice."""
        missing: set[str] = set()
        while not self.stop.is_set():
            for path in paths:
                try:
                    summary = self.ingest(path)
                except FileNotFoundError:
                    if path not in missing:
                        log.warning("tlsrpt ingest file=%s missing; waiting for it", path)
                    missing.add(path)
                    continue
                missing.discard(path)
                if report is not None and summary.lines:
                    report(path, summary)
                if self.stop.is_set():
                    break
            self.stop.wait(interval)

    def _parser(self, state: str) -> Sessions:
        return PostfixSessions(state=state)

    def _line(self, text: str, parser: Sessions, batch: Batch, summary: IngestSummary) -> None:
        summary.lines += 1
        if not text.strip():
            return
        assert isinstance(parser, PostfixSessions)
        self._log_line(parse_syslog(text, self.clock(), self.tz), text, parser, batch, summary)

    def _log_line(self, line: LogLine | None, text: str, parser: PostfixSessions, batch: Batch,
                  summary: IngestSummary) -> None:
        """One MTA line (None: not a log line at all, counted as unparsed) into the batch."""
        if line is None:
            self._unparsed(batch, summary, None, text)
            return
        self._events(parser.feed(line), batch, summary)

    def _events(self, events: Iterable[Event], batch: Batch, summary: IngestSummary) -> None:
        """Sessions (with the policy in force and their result), local events, unparsed lines."""
        for event in events:
            if isinstance(event, Session):
                policy = self.policies(event.domain, event.when, event.mx_host)
                result, reason = session_result(event, policy)
                count = SessionCount(policy, result, self.sources(event.mx_ip), event.mx_host, event.mx_ip, reason, 1)
                batch.sessions.append((utc_day(event.when), count))
                summary.results[result.value if result else "success"] += 1
            elif isinstance(event, LocalEvent):
                batch.add_local(utc_day(event.when), event.kind)
                summary.local[event.kind] += 1
            else:
                self._unparsed(batch, summary, event.when, event.line)

    def _unparsed(self, batch: Batch, summary: IngestSummary, when: float | None, text: str) -> None:
        """Counted under its own day (the reading day when it has no time stamp); the first few of a
        run are logged, so an operator sees what the reader does not understand."""
        day = utc_day(when) if when is not None else self.clock().date()
        batch.add_unparsed(day, text)
        summary.unparsed += 1
        if summary.unparsed <= 3:
            log.warning("tlsrpt ingest: line not understood (counted as unparsed): %s", text[:300])


def _lines(handle: BinaryIO, final: bool) -> Iterator[bytes]:
    """Complete lines (with their LF); a last line without LF only when `final`."""
    rest = b""
    while chunk := handle.read(1 << 16):
        rest += chunk
        *complete, rest = rest.split(b"\n")
        for line in complete:
            yield line + b"\n"
    if final and rest:
        yield rest
