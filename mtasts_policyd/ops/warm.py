"""The cache warmer: what `mtasts-policyd warm` does (commands/warm.py is its command line).

It refreshes cached policies before they expire (RFC 8461 §10.2: fetch again regularly even when
the id is unchanged, so that max_age restarts from the new fetch), re-checks TXT ids, and resolves
domains from hint lists so that the first mail to a big provider finds its policy cached.

All cache writes go through `PolicyResolver.resolve()`, so the warmer follows the same rules as
the daemon: a failure never replaces a usable policy, back-off after failures is stored per
domain, and a write that races another process (daemon, second warmer) is merged, not lost. Each
domain's result is one SQLite statement in WAL mode, so killing the warmer at any moment leaves
the cache consistent. What happened to a domain is the resolution's outcome; the warmer adds what
only it knows (it skipped the domain, the policy it held before) and the alerts that follow.
"""

from __future__ import annotations

import enum
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from mtasts_policyd.core.policy import Mode, Policy
from mtasts_policyd.ops.pool import run_bounded
from mtasts_policyd.ops.views import iso_time
from mtasts_policyd.resolution.resolver import Outcome as Resolved
from mtasts_policyd.resolution.resolver import PolicyResolver, Resolution
from mtasts_policyd.store.entry import Entry

log = logging.getLogger("mtasts_policyd.warm")

DAY = 86400.0


class Outcome(enum.Enum):
    REFRESHED = "refreshed"  # fetched again, same id and policy: max_age restarts (§10.2)
    CHANGED = "changed"  # the cache now holds another policy: new id or content, or a first policy
    UNCHANGED = "unchanged"  # checked, no fetch needed: TXT id unchanged for a fresh copy, or still no policy
    KEPT = "kept"  # the TXT record is gone or broken: the cached policy stays until it expires (§5.1)
    FAILED = "failed"  # DNS or HTTPS failed; whatever usable policy was cached is kept
    SKIPPED = "skipped"  # not asked: backing off after a recent failure, or overridden in the config


class AlertKind(enum.Enum):
    ENFORCE_NOT_REFRESHED = "enforce-not-refreshed"  # a cached enforce policy could not be refreshed
    MODE_DOWNGRADE = "mode-downgrade"  # enforce -> testing or none
    MX_CHANGED = "mx-changed"  # the mx pattern set of an enforce policy changed
    ERROR = "error"  # the warmer itself failed (cache unusable, internal error)


@dataclass(frozen=True)
class Alert:
    kind: AlertKind
    domain: str
    detail: str

    def line(self) -> str:
        """One grep-able line; the detail comes last and may contain spaces."""
        detail = " ".join(self.detail.split())
        return f"ALERT kind={self.kind.value} domain={self.domain} detail={detail}"


@dataclass(frozen=True)
class WarmResult:
    domain: str
    outcome: Outcome
    detail: str = ""
    policy_id: str | None = None  # what the cache holds afterwards
    mode: Mode | None = None
    alerts: tuple[Alert, ...] = ()

    def line(self) -> str:
        mode = self.mode.value if self.mode else "-"
        return (f"warm domain={self.domain} outcome={self.outcome.value} id={self.policy_id or '-'} mode={mode}"
                f"{' detail=' + ' '.join(self.detail.split()) if self.detail else ''}")


@dataclass(frozen=True)
class WarmOptions:
    recent: float = 7 * DAY  # seconds: domains looked up within this are warmed
    all_policies: bool = False  # every cached domain with a policy, looked up recently or not
    concurrency: int = 8
    jitter: float = 2.0  # seconds: each domain waits a random 0..jitter before its network work
    force: bool = False  # ignore back-off
    refetch_after: float = 43200.0  # seconds: younger copies (and younger than max_age/2) get a TXT check only


@dataclass
class Summary:
    total: int  # domains selected
    results: list[WarmResult] = field(default_factory=list)
    interrupted: bool = False
    run_alerts: list[Alert] = field(default_factory=list)  # about the run, not one domain

    def count(self, outcome: Outcome) -> int:
        return sum(1 for r in self.results if r.outcome is outcome)

    @property
    def alerts(self) -> list[Alert]:
        return self.run_alerts + [alert for r in self.results for alert in r.alerts]

    def line(self) -> str:
        counts = ", ".join(f"{o.value} {self.count(o)}" for o in
                           (Outcome.REFRESHED, Outcome.UNCHANGED, Outcome.CHANGED, Outcome.KEPT, Outcome.FAILED,
                            Outcome.SKIPPED))
        done = f" (interrupted after {len(self.results)})" if self.interrupted else ""
        return f"warm: {self.total} domains, {counts}, alerts {len(self.alerts)}{done}"

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        return 1 if self.alerts else 0


