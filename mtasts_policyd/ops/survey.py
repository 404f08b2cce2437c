"""`mtasts-policyd survey FILE`: what a list of domains publishes for MTA-STS and TLSRPT, as a table
(commands/survey.py is its command line).

Why it exists: deploying MTA-STS goes wrong in a few recurring ways (an id with a hyphen, a
policy host without a valid certificate, a mode spelled `enforced`, and most often mx patterns
that do not cover the real MX hosts). Operators want to see that for their own domains, or for
the domains they send most mail to, before relying on `enforce`.

A survey is read-only by default: it asks DNS and HTTPS directly (the network seams, through the
same look-up as resolution: net/lookup.py) and never opens the daemon's cache, so it can run anywhere, next to a live daemon or not. With
`--update-cache` each domain goes through `PolicyResolver.resolve()` instead, which is the
daemon's own algorithm, so the rows show what the daemon now holds and the cache is warmed.

Every stage's failure is an errors.Failure (a FailureKind and a detail), so the survey speaks the
same vocabulary as logs and `query`, and the summary counts kinds, not free text.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from mtasts_policyd.core.dane_verdict import DaneBranch, DaneTtl, Verdict, decide
from mtasts_policyd.core.errors import Failure, FailureKind, MtaStsError
from mtasts_policyd.core.policy import Mode, Policy
from mtasts_policyd.core.tlsrpt_record import TlsRptRecord
from mtasts_policyd.net.base import Discovery, Fetcher
from mtasts_policyd.net.dane_lookup import dane_inputs
from mtasts_policyd.net.dnssec import DnssecQuestions
from mtasts_policyd.net.lookup import TXT_KINDS, get_policy, mail_hosts
from mtasts_policyd.ops.views import host_view, mx_secure, tlsa_summary
from mtasts_policyd.resolution.resolver import PolicyResolver

FORMATS = ("markdown", "csv", "json")
DEFAULT_CONCURRENCY = 16
# Where a domain's survey can end up: a policy mode, or the failure that left it without one.
OUTCOMES = tuple(mode.value for mode in Mode) + tuple(kind.value for kind in FailureKind)
TLSRPT_STATES = ("valid", FailureKind.NO_RECORD.value, FailureKind.INVALID_RECORD.value,
                 FailureKind.DNS_TEMPORARY.value)
DANE_VERDICTS = tuple(verdict.value for verdict in Verdict)


@dataclass(frozen=True)
class SurveyRow:
    """Everything the survey learnt about one domain; None means "not known / not asked"."""

    domain: str
    txt_record: str | None = None  # the valid STSv1 record as published (unknown if only cached)
    policy_id: str | None = None
    txt_failure: Failure | None = None  # no-record, invalid-record, dns-temporary
    policy: Policy | None = None  # with --update-cache: the policy the daemon now uses
    policy_failure: Failure | None = None  # fetch-error, certificate-invalid, invalid-policy
    mx_hosts: tuple[str, ...] | None = None  # looked up only for enforce/testing policies
    mx_unmatched: tuple[str, ...] = ()  # MX hosts no mx pattern matches (RFC 8461 §4.1)
    mx_failure: Failure | None = None
    tlsrpt: TlsRptRecord | None = None
    tlsrpt_failure: Failure | None = None  # no-record, invalid-record, dns-temporary
    dane: DaneBranch | None = None  # the DANE decision and what it read; None: DANE not surveyed

    @property
    def outcome(self) -> str:
        """The policy mode, else the failure that left the domain without a usable policy."""
        if self.policy is not None:
            return self.policy.mode.value
        failure = self.txt_failure or self.policy_failure
        return failure.kind.value if failure else "no-policy"

    @property
    def txt_status(self) -> str:
        return self.txt_failure.kind.value if self.txt_failure else "valid"

    @property
    def policy_status(self) -> str:
        """"ok", a fetch failure kind, or "" when no fetch was made (no valid TXT record)."""
        if self.policy_failure is not None:
            return self.policy_failure.kind.value
        return "ok" if self.policy is not None else ""

    @property
    def mx_match(self) -> bool | None:
        """Whether every MX host matches the policy; None when not checked or no MX host is known."""
        if not self.mx_hosts:
            return None
        return not self.mx_unmatched

    @property
    def tlsrpt_status(self) -> str:
        return self.tlsrpt_failure.kind.value if self.tlsrpt_failure else "valid"


@dataclass(frozen=True)
class SurveySummary:
    """Counts over all rows; every outcome is listed, zeros included, so the shape never varies."""

    total: int
    outcomes: dict[str, int]  # OUTCOMES -> domains; sums to total
    mx_mismatch: int  # domains with at least one MX host outside their enforce/testing policy
    tlsrpt: dict[str, int]  # TLSRPT_STATES -> domains; sums to total
    dane: dict[str, int] | None = None  # DANE_VERDICTS -> domains, when DANE was surveyed

    @classmethod
    def of(cls, rows: Sequence[SurveyRow]) -> SurveySummary:
        outcomes = dict.fromkeys(OUTCOMES, 0)
        tlsrpt = dict.fromkeys(TLSRPT_STATES, 0)
        dane = dict.fromkeys(DANE_VERDICTS, 0) if any(row.dane is not None for row in rows) else None
        for row in rows:
            outcomes[row.outcome] = outcomes.get(row.outcome, 0) + 1
            tlsrpt[row.tlsrpt_status] += 1
            if dane is not None and row.dane is not None:
                dane[row.dane.verdict.value] += 1
        return cls(len(rows), outcomes, sum(row.mx_match is False for row in rows), tlsrpt, dane)


# ----- surveying one domain -------------------------------------------------------------------


class Surveyor:
    """Surveys one domain per call; thread-safe (the network seams and the resolver are)."""

    def __init__(self, discovery: Discovery, fetcher: Fetcher | None = None,
                 resolver: PolicyResolver | None = None, dnssec: DnssecQuestions | None = None,
                 dane_ttl: DaneTtl = DaneTtl()) -> None:
        """`dnssec`: a validating resolver to survey DANE with (None: no DANE columns)."""
        if (fetcher is None) == (resolver is None):
            raise ValueError("give a fetcher (read-only survey) or a resolver (--update-cache), not both")
        self._discovery = discovery
        self._fetcher = fetcher
        self._resolver = resolver
        self._dnssec = dnssec
        self._dane_ttl = dane_ttl

    def survey(self, domain: str) -> SurveyRow:
        row = self._via_resolver(domain) if self._resolver is not None else self._direct(domain)
        return self._with_dane(self._with_tlsrpt(self._with_mx_check(row)))

    def _with_dane(self, row: SurveyRow) -> SurveyRow:
        """The daemon's DANE decision for the domain (issue 9 table), asked now; with --update-cache
        it is cached beside the MTA-STS half, as the daemon would. Runs in a worker thread: the
        questions are asyncio, so they get a loop of their own."""
        if self._dnssec is None:
            return row
        inputs = asyncio.run(dane_inputs(self._dnssec, row.domain))
        branch = DaneBranch(decide(inputs, self._dane_ttl), inputs, time.time())
        if self._resolver is not None:
            self._resolver.store_dane(row.domain, branch)
        return replace(row, dane=branch)

    def _direct(self, domain: str) -> SurveyRow:
        """RFC 8461 §3.1 then §3.3, as a sender would do them: no valid TXT record, no fetch."""
        assert self._fetcher is not None
        try:
            found = get_policy(domain, self._discovery, self._fetcher)
        except MtaStsError as exc:
            return SurveyRow(domain, txt_failure=exc.failure)
        record = found.answer.record
        return SurveyRow(domain, txt_record=record.text, policy_id=record.id, policy=found.policy,
                         policy_failure=found.error.failure if found.error is not None else None)

    def _via_resolver(self, domain: str) -> SurveyRow:
        """The daemon's view after asking now: a kept policy shows with the failure that kept it."""
        assert self._resolver is not None
        decision = self._resolver.resolve(domain).decision
        failure = decision.failure
        txt_failure = failure if failure is not None and failure.kind in TXT_KINDS else None
        policy_failure = failure if failure is not None and failure.kind not in TXT_KINDS else None
        # The cached TXT text belongs to the cached policy; only without a failure is it current.
        entry = self._resolver.cache.get(domain) if failure is None else None
        return SurveyRow(domain, txt_record=entry.txt_record if entry else None,
                         policy_id=decision.policy_id if failure is None else None,
                         txt_failure=txt_failure, policy=decision.policy, policy_failure=policy_failure)

    def _with_mx_check(self, row: SurveyRow) -> SurveyRow:
        """RFC 8461 §4.1: a sender only delivers to MX hosts that match a pattern. A host outside
        the patterns is the most common deployment mistake; it breaks delivery under enforce."""
        if row.policy is None or row.policy.mode is Mode.NONE:
            return row
        try:
            hosts, _ = mail_hosts(self._discovery, row.domain)  # RFC 5321 §5.1, RFC 7505
        except MtaStsError as exc:
            return replace(row, mx_failure=exc.failure)
        unmatched = tuple(host for host in hosts if not row.policy.matches(host))
        return replace(row, mx_hosts=tuple(hosts), mx_unmatched=unmatched)

    def _with_tlsrpt(self, row: SurveyRow) -> SurveyRow:
        """RFC 8460 §3: asked for every domain; reports are useful with or without MTA-STS."""
        try:
            return replace(row, tlsrpt=self._discovery.tlsrpt_record(row.domain).record)
        except MtaStsError as exc:
            return replace(row, tlsrpt_failure=exc.failure)


