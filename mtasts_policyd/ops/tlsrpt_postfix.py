"""Postfix smtp(8) logs at smtp_tls_loglevel = 1 as TLS sessions: what `tlsrpt ingest` counts.

Postfix before 3.10 cannot report TLSRPT itself, but its log says what happened to every session.
The lines below are what Postfix 3.7 really logs; tests/e2e/test_tlsrpt_postfix.py runs the real
Postfix against MX hosts with each TLS defect and checks this parser against its log. Per session:

    Verified TLS connection established to mx.d[192.0.2.25]:25: TLSv1.3 ...        (secure: success)
    server certificate verification failed for mx.d[192.0.2.25]:25: num=62:hostname mismatch
    server certificate verification failed for mx.d[192.0.2.25]:25: certificate has expired
    server certificate verification failed for mx.d[192.0.2.25]:25: num=65:no matching DANE TLSA records
    certificate verification failed for mx.d[192.0.2.25]:25: untrusted issuer /O=...
    certificate verification failed for mx.d[192.0.2.25]:25: self-signed certificate
    Untrusted TLS connection established to mx.d[...]:25: ...  (after a failure, or alone at "may")
    Trusted TLS connection established to mx.d[...]:25: ...    ("may": the chain verified, no name check)
    SSL_connect error to mx.d[192.0.2.25]:25: lost connection                  (handshake failed)
    3F1C2216C87: Server certificate not verified            (the session ends; Postfix tries the next MX)
    3F1C2216C87: to=<u@d>, relay=mx.d[192.0.2.25]:25, ..., status=deferred (TLS is required, but was
        not offered by host mx.d[192.0.2.25])           (or: but host mx.d[...] refused to start TLS: 454 ...)
    3F1C2216C87: to=<u@d>, relay=mx.d[192.0.2.25]:25, ..., status=sent (250 2.0.0 Ok)

The TLS lines carry no queue id and no recipient, so they are joined per smtp(8) process (service
and PID): a session's lines come first, then a line with the queue id ends it (a note such as
"Server certificate not verified" when Postfix goes on to the next MX, or the delivery status),
and the status line's recipient domain names the policy domain for every session of that delivery.

What is counted (README "TLSRPT"): each TLS handshake, and each session where TLS was required
but not offered or refused; the points where Postfix >= 3.10 reports itself, so numbers do not
change on upgrade. Result types follow what Postfix >= 3.10 reports at those points, as far as
its TLSRPT_README shows them (a new session's self-signed certificate is validation-failure with
the reason "self-signed_certificate"; a resumed session with an untrusted certificate is
certificate-not-trusted). Postfix >= 3.10 with smtp_tlsrpt_enable = yes also logs its own verdict,

    TLSRPT: status=failure, domain=d, receiving_mx=mx.d[192.0.2.25], failure_type=validation_failure, failure_reason=...

and that line, when present, is the session's result: a report built from such a log says what
Postfix's own reporter would. A connection reused for another delivery (conn_use=2 and up) is no new
session. A plaintext session where TLS was not required is no TLS session and is not counted. A
deferral because our policy map was unreachable (`policy table lookup error`, then `relay=none ...
client TLS configuration problem`) is our fault, not the receiver's: a local event, never reported.
Lines of the counted services that fit none of the known forms are returned as unparsed.

The state between lines (sessions still open) is plain data, saved with the reader's position, so
a restart in the middle of a delivery's lines loses nothing. Pure: no I/O.
"""

from __future__ import annotations

import datetime
import enum
import json
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

from mtasts_policyd.core.names import to_alabel
from mtasts_policyd.core.tlsrpt_report import ResultType

DEFAULT_SERVICES = ("smtp", "relay")  # master.cf services running smtp(8) in a stock Postfix
# contrib/postfix/tlsrpt-master.cf's transport for report mail logs as "postfix/tlsrpt/smtp": those
# are our own report deliveries, never counted (issue 10: no session counted for report mail).
REPORT_TRANSPORT = "tlsrpt"
STALE_AFTER = 3600.0  # seconds: a process's open session without any further line is given up
RECIPIENTS_WINDOW = 60.0  # seconds a process is remembered after its last status line

