"""The RFC 8460 §5.3 report mail and the rua URIs a report goes to. Pure: no I/O.

Why a module of its own: the message's shape is fixed by the RFC (a multipart/report with
report-type "tlsrpt", the TLS-Report-Domain and TLS-Report-Submitter headers, the subject and the
attachment's file name), and `tlsrpt send` and its tests both need it byte for byte; DKIM signing
and the hand-over to the MTA are ops/tlsrpt_send.py's.
"""

from __future__ import annotations

import datetime
import email.policy
import email.utils
import urllib.parse
from email.message import EmailMessage

from mtasts_policyd.core.tlsrpt_report import Report, filename

MEDIA_TYPE = "application/tlsrpt+gzip"  # RFC 8460 §5.2 / §6.4
# The headers a DKIM signature covers (RFC 8460 §5.3 asks for a signature over the report mail).
SIGNED_HEADERS = ("from", "to", "subject", "date", "message-id", "mime-version", "content-type",
                  "tls-report-domain", "tls-report-submitter", "tls-required")


def mailto_address(uri: str) -> str:
    """The recipient of a `mailto:` rua (RFC 6068: percent-decoded; header fields after "?" are not
    ours to add, RFC 8460 §3 uses the address only)."""
    scheme, _, rest = uri.partition(":")
    if scheme.lower() != "mailto":
        raise ValueError(f"not a mailto URI: {uri!r}")
    address = urllib.parse.unquote(rest.partition("?")[0]).split(",")[0].strip()
    if "@" not in address:
        raise ValueError(f"mailto URI without an address: {uri!r}")
    return address


def report_message(report: Report, policy_domain: str, submitter: str, sender: str, rcpt: str,
                   now: datetime.datetime) -> bytes:
    """The §5.3 message for one recipient, CRLF line ends (as DKIM signs and SMTP carries it)."""
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["From"] = sender
    msg["To"] = rcpt
    # RFC 8460 §5.3: Subject: Report Domain: <policy domain> Submitter: <submitter> Report-ID: <report-id>
    msg["Subject"] = f"Report Domain: {policy_domain} Submitter: {submitter} Report-ID: <{report.report_id}>"
    msg["Date"] = email.utils.format_datetime(now.astimezone(datetime.UTC))
    msg["Message-ID"] = f"<{report.report_id}>"  # the report-id is shaped like one (tlsrpt_report.py)
    msg["TLS-Report-Domain"] = policy_domain  # RFC 8460 §5.3
    msg["TLS-Report-Submitter"] = submitter
    # RFC 8460 §3: a report must not wait on the TLS failures it reports. RFC 8689 §5 asks the
    # sending MTA to relax its TLS policy for this message (Postfix >= 3.10 honours it; older MTAs
    # need contrib's bypass transport or router).
    msg["TLS-Required"] = "No"
    msg.set_content(f"This is an aggregate TLS report (RFC 8460) from {submitter} for {policy_domain}, "
                    f"{report.day.isoformat()} (UTC).\n")
    maintype, subtype = MEDIA_TYPE.split("/")
    # RFC 8460 §5.3: the attachment is named as the file of §5.1.
    msg.add_attachment(report.gzip_bytes(), maintype=maintype, subtype=subtype,
                       filename=filename(submitter, policy_domain, report.day))
    # RFC 8460 §5.3: multipart/report (RFC 6522) with report-type "tlsrpt".
    msg.set_param("report-type", "tlsrpt")
    msg.replace_header("Content-Type", msg["Content-Type"].replace("multipart/mixed", "multipart/report", 1))
    return msg.as_bytes()
