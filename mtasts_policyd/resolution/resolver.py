"""The resolution algorithm (RFC 8461 §3.3, §5.1, §10.2): cache, DNS and HTTPS tied together.

Two entry points with one rule each:
- `cached()` answers from the cache alone and says whether a refresh is due; the lookup path
  calls it so that no lookup waits on the network while a usable answer exists.
- `resolve()` asks the network and updates the cache; it runs in a worker thread, either for a
  lookup that has nothing usable cached, or in the background.
A failure never replaces a usable cached policy (§5.1); a domain that failed is not asked again
before its back-off ends (§3.3 suggests at least 5 minutes for a failed fetch).
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

from mtasts_policyd.core.errors import (
    DnsTemporaryFailure,
    Failure,
    InvalidRecord,
    MtaStsError,
    NoRecord,
)
from mtasts_policyd.core.limits import limits
from mtasts_policyd.core.overrides import Override
from mtasts_policyd.core.policy import Mode, Policy, parse_policy
from mtasts_policyd.net.dns import Discovery, StsAnswer
from mtasts_policyd.net.https import PolicyFetcher
from mtasts_policyd.net.trust import TrustStore
from mtasts_policyd.store.cache import PolicyCache
from mtasts_policyd.store.entry import Entry, merge

log = logging.getLogger("mtasts_policyd.resolution")


class CacheState(enum.Enum):
    OVERRIDE = "override"  # the operator's override from the configuration; no cache, no network
    HIT = "hit"  # a usable policy from the cache
    NEGATIVE = "negative"  # "no policy" from the cache (no or invalid TXT record, within its TTL)
    BACKOFF = "backoff"  # nothing usable; a recent failure means we do not ask again yet
    MISS = "miss"  # asked the network now


class Outcome(enum.Enum):
    """What a network resolution did (issue 8 contract; helper B's version replaces this one)."""

    FETCHED = "fetched"
    CHANGED = "changed"
    UNCHANGED = "unchanged"
    KEPT = "kept"
    NO_POLICY = "no-policy"
    FAILED = "failed"


class ResolutionCounters(Protocol):
    """What the resolver counts; handed in (ops/metrics.py implements it for Prometheus)."""

    def fetched(self, result: str) -> None: ...  # "ok" or a FailureKind value

    def resolved(self, outcome: Outcome) -> None: ...

    def refresh_failed(self, kind: str) -> None: ...  # a FailureKind value


class _NoCounts:
    def fetched(self, result: str) -> None:
        pass

    def resolved(self, outcome: Outcome) -> None:
        pass

    def refresh_failed(self, kind: str) -> None:
        pass


@dataclass(frozen=True)
class Decision:
    """What is known about a domain at lookup time; front ends translate it, nothing more."""

    domain: str
    policy: Policy | None
    cache: CacheState
    policy_id: str | None = None
    failure: Failure | None = None  # why there is no policy, or the last refresh failure
    fetched_at: float | None = None
    expires_at: float | None = None
    mx_hosts: tuple[str, ...] | None = None  # the domain's MX hosts, known when the policy has "*." patterns
    override: Override | None = None

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


def decision_from(entry: Entry, now: float, cache: CacheState) -> Decision:
    """The decision at `now`; a MISS is the resolution that just ran, which applies what it fetched."""
    return Decision(
        domain=entry.domain,
        policy=entry.usable_policy(now, resolving=cache is CacheState.MISS),
        cache=cache,
        policy_id=entry.policy_id,
        failure=entry.failure,
        fetched_at=entry.fetched_at,
        expires_at=entry.expires_at,
        mx_hosts=entry.mx_hosts,
    )


class PolicyResolver:
    def __init__(self, cache: PolicyCache, discovery: Discovery, fetcher: PolicyFetcher,
                 settings: ResolverSettings = ResolverSettings(),
                 clock: Callable[[], float] = time.time, overrides: dict[str, Override] | None = None,
                 counters: ResolutionCounters | None = None) -> None:
        self.cache = cache
        self.counters: ResolutionCounters = counters if counters is not None else _NoCounts()
        self._discovery = discovery
        self._fetcher = fetcher
        self.settings = settings
        self._clock = clock
        self.overrides = overrides or {}  # replaced as a whole on reload (SIGHUP)
        # The decision last built from each cached entry: a hit returns the same object until the
        # entry is replaced (the lookup path runs on one thread: no lock).
        self._decisions: dict[str, tuple[Entry, CacheState, Decision]] = {}

    @property
    def trust(self) -> TrustStore:
        """The CAs the policy hosts are verified against (shown by the start-up log and `query`)."""
        return self._fetcher.trust

    def _overridden(self, domain: str, now: float) -> Decision | None:
        override = self.overrides.get(domain)
        if override is None or not override.active(now):
            return None
        return Decision(domain, override.policy, CacheState.OVERRIDE, override=override)

    def cached(self, domain: str) -> tuple[Decision | None, bool]:
        """(decision from the cache or None, whether a background refresh is due). No network."""
        now = self._clock()
        if self.overrides:
            decision = self._overridden(domain, now)
            if decision is not None:
                return decision, False
        entry = self.cache.get(domain)
        if entry is None:
            return None, False
        if entry.usable_policy(now) is not None:
            due = now >= entry.retry_after and entry.refresh_due(now, self.settings.refresh_after)
            return self._decision(entry, now, CacheState.HIT), due
        if now < entry.negative_until:
            return self._decision(entry, now, CacheState.NEGATIVE), False
        if now < entry.retry_after:
            return self._decision(entry, now, CacheState.BACKOFF), False
        return None, False

    def _decision(self, entry: Entry, now: float, state: CacheState) -> Decision:
        """decision_from, built once per entry and state (valid while the entry is unchanged)."""
        memo = self._decisions.get(entry.domain)
        if memo is not None and memo[0] is entry and memo[1] is state:
            return memo[2]
        if len(self._decisions) > 2 * self.cache.memory_entries:
            self._decisions.clear()
        decision = decision_from(entry, now, state)
        self._decisions[entry.domain] = (entry, state, decision)
        return decision

    @property
    def discovery(self) -> Discovery:
        return self._discovery

    def resolve(self, domain: str, refetch: bool = False, txt: StsAnswer | MtaStsError | None = None) -> Decision:
        """Ask DNS (and HTTPS when needed) now, update the cache, return the resulting decision.

        `refetch`: fetch the policy even if its id is unchanged (RFC 8461 §10.2, the warmer), so
        that max_age restarts from this fetch.
        `txt`: the `_mta-sts` TXT answer (or its failure) when the caller already asked for it (the
        daemon asks on its event loop, `Discovery.sts_record_async`); None asks here.
        """
        now = self._clock()
        overridden = self._overridden(domain, now)
        if overridden is not None:
            return overridden
        entry, outcome = self._refresh_policy(self.cache.get(domain) or Entry(domain), now, refetch, txt)
        entry = self._commit(self._refresh_mx(entry, now))
        decision = decision_from(entry, now, CacheState.MISS)
        self.counters.resolved(Outcome(outcome.split(" ", 1)[0]))  # "changed from id=..." -> changed
        detail = f" detail={entry.failure.detail}" if entry.failure and decision.policy is None else ""
        log.info("refresh domain=%s outcome=%s reason=%s id=%s%s", domain, outcome, decision.reason,
                 entry.policy_id or "-", detail)
        return decision

    def _commit(self, entry: Entry) -> Entry:
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

    def _refresh_policy(self, entry: Entry, now: float, refetch: bool = False,
                        txt: StsAnswer | MtaStsError | None = None) -> tuple[Entry, str]:
        """The entry after asking DNS (and HTTPS when needed), and a word on what happened."""
        usable = entry.usable_policy(now)
        s = self.settings
        try:
            if txt is None:
                answer = self._discovery.sts_record(entry.domain)
            elif isinstance(txt, MtaStsError):
                raise txt
            else:
                answer = txt
        except (NoRecord, InvalidRecord) as exc:
            if usable is not None:
                # RFC 8461 §5.1: a missing or broken TXT record does not remove a cached policy.
                return replace(entry, txt_expires_at=now + _clamp(exc.ttl, s.txt_ttl_min, s.txt_ttl_max),
                               failure=exc.failure, failure_at=now), "kept"
            negative = _clamp(exc.ttl, s.negative_ttl_min, s.negative_ttl_max)
            return replace(entry, negative_until=now + negative, failure=exc.failure,
                           failure_at=now, failures=0, retry_after=0.0), "no-policy"
        except DnsTemporaryFailure as exc:
            return self._failed(entry, exc, now, s.dns_backoff_min), "failed"
        txt_expires_at = now + _clamp(answer.ttl, s.txt_ttl_min, s.txt_ttl_max)
        if usable is not None and answer.record.id == entry.policy_id and not refetch \
                and not entry.refetch_due(now, s.refresh_after):
            return replace(entry, txt_expires_at=txt_expires_at, failure=None, failures=0, retry_after=0.0), "unchanged"
        try:
            body = self._fetcher.fetch(entry.domain)
            policy = parse_policy(body)
        except MtaStsError as exc:
            self.counters.fetched(exc.kind.value)
            return self._failed(entry, exc, now, s.backoff_min), "failed"
        self.counters.fetched("ok")
        fresh = Entry(entry.domain, txt_record=answer.record.text, policy_id=answer.record.id, policy_body=body,
                      policy=policy, fetched_at=now, txt_expires_at=txt_expires_at, last_lookup=entry.last_lookup,
                      mx_hosts=entry.mx_hosts, version=entry.version)  # mx_expires_at 0: look at MX again
        outcome = "fetched" if entry.policy_id in (None, answer.record.id) else f"changed from id={entry.policy_id}"
        return fresh, outcome

    def _refresh_mx(self, entry: Entry, now: float) -> Entry:
        """Keep the MX host names of a domain whose policy has "*." patterns, in step with the MX TTL.

        Postfix before 3.10.5 reads a match pattern ".mx.example" as any depth below mx.example, while
        RFC 8461 §4.1 allows exactly one label; answering with the current MX hosts that match makes
        the answer exact (postfix.py).
        """
        policy = entry.usable_policy(now, resolving=True)
        if policy is None or not policy.has_wildcards or now < entry.mx_expires_at:
            return entry
        s = self.settings
        ttl: int | None
        try:
            hosts, ttl = self._discovery.mx_hosts(entry.domain)
        except NoRecord as exc:
            hosts, ttl = [entry.domain], exc.ttl  # RFC 5321 §5.1: no MX means the domain itself
        except MtaStsError as exc:
            log.warning("mx domain=%s lookup failed: %s; keeping %s", entry.domain, exc.detail,
                        " ".join(entry.mx_hosts) if entry.mx_hosts else "the plain patterns")
            return replace(entry, mx_expires_at=now + s.dns_backoff_min)
        return replace(entry, mx_hosts=tuple(hosts), mx_expires_at=now + _clamp(ttl, s.txt_ttl_min, s.txt_ttl_max))

    def _failed(self, entry: Entry, exc: MtaStsError, now: float, base: int) -> Entry:
        failures = entry.failures + 1
        delay = min(base * 2 ** min(failures - 1, 16), self.settings.backoff_max)
        usable = entry.usable_policy(now)
        self.counters.refresh_failed(exc.kind.value)
        log.warning("refresh domain=%s failed kind=%s retry_in=%ds keeping=%s detail=%s", entry.domain,
                    exc.kind.value, delay, usable.mode.value if usable else "nothing", exc.detail)
        return replace(entry, failure=exc.failure, failure_at=now, failures=failures, retry_after=now + delay)