def _time(value: float | None) -> str:
    return iso_time(value) or "-"


# ----- which domains ----------------------------------------------------------------------------


def select_domains(entries: Iterable[Entry], now: float, options: WarmOptions,
                   hints: Iterable[str] = ()) -> list[str]:
    """Cached domains looked up within `recent` (any entry: policy or negative), every cached
    domain with a policy under `all_policies`, and the hint domains; sorted, without duplicates."""
    chosen = set(hints)
    for entry in entries:
        recent = entry.last_lookup > 0 and entry.last_lookup >= now - options.recent
        if recent or (options.all_policies and entry.policy is not None):
            chosen.add(entry.domain)
    return sorted(chosen)


# ----- one domain -------------------------------------------------------------------------------


def warm_domain(resolver: PolicyResolver, domain: str, options: WarmOptions,
                clock: Callable[[], float] = time.time) -> WarmResult:
    """Refresh one domain through the resolver and say what happened."""
    now = clock()
    override = resolver.overrides.get(domain)
    if override is not None and override.active(now):
        return WarmResult(domain, Outcome.SKIPPED, "override in the configuration")
    cache = resolver.cache
    if resolver.fleet is not None:  # README "Fleet (Redis)": what another node fetched counts here too
        resolver.fleet.take(domain)
    # Read the stored row, not this process's memory copy: another process may have written it.
    before = cache.reload(domain) if cache.persistent else cache.get(domain)
    stored = before.policy if before is not None else None
    if before is not None and now < before.retry_after and not options.force:
        detail = f"backing off until {_time(before.retry_after)}"
        if before.failure is not None:
            detail += f" after {before.failure}"
        alerts = _not_refreshed(before, now, detail) if before.failure is not None else ()
        return WarmResult(domain, Outcome.SKIPPED, detail, before.policy_id, stored.mode if stored else None, alerts)
    # RFC 8461 §10.2: fetch even with an unchanged id so that max_age restarts. A copy younger than
    # refetch_after and than half its max_age only gets its TXT id checked (resolve() fetches on a
    # new id); a domain without a policy gets the TXT check too, and a fetch if a record appeared.
    refetch = before is not None and stored is not None and before.refetch_due(now, options.refetch_after)
    resolution = resolver.resolve(domain, refetch=refetch)
    after = cache.get(domain)
    if after is None:
        return WarmResult(domain, Outcome.FAILED, "result was not stored in the cache",
                          alerts=(Alert(AlertKind.ERROR, domain, "result was not stored in the cache"),))
    return classify(before, resolution, after, now)