_MONTHS = {name: number for number, name in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1)}
# "Nov 30 09:58:11 host postfix/smtp[123]: text" (syslog, postlogd) and RFC 3339 stamps (rsyslog's
# high-precision format, `journalctl -o short-iso`).
_TRADITIONAL = re.compile(r"(?P<mon>[A-Z][a-z]{2}) {1,2}(?P<day>\d{1,2}) (?P<time>\d\d:\d\d:\d\d)(?:\.\d+)? "
                          r"(?P<host>\S+) (?P<prog>[^\s\[\]]+)\[(?P<pid>\d+)\]: (?P<text>.*)")
_ISO = re.compile(r"(?P<stamp>\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d)) "
                  r"(?P<host>\S+) (?P<prog>[^\s\[\]]+)\[(?P<pid>\d+)\]: (?P<text>.*)")

_PEER = r"(?P<host>[^\s\[\]]+)\[(?P<ip>[^\]\s]+)\](?::\d+)?"
_ESTABLISHED = re.compile(rf"(?P<trust>Verified|Trusted|Untrusted|Anonymous) TLS connection (?P<how>established|reused) "
                          rf"to {_PEER}: ")
_VERIFY_FAILED = re.compile(rf"(?:server )?certificate verification failed for {_PEER}: (?P<reason>.+)")
_SSL_CONNECT = re.compile(rf"SSL_connect error to {_PEER}: (?P<reason>.*)")
_MAP_ERROR = re.compile(r'warning: smtp_tls_policy_maps, next-hop destination "[^"]*": policy table lookup error')
_STATUS = re.compile(r"(?P<qid>[0-9A-Za-z]{6,20}): to=<(?P<rcpt>[^>]*)>, (?:orig_to=<[^>]*>, )?relay=(?P<relay>[^,]+), "
                     r"(?:conn_use=(?P<conn_use>\d+), )?delay=.*?status=(?P<status>\w+) \((?P<reason>.*)\)")
# Postfix >= 3.10 (smtp_tlsrpt_enable = yes): its own TLSRPT verdict for one handshake.
_TLSRPT = re.compile(rf"(?:[0-9A-Za-z]{{6,20}}: )?TLSRPT: status=(?P<status>success|failure), domain=[^,\s]+, "
                     rf"receiving_mx={_PEER}(?:, failure_type=(?P<type>[a-z_]+))?(?:, failure_reason=(?P<reason>.*))?")
# tls_client.c: a resumed session whose certificate did not verify before (no reason is logged again).
_REUSED_UNTRUSTED = re.compile(rf"{_PEER}: re-using session with untrusted (?:certificate|peer credential)")
_NOTE = re.compile(r"(?P<qid>[0-9A-Za-z]{6,20}): (?P<note>.*)")
_RELAY = re.compile(rf"{_PEER}")
# Postfix 3.7 smtp_proto.c: TLS required by the policy, and the server does not do it.
_NOT_OFFERED = re.compile(rf"TLS is required, but (?:was not offered by host {_PEER}|"
                          rf"host (?P<host2>[^\s\[\]]+)\[(?P<ip2>[^\]\s]+)\] refused to start TLS)")
# Lines the counted services write that carry nothing for a report (loglevel 1, and above).
_KNOWN = re.compile(r"(?:warning|error|fatal|panic): |connect to |Host offered STARTTLS|SSL_connect:|"
                    r"(?:Verified|Trusted|Untrusted|Anonymous) (?:subject_CN|TLS connection reused)|"
                    r"(?:server )?certificate verification depth=|[^\s\[\]]+\[[^\]]+\]:\d+: (?:subject_CN|"
                    r"issuer|pkey_fingerprint|cert_fingerprint|depth=)")