# ----- output ---------------------------------------------------------------------------------


def _failure_json(failure: Failure | None) -> dict[str, str] | None:
    return None if failure is None else {"kind": failure.kind.value, "detail": failure.detail}


def row_json(row: SurveyRow) -> dict[str, Any]:
    policy = row.policy
    return {
        "domain": row.domain,
        "outcome": row.outcome,
        "txt": row.txt_status,
        "txt_record": row.txt_record,
        "policy_id": row.policy_id,
        "txt_failure": _failure_json(row.txt_failure),
        "policy": row.policy_status or None,
        "policy_failure": _failure_json(row.policy_failure),
        "mode": policy.mode.value if policy else None,
        "mx": list(policy.mx) if policy else [],
        "max_age": policy.max_age if policy else None,
        "policy_warnings": list(policy.warnings) if policy else [],
        "mx_hosts": None if row.mx_hosts is None else list(row.mx_hosts),
        "mx_match": row.mx_match,
        "mx_unmatched": list(row.mx_unmatched),
        "mx_failure": _failure_json(row.mx_failure),
        "tlsrpt": row.tlsrpt_status,
        "tlsrpt_record": row.tlsrpt.text if row.tlsrpt else None,
        "tlsrpt_rua": list(row.tlsrpt.rua) if row.tlsrpt else [],
        "tlsrpt_failure": _failure_json(row.tlsrpt_failure),
        "dane": row.dane.verdict.value if row.dane else None,
        "dane_reason": row.dane.decision.reason if row.dane else None,
        "dane_mx_secure": mx_secure(row.dane) if row.dane else None,
        "dane_hosts": [host_view(host) for host in row.dane.inputs.hosts] if row.dane else [],
    }


