"""Plain-data views of policies, failures and times, shared by `query`, `cache` and `warm`.

One rendering per idea, so the same policy or failure reads the same in every command's output.
"""

from __future__ import annotations

import datetime
from typing import Any

from .errors import Failure
from .policy import Policy


def iso_time(value: float | None) -> str | None:
    """ISO 8601 UTC to the second; None for unset (None or 0)."""
    if not value:
        return None
    return datetime.datetime.fromtimestamp(value, datetime.timezone.utc).isoformat(timespec="seconds")


def policy_fields(policy: Policy | None) -> dict[str, Any]:
    return {"mode": policy.mode.value if policy else None,
            "mx": list(policy.mx) if policy else [],
            "max_age": policy.max_age if policy else None}


def failure_fields(failure: Failure | None) -> dict[str, Any] | None:
    if failure is None:
        return None
    return {"kind": failure.kind.value, "detail": failure.detail,
            "tlsrpt_result_type": failure.kind.tlsrpt_result_type}