class Evidence(enum.StrEnum):
    """What the log says about one TLS session, before a policy gives it a result type."""

    VERIFIED = "verified"  # "Verified TLS connection": chain and name checked (secure, verify)
    TRUSTED = "trusted"  # "Trusted TLS connection": chain checked, no name check (may, encrypt)
    UNTRUSTED = "untrusted"  # "Untrusted"/"Anonymous" with no failure logged: nothing checked (may)
    FAILED = "failed"  # a failure with its RFC 8460 result type


@dataclass(frozen=True)
class LogLine:
    when: float  # seconds since the epoch
    program: str  # "postfix/smtp", "postfix-out/relay"
    pid: int
    text: str

    @property
    def service(self) -> str:
        return self.program.rpartition("/")[2]


def parse_syslog(line: str, now: datetime.datetime, tz: datetime.tzinfo | None = None) -> LogLine | None:
    """One syslog line, or None when it is not one. Traditional stamps have no year and no zone:
    they are read in `tz` (None: this machine's zone) and in the year that puts them at most a
    day after `now` (a log read on 1 January still holds 31 December)."""
    match = _ISO.fullmatch(line)
    if match:
        try:
            stamp = datetime.datetime.fromisoformat(match["stamp"].replace(" ", "T"))
        except ValueError:
            return None
        return LogLine(stamp.timestamp(), match["prog"], int(match["pid"]), match["text"])
    match = _TRADITIONAL.fullmatch(line)
    if match is None or match["mon"] not in _MONTHS:
        return None
    hour, minute, second = (int(part) for part in match["time"].split(":"))
    zone = tz or now.astimezone().tzinfo
    local_now = now.astimezone(zone)
    for year in (local_now.year, local_now.year - 1):
        try:
            stamp = datetime.datetime(year, _MONTHS[match["mon"]], int(match["day"]), hour, minute, second,
                                      tzinfo=zone)
        except ValueError:  # 29 February of another year, 31 April
            continue
        if stamp <= local_now + datetime.timedelta(days=1):
            return LogLine(stamp.timestamp(), match["prog"], int(match["pid"]), match["text"])
    return None


@dataclass(frozen=True)
class Session:
    """One TLS session for the report, once its delivery named the domain."""

    when: float
    domain: str  # the recipient domain (A-label): the policy domain
    mx_host: str
    mx_ip: str
    evidence: Evidence
    result: ResultType | None = None  # for FAILED
    reason: str = ""  # failure-reason-code


@dataclass(frozen=True)
class LocalEvent:
    """Ours, not the receiver's: counted for the operator, never reported."""

    when: float
    kind: str  # policy-map-error, stale-session


@dataclass(frozen=True)
class Unparsed:
    when: float | None
    line: str


Event = Session | LocalEvent | Unparsed


@dataclass
class _Open:
    """A session whose TLS lines were seen and whose delivery has not named the domain yet."""

    when: float
    host: str
    ip: str
    evidence: str
    result: str = ""
    reason: str = ""
    reported: bool = False  # Postfix >= 3.10's TLSRPT line gave the verdict: later lines change nothing


@dataclass
class _Process:
    """One smtp(8) process (service and PID): its session in progress and the ones it closed."""

    seen: float
    current: _Open | None = None
    done: list[_Open] = field(default_factory=list)
    map_error: bool = False
    last_status: str = ""  # "qid relay" of the last status line: more recipients, same session


