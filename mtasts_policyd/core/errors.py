"""One small failure taxonomy for everything that can go wrong between a domain and its policy.

Every failure has a kind that an operator can grep for and that maps onto an RFC 8460 (TLSRPT)
result type, the way httpx maps transport errors onto one hierarchy. Failures travel as values
(`Failure`) in decisions and the cache; the exceptions exist so that the layers that find them
can stop early.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar


class FailureKind(enum.Enum):
    """Why a domain has no usable policy, or why refreshing one failed."""

    NO_RECORD = "no-record"  # RFC 8461 §3.1: no TXT record beginning "v=STSv1;"
    INVALID_RECORD = "invalid-record"  # RFC 8461 §3.1: several STSv1 records, or a malformed one
    DNS_TEMPORARY = "dns-temporary"  # timeout, SERVFAIL: we could not ask, so we know nothing
    FETCH_ERROR = "fetch-error"  # RFC 8461 §3.3: HTTPS GET did not give a 200 text/plain policy
    INVALID_POLICY = "invalid-policy"  # RFC 8461 §3.2: the body is not a valid policy
    CERTIFICATE_INVALID = "certificate-invalid"  # RFC 8461 §3.3: policy host certificate failed

    @property
    def tlsrpt_result_type(self) -> str | None:
        """The RFC 8460 §4.3.2.2 result type a report would carry, if any."""
        return _TLSRPT.get(self)

    @property
    def temporary(self) -> bool:
        """Whether asking again later could give another answer without the domain changing."""
        return self in (FailureKind.DNS_TEMPORARY, FailureKind.FETCH_ERROR, FailureKind.CERTIFICATE_INVALID)


_TLSRPT = {
    FailureKind.DNS_TEMPORARY: "sts-policy-fetch-error",
    FailureKind.FETCH_ERROR: "sts-policy-fetch-error",
    FailureKind.INVALID_POLICY: "sts-policy-invalid",
    FailureKind.CERTIFICATE_INVALID: "sts-webpki-invalid",
}


@dataclass(frozen=True)
class Failure:
    """A failure as a value: what kind, and a short human detail for logs and `query`."""

    kind: FailureKind
    detail: str

    def __str__(self) -> str:
        return f"{self.kind.value}: {self.detail}"


class MtaStsError(Exception):
    """Base of the hierarchy; `kind` says which branch of the taxonomy a failure belongs to."""

    kind: ClassVar[FailureKind]

    def __init__(self, detail: str, *, ttl: int | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        # For DNS answers (including negative ones, RFC 2308) the TTL the answer may be kept for.
        self.ttl = ttl

    @property
    def failure(self) -> Failure:
        return Failure(self.kind, self.detail)


class NoRecord(MtaStsError):
    kind = FailureKind.NO_RECORD


class InvalidRecord(MtaStsError):
    kind = FailureKind.INVALID_RECORD


class DnsTemporaryFailure(MtaStsError):
    kind = FailureKind.DNS_TEMPORARY


class FetchError(MtaStsError):
    kind = FailureKind.FETCH_ERROR


class CertificateInvalid(FetchError):
    kind = FailureKind.CERTIFICATE_INVALID


class InvalidPolicy(MtaStsError):
    kind = FailureKind.INVALID_POLICY
