"""Prometheus metrics: a small in-process registry and an opt-in HTTP listener (GET /metrics, /health).

No client library: a lookup answered from the cache costs a few microseconds, and counting it must
not add to that noticeably. Counters are plain dicts keyed by label tuples, the latency histogram
is a fixed list of buckets found with `bisect`, and the text exposition format 0.0.4 is written
only when somebody scrapes.

Threads: `FrontEndMetrics.answered()` runs on the event loop thread only (the front ends), so its
dicts need no lock: nothing else writes them, and the scrape reads them on the same thread.
Resolutions run in worker threads: `fetched()`, `resolved()` and `refresh_failed()` take a lock,
which costs nothing next to a DNS query or an HTTPS fetch; the scrape copies those dicts under it.

The HTTP side is a tiny HTTP/1.0 responder: one request per connection (bounded in size and in
time), one reply, close. README "Metrics" lists every name.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import platform
import sqlite3
import threading
import time
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from mtasts_policyd import __version__
from mtasts_policyd.core.errors import FailureKind
from mtasts_policyd.frontends.listeners import Address, ConnectionSlots, parse_address
from mtasts_policyd.resolution.resolver import Outcome
from mtasts_policyd.resolution.service import DROP_REASONS
from mtasts_policyd.resolution.workers import in_thread
from mtasts_policyd.store.cache import connect_readonly

if TYPE_CHECKING:
    from mtasts_policyd.resolution.resolver import Decision
    from mtasts_policyd.store.cache import PolicyCache

log = logging.getLogger("mtasts_policyd.ops.metrics")

# Seconds. A cached lookup takes a few microseconds; a miss, a DNS round trip up to a whole HTTPS fetch.
LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0, 30.0)
FRONTENDS = ("socketmap", "exim")
OVERRIDE_ACTIONS = ("ignore", "enforce")
REFRESH_OUTCOMES = tuple(outcome.value for outcome in Outcome)  # fetched, changed, unchanged, kept, no-policy, failed
MAX_HTTP_REQUEST = 8192  # bytes of request line and headers
HTTP_READ_TIMEOUT = 5.0  # seconds to send them
COUNT_TIME_LIMIT = 1.0  # seconds a scrape may spend counting the SQLite cache's rows


class FrontEndMetrics:
    """One front end's lookups: counters by (answer, cache state), overrides, a latency histogram.

    Event loop thread only: no lock. `answered` is on the path of every cached socketmap lookup, so
    there it is one dict increment and reads no clock: an answer given at once (`elapsed` 0) takes
    microseconds and is observed as 0 s, in the lowest bucket; `buckets` holds only the timed ones.
    """

    __slots__ = ("name", "lookups", "overrides", "protocol_errors", "bounds", "buckets", "seconds")

    def __init__(self, name: str, bounds: Iterable[float] = LATENCY_BUCKETS) -> None:
        self.name = name
        self.lookups: defaultdict[tuple[str, str], int] = defaultdict(int)  # (answer, cache) -> count
        self.overrides: defaultdict[str, int] = defaultdict(int)  # action -> count
        self.protocol_errors = 0  # broken frames, timeouts: no request, so not a lookup
        self.bounds = tuple(bounds)
        self.buckets = [0] * (len(self.bounds) + 1)  # timed lookups per bucket (not cumulative; last: +Inf)
        self.seconds = 0.0

    def answered(self, answer: str, decision: Decision | None, elapsed: float = 0.0) -> None:
        """One reply to a request: count it by answer and cache state, and observe its latency."""
        if decision is None:
            self.lookups[answer, "none"] += 1
        else:
            self.lookups[answer, decision.state._value_] += 1  # a plain attribute; Enum.value is a property
            if decision.override is not None:
                self.overrides[decision.override.action] += 1
        if elapsed:
            self.buckets[bisect_left(self.bounds, elapsed)] += 1  # bucket le=b holds values <= b
            self.seconds += elapsed

    def histogram(self) -> list[int]:
        """Lookups per bucket, untimed ones (0 s) in the first."""
        buckets = list(self.buckets)
        buckets[0] += sum(self.lookups.values()) - sum(buckets)
        return buckets


class Metrics:
    def __init__(self) -> None:
        self.started = time.time()
        self.frontends = {name: FrontEndMetrics(name) for name in FRONTENDS}  # event loop thread only
        # The service's own counts (PolicyService.dropped), handed over by the daemon's wiring.
        self.resolutions_dropped: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)  # event loop thread only
        # Any thread, under _lock.
        self._lock = threading.Lock()
        fetch_failures = [k.value for k in (FailureKind.FETCH_ERROR, FailureKind.CERTIFICATE_INVALID,
                                            FailureKind.INVALID_POLICY)]
        self.fetches: dict[str, int] = dict.fromkeys(["ok", *fetch_failures], 0)
        self.refreshes: dict[str, int] = dict.fromkeys(REFRESH_OUTCOMES, 0)
        self.refresh_failures: dict[str, int] = dict.fromkeys([FailureKind.DNS_TEMPORARY.value, *fetch_failures], 0)

    # --- resolutions (worker threads) ---

    def _count(self, table: dict[str, int], key: str) -> None:
        with self._lock:
            table[key] = table.get(key, 0) + 1

    def fetched(self, result: str) -> None:
        """A policy fetch: "ok" or the failure kind (fetch-error, certificate-invalid, invalid-policy)."""
        self._count(self.fetches, result)

    def resolved(self, outcome: Outcome) -> None:
        """A network resolution (resolver.ResolutionCounters): counted by its outcome."""
        self._count(self.refreshes, outcome.value)

    def refresh_failed(self, kind: str) -> None:
        self._count(self.refresh_failures, kind)

    # --- exposition ---

    def render(self, gauges: Iterable[tuple[str, str, str, Iterable[tuple[dict[str, str], float]]]] = ()) -> str:
        """The text exposition format 0.0.4. `gauges`: (name, type, help, samples) computed by the caller."""
        with self._lock:
            fetches, refreshes, failures = dict(self.fetches), dict(self.refreshes), dict(self.refresh_failures)
        out: list[str] = []

        def family(name: str, kind: str, help: str, samples: Iterable[tuple[dict[str, str], float]]) -> None:
            out.append(f"# HELP {name} {help}")
            out.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                out.append(f"{name}{_labels(labels)} {_number(value)}")

        fronts = self.frontends.values()
        lookups = sorted((f.name, a, c, n) for f in fronts for (a, c), n in f.lookups.items())
        family("mtasts_lookups_total", "counter", "Replies to lookups, by front end, answer and cache state.",
               (({"frontend": f, "answer": a, "cache": c}, n) for f, a, c, n in lookups))
        overrides = dict.fromkeys(OVERRIDE_ACTIONS, 0)
        for front in fronts:
            for action, n in front.overrides.items():
                overrides[action] = overrides.get(action, 0) + n
        family("mtasts_overrides_total", "counter", "Lookups answered by a configured override, by action.",
               (({"action": a}, n) for a, n in sorted(overrides.items())))
        family("mtasts_protocol_errors_total", "counter",
               "Connections closed for a protocol error (broken netstring, oversized or missing request line).",
               (({"frontend": f.name}, f.protocol_errors) for f in fronts))
        family("mtasts_resolutions_dropped_total", "counter",
               "Resolutions not seen through: busy (max_pending reached, not started), timeout (a lookup "
               "waited lookup_timeout), abandoned (every waiting client left), stopping (SIGTERM).",
               (({"reason": r}, n) for r, n in sorted(self.resolutions_dropped.items())))
        family("mtasts_fetches_total", "counter", "HTTPS policy fetches, by result (ok or the failure kind).",
               (({"result": r}, n) for r, n in sorted(fetches.items())))
        family("mtasts_refreshes_total", "counter",
               "Network resolutions (misses and background refreshes), by outcome.",
               (({"outcome": o}, n) for o, n in sorted(refreshes.items())))
        family("mtasts_refresh_failures_total", "counter",
               "Resolutions that failed and started a back-off, by failure kind.",
               (({"kind": k}, n) for k, n in sorted(failures.items())))
        out.append("# HELP mtasts_lookup_seconds Time from taking up a request to its reply, by front end.")
        out.append("# TYPE mtasts_lookup_seconds histogram")
        for front in fronts:
            cumulative = 0
            for bound, n in zip((*front.bounds, math.inf), front.histogram()):
                cumulative += n
                labels = _labels({"frontend": front.name, "le": _number(bound)})
                out.append(f"mtasts_lookup_seconds_bucket{labels} {cumulative}")
            out.append(f"mtasts_lookup_seconds_sum{_labels({'frontend': front.name})} {_number(front.seconds)}")
            out.append(f"mtasts_lookup_seconds_count{_labels({'frontend': front.name})} {cumulative}")
        for name, kind, help, samples in gauges:
            family(name, kind, help, samples)
        family("mtasts_process_start_time_seconds", "gauge", "Start time of the process since the epoch, in seconds.",
               [({}, self.started)])
        family("mtasts_build_info", "gauge", "Version of mtasts-policyd and of Python; always 1.",
               [({"version": __version__, "python": platform.python_version()}, 1)])
        return "\n".join(out) + "\n"


REGISTRY = Metrics()  # the process's registry: front ends and the resolver count here


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value))


def parse_metrics_address(text: str) -> Address:
    """A listener address; a bare port ("9461" or ":9461") means loopback, 127.0.0.1."""
    text = text.strip()
    port = text.removeprefix(":")
    if port.isdigit():
        text = f"127.0.0.1:{port}"
    return parse_address(text)


def count_rows(path: str, limit: float = COUNT_TIME_LIMIT) -> int | None:
    """COUNT(*) of the cache table on a separate read-only connection, interrupted after `limit` seconds.

    Its own connection, so the daemon's (and its lock, which cached lookups take) is never held.
    """
    try:
        db = connect_readonly(path, limit)
    except sqlite3.Error:
        return None

    def interrupt() -> None:
        try:
            db.interrupt()  # thread-safe; also stops COUNT(*)'s single b-tree walk
        except sqlite3.Error:
            pass

    timer = threading.Timer(limit, interrupt)
    timer.start()
    try:
        return int(db.execute("SELECT COUNT(*) FROM policies").fetchone()[0])
    except sqlite3.Error as exc:
        log.debug("metrics: counting cache rows failed: %s", exc)
        return None
    finally:
        timer.cancel()
        db.close()


class MetricsServer:
    """What the HTTP listener serves: /metrics from the registry plus gauges computed on scrape, and /health."""

    def __init__(self, cache: PolicyCache, registry: Metrics = REGISTRY,
                 connections: Callable[[], int] | None = None, max_connections: int = 64,
                 listeners: dict[str, ConnectionSlots] | None = None,
                 pending: Callable[[], int] | None = None) -> None:
        self.cache = cache
        self.registry = registry
        self.connections = connections  # socketmap connections open now
        self.stopping = False  # set on SIGTERM: /health answers 503 while lookups drain
        self.max_connections = max_connections  # metrics.max_connections; reloadable
        self.slots = ConnectionSlots()  # this listener's own connections
        self.listeners = {**(listeners or {}), "metrics": self.slots}  # name -> slots, for the gauges
        self.pending = pending  # resolutions in flight or queued now

    def protocol(self) -> HttpProtocol:
        return HttpProtocol(self)

    def health(self) -> tuple[int, dict[str, object]]:
        """200 while the daemon answers (this runs on its event loop); 503 once it is stopping.

        A cache whose last write failed is reported ("degraded", persistent false, and how many
        entries wait in memory for the disk) but still 200: the daemon answers correctly from
        memory and writes them when the disk is back; a restart would lose them.
        """
        persistent = self.cache.persistent
        status = "stopping" if self.stopping else "ok" if persistent else "degraded"
        body = {"status": status, "version": __version__,
                "uptime_seconds": round(time.time() - self.registry.started, 3),
                "cache": {"path": self.cache.path, "persistent": persistent, "unsaved_entries": self.cache.unsaved}}
        return (503 if self.stopping else 200), body

    async def metrics(self) -> str:
        rows = None
        if self.cache.persistent and self.cache.path is not None:
            rows = await in_thread(count_rows, self.cache.path)  # bounded by its own time limit
        memory = self.cache.memory_size
        entries: list[tuple[dict[str, str], float]] = [({"store": "memory"}, memory)]
        if rows is not None:
            entries.append(({"store": "disk"}, rows))
        gauges: list[tuple[str, str, str, list[tuple[dict[str, str], float]]]] = [
            ("mtasts_cache_entries", "gauge",
             "Domains in the cache: the in-memory LRU, and the SQLite file (absent if it cannot be counted).",
             entries),
            ("mtasts_cache_persistent", "gauge",
             "1 while the cache's writes reach the disk, 0 when the last one failed (running from memory).",
             [({}, int(self.cache.persistent))]),
            ("mtasts_cache_unsaved_entries", "gauge",
             "Cache entries kept in memory because the disk refused them; written when it takes writes again.",
             [({}, self.cache.unsaved)]),
        ]
        if self.connections is not None:
            gauges.append(("mtasts_socketmap_connections", "gauge", "Socketmap connections open now.",
                           [({}, self.connections())]))
        listeners = sorted(self.listeners.items())
        gauges.append(("mtasts_connections", "gauge", "Connections open now, by listener.",
                       [({"listener": name}, len(slots)) for name, slots in listeners]))
        gauges.append(("mtasts_connections_evicted_total", "counter",
                       "Connections closed to make room for a new one at the listener's max_connections.",
                       [({"listener": name}, slots.evicted) for name, slots in listeners]))
        gauges.append(("mtasts_connections_refused_total", "counter",
                       "New connections closed at max_connections because every open one had a request pending.",
                       [({"listener": name}, slots.refused) for name, slots in listeners]))
        if self.pending is not None:
            gauges.append(("mtasts_resolutions_pending", "gauge", "Resolutions in flight or queued now.",
                           [({}, self.pending())]))
        return self.registry.render(gauges)


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
