"""The asynchronous face of the resolver, shared by every front end of one daemon.

Cache hits are answered on the event loop without touching a thread; everything that needs the
network runs in a bounded thread pool. Concurrent lookups of one domain share a single
resolution (one DNS query, one HTTPS fetch), whether it is a foreground miss or a background
refresh.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from .resolution import Decision, PolicyResolver

log = logging.getLogger("mtasts_policyd.service")


def describe(decision: Decision) -> str:
    """The grep-able part of a decision log line, the same for every front end."""
    failure = f" failure={decision.failure}" if decision.failure and decision.policy is None else ""
    override = f" override_reason={decision.override.reason!r}" if decision.override else ""
    return f"domain={decision.domain} cache={decision.cache.value} reason={decision.reason}{failure}{override}"


class PolicyService:
    def __init__(self, resolver: PolicyResolver, workers: int = 32, max_background: int = 1000) -> None:
        self.resolver = resolver
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="resolve")
        self._inflight: dict[str, asyncio.Future[Decision]] = {}
        self._max_background = max_background
        self._seen: dict[str, float] = {}
        self._flusher: asyncio.Task[None] | None = None

    async def lookup(self, domain: str) -> Decision:
        decision = self.cached(domain)
        if decision is not None:
            return decision
        return await asyncio.shield(self._resolve(domain))

    def cached(self, domain: str) -> Decision | None:
        """The fast path alone, for front ends that want to avoid a coroutine on a hit."""
        self._seen[domain] = time.time()
        decision, refresh_due = self.resolver.cached(domain)
        if decision is not None and refresh_due and domain not in self._inflight \
                and len(self._inflight) < self._max_background:
            self._resolve(domain)
        return decision

    def _resolve(self, domain: str) -> asyncio.Future[Decision]:
        future = self._inflight.get(domain)
        if future is None:
            loop = asyncio.get_running_loop()
            future = loop.run_in_executor(self._executor, self.resolver.resolve, domain)
            self._inflight[domain] = future
            future.add_done_callback(lambda f: self._done(domain, f))
        return future

    def _done(self, domain: str, future: asyncio.Future[Decision]) -> None:
        self._inflight.pop(domain, None)
        if not future.cancelled() and future.exception() is not None:
            log.error("resolve domain=%s crashed: %r", domain, future.exception())

    async def run_flusher(self, interval: float = 30.0) -> None:
        """Write lookup times to the cache in batches (the warmer refreshes what is in use)."""
        while True:
            await asyncio.sleep(interval)
            await self.flush()

    async def flush(self) -> None:
        seen, self._seen = self._seen, {}
        if seen:
            await asyncio.get_running_loop().run_in_executor(self._executor, self.resolver.cache.touch, seen)

    async def drain(self) -> None:
        """Wait for resolutions in flight (SIGTERM), then flush lookup times."""
        if self._inflight:
            await asyncio.wait(list(self._inflight.values()), timeout=30)
        await self.flush()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
