"""Exim 4.96 main log lines as TLS sessions: what `tlsrpt ingest --exim-log` counts.

What Exim 4.96 (Debian's exim4-daemon-light, GnuTLS) really logs with contrib/exim/exim.conf's
log_selector (+tls_certificate_verified +tls_peerdn ...) for each MX behaviour of the test world;
tests/e2e/test_tlsrpt_exim_e2e.py runs the real Exim and tests/data/exim-4.96-tls.log is its
recording. Per delivery (message id MSGID, recipient RCPT):

    MSGID => RCPT R=... T=... H=mx.d [192.0.2.25] X=TLS1.3:...:256 CV=yes DN="..." C="250 ..."  (verified)
    MSGID => RCPT ... H=mx.d [192.0.2.25] X=TLS1.3:... CV=no DN="..." ...     (opportunistic, not verified)
    MSGID => RCPT ... H=mx.d [192.0.2.25] C="250 ..."                         (no TLS at all)
    MSGID == RCPT ... defer (-37) H=mx.d [ip]: TLS session: (certificate verification failed)
                                                                            (name mismatch: no reason given)
    MSGID == RCPT ... defer (-37) H=mx.d [ip]: TLS session: (certificate verification failed): certificate invalid
                                                    (untrusted CA, self-signed and expired alike, GnuTLS)
    MSGID == RCPT ... defer (-38) H=mx.d [ip]: a TLS session is required, but the server did not offer TLS support
    MSGID == RCPT ... defer (0) H=mx.d [ip]: SMTP error from remote mail server after STARTTLS: 454 ...
    MSGID == RCPT ... defer (-37) H=mx.d [ip]: TLS session: (gnutls_handshake): ...   (handshake failed)
    MSGID TLS session: (gnutls_handshake): ...: delivering unencrypted to H=mx.d [ip] (not in hosts_require_tls)
                                        (opportunistic: the handshake failed, then plaintext; the => follows)

Each line carries the message id, so a session is joined to its recipient domain through it (only
the "delivering unencrypted" line needs that: its delivery line follows). Exim says less than
Postfix: an expired certificate is not told from an untrusted one ("certificate invalid"), and a
name mismatch has no reason at all. `->` lines (more recipients, same session) are not counted
again; a plaintext delivery is no TLS session. Lines with a time stamp and no TLS content are
Exim's other business and ignored; lines that mention TLS in no known form, and lines without an
Exim time stamp, are unparsed. Pure: no I/O.
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Iterator

from mtasts_policyd.core.names import to_alabel
from mtasts_policyd.core.tlsrpt_report import ResultType
from mtasts_policyd.ops.tlsrpt_ingest import IngestSummary, PostfixIngest, Sessions
from mtasts_policyd.ops.tlsrpt_postfix import Event, Evidence, Session, Unparsed
from mtasts_policyd.store.tlsrpt_store import Batch

# "2026-11-30 10:32:36 [pid] MSGID text" (log_timezone adds " +0100"; +pid adds "[pid]")
_LINE = re.compile(r"(?P<stamp>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)(?:\.\d+)?(?P<zone> [+-]\d{4})?(?: \[\d+\])? "
                   r"(?P<text>.*)")
_MSGID = r"(?P<id>[0-9A-Za-z]{6}-[0-9A-Za-z]{6,11}-[0-9A-Za-z]{2,4})"
_HOST = r"H=(?P<host>[^\s\[\]]+) \[(?P<ip>[^\]\s]+)\](?::\d+)?"
_DELIVERY = re.compile(rf"{_MSGID} (?P<flag>=>|==|\*\*) (?P<rcpt>\S+) (?P<rest>.*)")
_DELIVERED_HOST = re.compile(rf"{_HOST}")
_TLS = re.compile(r" X=(?P<cipher>\S+)(?: CV=(?P<cv>yes|no|dane))?")
_UNENCRYPTED = re.compile(rf"{_MSGID} TLS session: \((?P<what>[^)]*)\): .*delivering unencrypted to {_HOST}")
_VERIFY = "TLS session: (certificate verification failed)"
_HANDSHAKE = re.compile(r"TLS session: \((?:gnutls_handshake|SSL_connect)\)")
# contrib/exim/exim.conf's router for our own report mail (TLSRPT_SENDER): those deliveries are
# never counted (issue 10: no session counted for report mail itself).
_REPORT_ROUTER = re.compile(r"(?:^| )R=tlsrpt_reports(?: |$)")
_NOT_OFFERED = "a TLS session is required, but the server did not offer TLS support"
_REFUSED = "SMTP error from remote mail server after STARTTLS"
# Lines that name TLS and carry nothing for a report (the sink closing without close_notify).
_KNOWN = re.compile(r"(?:\S+ )?H=\S+ \[[^\]\s]+\](?::\d+)?(?: TLS error on connection|: a TLS session is required|"
                    r": SMTP error from remote mail server after STARTTLS)")


def exim_result(reason: str) -> tuple[ResultType, str] | None:
    """RFC 8460 result and failure-reason-code of a deferral's reason, None if it is no TLS failure."""
    if reason.startswith(_VERIFY):
        detail = reason[len(_VERIFY):].lstrip(": ").strip()
        if not detail:  # Exim 4.96/GnuTLS: the name check failed (the chain verified)
            return ResultType.CERTIFICATE_HOST_MISMATCH, ""
        if detail == "certificate invalid":  # untrusted, self-signed or expired: Exim does not say which
            return ResultType.CERTIFICATE_NOT_TRUSTED, detail
        return ResultType.VALIDATION_FAILURE, detail[:200]
    if _HANDSHAKE.match(reason):
        return ResultType.VALIDATION_FAILURE, "tls-handshake-failure"
    if reason.startswith(_NOT_OFFERED) or reason.startswith(_REFUSED):
        return ResultType.STARTTLS_NOT_SUPPORTED, ""
    return None


