"""Exim front end for `${readsocket}`: one request line in, one reply line out, then close.

Exim writes the request, half-closes, and reads until EOF; a server that keeps the connection
open makes the expansion fail at its timeout although the answer arrived. So every connection
carries exactly one request, and the reply is always followed by a close.

Grammar (README "Exim"):
    request  = [verb SP] domain [SP host] LF        ; LF optional: EOF ends the request too
    policy DOMAIN   -> "enforce PATTERN..." | "testing PATTERN..." | "none"
    DOMAIN          -> the same as "policy DOMAIN"
    mx DOMAIN HOST  -> "match" | "nomatch" | "none"   (RFC 8461 §4.1 for HOST; "none": no policy)
    anything else   -> "error REASON"
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mtasts_policyd.answers.dane import exim_reply
from mtasts_policyd.core.names import clean_key
from mtasts_policyd.core.policy import Mode
from mtasts_policyd.frontends.base import (
    QUIET_STATES,
    FrontEnd,
    FrontEndCounters,
    NoCounts,
    dane_reply,
    decision_log_fields,
)
from mtasts_policyd.frontends.listeners import ConnectionSlots
from mtasts_policyd.resolution.resolver import Decision
from mtasts_policyd.resolution.service import PolicyService, ServiceStopping

if TYPE_CHECKING:
    from mtasts_policyd.runtime.config import EximConfig

log = logging.getLogger("mtasts_policyd.exim")

DANE_ANSWERS = ("dane-only", "dane", "temp")  # replies of the DANE verdict (answers/dane.py)


@dataclass(frozen=True)
class EximSettings:
    max_request: int = 1024  # bytes; one domain and one host name fit many times over
    read_timeout: float = 10.0  # a client that sends nothing (or half a line) is dropped after this
    max_connections: int = 1024  # at the cap, the oldest connection still sending its request is closed

    @classmethod
    def from_section(cls, section: EximConfig) -> EximSettings:
        """The `exim` configuration section's keys for the front end (not its listeners')."""
        return cls(max_request=section.max_request, read_timeout=section.read_timeout,
                   max_connections=section.max_connections)


def policy_reply(decision: Decision | None) -> str:
    """The DANE verdict's reply where one applies ("dane-only", "dane", "temp <reason>"; RFC 8461
    §2), else the MTA-STS policy's."""
    dane = dane_reply(decision, exim_reply)
    if dane is not None:
        return dane
    policy = decision.policy if decision is not None else None
    if policy is None or policy.mode is Mode.NONE:
        return "none"  # RFC 8461 §5: none, no policy and no usable policy all mean "as before"
    return " ".join([policy.mode.value, *policy.mx])


def mx_reply(decision: Decision | None, host: str) -> str:
    policy = decision.policy if decision is not None else None
    if policy is None or policy.mode is Mode.NONE:
        return "none"
    return "match" if policy.matches(host) else "nomatch"


class EximFrontEnd:
    def __init__(self, service: PolicyService, settings: EximSettings = EximSettings(),
                 counters: FrontEndCounters | None = None) -> None:
        self.service = service
        self.settings = settings
        self.counters: FrontEndCounters = counters if counters is not None else NoCounts()
        self.slots = ConnectionSlots()

    def protocol(self) -> EximProtocol:
        return EximProtocol(self)

    def summary(self) -> str:
        return ""

    async def answer(self, request: bytes) -> str:
        started = time.perf_counter()
        try:
            words = request.decode("utf-8").split()
        except UnicodeDecodeError:
            return self._error("request is not UTF-8 text", started)
        if not words:
            return self._error("empty request", started)
        verb = words[0].lower() if words[0].lower() in ("policy", "mx") else "policy"
        args = words[1:] if words[0].lower() == verb else words
        expected = 2 if verb == "mx" else 1
        if len(args) != expected:
            return self._error(f"usage: {'mx DOMAIN HOST' if verb == 'mx' else '[policy] DOMAIN'}", started)
        domain = clean_key(args[0])
        decision = await self.service.lookup(domain) if domain is not None else None
        reply = mx_reply(decision, args[1]) if verb == "mx" else policy_reply(decision)
        answer = reply.split(" ", 1)[0]
        self.counters.answered(answer, decision, time.perf_counter() - started)
        if answer in DANE_ANSWERS:
            self.counters.dane_answered(answer)
        quiet = decision is None or (decision.state in QUIET_STATES and answer != "temp")
        level = logging.DEBUG if quiet else logging.INFO  # README "Logs"
        if log.isEnabledFor(level):
            target = f" host={args[1]}" if verb == "mx" else ""
            what = decision_log_fields(decision) if decision is not None else f"key={args[0][:100]!r} reason=not-a-policy-domain"
            log.log(level, "exim verb=%s answer=%s %s%s", verb, answer, what, target)
        return reply

    def _error(self, reason: str, started: float) -> str:
        log.warning("exim answer=error reason=%r", reason)
        self.counters.answered("error", None, time.perf_counter() - started)
        return f"error {reason}"


