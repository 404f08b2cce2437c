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

from .metrics import REGISTRY
from .names import clean_key
from .postfix import MapOptions, tls_policy
from .resolution import Decision
from .service import PolicyService, describe

log = logging.getLogger("mtasts_policyd.socketmap")

MAX_LENGTH_DIGITS = 6


@dataclass(frozen=True)
class SocketmapSettings:
    maps: dict[str, MapOptions] = field(default_factory=lambda: {"postfix": MapOptions()})
    max_request: int = 10000  # Postfix's own query limit (socketmap_max_query_size)
    idle_timeout: float = 60.0  # Postfix closes idle connections after 10 s itself
    max_connections: int = 1024


def netstring(text: str) -> bytes:
    data = text.encode("utf-8")
    return b"%d:%s," % (len(data), data)


class SocketmapFrontEnd:
    """The request -> reply rule, shared by all connections of one listener set."""

    def __init__(self, service: PolicyService, settings: SocketmapSettings = SocketmapSettings()) -> None:
        self.service = service
        self.settings = settings
        self.connections = 0
        self.metrics = REGISTRY.frontends["socketmap"]
        # Reply text per (map options, decision object): cached decisions are reused objects, so
        # a hit formats nothing. The decision is kept in the value so its id cannot be reused.
        self._replies: dict[tuple[int, int], tuple[MapOptions, Decision, str]] = {}

    def _policy_reply(self, options: MapOptions, decision: Decision) -> str:
        key = (id(options), id(decision))
        memo = self._replies.get(key)
        if memo is not None and memo[0] is options and memo[1] is decision:
            return memo[2]
        if len(self._replies) > 100_000:
            self._replies.clear()
        policy = tls_policy(decision, options)
        reply = f"OK {policy}" if policy else "NOTFOUND "
        self._replies[key] = (options, decision, reply)
        return reply

    def _reply(self, name: str, key: str, options: MapOptions, decision: Decision | None,
               elapsed: float = 0.0) -> str:
        reply = self._policy_reply(options, decision) if decision is not None else "NOTFOUND "
        policy = reply != "NOTFOUND "
        self.metrics.answered("OK" if policy else "NOTFOUND", decision, elapsed)  # at once: 0 s, no clock read
        if log.isEnabledFor(logging.INFO):
            if decision is None:
                log.info("socketmap map=%s answer=NOTFOUND key=%r reason=not-a-policy-domain", name, key[:100])
            else:
                log.info("socketmap map=%s answer=%s %s", name, "OK" if policy else "NOTFOUND", describe(decision))
        return reply

    def immediate(self, request: bytes) -> tuple[str | None, str | None]:
        """(reply, None) when answerable now; (None, domain) when the network is needed."""
        try:
            text = request.decode("utf-8")
        except UnicodeDecodeError:
            log.info("socketmap request=%r answer=NOTFOUND reason=not-utf-8", request[:100])
            self.metrics.answered("NOTFOUND", None)
            return "NOTFOUND ", None
        name, _, key = text.partition(" ")
        options = self.settings.maps.get(name)
        if options is None:
            log.warning("socketmap map=%r answer=PERM reason=unknown-map-name", name[:100])
            self.metrics.answered("PERM", None)
            return f"PERM unknown map name {name[:100]!r}; this daemon serves {', '.join(sorted(self.settings.maps))}", None
        domain = clean_key(key)
        if domain is None:
            return self._reply(name, key, options, None), None
        decision = self.service.cached(domain)
        if decision is None:
            return None, domain
        return self._reply(name, key, options, decision), None

    async def resolve(self, request: bytes, domain: str) -> str:
        started = time.perf_counter()
        name, _, key = request.decode("utf-8").partition(" ")
        options = self.settings.maps[name]
        try:
            decision = await self.service.lookup(domain)
        except Exception as exc:  # a bug must defer mail, never downgrade it silently
            log.error("socketmap map=%s domain=%s answer=TEMP reason=internal-error error=%r", name, domain, exc)
            self.metrics.answered("TEMP", None, time.perf_counter() - started)
            return "TEMP internal error in mtasts-policyd; see its log"
        return self._reply(name, key, options, decision, time.perf_counter() - started)


class SocketmapProtocol(asyncio.Protocol):
    def __init__(self, front: SocketmapFrontEnd) -> None:
        self.front = front
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.queue: collections.deque[tuple[bytes, str | None]] = collections.deque()
        self.worker: asyncio.Task[None] | None = None
        self.last_activity = time.monotonic()
        self.timer: asyncio.TimerHandle | None = None
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.front.connections += 1
        if self.front.connections > self.front.settings.max_connections:
            log.warning("socketmap connection refused: more than %d connections", self.front.settings.max_connections)
            transport.close()
            return
        self._arm_timer(self.front.settings.idle_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.front.connections -= 1
        self.closing = True
        if self.timer is not None:
            self.timer.cancel()
        if self.worker is not None:
            self.worker.cancel()

    def _arm_timer(self, delay: float) -> None:
        self.timer = asyncio.get_running_loop().call_later(delay, self._check_idle)

    def _check_idle(self) -> None:
        idle = time.monotonic() - self.last_activity
        limit = self.front.settings.idle_timeout
        if idle >= limit and self.worker is None:
            log.info("socketmap connection closed after %.0fs idle", idle)
            self._close()
        else:
            self._arm_timer(max(limit - idle, 0.5))

    def _close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    def _error(self, reason: str, reply: bool) -> None:
        log.warning("socketmap protocol error: %s; closing connection", reason)
        self.front.metrics.protocol_errors += 1
        if reply:
            self._send(f"PERM {reason}")
        self._close()

    def _send(self, text: str) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(netstring(text))

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.last_activity = time.monotonic()
        self.buffer += data
        while self.buffer and not self.closing:
            colon = self.buffer.find(b":", 0, MAX_LENGTH_DIGITS + 1)
            if colon < 0:
                if len(self.buffer) > MAX_LENGTH_DIGITS or not self.buffer.isdigit():
                    self._error("malformed netstring length", reply=True)
                return
            digits = bytes(self.buffer[:colon])
            if not digits.isdigit():
                self._error("malformed netstring length", reply=True)
                return
            length = int(digits)
            if length > self.front.settings.max_request:
                self._error(f"request longer than {self.front.settings.max_request} bytes", reply=True)
                return
            end = colon + 1 + length
            if len(self.buffer) <= end:
                return  # wait for the rest
            if self.buffer[end] != ord(","):
                self._error("netstring not terminated by ','", reply=True)
                return
            request = bytes(self.buffer[colon + 1:end])
            del self.buffer[:end + 1]
            self._handle(request)

    def _handle(self, request: bytes) -> None:
        if self.worker is None:
            reply, domain = self.front.immediate(request)
            if reply is not None:
                self._send(reply)
                return
            self.queue.append((request, domain))
            self.worker = asyncio.get_running_loop().create_task(self._drain())
        else:
            self.queue.append((request, None))

    async def _drain(self) -> None:
        """Answer queued requests in order; runs only while some lookup waits for the network."""
        try:
            while self.queue and not self.closing:
                request, domain = self.queue.popleft()
                if domain is None:
                    reply, domain = self.front.immediate(request)
                    if reply is not None:
                        self._send(reply)
                        continue
                assert domain is not None
                self._send(await self.front.resolve(request, domain))
                self.last_activity = time.monotonic()
        finally:
            self.worker = None
