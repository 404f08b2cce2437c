"""Postfix socketmap front end (socketmap_table(5)): netstring "NAME KEY" in, netstring reply out.

It only translates: framing here, key cleaning in `names`, the answer in `postfix`. One connection
carries many requests in sequence (Postfix reuses it); replies keep request order even when a
lookup has to wait for the network. A malformed frame gets "PERM <reason>" where a reply still
makes sense, and the connection is closed: the framing is lost, so nothing after it can be trusted.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass, field
from time import monotonic
from typing import TYPE_CHECKING

from mtasts_policyd.answers.dane import socketmap_answer
from mtasts_policyd.answers.postfix import MapOptions, tls_policy
from mtasts_policyd.core.dane_verdict import Verdict
from mtasts_policyd.core.names import clean_key
from mtasts_policyd.frontends.base import (
    QUIET_STATES,
    FrontEnd,
    FrontEndCounters,
    NoCounts,
    dane_reply,
    decision_log_fields,
)
from mtasts_policyd.frontends.listeners import ConnectionSlots
from mtasts_policyd.frontends.netstring import FrameError, NetstringDecoder, encode
from mtasts_policyd.resolution.resolver import Decision
from mtasts_policyd.resolution.service import PolicyService, ServiceStopping

if TYPE_CHECKING:
    from mtasts_policyd.runtime.config import SocketmapConfig

log = logging.getLogger("mtasts_policyd.socketmap")

# Requests of one connection waiting behind a lookup that needs the network. Postfix sends one
# request at a time; a client that pipelines more is not read from until the queue drains.
MAX_QUEUED = 64


@dataclass(frozen=True)
class SocketmapSettings:
    maps: dict[str, MapOptions] = field(default_factory=lambda: {"postfix": MapOptions()})
    max_request: int = 10000  # Postfix's own query limit (socketmap_max_query_size)
    idle_timeout: float = 60.0  # between requests; Postfix closes idle connections after 10 s itself
    max_connections: int = 1024  # at the cap the connection idle longest is closed (ConnectionSlots)
    frame_timeout: float = 10.0  # from a request's first byte to its last: Postfix sends it at once

    @classmethod
    def from_section(cls, section: SocketmapConfig) -> SocketmapSettings:
        """The `socketmap` configuration section's keys for the front end (not its listeners')."""
        return cls(maps=section.maps, max_request=section.max_request, idle_timeout=section.idle_timeout,
                   max_connections=section.max_connections, frame_timeout=section.frame_timeout)


def map_reply(decision: Decision | None, options: MapOptions) -> str:
    """The socketmap reply for a decision (socketmap_table(5)): the DANE verdict's reply where one
    applies ("OK dane-only", "OK dane", "TEMP <reason>"; RFC 8461 §2), else "OK <policy>" or "NOTFOUND "."""
    dane = dane_reply(decision, socketmap_answer)
    if dane is not None:
        return dane
    policy = tls_policy(decision, options) if decision is not None else None
    return f"OK {policy}" if policy else "NOTFOUND "


class SocketmapFrontEnd:
    """The request -> reply rule, shared by all connections of one listener set."""

    def __init__(self, service: PolicyService, settings: SocketmapSettings = SocketmapSettings(),
                 counters: FrontEndCounters | None = None) -> None:
        self.service = service
        self.settings = settings
        self.slots = ConnectionSlots()
        self.counters: FrontEndCounters = counters if counters is not None else NoCounts()
        # Reply text per (map options, decision object): cached decisions are reused objects, so
        # a hit formats nothing. The decision is kept in the value so its id cannot be reused.
        self._replies: dict[tuple[int, int], tuple[MapOptions, Decision, str]] = {}

    @property
    def connections(self) -> int:
        return len(self.slots)

    def protocol(self) -> SocketmapProtocol:
        return SocketmapProtocol(self)

    def summary(self) -> str:
        return f"maps={','.join(sorted(self.settings.maps))}"

    def _policy_reply(self, options: MapOptions, decision: Decision) -> str:
        key = (id(options), id(decision))
        memo = self._replies.get(key)
        if memo is not None and memo[0] is options and memo[1] is decision:
            return memo[2]
        if len(self._replies) > 100_000:
            self._replies.clear()
        reply = map_reply(decision, options)
        self._replies[key] = (options, decision, reply)
        return reply

    def _reply(self, name: str, key: str, options: MapOptions, decision: Decision | None,
               elapsed: float = 0.0) -> str:
        reply = self._policy_reply(options, decision) if decision is not None else "NOTFOUND "
        answer = "NOTFOUND" if reply == "NOTFOUND " else "OK" if reply.startswith("OK ") else "TEMP"
        self.counters.answered(answer, decision, elapsed)  # at once: 0 s, no clock read
        dane = decision.dane_applied if decision is not None else None
        if dane is not None and dane.verdict is not Verdict.NONE:  # map_reply answered the verdict
            self.counters.dane_answered(dane.verdict.value)
        # Cached answers and keys that cannot be domains are debug: at info, a line per cached
        # lookup would cost more than the lookup (README "Logs"); a TEMP is always shown.
        if decision is None:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("socketmap map=%s answer=NOTFOUND key=%r reason=not-a-policy-domain", name, key[:100])
        elif decision.state in QUIET_STATES and answer != "TEMP":
            if log.isEnabledFor(logging.DEBUG):
                log.debug("socketmap map=%s answer=%s %s", name, answer, decision_log_fields(decision))
        elif log.isEnabledFor(logging.INFO):
            log.info("socketmap map=%s answer=%s %s", name, answer, decision_log_fields(decision))
        return reply

    def immediate(self, request: bytes) -> tuple[str | None, str | None]:
        """(reply, None) when answerable now; (None, domain) when the network is needed."""
        try:
            name, _, key = request.decode("utf-8").partition(" ")
        except UnicodeDecodeError:
            return self._not_text(request), None
        options = self.settings.maps.get(name)
        if options is None:
            return self._unknown_map(name[:100], f"unknown map name {name[:100]!r}"), None
        domain = clean_key(key)
        if domain is None:
            return self._reply(name, key, options, None), None
        decision = self.service.cached(domain)
        if decision is None:
            return None, domain
        return self._reply(name, key, options, decision), None

    def _not_text(self, request: bytes) -> str:
        """A request that is not UTF-8: PERM if the map name is not (a configuration or client
        error must be loud), NOTFOUND if only the key is (it cannot be a domain: RFC 8461 §3.4)."""
        raw_name, _, raw_key = request.partition(b" ")
        try:
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError:
            return self._unknown_map(raw_name[:100], "map name is not UTF-8 text")
        options = self.settings.maps.get(name)
        if options is None:
            return self._unknown_map(name[:100], f"unknown map name {name[:100]!r}")
        return self._reply(name, raw_key.decode("utf-8", "backslashreplace"), options, None)

    def _unknown_map(self, name: str | bytes, reason: str) -> str:
        log.warning("socketmap map=%r answer=PERM reason=unknown-map-name", name)
        self.counters.answered("PERM", None)
        return f"PERM {reason}; this daemon serves {', '.join(sorted(self.settings.maps))}"

    async def resolve(self, request: bytes, domain: str) -> str:
        started = time.perf_counter()
        name, _, key = request.decode("utf-8").partition(" ")
        options = self.settings.maps[name]
        try:
            decision = await self.service.lookup(domain)
        except ServiceStopping:
            log.warning("socketmap map=%s domain=%s answer=TEMP reason=stopping", name, domain)
            self.counters.answered("TEMP", None, time.perf_counter() - started)
            return "TEMP mtasts-policyd is stopping; try again"
        except Exception as exc:  # a bug must defer mail, never downgrade it silently
            log.error("socketmap map=%s domain=%s answer=TEMP reason=internal-error error=%r", name, domain, exc)
            self.counters.answered("TEMP", None, time.perf_counter() - started)
            return "TEMP internal error in mtasts-policyd; see its log"
        return self._reply(name, key, options, decision, time.perf_counter() - started)


class SocketmapProtocol(asyncio.Protocol):
    """One connection: netstrings in, replies out in request order, within bounds of time and memory.

    Back-pressure: reading stops while the client does not read its replies (the transport's
    write buffer is above its high-water mark: `pause_writing`) or while MAX_QUEUED requests wait
    behind a lookup; it resumes when they drain. So a client that pipelines without reading costs
    at most one read's worth of bytes, the write buffer and the queue, however much it sends.
    Time: a request must be complete within `frame_timeout` of its first byte (bytes trickling in
    do not extend it); between requests the connection may idle for `idle_timeout`, and a client
    that reads none of its replies for `idle_timeout` is closed too.
    """

    def __init__(self, front: SocketmapFrontEnd) -> None:
        self.front = front
        self.decoder = NetstringDecoder()  # the bytes of an incomplete request
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        self.queue: collections.deque[tuple[bytes, str | None]] = collections.deque()
        self.worker: asyncio.Task[None] | None = None
        self.last_activity = self.loop.time()  # the last complete request or reply (idle timeout)
        self.frame_started = 0.0  # first byte of the incomplete request in `decoder` (frame timeout)
        self.write_paused_at: float | None = None  # since when the client has not read its replies
        self.writable: asyncio.Future[None] | None = None  # resolved when writing may go on
        self.reading = True
        self.timer: asyncio.TimerHandle | None = None
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        limit = self.front.settings.max_connections
        if not self.front.slots.admit(self, limit):
            log.warning("socketmap connection refused: all %d connections have a lookup pending", limit)
            self.closing = True
            transport.close()
            return
        self._arm_timer(self.last_activity + self.front.settings.idle_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.front.slots.release(self)
        self.closing = True
        if self.timer is not None:
            self.timer.cancel()
        if self.worker is not None:
            self.worker.cancel()  # the client has gone: its lookups need no answer (service.py)

    # --- ConnectionSlots ---

    def eviction_rank(self) -> tuple[int, float] | None:
        if self.worker is not None:
            return None  # a lookup is pending: its answer is awaited
        if self.decoder:
            return 0, self.frame_started
        return 1, self.last_activity

    def evict(self) -> None:
        log.info("socketmap connection closed to make room: idle %.0fs%s, %d connections open",
                 self.loop.time() - self.last_activity, " with an incomplete request" if self.decoder else "",
                 len(self.front.slots))
        self._close()

    # --- time limits ---

    def _arm_timer(self, when: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_at(when, self._check_time)

    def _deadline(self) -> tuple[float, str] | None:
        """When this connection must be closed if nothing changes, and why."""
        settings = self.front.settings
        if self.write_paused_at is not None:
            return self.write_paused_at + settings.idle_timeout, "replies not read"
        if not self.reading:
            return None  # our own back-pressure: waiting for lookups (each bounded by lookup_timeout)
        if self.decoder:
            return self.frame_started + settings.frame_timeout, "request not completed"
        if self.worker is None:
            return self.last_activity + settings.idle_timeout, "idle"
        return None

    def _check_time(self) -> None:
        self.timer = None
        if self.closing:
            return
        now = self.loop.time()
        deadline = self._deadline()
        if deadline is None:
            self._arm_timer(now + self.front.settings.idle_timeout)
        elif now < deadline[0]:
            self._arm_timer(deadline[0])
        elif deadline[1] == "request not completed":
            self._error(f"request not completed within {self.front.settings.frame_timeout:g}s", reply=True)
        else:
            log.info("socketmap connection closed: %s for %.0fs", deadline[1], self.front.settings.idle_timeout)
            self._close()

    # --- flow control ---

    def pause_writing(self) -> None:
        self.write_paused_at = self.loop.time()
        self.writable = self.loop.create_future()
        self._flow()

    def resume_writing(self) -> None:
        self.write_paused_at = None
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)
        self.writable = None
        self._flow()

    def _flow(self) -> None:
        """Read only while replies are being read and the queue has room."""
        if self.closing or self.transport is None:
            return
        blocked = self.write_paused_at is not None or len(self.queue) >= MAX_QUEUED
        if blocked and self.reading:
            self.reading = False
            self.transport.pause_reading()
        elif not blocked and not self.reading:
            self.reading = True
            self.transport.resume_reading()
            now = self.loop.time()
            self.frame_started = now  # the rest of a request may still be in the socket: from now on
            self._parse(now)

    # --- framing ---

    def _close(self) -> None:
        self.closing = True
        if self.transport is not None:
            if self.transport.get_write_buffer_size():
                self.transport.abort()  # close() would wait for a client that does not read
            else:
                self.transport.close()

    def _error(self, reason: str, reply: bool) -> None:
        log.warning("socketmap protocol error: %s; closing connection", reason)
        self.front.counters.protocol_error()
        if reply:
            self._send(f"PERM {reason}")
        self._close()

    def _send(self, text: str) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(encode(text))

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        now = monotonic()  # the event loop's clock (loop.time()), without the method call
        if not self.decoder:
            self.frame_started = now
        self.decoder.feed(data)
        self._parse(now)

    def _parse(self, now: float) -> None:
        handled = False
        frames = self.decoder.frames(self.front.settings.max_request)
        try:
            while self.reading and not self.closing:  # stop taking requests when reading pauses
                request = next(frames, None)
                if request is None:
                    break
                handled = True
                self._handle(request)
        except FrameError as exc:  # the framing is lost: PERM where a reply still makes sense, and close
            self._error(str(exc), reply=True)
        if handled:
            self.last_activity = now
            self.frame_started = now  # a rest in the buffer is the next request, begun in this read
        if self.decoder and self.reading and not self.closing:
            # An incomplete request: make sure the timer fires by its deadline (it usually waits
            # for the idle one). Postfix sends whole requests, so this is rare.
            deadline = self.frame_started + self.front.settings.frame_timeout
            if self.timer is None or self.timer.when() > deadline:
                self._arm_timer(deadline)

    def _handle(self, request: bytes) -> None:
        if self.worker is None:
            reply, domain = self.front.immediate(request)
            if reply is not None:
                self._send(reply)
                return
            self.queue.append((request, domain))
            self.worker = self.loop.create_task(self._drain())
        else:
            self.queue.append((request, None))
            self._flow()

    async def _drain(self) -> None:
        """Answer queued requests in order; runs only while some lookup waits for the network."""
        try:
            while self.queue and not self.closing:
                if self.writable is not None:
                    await self.writable  # the client is not reading: answer nothing more for now
                    continue
                request, domain = self.queue.popleft()
                self._flow()
                if domain is None:
                    reply, domain = self.front.immediate(request)
                    if reply is not None:
                        self._send(reply)
                        continue
                assert domain is not None
                self._send(await self.front.resolve(request, domain))
                self.last_activity = self.loop.time()
        finally:
            self.worker = None


FRONT_END = FrontEnd[SocketmapSettings](
    name="socketmap", section="socketmap", settings=SocketmapSettings.from_section,
    build=lambda service, settings, counters: SocketmapFrontEnd(service, settings, counters))
