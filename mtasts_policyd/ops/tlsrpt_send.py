"""`tlsrpt send`: deliver built reports to every rua of their domain, once each, retrying for a day.

RFC 8460 §5: a report goes to each `rua` URI of the domain's record: `https:` as a POST of the
gzip (§5.4), `mailto:` as the mail of §5.3 (core/tlsrpt_mail.py), DKIM-signed when configured and
handed to the local MTA. Each (report-id, rua) is recorded in the store before the next is tried:
one that was sent is never sent again (a report rebuilt the same day keeps its report-id, so it
is not sent a second time either); one that failed is retried by a later run after a back-off,
for one day from its first attempt (the issue's contract), and then given up, loudly.

Choices (README "TLSRPT"):
- https: certificates ARE verified, against the daemon's trust store (`fetch.ca_file` or the
  machine's). §5.4 lets a reporter ignore certificate errors, but a report names our sending IPs
  and the receivers' failures, and an endpoint that cannot prove who it is should not get it; a
  failure is logged and retried, so an operator sees it. No redirects (a 3xx is a failure, as
  §5.4 only counts 2xx as success), one bounded timeout per step.
- mailto: `sendmail -i -f SENDER RCPT`; exit status 0 is success (the MTA owns the message then).
"""

from __future__ import annotations

import datetime
import http.client
import logging
import shlex
import ssl
import subprocess
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, replace

import dkim  # type: ignore[import-untyped]  # dkimpy has no type hints

from mtasts_policyd.core.tlsrpt_mail import MEDIA_TYPE, SIGNED_HEADERS, mailto_address, report_message
from mtasts_policyd.core.tlsrpt_report import Report
from mtasts_policyd.store.tlsrpt_store import Delivery, TlsRptStore

log = logging.getLogger("mtasts_policyd.tlsrpt")

RETRY_FOR = 86400.0  # seconds from the first attempt: "retries with back-off for a day"
BACKOFF_MIN = 300.0  # first retry after 5 minutes, doubling up to BACKOFF_MAX
BACKOFF_MAX = 4 * 3600.0


class DeliveryFailed(Exception):
    """One attempt did not deliver; the text says why, for the log and the store."""


@dataclass(frozen=True)
class DkimKey:
    domain: str
    selector: str
    key: bytes  # PEM


@dataclass(frozen=True)
class Sender:
    """How report mail leaves: the From/envelope address, the sendmail command, the DKIM key."""

    address: str
    submitter: str
    sendmail: tuple[str, ...] = ("/usr/sbin/sendmail",)
    dkim_key: DkimKey | None = None
    https_context: ssl.SSLContext | None = None
    https_timeout: float = 30.0
    sendmail_timeout: float = 60.0


@dataclass(frozen=True)
class Sent:
    """One (report, rua) outcome of a run: sent, would-send (dry run), already-sent, waiting,
    failed (retried later), given-up."""

    domain: str
    report_id: str
    rua: str
    outcome: str
    detail: str = ""


def backoff(attempts: int) -> float:
    """Seconds before the next try after `attempts` failed ones: 5 min doubling, at most 4 h."""
    return min(BACKOFF_MIN * 2 ** max(attempts - 1, 0), BACKOFF_MAX)


def sign(message: bytes, key: DkimKey) -> bytes:
    """The message with a DKIM-Signature prepended. dkimpy's tlsrpt=True: never an `l=` tag (RFC
    8460 §5.3); the receiver checks the key's `s=tlsrpt` service type (RFC 8460 §7.3)."""
    signature = dkim.sign(message, key.selector.encode(), key.domain.encode(), key.key,
                          canonicalize=(b"relaxed", b"relaxed"),
                          include_headers=[h.encode() for h in SIGNED_HEADERS], tlsrpt=True)
    return signature + message


def post_https(uri: str, body: bytes, context: ssl.SSLContext | None, timeout: float) -> None:
    """RFC 8460 §5.4: POST the gzip with Content-Type application/tlsrpt+gzip; 2xx is success."""
    try:
        parts = urllib.parse.urlsplit(uri)
        host, port = parts.hostname, parts.port or 443
    except ValueError as exc:  # a port that is not a number, a bracket left open
        raise DeliveryFailed(f"not a usable https URI: {uri}: {exc}") from None
    if parts.scheme.lower() != "https" or not host:
        raise DeliveryFailed(f"not an https URI: {uri}")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    connection = http.client.HTTPSConnection(host, port, timeout=timeout,
                                             context=context or ssl.create_default_context())
    try:
        connection.request("POST", path, body=body, headers={"Content-Type": MEDIA_TYPE,
                                                             "Content-Length": str(len(body))})
        response = connection.getresponse()
        response.read(65536)
    except (OSError, http.client.HTTPException) as exc:  # ssl.SSLError (certificate) included
        raise DeliveryFailed(f"{type(exc).__name__}: {exc}") from None
    finally:
        connection.close()
    if not 200 <= response.status < 300:  # a redirect is not followed (§5.4: 2xx only)
        raise DeliveryFailed(f"HTTP {response.status} {response.reason}")