class EximSessions:
    """Turns Exim main log lines, in order, into sessions and unparsed lines."""

    def __init__(self, state: str = "{}") -> None:
        # message id -> [when, host, ip] of a failed handshake whose plaintext delivery line follows
        self._pending: dict[str, list[object]] = json.loads(state).get("pending", {})

    def state(self) -> str:
        return json.dumps({"pending": self._pending}, sort_keys=True)

    def feed(self, text: str, tz: datetime.tzinfo | None = None) -> Iterator[Event]:
        match = _LINE.fullmatch(text)
        if match is None:
            yield Unparsed(None, text)
            return
        stamp = datetime.datetime.fromisoformat(match["stamp"] + (match["zone"] or "").replace(" ", ""))
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=tz) if tz is not None else stamp.astimezone()
        when = stamp.timestamp()
        body = match["text"]
        delivery = _DELIVERY.fullmatch(body)
        if delivery is not None:
            yield from self._delivery(when, delivery)
            return
        unencrypted = _UNENCRYPTED.match(body)
        if unencrypted is not None:
            self._pending[unencrypted["id"]] = [when, unencrypted["host"], unencrypted["ip"]]
            return
        if "TLS" in body and not _KNOWN.match(body):
            yield Unparsed(when, text)

    def _delivery(self, when: float, match: re.Match[str]) -> Iterator[Event]:
        raw = match["rcpt"].rpartition("@")[2].rstrip(".").lower()
        domain = to_alabel(raw) or raw
        pending = self._pending.pop(match["id"], None)
        if pending is not None:  # the handshake failed, then this plaintext delivery (or deferral)
            yield Session(float(str(pending[0])), domain, str(pending[1]), str(pending[2]), Evidence.FAILED,
                          ResultType.VALIDATION_FAILURE, "tls-handshake-failure")
        rest = match["rest"]
        if _REPORT_ROUTER.search(rest):
            return
        host = _DELIVERED_HOST.search(rest)
        if host is None:  # no host tried (retry time not reached, routing failure)
            return
        if match["flag"] == "=>":
            tls = _TLS.search(rest)
            if tls is None:
                return  # plaintext: no TLS session
            evidence = Evidence.VERIFIED if tls["cv"] in ("yes", "dane") else Evidence.UNTRUSTED
            yield Session(when, domain, host["host"].lower(), host["ip"], evidence)
            return
        reason = rest[host.end():].lstrip(": ")
        result = exim_result(reason)
        if result is not None:
            yield Session(when, domain, host["host"].lower(), host["ip"], Evidence.FAILED, *result)


class EximIngest(PostfixIngest):
    """Reads one Exim main log into the store: positions, rotation and batches as for Postfix
    (ops/tlsrpt_ingest.py); Exim's time stamps are read in `tz` (None: this machine's zone)."""

    KIND = "exim"

    def _parser(self, state: str) -> Sessions:
        return EximSessions(state)

    def _line(self, text: str, parser: Sessions, batch: Batch, summary: IngestSummary) -> None:
        summary.lines += 1
        if not text.strip():
            return
        assert isinstance(parser, EximSessions)
        self._events(parser.feed(text, self.tz), batch, summary)
