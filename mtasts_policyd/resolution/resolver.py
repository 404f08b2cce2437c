"""The resolution algorithm (RFC 8461 §3.3, §5.1, §10.2): cache, DNS and HTTPS tied together.

Two entry points with one rule each:
- `cached()` answers from the cache alone and says whether a refresh is due; the lookup path
  calls it so that no lookup waits on the network while a usable answer exists.
- `resolve()` asks the network and updates the cache; it runs in a worker thread, either for a
  lookup that has nothing usable cached, or in the background. It returns a `Resolution`: the
  decision and what was done (an `Outcome`), for the log line, the metrics, `warm` and `survey`.
A failure never replaces a usable cached policy (§5.1); a domain that failed is not asked again
before its back-off ends (§3.3 suggests at least 5 minutes for a failed fetch).

The network comes in through the seams of net/base.py and the shared look-up of net/lookup.py;
counters are handed in (`ResolutionCounters`), so nothing here knows a metrics registry.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

from mtasts_policyd.core.dane_verdict import DaneBranch, DaneDecision
from mtasts_policyd.core.errors import (
    DnsTemporaryFailure,
    Failure,
    InvalidRecord,
    MtaStsError,
    NoRecord,
)
from mtasts_policyd.core.limits import limits
from mtasts_policyd.core.overrides import Override
from mtasts_policyd.core.policy import Mode, Policy
from mtasts_policyd.net.base import Discovery, Fetcher, StsAnswer
from mtasts_policyd.net.lookup import Ahead, MailHosts, get_policy, mail_hosts
from mtasts_policyd.net.trust import TrustStore
from mtasts_policyd.resolution.dane import DaneGate, Need
from mtasts_policyd.store.cache import PolicyCache
from mtasts_policyd.store.entry import Entry, merge

if TYPE_CHECKING:
    from mtasts_policyd.resolution.fleet import Fleet

log = logging.getLogger("mtasts_policyd.resolution")


class CacheState(enum.Enum):
    OVERRIDE = "override"  # the operator's override from the configuration; no cache, no network
    HIT = "hit"  # a usable policy from the cache
    NEGATIVE = "negative"  # "no policy" from the cache (no or invalid TXT record, within its TTL)
    BACKOFF = "backoff"  # nothing usable; a recent failure means we do not ask again yet
    MISS = "miss"  # asked the network now


@dataclass(frozen=True)
class Decision:
    """What is known about a domain at lookup time; front ends translate it, nothing more."""

    domain: str
    policy: Policy | None
    state: CacheState  # where the answer came from (README "Metrics": the `cache` label)
    policy_id: str | None = None
    failure: Failure | None = None  # why there is no policy, or the last refresh failure
    fetched_at: float | None = None
    expires_at: float | None = None
    mx_hosts: tuple[str, ...] | None = None  # the domain's MX hosts, known when the policy has "*." patterns
    override: Override | None = None
    dane: DaneBranch | None = None  # the DANE branch as cached (`query` shows it)
    # What the front ends apply before the MTA-STS answer (issue 9: DANE takes precedence); None:
    # the MTA-STS answer alone (no DANE, `dane.mode` off, or `auto` while the resolver does not validate).
    dane_applied: DaneDecision | None = None

    @property
    def mode(self) -> Mode | None:
        return self.policy.mode if self.policy else None

    @property
    def reason(self) -> str:
        """One word-ish reason for logs: the policy mode, or the failure kind."""
        if self.override is not None:
            return f"override-{self.override.action}"
        if self.policy is not None:
            return f"policy-{self.policy.mode.value}"
        return self.failure.kind.value if self.failure else "no-policy"


class Outcome(enum.Enum):
    """What one network resolution did (README "Metrics": mtasts_refreshes_total{outcome})."""

    FETCHED = "fetched"  # a policy fetched: the first for the domain, or again with the same id
    CHANGED = "changed"  # a policy fetched for a new id; it replaces the cached one
    UNCHANGED = "unchanged"  # the TXT id checked and unchanged: nothing fetched
    KEPT = "kept"  # the TXT record is gone or broken: the cached policy stays until it expires (§5.1)
    NO_POLICY = "no-policy"  # no or an invalid TXT record, and no usable policy cached
    FAILED = "failed"  # DNS or HTTPS failed: back-off; a usable cached policy is kept (§5.1)


@dataclass(frozen=True)
class Resolution:
    """The result of `PolicyResolver.resolve()`: the decision, and what the resolution did to get it."""

    decision: Decision
    outcome: Outcome
    previous_id: str | None = None  # the policy id before, when it changed

    @property
    def outcome_text(self) -> str:
        """The outcome as the refresh log line gives it: `changed from id=1` (README "Logs")."""
        if self.outcome is Outcome.CHANGED:
            return f"{self.outcome.value} from id={self.previous_id}"
        return self.outcome.value


class ResolutionCounters(Protocol):
    """What the resolver counts, handed in (ops/metrics.py implements it for the daemon)."""

    def fetched(self, result: str) -> None:
        """One HTTPS policy fetch: "ok" or a FailureKind value."""

    def resolved(self, outcome: Outcome) -> None:
        """One network resolution and its outcome."""

    def refresh_failed(self, kind: str) -> None:
        """A resolution that failed and started a back-off: a FailureKind value."""


class PolicyFailures(Protocol):
    """Where the daemon records its own failed policy resolutions for TLSRPT (RFC 8460 §4.3.2.2),
    handed in (ops/tlsrpt_policy.py implements it). Called from `resolve()`, i.e. in a worker
    thread, never on the lookup path; it decides itself which failures are worth reporting."""

    def policy_failed(self, domain: str, failure: Failure, failures: int, policy: Policy | None,
                      now: float) -> None:
        """`failures`: consecutive failures including this one; `policy`: the usable cached policy."""


class _NoCounters:
    """Counts nothing: commands other than `serve` export no metrics (README "Metrics")."""

    def fetched(self, result: str) -> None:
        pass

    def resolved(self, outcome: Outcome) -> None:
        pass

    def refresh_failed(self, kind: str) -> None:
        pass


SECONDS_MAX = 31557600  # a year: RFC 8461 §3.2's largest max_age; longer bounds mean nothing


@dataclass(frozen=True)
class ResolverSettings:
    """Seconds. Each X_min must not exceed its X_max (config.validate checks such pairs)."""

    # bounds for caching "no record" (RFC 2308 negative TTL)
    negative_ttl_min: int = field(default=60, metadata=limits(min=1, max=SECONDS_MAX))
    negative_ttl_max: int = field(default=3600, metadata=limits(min=1, max=SECONDS_MAX))
    # bounds for trusting a TXT id before checking it again
    txt_ttl_min: int = field(default=60, metadata=limits(min=1, max=SECONDS_MAX))
    txt_ttl_max: int = field(default=3600, metadata=limits(min=1, max=SECONDS_MAX))
    # RFC 8461 §10.2: fetch again at least daily, id unchanged or not
    refresh_after: int = field(default=86400, metadata=limits(min=60, max=SECONDS_MAX))
    # RFC 8461 §3.3: wait at least 5 minutes after a failed fetch
    backoff_min: int = field(default=300, metadata=limits(min=1, max=SECONDS_MAX))
    backoff_max: int = field(default=3600, metadata=limits(min=1, max=SECONDS_MAX))
    # DNS failures are usually shorter-lived than broken web servers
    dns_backoff_min: int = field(default=30, metadata=limits(min=1, max=SECONDS_MAX))
    # The daemon's bounds on network work (service.py), so that no flood can queue work without end:
    max_pending: int = field(default=1024, metadata=limits(min=1, max=100_000))  # resolutions in flight or queued
    lookup_timeout: float = field(default=30.0, metadata=limits(min=0.1, max=3600))  # a waiting lookup's deadline


def _clamp(value: int | None, low: int, high: int) -> int:
    return max(low, min(high, value if value is not None else low))


def cache_state(entry: Entry, now: float) -> CacheState | None:
    """What the cache can answer for the entry at `now` without the network: its usable policy
    (HIT), a negative answer in force (NEGATIVE), a back-off in force (BACKOFF); None: nothing."""
    if entry.usable_policy(now) is not None:
        return CacheState.HIT
    if now < entry.negative_until:
        return CacheState.NEGATIVE
    if now < entry.retry_after:
        return CacheState.BACKOFF
    return None


def decision_from(entry: Entry, now: float, state: CacheState, dane: DaneGate | None = None) -> Decision:
    """The decision at `now`; a MISS is the resolution that just ran, which applies what it fetched.
    `dane`: the daemon's DANE gate, which says what of the entry's DANE branch applies."""
    return Decision(
        domain=entry.domain,
        policy=entry.usable_policy(now, resolving=state is CacheState.MISS),
        state=state,
        policy_id=entry.policy_id,
        failure=entry.failure,
        fetched_at=entry.fetched_at,
        expires_at=entry.expires_at,
        mx_hosts=entry.mx_hosts,
        dane=entry.dane,
        dane_applied=dane.applied(entry.domain, entry.dane, now) if dane is not None else None,
    )


class PolicyResolver:
    """The daemon's one algorithm for what to answer about a domain, shared by every front end
    and by `query`, `warm` and `survey --update-cache`, so that they all follow the same rules.

    Why a class: it ties the cache, the network seams (Discovery, Fetcher), the settings, the
    operator's overrides and the clock together, and those change at runtime (reload) or in
    tests (a settable clock, in-memory fakes). What it guarantees: an override wins over
    everything; a usable cached policy is never replaced by a failure (RFC 8461 §5.1) nor
    dropped before max_age; "no record" is cached for its negative TTL, "could not ask" never is;
    a failed domain is not asked again before its back-off ends (§3.3); every result is written
    through the cache's version check, merged with another process's newer fetch. Thread-safe as
    the cache and the seams are: `resolve()` runs in worker threads.
    """

    def __init__(self, cache: PolicyCache, discovery: Discovery, fetcher: Fetcher,
                 settings: ResolverSettings = ResolverSettings(),
                 clock: Callable[[], float] = time.time, overrides: dict[str, Override] | None = None,
                 counters: ResolutionCounters | None = None) -> None:
        self.cache = cache
        self._discovery = discovery
        self._fetcher = fetcher
        self.settings = settings
        self._clock = clock
        self.overrides = overrides or {}  # replaced as a whole on reload (SIGHUP)
        self._counters: ResolutionCounters = counters if counters is not None else _NoCounters()
        # DANE beside MTA-STS (resolution/dane.py): set by the daemon and `query`; None for the
        # commands and tests that resolve MTA-STS alone (warm, survey, cache tools).
        self.dane: DaneGate | None = None
        # The decision last built from each cached entry: a hit returns the same object until the
        # entry is replaced or DANE's state changes (the lookup path runs on one thread: no lock).
        self._decisions: dict[str, tuple[Entry, CacheState, int, Decision]] = {}
        # TLSRPT records of the daemon's own policy failures (runtime/daemon.py sets it when a
        # TLSRPT store is in use); None for the commands and tests.
        self.policy_failures: PolicyFailures | None = None
        # The fleet's shared level (resolution/fleet.py), when `cache.redis` is configured: every
        # resolution's result is shared; None for a single node.
        self.fleet: Fleet | None = None

    @property
    def trust(self) -> TrustStore:
        """The CAs the policy hosts are verified against (shown by the start-up log and `query`)."""
        return self._fetcher.trust

    def _overridden(self, domain: str, now: float) -> Decision | None:
        override = self.overrides.get(domain)
        if override is None or not override.active(now):
            return None
        return Decision(domain, override.policy, CacheState.OVERRIDE, override=override)

    @property
    def clock(self) -> Callable[[], float]:
        return self._clock

    def cached(self, domain: str) -> tuple[Decision | None, bool]:
        """(decision from the cache or None, whether a background refresh is due). No network.

        None when the MTA-STS half or, where DANE applies, the DANE half has nothing usable cached.
        """
        now = self._clock()
        if self.overrides:
            decision = self._overridden(domain, now)
            if decision is not None:
                return decision, False
        entry = self.cache.get(domain)
        state = cache_state(entry, now) if entry is not None else None
        if entry is None or state is None:
            return None, False
        due = state is CacheState.HIT and entry.due(now, self.settings.refresh_after)
        if self.dane is not None:
            need = self.dane.need(entry.dane, now)
            if need is Need.WAIT:
                return None, False
            due = due or need is Need.DUE
        return self._decision(entry, now, state), due

    def answer(self, entry: Entry, now: float) -> Decision:
        """The decision for an entry that is not due (a fleet's shared entry): as from the cache."""
        return decision_from(entry, now, cache_state(entry, now) or CacheState.BACKOFF, self.dane)

    def _decision(self, entry: Entry, now: float, state: CacheState) -> Decision:
        """decision_from, built once per entry, state and DANE state (valid while none changes)."""
        memo = self._decisions.get(entry.domain)
        generation = self.dane.generation if self.dane is not None else 0
        if memo is not None and memo[0] is entry and memo[1] is state and memo[2] == generation:
            return memo[3]
        if len(self._decisions) > 2 * self.cache.memory_entries:
            self._decisions.clear()
        decision = decision_from(entry, now, state, self.dane)
        self._decisions[entry.domain] = (entry, state, generation, decision)
        return decision

    def sts_due(self, domain: str) -> bool:
        """Whether the MTA-STS half of the domain needs the network now (Entry.due; nothing cached)."""
        entry = self.cache.get(domain)
        return entry is None or entry.due(self._clock(), self.settings.refresh_after)

    def dane_needed(self, domain: str) -> bool:
        """Whether the DANE half of the domain needs the network now (resolution/dane.py)."""
        if self.dane is None:
            return False
        entry = self.cache.get(domain)
        return self.dane.need(entry.dane if entry else None, self._clock()) is not Need.NO

    def store_dane(self, domain: str, branch: DaneBranch) -> Entry:
        """Keep a DANE branch beside the domain's MTA-STS half (a worker thread: it writes the cache)."""
        entry = self.cache.get(domain) or Entry(domain)
        return self.commit(replace(entry, dane=branch))

    def current(self, domain: str) -> Decision:
        """The decision for what is cached now, as a resolution that just ran (a lookup that waited
        on the DANE half alone)."""
        entry = self.cache.get(domain) or Entry(domain)
        return decision_from(entry, self._clock(), CacheState.MISS, self.dane)

    def with_dane(self, decision: Decision, branch: DaneBranch | None, missing: str = "") -> Decision:
        """`decision` with `branch` as its DANE half (`missing`: why there is none, for a TEMP)."""
        if self.dane is None:
            return decision
        applied = self.dane.applied(decision.domain, branch, self._clock(), missing or "no DANE lookup was made")
        return replace(decision, dane=branch, dane_applied=applied)

    @property
    def discovery(self) -> Discovery:
        return self._discovery

    def look_ahead(self, domain: str, txt: StsAnswer) -> tuple[bool, bool]:
        """What the daemon may ask on its event loop before `resolve(domain, txt=txt)` (net/lookup.py
        `look_ahead`): (the policy host's addresses: the policy is going to be fetched; the MX hosts:
        `_refresh_mx` will want them, or may, as nothing usable is cached yet)."""
        now = self._clock()
        if self._overridden(domain, now) is not None:
            return False, False
        entry = self.cache.get(domain) or Entry(domain)
        fetch = txt.record.id != self._known_id(entry, now, False)
        usable = entry.usable_policy(now)
        if usable is None:
            return fetch, fetch
        return fetch, usable.has_wildcards and (fetch or now >= entry.mx_expires_at)

    def resolve(self, domain: str, refetch: bool = False, txt: StsAnswer | MtaStsError | None = None,
                ahead: Ahead | None = None) -> Resolution:
        """Ask DNS (and HTTPS when needed) now, update the cache, return the resulting decision
        and what was done to get it.

        `refetch`: fetch the policy even if its id is unchanged (RFC 8461 §10.2, the warmer), so
        that max_age restarts from this fetch.
        `txt`: the `_mta-sts` TXT answer (or its failure) when the caller already asked for it (the
        daemon asks on its event loop, `Discovery.sts_record_async`); None asks here.
        `ahead`: the policy host's A lookup and the MX hosts when the daemon asked for them on its
        event loop (`look_ahead`); whatever it does not hold is asked here, when needed.
        An overridden domain asks nothing: its resolution is UNCHANGED with the override's decision.
        """
        now = self._clock()
        overridden = self._overridden(domain, now)
        if overridden is not None:
            return Resolution(overridden, Outcome.UNCHANGED)
        before = self.cache.get(domain) or Entry(domain)
        ahead = ahead or Ahead()
        entry, outcome = self._refresh_policy(before, now, refetch, txt, ahead.ipv4)
        entry = self.commit(self._refresh_mx(entry, now, ahead.mx))
        if self.fleet is not None:
            self.fleet.publish(entry)  # README "Fleet (Redis)": the fleet learns what this node found
        decision = decision_from(entry, now, CacheState.MISS, self.dane)
        resolution = Resolution(decision, outcome, before.policy_id if outcome is Outcome.CHANGED else None)
        self._counters.resolved(outcome)
        detail = f" detail={entry.failure.detail}" if entry.failure and decision.policy is None else ""
        log.info("refresh domain=%s outcome=%s reason=%s id=%s%s", domain, resolution.outcome_text, decision.reason,
                 entry.policy_id or "-", detail)
        return resolution

    def commit(self, entry: Entry) -> Entry:
        """Store the entry; when another process wrote the domain meanwhile, keep the newer policy."""
        for _ in range(5):
            stored = self.cache.put(entry)
            if stored is not None:
                return stored
            current = self.cache.reload(entry.domain)
            log.info("cache domain=%s changed by another process; merging", entry.domain)
            entry = merge(current, entry)
        log.error("cache domain=%s kept changing under us; this result was not stored", entry.domain)
        return entry

    def _known_id(self, entry: Entry, now: float, refetch: bool) -> str | None:
        """The id of the cached policy that needs no fetch while the TXT record names it."""
        # RFC 8461 §3.3: an unchanged id needs no fetch, unless §10.2's regular refetch is due.
        if entry.usable_policy(now) is None or refetch or entry.refetch_due(now, self.settings.refresh_after):
            return None
        return entry.policy_id

    def _refresh_policy(self, entry: Entry, now: float, refetch: bool = False,
                        txt: StsAnswer | MtaStsError | None = None,
                        ipv4: list[str] | MtaStsError | None = None) -> tuple[Entry, Outcome]:
        """The entry after asking DNS (and HTTPS when needed), and what happened."""
        usable = entry.usable_policy(now)
        s = self.settings
        try:
            found = get_policy(entry.domain, self._discovery, self._fetcher, txt,
                               known_id=self._known_id(entry, now, refetch), ipv4=ipv4)
        except (NoRecord, InvalidRecord) as exc:
            if usable is not None:
                # RFC 8461 §5.1: a missing or broken TXT record does not remove a cached policy.
                return replace(entry, txt_expires_at=now + _clamp(exc.ttl, s.txt_ttl_min, s.txt_ttl_max),
                               failure=exc.failure, failure_at=now), Outcome.KEPT
            negative = _clamp(exc.ttl, s.negative_ttl_min, s.negative_ttl_max)
            return replace(entry, negative_until=now + negative, failure=exc.failure,
                           failure_at=now, failures=0, retry_after=0.0), Outcome.NO_POLICY
        except DnsTemporaryFailure as exc:
            return self._failed(entry, exc, now, s.dns_backoff_min), Outcome.FAILED
        answer = found.answer
        txt_expires_at = now + _clamp(answer.ttl, s.txt_ttl_min, s.txt_ttl_max)
        if not found.fetched:
            return replace(entry, txt_expires_at=txt_expires_at, failure=None, failures=0,
                           retry_after=0.0), Outcome.UNCHANGED
        if found.error is not None:
            self._counters.fetched(found.error.kind.value)
            return self._failed(entry, found.error, now, s.backoff_min), Outcome.FAILED
        self._counters.fetched("ok")
        fresh = Entry(entry.domain, txt_record=answer.record.text, policy_id=answer.record.id, policy_body=found.body,
                      policy=found.policy, fetched_at=now, txt_expires_at=txt_expires_at,
                      last_lookup=entry.last_lookup, mx_hosts=entry.mx_hosts, dane=entry.dane,
                      version=entry.version)  # mx_expires_at 0: look at MX again
        changed = entry.policy_id not in (None, answer.record.id)
        return fresh, Outcome.CHANGED if changed else Outcome.FETCHED

    def _refresh_mx(self, entry: Entry, now: float, asked: MailHosts | MtaStsError | None = None) -> Entry:
        """Keep the MX host names of a domain whose policy has "*." patterns, in step with the MX TTL.

        Postfix before 3.10.5 reads a match pattern ".mx.example" as any depth below mx.example, while
        RFC 8461 §4.1 allows exactly one label; answering with the current MX hosts that match makes
        the answer exact (postfix.py). `asked`: the MX answer (or its failure) when the daemon
        already asked (`Ahead.mx`); None asks here.
        """
        policy = entry.usable_policy(now, resolving=True)
        if policy is None or not policy.has_wildcards or now < entry.mx_expires_at:
            return entry
        s = self.settings
        try:
            if isinstance(asked, MtaStsError):
                raise asked
            hosts, ttl = asked or mail_hosts(self._discovery, entry.domain)  # RFC 5321 §5.1, RFC 7505
        except MtaStsError as exc:
            log.warning("mx domain=%s lookup failed: %s; keeping %s", entry.domain, exc.detail,
                        " ".join(entry.mx_hosts) if entry.mx_hosts else "the plain patterns")
            return replace(entry, mx_expires_at=now + s.dns_backoff_min)
        return replace(entry, mx_hosts=tuple(hosts), mx_expires_at=now + _clamp(ttl, s.txt_ttl_min, s.txt_ttl_max))

    def _failed(self, entry: Entry, exc: MtaStsError, now: float, base: int) -> Entry:
        failures = entry.failures + 1
        delay = min(base * 2 ** min(failures - 1, 16), self.settings.backoff_max)
        usable = entry.usable_policy(now)
        self._counters.refresh_failed(exc.kind.value)
        log.warning("refresh domain=%s failed kind=%s retry_in=%ds keeping=%s detail=%s", entry.domain,
                    exc.kind.value, delay, usable.mode.value if usable else "nothing", exc.detail)
        if self.policy_failures is not None:
            self.policy_failures.policy_failed(entry.domain, exc.failure, failures, usable, now)
        return replace(entry, failure=exc.failure, failure_at=now, failures=failures, retry_after=now + delay)