def summary_json(summary: SurveySummary) -> dict[str, Any]:
    result = {"domains": summary.total, "outcomes": summary.outcomes, "mx_mismatch": summary.mx_mismatch,
              "tlsrpt": summary.tlsrpt}
    if summary.dane is not None:
        result["dane"] = summary.dane
    return result


def render_json(rows: Sequence[SurveyRow], summary: SurveySummary) -> str:
    """One JSON document: {"domains": [row...], "summary": {...}}, rows in FILE order."""
    return json.dumps({"domains": [row_json(row) for row in rows], "summary": summary_json(summary)},
                      indent=2) + "\n"


CSV_COLUMNS = ("domain", "outcome", "txt", "txt_record", "txt_detail", "policy", "policy_detail", "mode",
               "mx", "max_age", "policy_warnings", "mx_hosts", "mx_match", "mx_unmatched", "mx_detail",
               "tlsrpt", "tlsrpt_rua", "tlsrpt_detail", "dane", "dane_reason", "dane_mx_secure", "dane_tlsa")


def _detail(failure: Failure | None) -> str:
    return failure.detail if failure else ""


def _yes_no(value: bool | None) -> str:
    return "" if value is None else ("yes" if value else "no")


def row_csv(row: SurveyRow) -> dict[str, str]:
    """Lists are space-separated: host names and URIs cannot contain a raw space."""
    policy = row.policy
    return {
        "domain": row.domain, "outcome": row.outcome,
        "txt": row.txt_status, "txt_record": row.txt_record or "", "txt_detail": _detail(row.txt_failure),
        "policy": row.policy_status, "policy_detail": _detail(row.policy_failure),
        "mode": policy.mode.value if policy else "", "mx": " ".join(policy.mx) if policy else "",
        "max_age": str(policy.max_age) if policy else "",
        "policy_warnings": "; ".join(policy.warnings) if policy else "",
        "mx_hosts": " ".join(row.mx_hosts or ()), "mx_match": _yes_no(row.mx_match),
        "mx_unmatched": " ".join(row.mx_unmatched), "mx_detail": _detail(row.mx_failure),
        "tlsrpt": row.tlsrpt_status, "tlsrpt_rua": " ".join(row.tlsrpt.rua) if row.tlsrpt else "",
        "tlsrpt_detail": _detail(row.tlsrpt_failure),
        "dane": row.dane.verdict.value if row.dane else "", "dane_reason": row.dane.decision.reason if row.dane else "",
        "dane_mx_secure": _yes_no(mx_secure(row.dane)) if row.dane else "",
        "dane_tlsa": "; ".join(tlsa_summary(host) for host in row.dane.inputs.hosts) if row.dane else "",
    }