def classify(before: Entry | None, resolution: Resolution, after: Entry, now: float) -> WarmResult:
    """The warmer's outcome for a resolution started at `now`, and its alerts.

    The resolution says what happened; `before` (the entry the warmer read first) tells a refresh
    of the same policy from a change, and which alerts follow; `after` is what the cache holds now.
    """
    domain = after.domain
    stored = before.policy if before is not None else None
    new = after.policy
    mode = new.mode if new else None
    outcome = resolution.outcome
    if outcome in (Resolved.FETCHED, Resolved.CHANGED) and new is not None:
        if outcome is Resolved.FETCHED and stored is not None and before is not None \
                and after.policy_id == before.policy_id and new == stored:
            return WarmResult(domain, Outcome.REFRESHED, f"expires {_time(after.expires_at)}", after.policy_id, mode)
        old_id = before.policy_id if before is not None and before.policy_id else "-"
        detail = f"id {old_id} -> {after.policy_id}"
        if stored is not None:
            detail += f", mode {stored.mode.value} -> {new.mode.value}"
        else:
            detail += f", mode {new.mode.value} (first policy)"
        return WarmResult(domain, Outcome.CHANGED, detail, after.policy_id, mode,
                          _policy_alerts(domain, stored, new, old_id, after.policy_id or "-"))
    failure = resolution.decision.failure
    if outcome is Resolved.NO_POLICY and failure is not None:
        return WarmResult(domain, Outcome.UNCHANGED, f"no policy ({failure.kind.value})")
    if outcome in (Resolved.KEPT, Resolved.FAILED) and failure is not None:
        detail = str(failure)
        if after.usable_policy(now) is not None:
            detail += f"; keeping id {after.policy_id} until {_time(after.expires_at)}"
        alerts = _not_refreshed(before, now, str(failure)) if before is not None else ()
        # RFC 8461 §5.1: a vanished or broken TXT record keeps the cached policy, whatever its mode,
        # until it expires; not a failure (§8.3 withdraws a policy exactly so), but an enforce
        # policy that will not be refreshed is worth an alert.
        kept = outcome is Resolved.KEPT
        return WarmResult(domain, Outcome.KEPT if kept else Outcome.FAILED, detail, after.policy_id, mode, alerts)
    if after.usable_policy(now) is not None:
        return WarmResult(domain, Outcome.UNCHANGED, f"id {after.policy_id} unchanged", after.policy_id, mode)
    return WarmResult(domain, Outcome.UNCHANGED, "no policy")


def _not_refreshed(before: Entry, now: float, why: str) -> tuple[Alert, ...]:
    """A cached enforce policy (usable or just expired) that this run could not refresh."""
    if before.policy is None or before.policy.mode is not Mode.ENFORCE:
        return ()
    usable = before.usable_policy(now) is not None
    when = f"{'expires' if usable else 'expired'} {_time(before.expires_at)}"
    return (Alert(AlertKind.ENFORCE_NOT_REFRESHED, before.domain, f"id={before.policy_id} {when}; {why}"),)


def _policy_alerts(domain: str, old: Policy | None, new: Policy, old_id: str, new_id: str) -> tuple[Alert, ...]:
    if old is None:
        return ()
    alerts = []
    if old.mode is Mode.ENFORCE and new.mode is not Mode.ENFORCE:
        alerts.append(Alert(AlertKind.MODE_DOWNGRADE, domain,
                            f"enforce -> {new.mode.value} (id {old_id} -> {new_id})"))
    if Mode.NONE not in (old.mode, new.mode) and Mode.ENFORCE in (old.mode, new.mode) and set(old.mx) != set(new.mx):
        alerts.append(Alert(AlertKind.MX_CHANGED, domain,
                            f"{','.join(old.mx)} -> {','.join(new.mx)} (id {old_id} -> {new_id})"))
    return tuple(alerts)


# ----- a run ------------------------------------------------------------------------------------


def warm(resolver: PolicyResolver, domains: Sequence[str], options: WarmOptions,
         clock: Callable[[], float] = time.time,
         on_result: Callable[[WarmResult, int, int], None] | None = None,
         stop: threading.Event | None = None) -> Summary:
    """Warm `domains` with at most `options.concurrency` at a time. `on_result(result, done,
    total)` runs in the calling thread as results arrive. KeyboardInterrupt (or `stop`) ends the
    run after the domains in flight; the summary then says it was interrupted."""
    stop = stop or threading.Event()
    summary = Summary(len(domains))

    def task(domain: str) -> WarmResult | None:
        if options.jitter > 0 and stop.wait(random.uniform(0, options.jitter)):
            return None
        if stop.is_set():
            return None
        try:
            return warm_domain(resolver, domain, options, clock)
        except Exception as exc:  # a bug must not end the run for every other domain
            log.exception("warm domain=%s crashed", domain)
            return WarmResult(domain, Outcome.FAILED, f"internal error: {exc!r}",
                              alerts=(Alert(AlertKind.ERROR, domain, f"internal error: {exc!r}"),))

    def collect(result: WarmResult | None) -> None:
        if result is None:
            return
        summary.results.append(result)
        if on_result is not None:
            on_result(result, len(summary.results), summary.total)

    try:
        run_bounded(task, domains, options.concurrency, collect, stop=stop, name="warm")
    except KeyboardInterrupt:
        pass  # run_bounded set `stop` and waited for the domains in flight
    if stop.is_set():
        summary.interrupted = True
    return summary