class EximProtocol(asyncio.Protocol):
    def __init__(self, front: EximFrontEnd) -> None:
        self.front = front
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None
        self.answered = False  # set once a request was taken (or refused): nothing more is read
        self.timer: asyncio.TimerHandle | None = None
        self.connected_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        loop = asyncio.get_running_loop()
        self.connected_at = loop.time()
        limit = self.front.settings.max_connections
        if not self.front.slots.admit(self, limit):
            log.warning("exim answer=error reason='all %d connections have a lookup pending'", limit)
            self._finish("error too many connections to mtasts-policyd")
            return
        self.timer = loop.call_later(self.front.settings.read_timeout, self._timed_out)

    def eviction_rank(self) -> tuple[int, float] | None:
        """Only a connection whose request has not arrived yet may be evicted (ConnectionSlots)."""
        return None if self.answered else (0, self.connected_at)

    def evict(self) -> None:
        log.warning("exim answer=error reason='evicted: request not sent after %.1fs, %d connections open'",
                    asyncio.get_running_loop().time() - self.connected_at, len(self.front.slots))
        self._finish("error too many connections to mtasts-policyd")

    def connection_lost(self, exc: Exception | None) -> None:
        self.front.slots.release(self)
        if self.timer is not None:
            self.timer.cancel()
        if self.task is not None:
            self.task.cancel()

    def _timed_out(self) -> None:
        if not self.answered:
            log.warning("exim answer=error reason='no complete request within %ss'", self.front.settings.read_timeout)
            self.front.counters.protocol_error()
            self._finish("error timeout waiting for the request line")

    def data_received(self, data: bytes) -> None:
        if self.answered:
            return  # one request per connection; anything after the line is ignored
        self.buffer += data
        newline = self.buffer.find(b"\n")
        if newline >= 0:
            self._start(bytes(self.buffer[:newline]))
        elif len(self.buffer) > self.front.settings.max_request:
            log.warning("exim answer=error reason='request longer than %d bytes'", self.front.settings.max_request)
            self.front.counters.protocol_error()
            self._finish(f"error request longer than {self.front.settings.max_request} bytes")

    def eof_received(self) -> bool:
        if not self.answered:
            self._start(bytes(self.buffer))  # Exim half-closes after writing: EOF ends the request
        return True  # keep our half open to write the reply

    def _start(self, request: bytes) -> None:
        self.answered = True
        if len(request) > self.front.settings.max_request:
            self.front.counters.protocol_error()
            self._finish(f"error request longer than {self.front.settings.max_request} bytes")
            return
        self.task = asyncio.get_running_loop().create_task(self._answer(request.rstrip(b"\r")))

    async def _answer(self, request: bytes) -> None:
        try:
            reply = await self.front.answer(request)
        except ServiceStopping:
            log.warning("exim answer=error reason=stopping")
            self.front.counters.answered("error", None)
            reply = "error mtasts-policyd is stopping"
        except Exception as exc:  # never a silent downgrade: Exim sees an error, not "none"
            log.error("exim answer=error reason=internal-error error=%r", exc)
            self.front.counters.answered("error", None)
            reply = "error internal error in mtasts-policyd; see its log"
        self._finish(reply)

    def _finish(self, reply: str) -> None:
        self.answered = True
        if self.timer is not None:
            self.timer.cancel()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(reply.encode("utf-8") + b"\n")
            self.transport.close()


FRONT_END = FrontEnd[EximSettings](
    name="exim", section="exim", settings=EximSettings.from_section,
    build=lambda service, settings, counters: EximFrontEnd(service, settings, counters))