def render_csv(rows: Sequence[SurveyRow]) -> str:
    """One rectangular table, header first, so any CSV reader loads it; the summary goes elsewhere."""
    out = io.StringIO()
    writer = csv.DictWriter(out, CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(row_csv(row) for row in rows)
    return out.getvalue()


def summary_lines(summary: SurveySummary) -> list[tuple[str, int]]:
    """The summary as (label, domains) pairs: outcomes, MX mismatches, TLSRPT states, total."""
    lines = [(outcome, count) for outcome, count in summary.outcomes.items()]
    lines.append(("mx-mismatch", summary.mx_mismatch))
    lines += [(f"tlsrpt-{state}", count) for state, count in summary.tlsrpt.items()]
    if summary.dane is not None:
        lines += [(f"dane-{verdict}" if not verdict.startswith("dane") else verdict, count)
                  for verdict, count in summary.dane.items()]
    lines.append(("total", summary.total))
    return lines


def render_summary_csv(summary: SurveySummary) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(("summary", "domains"))
    writer.writerows(summary_lines(summary))
    return out.getvalue()


MARKDOWN_COLUMNS = ("domain", "TXT record", "policy", "mode", "mx patterns", "max_age", "MX hosts match",
                    "TLSRPT")
DANE_MARKDOWN_COLUMNS = ("MX secure", "TLSA", "DANE")  # when DANE was surveyed


def _cell(text: str) -> str:
    """Markdown table cells cannot hold "|" or line breaks."""
    return " ".join(text.split()).replace("|", "\\|") or "-"


def _failure_cell(failure: Failure) -> str:
    """"no-record" alone says it all; every other kind needs its why (CSV and JSON have all)."""
    if failure.kind is FailureKind.NO_RECORD:
        return failure.kind.value
    return str(failure)


def _txt_cell(row: SurveyRow) -> str:
    if row.txt_failure is not None:
        return _failure_cell(row.txt_failure)
    return row.txt_record or "valid"  # --update-cache after a failed fetch: valid, text not kept


def _policy_cell(row: SurveyRow) -> str:
    if row.policy_failure is not None:
        kept = " (cached policy kept)" if row.policy is not None else ""  # RFC 8461 §5.1
        return _failure_cell(row.policy_failure) + kept
    if row.policy is not None and row.policy.warnings:  # what the parser forgave, for the owner to fix
        warnings = row.policy.warnings
        return f"ok ({len(warnings)} warning{'s' if len(warnings) > 1 else ''}: {'; '.join(warnings)})"
    return "ok" if row.policy is not None else ""


def _mx_cell(row: SurveyRow) -> str:
    if row.mx_failure is not None:
        return _failure_cell(row.mx_failure)
    if row.mx_hosts == ():
        return "null MX (RFC 7505)"
    if row.mx_match is None:
        return ""
    return "yes" if row.mx_match else "no: " + ", ".join(row.mx_unmatched)


def _tlsrpt_cell(row: SurveyRow) -> str:
    if row.tlsrpt is not None:
        return ", ".join(row.tlsrpt.rua)
    return _failure_cell(row.tlsrpt_failure) if row.tlsrpt_failure is not None else ""


def _dane_cells(row: SurveyRow) -> tuple[str, ...]:
    """MX secure, TLSA per MX host, the verdict (TEMP with its reason): DANE beside MTA-STS."""
    branch = row.dane
    if branch is None:
        return "", "", ""
    secure = mx_secure(branch)
    mx = "failed" if secure is None else "yes" if secure else "no"
    verdict = branch.verdict.value + (f": {branch.decision.reason}" if branch.verdict is Verdict.TEMP else "")
    return mx, "; ".join(tlsa_summary(host) for host in branch.inputs.hosts), verdict


def markdown_cells(row: SurveyRow, dane: bool = False) -> tuple[str, ...]:
    """One table row, in MARKDOWN_COLUMNS order (then DANE_MARKDOWN_COLUMNS with `dane`); empty
    cells are drawn as "-"."""
    policy = row.policy
    cells = (row.domain, _txt_cell(row), _policy_cell(row), policy.mode.value if policy else "",
             ", ".join(policy.mx) if policy else "", str(policy.max_age) if policy else "",
             _mx_cell(row), _tlsrpt_cell(row))
    return cells + _dane_cells(row) if dane else cells


def _markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(cell) for cell in row) + " |" for row in rows]
    return lines


def render_markdown(rows: Sequence[SurveyRow], summary: SurveySummary) -> str:
    """The survey table, a blank line, then the summary as a second two-column table."""
    dane = summary.dane is not None
    header = MARKDOWN_COLUMNS + DANE_MARKDOWN_COLUMNS if dane else MARKDOWN_COLUMNS
    lines = _markdown_table(header, (markdown_cells(row, dane) for row in rows))
    lines.append("")
    lines += _markdown_table(("summary", "domains"), ((label, str(n)) for label, n in summary_lines(summary)))
    return "\n".join(lines) + "\n"