def verification_result(reason: str) -> tuple[ResultType, str]:
    """RFC 8460 §4.3.1 result type and failure-reason-code of a Postfix verification failure (the
    text after "verification failed for host[ip]:port: ", from OpenSSL's X509 error strings)."""
    text = reason.lower()
    if "no matching dane tlsa records" in text:
        # RFC 8460 §4.3.2.1: the host's TLSA records (DANE) match none of its certificates.
        return ResultType.TLSA_INVALID, reason[:200]
    if "hostname mismatch" in text or "name mismatch" in text:
        return ResultType.CERTIFICATE_HOST_MISMATCH, ""
    if "certificate has expired" in text:
        return ResultType.CERTIFICATE_EXPIRED, ""
    if text in ("self-signed certificate", "self signed certificate"):
        # Postfix >= 3.10 (TLSRPT_README, "TLSRPT Status logging"): validation_failure with OpenSSL's
        # error string, blanks made underscores, as the reason.
        return ResultType.VALIDATION_FAILURE, "self-signed_certificate"
    if any(words in text for words in ("untrusted issuer", "local issuer", "issuer certificate",
                                        "certificate chain", "self-signed certificate in")):
        # §4.3.1: certificate-not-trusted SHOULD carry a failure-reason-code.
        return ResultType.CERTIFICATE_NOT_TRUSTED, reason[:200]
    return ResultType.VALIDATION_FAILURE, reason[:200]


