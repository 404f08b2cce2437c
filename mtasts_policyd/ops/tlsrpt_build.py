"""`tlsrpt build`: one RFC 8460 report file per policy domain of a day, for domains that ask for it.

RFC 8460 §3: a domain asks for reports with a `_smtp._tls` TXT record; without a valid one (none,
several, no usable rua) nobody would receive the report, so none is built. A DNS failure is not
"no record": the domain is reported as failed and a later run builds it. The file is written whole
or not at all (a temporary file renamed over the name of §5.1), and the same counts give the same
bytes (core/tlsrpt_report.py), so building a day twice changes nothing.
"""

from __future__ import annotations

import datetime
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

from mtasts_policyd.core.errors import DnsTemporaryFailure, MtaStsError
from mtasts_policyd.core.tlsrpt_report import Report, ReportIdentity, build_report, filename
from mtasts_policyd.net.base import Discovery
from mtasts_policyd.store.sqlite import DIRECTORY_MODE, FILE_MODE
from mtasts_policyd.store.tlsrpt_store import TlsRptStore


def sender_address(sender: str | None, fqdn: str) -> str:
    """`tlsrpt.sender`, or tlsrpt-noreply@ this host's fully qualified name (README)."""
    return sender or f"tlsrpt-noreply@{fqdn}"


def report_identity(sender: str | None, organization_name: str | None, contact_info: str | None,
                    fqdn: str) -> ReportIdentity:
    """Who reports, from `tlsrpt:` (README): sender defaults to tlsrpt-noreply@ this host's fully
    qualified name, organization_name to the sender's domain, contact_info to the sender. A host
    name without a dot cannot name a submitter (RFC 8460 §5.1 sender = domain)."""
    address = sender_address(sender, fqdn)
    domain = address.rpartition("@")[2].lower().rstrip(".")
    if "." not in domain:
        raise ValueError(f"this host's name {fqdn!r} is not a fully qualified domain name: set tlsrpt.sender")
    return ReportIdentity(organization_name or domain, contact_info or address, domain)


@dataclass(frozen=True)
class Built:
    """One policy domain's outcome: built (with its file), skipped (no valid TLSRPT record) or failed."""

    domain: str
    outcome: str  # built, skipped, failed
    detail: str = ""
    path: str | None = None
    report: Report | None = None
    rua: tuple[str, ...] = ()


def build_day(store: TlsRptStore, day: datetime.date, identity: ReportIdentity, discovery: Discovery,
              output: str, *, write: bool = True, clock: Callable[[], float] = time.time) -> list[Built]:
    """Reports of `day` for every policy domain with sessions, written into `output` (write False:
    only made, for `tlsrpt send --dry-run`, which changes nothing). The report's content depends on
    `day` alone; `clock` only stamps when it was built (injected by tests)."""
    results = []
    for domain in store.domains(day):
        try:
            record = discovery.tlsrpt_record(domain).record
        except DnsTemporaryFailure as exc:
            results.append(Built(domain, "failed", f"{exc.kind.value}: {exc.detail}"))
            continue
        except MtaStsError as exc:  # RFC 8460 §3: no record, or not exactly one usable record
            results.append(Built(domain, "skipped", f"{exc.kind.value}: {exc.detail}"))
            continue
        report = build_report(identity, day, domain, store.sessions(day, domain))
        path = os.path.join(output, filename(identity.submitter, domain, day))
        try:
            if write:
                write_whole(path, report.gzip_bytes())
        except OSError as exc:
            results.append(Built(domain, "failed", f"cannot write {path}: {exc}"))
            continue
        store.built(day, domain, report.report_id, clock())
        results.append(Built(domain, "built", path=path, report=report, rua=record.rua))
    return results


def write_whole(path: str, data: bytes) -> None:
    """`data` at `path`, or nothing: a temporary file in the same directory, renamed over it."""
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=DIRECTORY_MODE, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=".tlsrpt-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, FILE_MODE)
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
