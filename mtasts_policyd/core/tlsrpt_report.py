"""The RFC 8460 §4 aggregate report: its model, its JSON and its file name. Pure: no I/O.

Why a module of its own: `tlsrpt build` must give the same report byte for byte from the same
counts (the issue's idempotence: the same report-id and content twice), and every field name and
result type is fixed by the RFC, so one home holds them all: the result types of §4.3 as an enum,
the report of §4.4 as frozen dataclasses built from session counts, its JSON (members in the RFC's
order, sorted policies and failure details), the gzip (§5.2) with no time stamp in its header, a
report-id that depends only on who reports what for which day, and the file name of §5.1 (used as
the attachment name of §5.3).

Choices where the RFC leaves room (README "TLSRPT"):
- date-range: one UTC day, "YYYY-MM-DDT00:00:00Z" to "YYYY-MM-DDT23:59:59Z", as in the RFC's own
  example (Appendix B); the file name's timestamps are the same two instants.
- report-id: "<YYYYMMDD>.<policy-domain>@<submitter>": unique per reporter, policy domain and day,
  and shaped like a Message-ID (RFC 5322 msg-id without the brackets) for the mail of §5.3. It does
  not depend on the counts: a report rebuilt after late log lines replaces the earlier one under
  the same id instead of posing as a second report.
- optional members are left out when empty: policy-string and mx-host (a no-policy-found policy
  has neither), failure-details (no failures), receiving-ip and failure-reason-code (unknown), and
  sending-mta-ip and receiving-mx-hostname for a policy failure (RFC 8460 §4.3.2.2: the daemon's
  policy fetch failed before any MX was chosen or connected to).
"""

from __future__ import annotations

import datetime
import enum
import gzip
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


class ResultType(enum.StrEnum):
    """RFC 8460 §4.3 result types (IANA "STARTTLS Validation Result Types")."""

    # §4.3.1 negotiation failures
    STARTTLS_NOT_SUPPORTED = "starttls-not-supported"
    CERTIFICATE_HOST_MISMATCH = "certificate-host-mismatch"
    CERTIFICATE_NOT_TRUSTED = "certificate-not-trusted"
    CERTIFICATE_EXPIRED = "certificate-expired"
    VALIDATION_FAILURE = "validation-failure"
    # §4.3.2.1 DANE policy failures
    TLSA_INVALID = "tlsa-invalid"
    DNSSEC_INVALID = "dnssec-invalid"
    DANE_REQUIRED = "dane-required"
    # §4.3.2.2 MTA-STS policy failures
    STS_POLICY_FETCH_ERROR = "sts-policy-fetch-error"
    STS_POLICY_INVALID = "sts-policy-invalid"
    STS_WEBPKI_INVALID = "sts-webpki-invalid"


class PolicyType(enum.StrEnum):
    """RFC 8460 §4.4 policy-type."""

    STS = "sts"
    TLSA = "tlsa"
    NO_POLICY_FOUND = "no-policy-found"


@dataclass(frozen=True, order=True)
class ReportPolicy:
    """The `policy` member: which policy the counted sessions were made under (RFC 8460 §4.4)."""

    policy_type: PolicyType
    policy_domain: str
    policy_string: tuple[str, ...] = ()  # the policy as published, one string per line
    mx_host: tuple[str, ...] = ()  # sts: the policy's mx patterns

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"policy-type": self.policy_type.value}
        if self.policy_string:
            out["policy-string"] = list(self.policy_string)
        out["policy-domain"] = self.policy_domain
        if self.mx_host:
            out["mx-host"] = list(self.mx_host)
        return out


@dataclass(frozen=True)
class SessionCount:
    """Sessions of one day with one outcome: what the store counts and a report is built from.

    `result` None is a successful session; `receiving_ip` and `reason_code` may be unknown ("").
    """

    policy: ReportPolicy
    result: ResultType | None
    sending_ip: str
    receiving_mx: str
    receiving_ip: str
    reason_code: str
    sessions: int


@dataclass(frozen=True, order=True)
class FailureDetail:
    """One `failure-details` entry (RFC 8460 §4.4): failed sessions with the same particulars."""

    result_type: ResultType
    sending_mta_ip: str
    receiving_mx_hostname: str
    receiving_ip: str = ""
    failure_reason_code: str = ""
    failed_session_count: int = 0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"result-type": self.result_type.value}
        if self.sending_mta_ip:  # unknown for the daemon's own policy failures (no session yet)
            out["sending-mta-ip"] = self.sending_mta_ip
        if self.receiving_mx_hostname:  # none for a policy failure: no MX was chosen
            out["receiving-mx-hostname"] = self.receiving_mx_hostname
        if self.receiving_ip:
            out["receiving-ip"] = self.receiving_ip
        out["failed-session-count"] = self.failed_session_count
        if self.failure_reason_code:
            out["failure-reason-code"] = self.failure_reason_code
        return out


@dataclass(frozen=True)
class PolicyResults:
    """One entry of `policies`: a policy, its summary and its failure details."""

    policy: ReportPolicy
    successful: int
    failure_details: tuple[FailureDetail, ...] = ()

    @property
    def failed(self) -> int:
        """RFC 8460 §4.4 total-failure-session-count: every failed session has one detail entry."""
        return sum(detail.failed_session_count for detail in self.failure_details)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "policy": self.policy.to_json(),
            "summary": {"total-successful-session-count": self.successful,
                        "total-failure-session-count": self.failed},
        }
        if self.failure_details:
            out["failure-details"] = [detail.to_json() for detail in self.failure_details]
        return out