def hand_to_sendmail(command: tuple[str, ...], sender: str, rcpt: str, message: bytes, timeout: float) -> None:
    """The message to the local MTA (`-i`: a line "." is not the end; `-f`: the envelope sender)."""
    try:
        done = subprocess.run([*command, "-i", "-f", sender, rcpt], input=message, capture_output=True,
                              timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DeliveryFailed(f"{command[0]}: {exc}") from None
    if done.returncode != 0:
        raise DeliveryFailed(f"{command[0]} exit {done.returncode}: "
                             f"{done.stderr.decode(errors='replace').strip()[:300]}")


def deliver(report: Report, domain: str, rua: str, sender: Sender, now: datetime.datetime) -> None:
    """One attempt to one rua; DeliveryFailed if it did not go."""
    scheme = rua.partition(":")[0].lower()
    if scheme == "https":
        post_https(rua, report.gzip_bytes(), sender.https_context, sender.https_timeout)
        return
    if scheme == "mailto":
        try:
            rcpt = mailto_address(rua)
        except ValueError as exc:
            raise DeliveryFailed(str(exc)) from None
        message = report_message(report, domain, sender.submitter, sender.address, rcpt, now)
        if sender.dkim_key is not None:
            message = sign(message, sender.dkim_key)
        hand_to_sendmail(sender.sendmail, sender.address, rcpt, message, sender.sendmail_timeout)
        return
    raise DeliveryFailed(f"unsupported scheme: {rua}")  # RFC 8460 §3: mailto and https only


Attempt = Callable[[Report, str, str, Sender, datetime.datetime], None]


def send_report(store: TlsRptStore, report: Report, domain: str, ruas: tuple[str, ...], sender: Sender,
                now: datetime.datetime, *, dry_run: bool = False, attempt: Attempt = deliver) -> list[Sent]:
    """Send `report` to each rua that has not had it, when its retry is due; record each outcome."""
    results = []
    clock = now.timestamp()
    for rua in ruas:
        known = store.delivery(report.report_id, rua)
        if known is not None and known.state == "sent":
            results.append(Sent(domain, report.report_id, rua, "already-sent"))
            continue
        if known is not None and known.state == "given-up":
            results.append(Sent(domain, report.report_id, rua, "given-up", known.last_error))
            continue
        if known is not None and known.next_attempt > clock:
            results.append(Sent(domain, report.report_id, rua, "waiting",
                                f"retry after {datetime.datetime.fromtimestamp(known.next_attempt, datetime.UTC):%H:%M:%SZ}"
                                f" attempts={known.attempts} last_error={known.last_error}"))
            continue
        if dry_run:
            results.append(Sent(domain, report.report_id, rua, "would-send"))
            continue
        first = known.first_attempt if known is not None else clock
        attempts = (known.attempts if known is not None else 0) + 1
        record = Delivery(report.report_id, rua, report.day.isoformat(), "sent", attempts, first, clock)
        try:
            attempt(report, domain, rua, sender, now)
        except DeliveryFailed as exc:
            error = str(exc)
            if clock + backoff(attempts) - first >= RETRY_FOR:
                record = replace(record, state="given-up", last_error=error)
                log.error("tlsrpt given-up domain=%s report_id=%s rua=%s attempts=%d error=%s", domain,
                          report.report_id, rua, attempts, error)
                results.append(Sent(domain, report.report_id, rua, "given-up", error))
            else:
                record = replace(record, state="pending", next_attempt=clock + backoff(attempts), last_error=error)
                log.warning("tlsrpt send-failed domain=%s report_id=%s rua=%s attempts=%d error=%s", domain,
                            report.report_id, rua, attempts, error)
                results.append(Sent(domain, report.report_id, rua, "failed", error))
            store.record_delivery(record)
            continue
        store.record_delivery(replace(record, sent_at=clock))
        log.info("tlsrpt sent domain=%s report_id=%s rua=%s attempts=%d", domain, report.report_id, rua, attempts)
        results.append(Sent(domain, report.report_id, rua, "sent"))
    return results


def sendmail_command(text: str) -> tuple[str, ...]:
    """`tlsrpt.sendmail` split like a shell would (a path, or a path with options)."""
    words = tuple(shlex.split(text))
    if not words:
        raise ValueError("tlsrpt.sendmail is empty")
    return words
