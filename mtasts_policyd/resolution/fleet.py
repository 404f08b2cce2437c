"""A node of a fleet (README "Fleet (Redis)"): the resolver's cache beside the shared level.

The node's own cache answers every lookup it can (the event loop's fast path never asks the
shared level). Before a resolution goes to the network (a local miss or a due refresh), the
shared level is asked, from a worker thread: a shared entry that makes the domain not due any
more is taken into the node's cache (store/shared.adopt: never a downgrade) and answers. Else the
node takes the domain's fetch lock and resolves; a node that finds the lock taken waits for the
holder's write (its invalidation wakes the waiters; a slow poll sees a lock that expired because
its holder died), within the lookup's deadline. Every resolution's result is written back
(compare-and-set on the fetch time), and the invalidations of other nodes' writes are merged into
this node's cache, so its memory layer picks a change up within a second.

When the shared level fails, the node works as a single node: SharedUnavailable means "go to the
network", at the cost of at most one `timeout` while the circuit breaker closes.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any

from mtasts_policyd.store.entry import Entry
from mtasts_policyd.store.shared import (IGNORED_REASONS, Horizons, IgnoredEntry, Notice, SharedLevel, SharedUnavailable,
                                         adopt)

if TYPE_CHECKING:
    from mtasts_policyd.resolution.resolver import Decision, PolicyResolver

log = logging.getLogger("mtasts_policyd.fleet")

POLL = 0.5  # seconds between looks at a domain another node is fetching (invalidations wake sooner)


class Step(enum.Enum):
    FETCH = "fetch"  # go to the network (lock taken, or the shared level cannot help)
    WAIT = "wait"  # another node is fetching the domain


class Fleet:
    """The node's side of the shared level, tied to its resolver (which calls publish())."""

    def __init__(self, level: SharedLevel, resolver: PolicyResolver, lock_ttl: float, node: str) -> None:
        self.level = level
        self.resolver = resolver
        self.lock_ttl = lock_ttl  # about the fetch timeout: a holder that died frees the domain then
        self.node = node
        self._lock = threading.Lock()
        # Counters (README "Metrics": mtasts_redis_*), any thread, under _lock.
        self.counts: dict[str, int] = dict.fromkeys(("hits", "misses", "written", "refused", "adopted",
                                                     "lock_waits", "invalidations"), 0)
        self.ignored: dict[str, int] = dict.fromkeys(IGNORED_REASONS, 0)
        self._waiting: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}

    def _count(self, name: str) -> None:
        with self._lock:
            self.counts[name] += 1

    def status(self) -> dict[str, Any]:
        """/health's "redis" object: the level's state and this node's counters."""
        with self._lock:
            counts = dict(self.counts)
            ignored = dict(self.ignored)
        return {**self.level.status(), **counts, "ignored": ignored}

    # ----- reading (worker threads) ------------------------------------------------------------

    def adopt(self, domain: str) -> Entry | None:
        """The node's entry after taking in the shared one (store/shared.adopt), or the node's own
        when the shared one is missing, adds nothing or must not be used (logged, counted)."""
        resolver = self.resolver
        now = resolver.clock()
        local = resolver.cache.get(domain)
        try:
            remote = self.level.get(domain, now)
            if remote is None:
                self._count("misses")
                return local
            self._count("hits")
            s = resolver.settings
            merged = adopt(local, remote, now, Horizons(s.negative_ttl_max, s.txt_ttl_max, s.backoff_max))
        except IgnoredEntry as exc:
            with self._lock:
                self.ignored[exc.reason] = self.ignored.get(exc.reason, 0) + 1
            log.warning("redis domain=%s entry ignored reason=%s detail=%s", domain, exc.reason, exc.detail)
            return local
        if merged is None:
            return local
        self._count("adopted")
        return resolver.commit(merged)

    def take(self, domain: str) -> Entry | None:
        """adopt(), or the node's own entry while the shared level cannot be asked (the warmer)."""
        try:
            return self.adopt(domain)
        except SharedUnavailable:
            return self.resolver.cache.get(domain)

    def due(self, until: float, limit: int = 100_000) -> list[str]:
        """The fleet's domains due by `until` (its index), or none while the level cannot be asked."""
        try:
            return self.level.due(until, limit)
        except SharedUnavailable as exc:
            log.warning("redis due domains not read: %s", exc)
            return []

    def first(self, domain: str) -> Decision | Step:
        """Before the network: the answer the shared level gives, or whether to fetch or wait."""
        try:
            answer = self._answer(self.adopt(domain))
            if answer is not None:
                return answer
            if self.level.read_only:  # never a write: a replica's node waits on the lock, takes none
                return Step.WAIT if self.level.locked(domain) else Step.FETCH
            if not self.level.claim(domain, self.lock_ttl):
                return Step.WAIT
            # The holder before us wrote before it let go of the lock: look again.
            answer = self._answer(self.adopt(domain))
            if answer is not None:
                self.level.release(domain)
                return answer
            return Step.FETCH
        except SharedUnavailable:
            return Step.FETCH

    def _answer(self, entry: Entry | None) -> Decision | None:
        """The decision for the entry when it is not due (no network needed), else None."""
        resolver = self.resolver
        now = resolver.clock()
        if entry is None or entry.due(now, resolver.settings.refresh_after):
            return None
        return resolver.answer(entry, now)

    async def before_network(self, domain: str, executor: Executor, deadline: float) -> Decision | None:
        """The answer without the network, or None to resolve (lock taken, level down, deadline
        reached). `deadline`: loop time after which nobody waits for this resolution."""
        loop = asyncio.get_running_loop()
        waited = False
        while True:
            step = await loop.run_in_executor(executor, self.first, domain)
            if not isinstance(step, Step):
                return step
            remaining = deadline - loop.time()
            if step is Step.FETCH or remaining <= 0:
                return None
            if not waited:
                waited = True
                self._count("lock_waits")
            event = asyncio.Event()
            waiter = (loop, event)
            with self._lock:
                self._waiting.setdefault(domain, []).append(waiter)
            try:
                await asyncio.wait_for(event.wait(), timeout=min(POLL, remaining))
            except asyncio.TimeoutError:
                pass
            finally:
                with self._lock:
                    waiters = self._waiting.get(domain, [])
                    if waiter in waiters:
                        waiters.remove(waiter)
                    if not waiters:
                        self._waiting.pop(domain, None)

    # ----- writing (worker threads) ------------------------------------------------------------

    def publish(self, entry: Entry) -> None:
        """Share a resolution's result (and let go of the domain's lock); a refused write (a newer
        fetch is shared) takes the shared entry in instead."""
        if self.level.read_only:
            return
        try:
            if self.level.put(entry, entry.due_at(self.resolver.settings.refresh_after)):
                self._count("written")
                return
            self._count("refused")
            log.info("redis domain=%s write refused: a newer policy fetch is shared; taking it", entry.domain)
            self.adopt(entry.domain)
        except SharedUnavailable:
            pass

    # ----- invalidations (the level's listener thread) -----------------------------------------

    def invalidated(self, domain: str, node: str, notice: Notice) -> None:
        """Another node wrote the domain: merge the shared entry into this node's cache when the
        node knows the domain; FORGOTTEN (`cache forget`): drop it here too; FORGED (a forget that
        is not the fleet's, store/shared.read_notice): ignored, counted. Then wake the lookups
        waiting for it."""
        if notice is Notice.FORGED:
            with self._lock:
                self.ignored["signature"] += 1
            log.warning("redis domain=%s forget ignored: not signed with the fleet's hmac_key or too old "
                        "(node=%s)", domain, node)
        elif node != self.node:
            self._count("invalidations")
            try:
                if notice is Notice.FORGOTTEN:
                    self.resolver.cache.delete(domain)
                    log.info("redis domain=%s forgotten by node=%s; dropped here too", domain, node)
                elif self.resolver.cache.get(domain) is not None:
                    self.adopt(domain)
            except SharedUnavailable:
                pass
        with self._lock:
            waiters = list(self._waiting.get(domain, ()))
        for loop, event in waiters:
            loop.call_soon_threadsafe(event.set)
