"""DANE precedence (issue 9): the verdict of core/dane_verdict.py as each front end's reply.

| verdict | socketmap (Postfix) | Exim `policy` line |
|---|---|---|
| DANE_ONLY | `OK dane-only` | `dane-only` |
| DANE | `OK dane` | `dane` |
| TEMP | `TEMP <reason>` | `temp <reason>` |
| NONE | the MTA-STS answer, unchanged | the MTA-STS reply, unchanged |
"""

from __future__ import annotations

from mtasts_policyd.core.dane_verdict import (  # re-exported: the decision's home moved to core
    MAX_REASON as MAX_REASON,
)
from mtasts_policyd.core.dane_verdict import DaneDecision as DaneDecision
from mtasts_policyd.core.dane_verdict import DaneTtl as DaneTtl
from mtasts_policyd.core.dane_verdict import Verdict as Verdict
from mtasts_policyd.core.dane_verdict import decide as decide

# ----- front ends -----------------------------------------------------------------


def socketmap_answer(decision: DaneDecision) -> str | None:
    """The Postfix socketmap reply (socketmap_table(5), smtp_tls_policy_maps syntax), or None for
    "answer as MTA-STS alone would". Postfix defers mail on TEMP."""
    if decision.verdict is Verdict.DANE_ONLY:
        return "OK dane-only"
    if decision.verdict is Verdict.DANE:
        return "OK dane"
    if decision.verdict is Verdict.TEMP:
        return f"TEMP {decision.reason}"
    return None


def exim_reply(decision: DaneDecision) -> str | None:
    """The Exim `${readsocket}` line reply, or None for "the MTA-STS reply unchanged"."""
    if decision.verdict is Verdict.TEMP:
        return f"temp {decision.reason}"
    if decision.verdict is Verdict.NONE:
        return None
    return decision.verdict.value
