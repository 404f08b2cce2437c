"""The status listener: a tiny HTTP/1.0 responder for GET /metrics and /health (README "Metrics").

One request per connection (bounded in size and in time), one reply, close. /metrics renders the
registry (ops/metrics.py) with the gauges read at the scrape: the cache's figures, connections,
resolutions pending and dropped; /health says whether the daemon answers, from its event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mtasts_policyd import __version__
from mtasts_policyd.frontends.listeners import Address, ConnectionSlots, parse_address
from mtasts_policyd.ops.metrics import Family, Metrics, Sample, fleet_families, tlsrpt_families
from mtasts_policyd.resolution.workers import in_thread
from mtasts_policyd.store.tlsrpt_store import TlsRptStore, TlsRptStoreError

if TYPE_CHECKING:
    from mtasts_policyd.store.cache import PolicyCache

log = logging.getLogger("mtasts_policyd.metrics")

MAX_HTTP_REQUEST = 8192  # bytes of request line and headers
HTTP_READ_TIMEOUT = 5.0  # seconds to send them


def parse_metrics_address(text: str) -> Address:
    """A listener address; a bare port ("9461" or ":9461") means loopback, 127.0.0.1."""
    text = text.strip()
    port = text.removeprefix(":")
    if port.isdigit():
        text = f"127.0.0.1:{port}"
    return parse_address(text)


class MetricsServer:
    """What the HTTP listener serves: /metrics from the registry plus gauges computed on scrape, and /health."""

    def __init__(self, cache: PolicyCache, registry: Metrics, max_connections: int = 64,
                 listeners: dict[str, ConnectionSlots] | None = None,
                 pending: Callable[[], int] | None = None,
                 dropped: Callable[[], dict[str, int]] | None = None,
                 dane: Callable[[], dict[str, Any]] | None = None,
                 tlsrpt: TlsRptStore | None = None,
                 fleet: Callable[[], dict[str, Any]] | None = None) -> None:
        self.cache = cache
        self.registry = registry
        self.stopping = False  # set on SIGTERM: /health answers 503 while lookups drain
        self.max_connections = max_connections  # metrics.max_connections; reloadable
        self.slots = ConnectionSlots()  # this listener's own connections
        # name -> slots, for the gauges: each front end's listeners, and this one
        self.listeners = {**(listeners or {}), "metrics": self.slots}
        self.pending = pending  # resolutions in flight or queued now
        self.dropped = dropped  # resolutions not seen through, by reason
        self.dane = dane  # DANE's mode and probe state (resolution/dane.DaneGate.status)
        self.tlsrpt = tlsrpt  # the TLSRPT counts store the daemon records into, if any
        self.fleet = fleet  # the fleet's shared level and this node's counters (resolution/fleet.Fleet.status)

    def protocol(self) -> HttpProtocol:
        return HttpProtocol(self)

    def health(self) -> tuple[int, dict[str, object]]:
        """200 while the daemon answers (this runs on its event loop); 503 once it is stopping.

        A cache whose last write failed is reported ("degraded", persistent false, and how many
        entries wait in memory for the disk) but still 200: the daemon answers correctly from
        memory and writes them when the disk is back; a restart would lose them. DANE's state has
        its own object: a resolver that does not validate makes DANE "degraded", not the daemon.
        """
        stats = self.cache.stats(count_rows=False)
        status = "stopping" if self.stopping else "ok" if stats.persistent else "degraded"
        body = {"status": status, "version": __version__,
                "uptime_seconds": round(time.time() - self.registry.started, 3),
                "cache": {"path": stats.path, "persistent": stats.persistent, "unsaved_entries": stats.unsaved}}
        if self.dane is not None:
            body["dane"] = self.dane()
        if self.fleet is not None:
            body["redis"] = self.fleet()
        return (503 if self.stopping else 200), body

    async def metrics(self) -> str:
        stats = await in_thread(self.cache.stats)  # counting is bounded by the store's own time limit
        entries: list[Sample] = [({"store": "memory"}, self.cache.memory_size)]
        if stats.persistent and stats.rows is not None:  # the "disk" sample: none in memory only
            entries.append(({"store": "disk"}, stats.rows))
        gauges: list[Family] = [
            ("mtasts_cache_entries", "gauge",
             "Domains in the cache: the in-memory LRU, and the SQLite file (absent if it cannot be counted).",
             entries),
            ("mtasts_cache_persistent", "gauge",
             "1 while the cache's writes reach the disk, 0 when the last one failed (running from memory).",
             [({}, int(stats.persistent))]),
            ("mtasts_cache_unsaved_entries", "gauge",
             "Cache entries kept in memory because the disk refused them; written when it takes writes again.",
             [({}, stats.unsaved)]),
        ]
        if "socketmap" in self.listeners:  # named before mtasts_connections had a listener label; kept
            gauges.append(("mtasts_socketmap_connections", "gauge", "Socketmap connections open now.",
                           [({}, len(self.listeners["socketmap"]))]))
        listeners = sorted(self.listeners.items())
        gauges.append(("mtasts_connections", "gauge", "Connections open now, by listener.",
                       [({"listener": name}, len(slots)) for name, slots in listeners]))
        gauges.append(("mtasts_connections_evicted_total", "counter",
                       "Connections closed to make room for a new one at the listener's max_connections.",
                       [({"listener": name}, slots.evicted) for name, slots in listeners]))
        gauges.append(("mtasts_connections_refused_total", "counter",
                       "New connections closed at max_connections because every open one had a request pending.",
                       [({"listener": name}, slots.refused) for name, slots in listeners]))
        dane = self.dane() if self.dane is not None else None
        if dane is not None and dane["mode"] != "off":
            gauges.append(("mtasts_dane_validating", "gauge",
                           "1 while the DNS resolver's answers come with AD (the trust probe), 0 while DANE is "
                           "degraded.", [({"mode": dane["mode"]}, int(dane["state"] == "validating"))]))
        if self.fleet is not None:
            gauges += fleet_families(self.fleet())
        if self.pending is not None:
            gauges.append(("mtasts_resolutions_pending", "gauge", "Resolutions in flight or queued now.",
                           [({}, self.pending())]))
        if self.tlsrpt is not None:
            try:  # a few GROUP BYs over small tables, in a thread: never on the event loop
                gauges += tlsrpt_families(await in_thread(self.tlsrpt.totals))
            except TlsRptStoreError as exc:
                log.warning("metrics: %s", exc)
        return self.registry.render(gauges, dropped=self.dropped() if self.dropped is not None else None)


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 500: "Internal Server Error", 503: "Service Unavailable"}


class HttpProtocol(asyncio.Protocol):
    """One HTTP/1.x request (GET or HEAD, headers ignored), one HTTP/1.0 reply, close."""

    def __init__(self, server: MetricsServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.done = False
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None
        self.connected_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        loop = asyncio.get_running_loop()
        self.connected_at = loop.time()
        if not self.server.slots.admit(self, self.server.max_connections):
            log.warning("metrics connection refused: all %d connections are being answered", self.server.max_connections)
            self.done = True
            transport.close()
            return
        self.timer = loop.call_later(HTTP_READ_TIMEOUT, self._timed_out)

    def eviction_rank(self) -> tuple[int, float] | None:
        """Incomplete requests go first, then replies still being sent; a /metrics being rendered stays."""
        if not self.done:
            return 0, self.connected_at
        if self.task is not None and not self.task.done():
            return None
        return 1, self.connected_at

    def evict(self) -> None:
        self.done = True
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.slots.release(self)
        if self.timer is not None:
            self.timer.cancel()
        if self.task is not None:
            self.task.cancel()

    def _timed_out(self) -> None:
        if not self.done:
            self._reply(408, "request timeout\n")

    def data_received(self, data: bytes) -> None:
        if self.done:
            return
        self.buffer += data
        end = min((i for i in (self.buffer.find(b"\r\n\r\n"), self.buffer.find(b"\n\n")) if i >= 0), default=-1)
        if end >= 0 and end <= MAX_HTTP_REQUEST:
            self._request(bytes(self.buffer[:end]))
        elif len(self.buffer) > MAX_HTTP_REQUEST:
            self._reply(400, "request too long\n")

    def eof_received(self) -> bool:
        if not self.done:
            self._reply(400, "incomplete request\n")
        return True  # a client may half-close after its request: keep our side open for the reply

    def _request(self, head: bytes) -> None:
        self.done = True
        words = head.split(b"\n", 1)[0].rstrip(b"\r").split(b" ")
        if len(words) != 3 or not words[2].startswith(b"HTTP/1.") or not words[1].startswith(b"/"):
            self._reply(400, "bad request\n")
            return
        method, target = words[0], words[1].split(b"?", 1)[0]
        if target not in (b"/metrics", b"/health"):
            self._reply(404, "not found: try /metrics or /health\n")
        elif method not in (b"GET", b"HEAD"):
            self._reply(405, "only GET and HEAD\n", extra="Allow: GET, HEAD\r\n")
        elif target == b"/health":
            status, body = self.server.health()
            self._reply(status, json.dumps(body) + "\n", "application/json", head_only=method == b"HEAD")
        else:
            self.task = asyncio.get_running_loop().create_task(self._metrics(method == b"HEAD"))

    async def _metrics(self, head_only: bool) -> None:
        try:
            text = await self.server.metrics()
        except Exception as exc:  # a scrape must never take the daemon down
            log.error("metrics: rendering failed: %r", exc)
            self._reply(500, "internal error; see the log\n")
            return
        self._reply(200, text, "text/plain; version=0.0.4; charset=utf-8", head_only=head_only)

    def _reply(self, status: int, body: str, content_type: str = "text/plain; charset=utf-8", *,
               head_only: bool = False, extra: str = "") -> None:
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
        if status >= 400:
            log.info("metrics http status=%d request=%r", status, bytes(self.buffer[:100]).split(b"\n", 1)[0])
        if self.transport is None or self.transport.is_closing():
            return
        data = body.encode("utf-8")
        header = (f"HTTP/1.0 {status} {_REASONS.get(status, '')}\r\nContent-Type: {content_type}\r\n"
                  f"Content-Length: {len(data)}\r\n{extra}Connection: close\r\n\r\n").encode("ascii")
        self.transport.write(header if head_only else header + data)
        self.transport.close()