class PostfixSessions:
    """Turns Postfix log lines, in order, into sessions, local events and unparsed lines."""

    def __init__(self, services: tuple[str, ...] = DEFAULT_SERVICES, state: str = "{}") -> None:
        self.services = services
        self._processes: dict[str, _Process] = {}
        self._latest = 0.0  # time of the latest line fed
        for key, data in json.loads(state).items():
            current = _Open(**data["current"]) if data.get("current") else None
            self._processes[key] = _Process(data["seen"], current, [_Open(**d) for d in data.get("done", [])],
                                            data.get("map_error", False), data.get("last_status", ""))
            self._latest = max(self._latest, data["seen"])

    def state(self) -> str:
        """The open sessions as JSON, to be stored with the reader's position. Processes silent
        for STALE_AFTER before the latest line read are forgotten (the log's time: an old log is
        read in its own time); one with nothing open is kept for RECIPIENTS_WINDOW after
        its last status line, so the next recipients of the same delivery are still known as such
        after a restart."""
        now = self._latest
        for key in [key for key, p in self._processes.items() if now - p.seen >= STALE_AFTER
                    or not (p.current or p.done or p.map_error) and now - p.seen >= RECIPIENTS_WINDOW]:
            del self._processes[key]
        return json.dumps({key: asdict(p) for key, p in self._processes.items()}, sort_keys=True,
                          separators=(",", ":"))

    def feed(self, line: LogLine) -> Iterator[Event]:
        """The events one line completes (a status line completes all sessions of its delivery)."""
        if line.service not in self.services or not line.program.startswith("postfix"):
            return
        if REPORT_TRANSPORT in line.program.split("/")[:-1]:
            return
        self._latest = max(self._latest, line.when)
        key = f"{line.program}[{line.pid}]"
        process = self._processes.get(key)
        if process is not None and line.when - process.seen >= STALE_AFTER:  # a recycled PID
            yield from (LocalEvent(line.when, "stale-session") for _ in range(len(process.done) + bool(process.current)))
            process = None
        if process is None:
            process = self._processes[key] = _Process(line.when)
        process.seen = line.when
        yield from self._feed(process, line)

    def _feed(self, process: _Process, line: LogLine) -> Iterator[Event]:
        text = line.text
        if match := _ESTABLISHED.match(text):
            if match["how"] == "established":  # "reused": no new handshake (README)
                self._tls_line(process, line.when, match["host"], match["ip"], Evidence(_trust(match["trust"])))
        elif match := _VERIFY_FAILED.fullmatch(text):
            result, reason = verification_result(match["reason"])
            self._tls_line(process, line.when, match["host"], match["ip"], Evidence.FAILED, result, reason)
        elif match := _TLSRPT.fullmatch(text):
            yield from self._reported(process, line, match)
        elif match := _REUSED_UNTRUSTED.match(text):
            self._tls_line(process, line.when, match["host"], match["ip"], Evidence.FAILED,
                           ResultType.CERTIFICATE_NOT_TRUSTED)
        elif match := _SSL_CONNECT.fullmatch(text):
            # The mapping: a handshake that failed is validation-failure "tls-handshake-failure".
            self._tls_line(process, line.when, match["host"], match["ip"], Evidence.FAILED,
                           ResultType.VALIDATION_FAILURE, "tls-handshake-failure")
        elif _MAP_ERROR.match(text):
            process.map_error = True
        elif match := _STATUS.fullmatch(text):
            yield from self._status(process, line.when, match)
        elif _KNOWN.match(text):
            pass
        elif match := _NOTE.fullmatch(text):
            self._close(process, line.when, match["note"])
        else:
            yield Unparsed(line.when, f"{line.program}[{line.pid}]: {text}")

    def _reported(self, process: _Process, line: LogLine, match: re.Match[str]) -> Iterator[Event]:
        """Postfix >= 3.10's own verdict: it replaces what the other lines of the handshake say."""
        if match["status"] == "success":
            verdict: tuple[Evidence, ResultType | None, str] = (Evidence.VERIFIED, None, "")
        else:
            try:
                result = ResultType((match["type"] or "").replace("_", "-"))
            except ValueError:
                yield Unparsed(line.when, f"{line.program}[{line.pid}]: {line.text}")
                return
            verdict = (Evidence.FAILED, result, (match["reason"] or "")[:200])
        current = process.current
        if current is not None and (current.host, current.ip) == (match["host"].lower(), match["ip"]):
            process.current = None  # the same handshake: the verdict replaces it
        self._tls_line(process, line.when, match["host"], match["ip"], *verdict)
        assert process.current is not None
        process.current.reported = True

    @staticmethod
    def _tls_line(process: _Process, when: float, host: str, ip: str, evidence: Evidence,
                  result: ResultType | None = None, reason: str = "") -> None:
        current = process.current
        if current is not None and (current.host, current.ip) == (host.lower(), ip):
            if current.evidence == Evidence.FAILED or current.reported:
                return  # "Untrusted TLS connection established" after the failure that made it so
        elif current is not None:
            process.done.append(current)  # a session that ended without a line of its own
        process.current = _Open(when, host.lower(), ip, evidence.value, result.value if result else "", reason)

    @staticmethod
    def _close(process: _Process, when: float, text: str) -> None:
        """A line with the queue id ends the session in progress; without TLS lines before it, only
        "TLS is required, but ..." makes it a session to count."""
        if process.current is not None:
            process.done.append(process.current)
            process.current = None
        elif match := _NOT_OFFERED.search(text):
            process.done.append(_Open(when, (match["host"] or match["host2"]).lower(), match["ip"] or match["ip2"],
                                      Evidence.FAILED.value, ResultType.STARTTLS_NOT_SUPPORTED.value))

    def _status(self, process: _Process, when: float, match: re.Match[str]) -> Iterator[Event]:
        status_key = f"{match['qid']} {match['relay']}"
        if match["conn_use"] and int(match["conn_use"]) > 1 or status_key == process.last_status:
            process.last_status = status_key  # a reused connection, or another recipient of the same session
            return
        process.last_status = status_key
        if process.map_error and match["relay"] == "none":
            process.map_error = False
            yield LocalEvent(when, "policy-map-error")
        self._close(process, when, match["reason"])
        domain = to_alabel(match["rcpt"].rpartition("@")[2]) if "@" in match["rcpt"] else None
        done, process.done = process.done, []
        if domain is None:
            yield from (Unparsed(when, f"session without a recipient domain: {match.group(0)}") for _ in done)
            return
        for item in done:
            yield Session(item.when, domain, item.host, item.ip, Evidence(item.evidence),
                          ResultType(item.result) if item.result else None, item.reason)


def _trust(word: str) -> str:
    return {"Verified": Evidence.VERIFIED, "Trusted": Evidence.TRUSTED}.get(word, Evidence.UNTRUSTED).value
