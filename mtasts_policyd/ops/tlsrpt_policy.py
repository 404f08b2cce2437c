"""The daemon's own MTA-STS policy failures as TLSRPT counts (RFC 8460 §4.3.2.2).

The MTA's log knows every TLS session, but not why a domain had no policy: the daemon does. When
a resolution fails (resolution/resolver.py `_failed`, in a worker thread, never on the lookup
path), this records one failed session of `sts-policy-fetch-error`, `sts-policy-invalid` or
`sts-webpki-invalid` (FailureKind.tlsrpt_result_type) in the counts store that `tlsrpt build`
reads, under the policy domain.

Which failures count (README "TLSRPT"): RFC 8460 §4.3.4 says transient errors need not be
reported, and the daemon retries a failed domain after a back-off (§3.3 of RFC 8461). So the first
failure of a run of failures is not recorded; the failure of the retry after the back-off window
is, and so is each further failed retry (`failures` >= REPORT_AFTER). A domain that recovers on
its first retry is never reported.

The policy member: the cached policy still in force (`sts` with its lines, RFC 8461 §5.1 keeps
using it), else a bare `sts` policy of the domain (its policy could not be had). There is no MX and
no session yet, so sending-mta-ip and receiving-mx-hostname are left out; the failure kind
(`fetch-error`, `invalid-policy`, `certificate-invalid`, `dns-temporary`) is the
failure-reason-code. A store that cannot be written is logged, never raised: the resolution goes on.
"""

from __future__ import annotations

import logging

from mtasts_policyd.core.errors import Failure
from mtasts_policyd.core.policy import Policy
from mtasts_policyd.core.tlsrpt_report import PolicyType, ReportPolicy, ResultType, SessionCount
from mtasts_policyd.ops.tlsrpt_ingest import report_policy, utc_day
from mtasts_policyd.store.tlsrpt_store import TlsRptStore, TlsRptStoreError

log = logging.getLogger("mtasts_policyd.tlsrpt")

REPORT_AFTER = 2  # consecutive failures: the retry after the first back-off failed too


class PolicyFailureRecorder:
    """resolution/resolver.PolicyFailures on a TlsRptStore (module docstring)."""

    def __init__(self, store: TlsRptStore) -> None:
        self.store = store
        self.recorded = 0  # failures written (tests, logs)

    def policy_failed(self, domain: str, failure: Failure, failures: int, policy: Policy | None,
                      now: float) -> None:
        result = failure.kind.tlsrpt_result_type
        if result is None or failures < REPORT_AFTER:  # RFC 8460 §4.3.4: transient, not reported
            return
        member = report_policy(domain, policy) or ReportPolicy(PolicyType.STS, domain)
        count = SessionCount(member, ResultType(result), "", "", "", failure.kind.value, 1)
        try:
            self.store.record([(utc_day(now), count)])
        except TlsRptStoreError as exc:
            log.error("tlsrpt record domain=%s result=%s failed: %s", domain, result, exc)
            return
        self.recorded += 1
        log.info("tlsrpt record domain=%s result=%s failures=%d", domain, result, failures)
