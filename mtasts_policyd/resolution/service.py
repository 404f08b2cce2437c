"""The asynchronous face of the resolver, shared by every front end of one daemon.

Cache hits are answered on the event loop without touching a thread. A miss is one resolution,
shared by every lookup of that domain (one DNS query, one HTTPS fetch), whether it is a foreground
miss or a background refresh. It does what is due of the domain's two halves, at once:

- MTA-STS, in two steps: the DNS questions on the event loop (the DNS stub of net/udp.py):
  the `_mta-sts` TXT query, then, when a policy is to be fetched, the policy host's A records and
  the MX hosts at once (`PolicyResolver.look_ahead`). DNS is where domains whose DNS never answers
  spend their time, and there they cost a socket and a timer, not a worker thread, so a flood of
  them cannot hold up anybody else's lookup; then the rest of the algorithm
  (`PolicyResolver.resolve` with those answers: HTTPS fetch, cache write) in a bounded pool of
  worker threads: one hand-off per resolution;
- DANE (resolution/dane.py), where it applies: the MX, address and TLSA questions, all on the
  event loop, then one cache write in a worker thread beside the MTA-STS half.

Nothing grows without bound: at most `resolver.max_pending` resolutions are in flight or queued
(a lookup beyond that is answered at once, as for a DNS failure), each waiting lookup gives up
after `resolver.lookup_timeout`, and a resolution that nobody waits for any more (every client
gone) is cancelled unless it is a background refresh.
"""

from __future__ import annotations

import asyncio
import logging
import time

from mtasts_policyd.core.errors import Failure, FailureKind, MtaStsError
from mtasts_policyd.net.base import StsAnswer
from mtasts_policyd.net.lookup import look_ahead
from mtasts_policyd.resolution.resolver import CacheState, Decision, Outcome, PolicyResolver, Resolution
from mtasts_policyd.resolution.workers import DaemonThreadPool, in_thread
from mtasts_policyd.store.base import PruneSettings

log = logging.getLogger("mtasts_policyd.service")

LOOKUP_TIMES_FLUSH = 30.0  # seconds between batched writes of lookup times
PRUNE_POLL = 5.0  # seconds between looks at how many rows were added since the last prune
# Why a resolution was not seen through (README "Metrics": mtasts_resolutions_dropped_total):
# not started (max_pending reached), a lookup answered at lookup_timeout, cancelled because every
# waiting client left, cancelled at the drain deadline.
DROP_REASONS = ("busy", "timeout", "abandoned", "stopping")


class ServiceStopping(Exception):
    """The daemon is stopping: no new resolution starts, and the ones left at the deadline end."""


class Flight:
    """One domain's network resolution in flight and the lookups waiting for it (single flight)."""

    __slots__ = ("domain", "task", "background", "waiters", "deadline")

    def __init__(self, domain: str, task: asyncio.Task[Decision], background: bool, deadline: float) -> None:
        self.domain = domain
        self.task = task
        self.background = background  # a refresh: finished even when nobody waits
        self.waiters = 0
        self.deadline = deadline  # loop time after which waiting lookups are answered without it