@dataclass(frozen=True)
class ReportIdentity:
    """Who reports (RFC 8460 §4.4 organization-name, contact-info; §5.1 the sender domain)."""

    organization_name: str
    contact_info: str
    submitter: str  # the domain that submits the report: file name, report-id, §5.3 headers


@dataclass(frozen=True)
class Report:
    """An RFC 8460 §4.4 aggregate report for one policy domain and one UTC day."""

    organization_name: str
    day: datetime.date
    contact_info: str
    report_id: str
    policies: tuple[PolicyResults, ...]

    @property
    def start(self) -> datetime.datetime:
        return day_start(self.day)

    @property
    def end(self) -> datetime.datetime:
        return day_end(self.day)

    def to_json(self) -> dict[str, Any]:
        """The report as JSON data, members in the order of RFC 8460 §4.4 and its Appendix B."""
        return {
            "organization-name": self.organization_name,
            "date-range": {"start-datetime": rfc3339(self.start), "end-datetime": rfc3339(self.end)},
            "contact-info": self.contact_info,
            "report-id": self.report_id,
            "policies": [policy.to_json() for policy in self.policies],
        }

    def json_bytes(self) -> bytes:
        """UTF-8 JSON (RFC 8460 §4.4 is I-JSON, RFC 7493), indented for an operator's eyes."""
        return (json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n").encode("utf-8")

    def gzip_bytes(self) -> bytes:
        """RFC 8460 §5.2 gzip; mtime 0 so the same report is the same bytes on every build."""
        return gzip.compress(self.json_bytes(), compresslevel=9, mtime=0)


def day_start(day: datetime.date) -> datetime.datetime:
    return datetime.datetime.combine(day, datetime.time(0), tzinfo=datetime.UTC)


def day_end(day: datetime.date) -> datetime.datetime:
    """The last second of the UTC day, as the RFC's example writes end-datetime."""
    return day_start(day) + datetime.timedelta(days=1, seconds=-1)


def rfc3339(moment: datetime.datetime) -> str:
    """RFC 3339 date-time in UTC with the "Z" suffix (RFC 8460 §4.4 date-range)."""
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_LABELS = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*")
_UNIQUE_ID = re.compile(r"[A-Za-z0-9]+")  # RFC 8460 §5.1: unique-id = 1*(ALPHA / DIGIT)


def _domain(name: str, what: str) -> str:
    if not _LABELS.fullmatch(name):
        raise ValueError(f"{what} {name!r} is not a domain name (A-labels)")
    return name.lower()


def report_id(day: datetime.date, policy_domain: str, submitter: str) -> str:
    """The deterministic report-id (module docstring): the same reporter, domain and day give the
    same id, whatever the counts."""
    return f"{day:%Y%m%d}.{_domain(policy_domain, 'policy domain')}@{_domain(submitter, 'submitter')}"


def filename(submitter: str, policy_domain: str, day: datetime.date, unique_id: str | None = None,
             *, compressed: bool = True) -> str:
    """RFC 8460 §5.1: sender "!" policy-domain "!" begin-timestamp "!" end-timestamp
    [ "!" unique-id ] "." extension, the timestamps in seconds since the epoch and the extension
    "json" or "json.gz". §5.3 names the mail attachment the same way."""
    parts = [_domain(submitter, "submitter"), _domain(policy_domain, "policy domain"),
             str(int(day_start(day).timestamp())), str(int(day_end(day).timestamp()))]
    if unique_id is not None:
        if not _UNIQUE_ID.fullmatch(unique_id):
            raise ValueError(f"unique-id {unique_id!r} must be letters and digits (RFC 8460 §5.1)")
        parts.append(unique_id)
    return "!".join(parts) + (".json.gz" if compressed else ".json")


def build_report(identity: ReportIdentity, day: datetime.date, policy_domain: str,
                 counts: Iterable[SessionCount]) -> Report:
    """The report of `policy_domain` for `day` from the store's counts (rows of other domains are
    ignored). Policies and failure details are sorted, so the same counts give the same report."""
    successes: dict[ReportPolicy, int] = {}
    failures: dict[ReportPolicy, dict[tuple[ResultType, str, str, str, str], int]] = {}
    for count in counts:
        if count.policy.policy_domain != policy_domain or count.sessions <= 0:
            continue
        successes.setdefault(count.policy, 0)
        details = failures.setdefault(count.policy, {})
        if count.result is None:
            successes[count.policy] += count.sessions
        else:
            key = (count.result, count.sending_ip, count.receiving_mx, count.receiving_ip, count.reason_code)
            details[key] = details.get(key, 0) + count.sessions
    policies = tuple(
        PolicyResults(policy, successes[policy],
                      tuple(sorted(FailureDetail(*key, failed_session_count=n) for key, n in failures[policy].items())))
        for policy in sorted(successes))
    return Report(identity.organization_name, day, identity.contact_info,
                  report_id(day, policy_domain, identity.submitter), policies)
