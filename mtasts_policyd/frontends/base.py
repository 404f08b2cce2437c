"""What every front end is to the daemon: a description it registers, and what it counts.

A front end turns one MTA's protocol into lookups of the shared `PolicyService` and decisions
into that MTA's replies. The daemon knows front ends only through `FrontEnd` (runtime/daemon.py
keeps the list): it opens each one's listeners from its configuration section, labels its metrics
with its name, hands it its counters and passes reloads on. A new front end (a DANE-aware one,
say) is one module with a `FRONT_END` description and one line in that list.

Nothing here imports ops/: the counters are handed in (`FrontEndCounters`; ops/metrics.py has
the Prometheus implementation).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from mtasts_policyd.core.dane_verdict import DaneDecision, Verdict
from mtasts_policyd.resolution.resolver import CacheState, Decision

if TYPE_CHECKING:
    from mtasts_policyd.frontends.listeners import ConnectionSlots
    from mtasts_policyd.resolution.service import PolicyService


class FrontEndCounters(Protocol):
    """What a front end counts. Called on the event loop thread only."""

    def answered(self, answer: str, decision: Decision | None, elapsed: float = 0.0) -> None:
        """One reply to a request: its first word (OK, NOTFOUND, enforce, error...), the decision
        it came from (None: no cache state applies) and the seconds it took (0: answered at once,
        not timed)."""

    def protocol_error(self) -> None:
        """A connection closed for breaking the protocol (a broken frame, no request in time)."""

    def dane_answered(self, verdict: str) -> None:
        """A reply that came from the DANE verdict (dane-only, dane, temp), not the MTA-STS answer."""


class NoCounts:
    """Counters that count nothing: for a front end built without metrics (tests, tools)."""

    def answered(self, answer: str, decision: Decision | None, elapsed: float = 0.0) -> None:
        pass

    def protocol_error(self) -> None:
        pass

    def dane_answered(self, verdict: str) -> None:
        pass


S = TypeVar("S")


class RunningFrontEnd(Protocol[S]):
    """A built front end, shared by all connections of its listeners."""

    settings: S  # replaced as a whole on reload: connections read it as they go
    slots: ConnectionSlots  # its connections now, evictions and refusals (connection counts)

    def protocol(self) -> asyncio.Protocol:
        """A protocol object for one new connection (the listener's factory)."""

    def summary(self) -> str:
        """Key=value words for the start-up and reload log lines ("" when there is nothing to say)."""


class ListenerSection(Protocol):
    """The keys every front end's configuration section has (runtime/config.py)."""

    @property
    def listen(self) -> tuple[str, ...]: ...

    @property
    def socket_owner(self) -> str | None: ...

    @property
    def socket_mode(self) -> str: ...

    @property
    def max_connections(self) -> int: ...


@dataclass(frozen=True)
class FrontEnd(Generic[S]):
    """A front end as the daemon registers it."""

    name: str  # the `frontend` label of its metrics, the `listener` label and the log's `listening NAME=`
    section: str  # its configuration section (Config.<section>): listen, socket_owner, socket_mode, its own keys
    # Its settings from that section (also on reload: may raise ValueError, then nothing changes).
    settings: Callable[[Any], S]
    # The running front end from (service, settings, counters).
    build: Callable[[PolicyService, S, FrontEndCounters], RunningFrontEnd[S]]

    def start(self, service: PolicyService, config: Any, counters: FrontEndCounters) -> RunningFrontEnd[S]:
        """Build it from the whole configuration (`config.<section>`)."""
        return self.build(service, self.settings(self.section_of(config)), counters)

    def section_of(self, config: Any) -> Any:
        return getattr(config, self.section)

    def reload(self, running: RunningFrontEnd[S], new_config: Any) -> Callable[[], None]:
        """Check the new configuration's section now (ValueError: nothing changes); the returned
        function applies it, and cannot fail (the daemon's reload is all or nothing)."""
        settings = self.settings(self.section_of(new_config))

        def apply() -> None:
            running.settings = settings
        return apply


def decision_log_fields(decision: Decision) -> str:
    """The grep-able key=value part of a decision's log line, the same for every front end."""
    failure = f" failure={decision.failure}" if decision.failure and decision.policy is None else ""
    override = f" override_reason={decision.override.reason!r}" if decision.override else ""
    dane = ""
    if decision.dane_applied is not None:
        dane = f" dane={decision.dane_applied.verdict.value}"
        if decision.dane_applied.verdict is Verdict.TEMP:
            dane += f" dane_reason={decision.dane_applied.reason!r}"
    return f"domain={decision.domain} cache={decision.state.value} reason={decision.reason}{failure}{override}{dane}"


def dane_reply(decision: Decision | None, reply: Callable[[DaneDecision], str | None]) -> str | None:
    """The reply of the DANE verdict that applies to `decision` (answers/dane.py's `reply` form), or
    None when the MTA-STS answer stands: RFC 8461 §2, DANE first."""
    if decision is None or decision.dane_applied is None:
        return None
    return reply(decision.dane_applied)


# Answers from the cache with no network and nothing an operator must see: logged at debug, as a
# line per cached lookup would cost more than the lookup. Misses, refreshes, failures (back-off
# included) and overrides stay at info (README "Logs"). A tuple: `in` compares by identity first.
QUIET_STATES = (CacheState.HIT, CacheState.NEGATIVE)