class PolicyService:
    def __init__(self, resolver: PolicyResolver, workers: int = 32) -> None:
        self.resolver = resolver
        self._executor = DaemonThreadPool(workers, "resolve")
        self._pending: dict[str, Flight] = {}
        self._seen: dict[str, float] = {}
        self.stopping = False
        self.dropped: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)  # reason -> count (event loop thread only)
        self.prune_settings = PruneSettings()  # cache.* keys; replaced on reload
        self.prune_interval = 600.0

    @property
    def pending(self) -> int:
        """Resolutions in flight or queued."""
        return len(self._pending)

    async def lookup(self, domain: str) -> Decision:
        decision = self.cached(domain)
        if decision is not None:
            return decision
        return await self.resolve(domain)

    def cached(self, domain: str, refresh: bool = True) -> Decision | None:
        """The fast path alone, for front ends that want to avoid a coroutine on a hit.
        `refresh`: start the background refresh that is due (`query` only looks)."""
        self._seen[domain] = time.time()
        decision, refresh_due = self.resolver.cached(domain)
        # A refresh never takes more than half the room: misses, which wait, come first.
        if decision is not None and refresh_due and refresh and domain not in self._pending and not self.stopping \
                and len(self._pending) < self.resolver.settings.max_pending // 2:
            self._start(domain, background=True)
        return decision

    async def resolve(self, domain: str) -> Decision:
        """Wait for the domain's resolution (joining one in flight), within `lookup_timeout`."""
        flight = self._pending.get(domain)
        if flight is None:
            if self.stopping:
                raise ServiceStopping()
            limit = self.resolver.settings.max_pending
            if len(self._pending) >= limit:
                return self._unanswered(domain, "busy", f"{limit} resolutions pending (resolver.max_pending)")
            flight = self._start(domain, background=False)
        task = flight.task
        flight.waiters += 1
        try:
            timeout = flight.deadline - asyncio.get_running_loop().time()
            done, _ = await asyncio.wait((task,), timeout=max(timeout, 0.0))
            if not done:
                return self._unanswered(domain, "timeout", "no answer within resolver.lookup_timeout "
                                        f"({self.resolver.settings.lookup_timeout:g}s)")
            if task.cancelled():
                raise ServiceStopping()  # only drain() cancels a resolution somebody waits for
            return task.result()
        finally:
            flight.waiters -= 1
            if flight.waiters == 0 and not flight.background and not task.done():
                # Every client has gone (or given up): drop the work, queued or asking DNS. A thread
                # already running it finishes and stores its result; nobody waits for it.
                task.cancel()
                self._forget(flight)
                self._drop(domain, "abandoned")

    def _unanswered(self, domain: str, reason: str, detail: str) -> Decision:
        """A lookup answered without its resolution: as for a DNS failure with nothing cached
        (README: NOTFOUND), and nothing is written to the cache."""
        self._drop(domain, reason)
        log.warning("lookup domain=%s unanswered reason=%s pending=%d detail=%s", domain, reason,
                    len(self._pending), detail)
        decision = Decision(domain, None, CacheState.MISS, failure=Failure(FailureKind.DNS_TEMPORARY, detail))
        return self.resolver.with_dane(decision, None, detail)  # where DANE applies: its state is unknown, TEMP

    def _drop(self, domain: str, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        if reason == "abandoned" and log.isEnabledFor(logging.DEBUG):
            log.debug("resolve domain=%s cancelled: no client waits for it", domain)

    def _start(self, domain: str, background: bool) -> Flight:
        loop = asyncio.get_running_loop()
        task = loop.create_task(self._run(domain))
        flight = Flight(domain, task, background, loop.time() + self.resolver.settings.lookup_timeout)
        self._pending[domain] = flight
        task.add_done_callback(lambda t: self._done(flight, t))
        return flight

    async def _run(self, domain: str) -> Decision:
        """The halves that need the network, at once (a cold domain: both); their decision."""
        resolver = self.resolver
        sts = asyncio.ensure_future(self._sts(domain)) if resolver.sts_due(domain) else None
        dane = None
        if resolver.dane is not None and resolver.dane_needed(domain):
            dane = asyncio.ensure_future(resolver.dane.lookup(domain, resolver.clock()))
        try:
            resolution = await sts if sts is not None else None
            branch = await dane if dane is not None else None
        finally:  # cancelled (abandoned, stopping) or crashed: the other half goes too
            for job in (sts, dane):
                if job is not None and not job.done():
                    job.cancel()
        if branch is None:
            return resolution.decision if resolution is not None else resolver.current(domain)
        await asyncio.get_running_loop().run_in_executor(self._executor, resolver.store_dane, domain, branch)
        decision = resolution.decision if resolution is not None else resolver.current(domain)
        return resolver.with_dane(decision, branch)

    async def _sts(self, domain: str) -> Resolution:
        fleet = self.resolver.fleet
        if fleet is not None:  # README "Fleet (Redis)": the shared level first, in a worker thread
            flight = self._pending.get(domain)
            loop = asyncio.get_running_loop()
            deadline = flight.deadline if flight else loop.time() + self.resolver.settings.lookup_timeout
            shared = await fleet.before_network(domain, self._executor, deadline)
            if shared is not None:
                return Resolution(shared, Outcome.UNCHANGED)
        txt: StsAnswer | MtaStsError
        resolver = self.resolver
        try:
            txt = await resolver.discovery.sts_record_async(domain)
        except MtaStsError as exc:
            txt = exc  # no record, invalid record or a DNS failure: the resolver decides what it means
        ahead = None
        if isinstance(txt, StsAnswer):  # the policy host's address and the MX hosts, at once, on the loop
            ipv4, mx = resolver.look_ahead(domain, txt)
            if ipv4 or mx:
                ahead = await look_ahead(resolver.discovery, domain, ipv4, mx)
        return await asyncio.get_running_loop().run_in_executor(self._executor, resolver.resolve, domain, False,
                                                                txt, ahead)

    def _forget(self, flight: Flight) -> None:
        if self._pending.get(flight.domain) is flight:
            del self._pending[flight.domain]

    def _done(self, flight: Flight, task: asyncio.Task[Decision]) -> None:
        self._forget(flight)
        if not task.cancelled() and task.exception() is not None:
            log.error("resolve domain=%s crashed: %r", flight.domain, task.exception())

    async def run_flusher(self, interval: float = LOOKUP_TIMES_FLUSH) -> None:
        """Write lookup times to the cache in batches (the warmer refreshes what is in use)."""
        while True:
            await asyncio.sleep(interval)
            await self.flush()

    async def flush(self) -> None:
        seen, self._seen = self._seen, {}
        if seen:
            await asyncio.get_running_loop().run_in_executor(self._executor, self.resolver.cache.touch, seen)

    async def run_pruner(self) -> None:
        """Prune the cache every `prune_interval`, and sooner once many rows were added since (a
        flood of new no-policy domains), so the row cap holds between runs. In a worker thread:
        the prune deletes in small batches and never holds the cache for long (cache.py)."""
        loop = asyncio.get_running_loop()
        cache = self.resolver.cache
        last, mark = loop.time(), cache.inserted
        while True:
            await asyncio.sleep(min(self.prune_interval, PRUNE_POLL))
            settings = self.prune_settings
            soon = max(settings.max_negative_entries // 10, 100)
            if loop.time() - last < self.prune_interval and cache.inserted - mark < soon:
                continue
            last, mark = loop.time(), cache.inserted
            try:
                await loop.run_in_executor(self._executor, cache.prune, time.time(), settings)
            except Exception as exc:  # pruning must never stop the daemon; the next run tries again
                log.error("cache prune failed: %r", exc)

    async def drain(self, deadline: float) -> None:
        """SIGTERM: let resolutions in flight finish until `deadline` (loop time) minus a reserve,
        cancel the rest (their clients are told the daemon is stopping), then write lookup times.

        Nothing here waits on a worker thread: the last write runs in a thread of its own, so
        threads stuck in DNS or HTTPS cannot stretch the stop past the deadline.
        """
        self.stopping = True
        loop = asyncio.get_running_loop()
        reserve = min(3.0, max(deadline - loop.time(), 0.0) / 4)  # for the answers and the last write
        tasks = [r.task for r in self._pending.values()]
        if tasks:
            await asyncio.wait(tasks, timeout=max(deadline - reserve - loop.time(), 0.0))
        for flight in list(self._pending.values()):
            flight.task.cancel()
            self._drop(flight.domain, "stopping")
        await asyncio.sleep(0)  # let the waiting front ends write their answers
        seen, self._seen = self._seen, {}
        if seen:
            try:
                await asyncio.wait_for(in_thread(self.resolver.cache.touch, seen),
                                       timeout=max(deadline - loop.time(), 0.01))
            except asyncio.TimeoutError:
                log.warning("stopping: lookup times not written within the drain timeout")

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
