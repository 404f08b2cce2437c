"""DNS over UDP on the event loop: the daemon's own stub for the questions it asks there.

Why: the daemon asks every DNS question of a cold domain on its event loop (net/dns.py), three per
domain, and dnspython's asyncio resolver spends most of each query's CPU on its message classes
and resolver machinery (bench/README.md, "Cold path"). Here a query is the hand-written codec of
net/dnswire.py over one plain non-blocking socket, one reader callback and one timer.

The rules are dnspython's resolver's, as net/dns.py configures it: the nameservers in order (shuffled
when resolv.conf says `rotate`), each try within `timeout`, the whole question within `lifetime`,
another round (after a growing pause) while time remains; SERVFAIL, REFUSED, any other failing
rcode, a malformed reply or a socket error take that server out of the question, a timeout does
not. A truncated reply, or a name or reply the codec does not read, is left to dnspython
(`Fallback`): it asks again and goes on over TCP (RFC 7766).

Spoofing (RFC 5452): every query has a socket of its own bound to an ephemeral port the kernel
picks at random (§9.2) and a random id from `secrets` (§9.1); a datagram from another address or
port, or with another id or question, is dropped and the wait goes on (§9.1), as dnspython does.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import secrets
import socket
from dataclasses import dataclass

import dns.rcode

from mtasts_policyd.net import dnswire

FIRST_PAUSE, LAST_PAUSE = 0.1, 2.0  # seconds between rounds, doubling (dnspython's back-off)


class Fallback(Exception):
    """This question is for dnspython: a truncated reply, a name or a reply the codec does not read."""


class NoServerAnswered(Exception):
    """Every server failed (failing rcode, malformed reply, socket error); str() says how, in
    dnspython's words for NoNameservers, so that both paths log the same text."""

    def __init__(self, name: str, rdtype: str, errors: list[str]) -> None:
        super().__init__(f"All nameservers failed to answer the query {name} IN {rdtype}: {'; '.join(errors)}")


class TimedOut(Exception):
    """The question's lifetime ran out before a server answered."""


@dataclass(frozen=True)
class Server:
    """A nameserver: its address as the kernel reports a datagram's source, and its port."""

    host: str
    port: int
    family: int

    def __str__(self) -> str:
        return f"Do53:{self.host}@{self.port}"  # as dnspython names a nameserver in its errors


def server(address: str, port: int) -> Server | None:
    """`address` as a Server; None when it is not a plain IP address (a host name, an IPv6
    address with a scope): dnspython then asks instead."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        return None
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    return Server(socket.inet_ntop(family, ip.packed), port, family)


@dataclass(frozen=True)
class Stub:
    """Where and how to ask (module docstring); `edns`, `payload`, `ednsflags` as the dnspython
    resolver it stands in for would send them (-1: no EDNS)."""

    servers: tuple[Server, ...]
    timeout: float  # seconds per try
    lifetime: float  # seconds for the whole question, every try and pause included
    edns: int = -1
    payload: int = 0
    ednsflags: int = 0
    rotate: bool = False

    async def resolve(self, name: str, rdtype: str) -> dnswire.Reply:
        """The answer to `name` (absolute) `rdtype`: a Reply with an rcode of dnswire.ANSWERED.
        Raises Fallback (also for a type beyond dnswire.QTYPES), NoServerAnswered or TimedOut."""
        qtype = dnswire.QTYPES.get(rdtype)
        if qtype is None:
            raise Fallback(f"record type {rdtype}")
        try:
            asked = dnswire.question(name, qtype)
        except dnswire.Unsupported as exc:
            raise Fallback(str(exc)) from None
        query = dnswire.encode_query(0, asked, self.edns, self.payload, self.ednsflags)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.lifetime
        servers = list(self.servers)
        if self.rotate:
            random.shuffle(servers)
        errors: list[str] = []
        pause = FIRST_PAUSE
        while True:
            for each in list(servers):
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise TimedOut()
                timeout = min(remaining, self.timeout)
                try:
                    reply = await exchange(each, query, asked, timeout)
                except TimeoutError:
                    errors.append(f"Server {each} answered The DNS operation timed out after {timeout:.3f} seconds")
                    continue
                except dnswire.Unsupported as exc:
                    raise Fallback(str(exc)) from None
                except Exception as exc:  # malformed reply, socket error: this server is no good
                    servers.remove(each)
                    errors.append(f"Server {each} answered {exc}")
                    continue
                if reply.truncated:
                    raise Fallback("truncated")
                if reply.answered:
                    return reply
                servers.remove(each)
                errors.append(f"Server {each} answered {dns.rcode.to_text(dns.rcode.Rcode.make(reply.rcode))}")
            if not servers:
                raise NoServerAnswered(name, rdtype, errors)
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimedOut()
            await asyncio.sleep(min(pause, remaining))
            pause = min(pause * 2, LAST_PAUSE)


async def exchange(server: Server, query: bytes, asked: dnswire.Question, timeout: float) -> dnswire.Reply:
    """One try: `query` (any id) to `server` with a fresh random id from a fresh socket, and the
    decoded reply. TimeoutError after `timeout` seconds; dnswire.WireError for a malformed reply;
    OSError. The socket, its reader and the timer are gone when this returns, raises or is
    cancelled."""
    loop = asyncio.get_running_loop()
    qid = secrets.randbits(16)
    sock = socket.socket(server.family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.bind(("0.0.0.0" if server.family == socket.AF_INET else "::", 0))  # RFC 5452 §9.2
        wire = qid.to_bytes(2, "big") + query[2:]
        try:
            sock.sendto(wire, (server.host, server.port))
        except BlockingIOError:  # the socket's send buffer is full: wait until it is not
            await loop.sock_sendto(sock, wire, (server.host, server.port))
        return await _reply(loop, sock, server, qid, asked, timeout)
    finally:
        sock.close()


async def _reply(loop: asyncio.AbstractEventLoop, sock: socket.socket, server: Server, qid: int,
                 asked: dnswire.Question, timeout: float) -> dnswire.Reply:
    """The first datagram on `sock` that is the server's reply to `qid` (module docstring)."""
    waiter = loop.create_future()
    expired = False

    def wake() -> None:
        if not waiter.done():
            waiter.set_result(None)

    def expire() -> None:
        nonlocal expired
        expired = True
        wake()

    fd = sock.fileno()
    loop.add_reader(fd, wake)
    timer = loop.call_later(timeout, expire)
    try:
        while True:
            await waiter
            try:
                wire, source = sock.recvfrom(65535)
            except BlockingIOError:  # woken by the timer
                wire = b""
            if wire and source[0] == server.host and source[1] == server.port:
                try:
                    return dnswire.decode_reply(wire, qid, asked)
                except dnswire.NotTheReply:
                    pass
            if expired:
                raise TimeoutError
            waiter = loop.create_future()
    finally:  # answered, failed, timed out or cancelled: nothing stays registered
        loop.remove_reader(fd)
        timer.cancel()
