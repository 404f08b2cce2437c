"""DNS over UDP on the event loop for dnspython's asyncio resolver, with less machinery per query.

Why: the daemon asks every DNS question of a cold domain on its event loop (net/dns.py), three
per domain, and dnspython's own asyncio backend opens each query's socket through
`loop.create_datagram_endpoint` (a transport, a protocol, a queue and a `wait_for` task per
query): about 0.29 ms of CPU per query against 0.22 ms here (bench/README.md, "Cold path").
Here a query is a plain non-blocking socket, one reader callback and one timer. Everything else
(the messages, ids, retries, TCP after truncation, which answers are accepted) stays dnspython's:
only the socket underneath changes. Stream sockets (TCP) are left to dnspython's backend.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import dns._asyncbackend
import dns._asyncio_backend
import dns.exception


class _Datagram(dns._asyncbackend.DatagramSocket):  # type: ignore[misc]
    """One query's UDP socket. Not connected, as with dnspython's backend: it checks the source
    of every reply itself (dns.asyncquery.receive_udp)."""

    def __init__(self, family: int, sock: socket.socket) -> None:
        super().__init__(family, socket.SOCK_DGRAM)
        self._sock = sock

    async def sendto(self, what: bytes, destination: Any, timeout: float | None) -> int:
        await asyncio.get_running_loop().sock_sendto(self._sock, what, destination)
        return len(what)

    async def recvfrom(self, size: int, timeout: float | None) -> tuple[bytes, Any]:
        """The next datagram, or dns.exception.Timeout after `timeout` seconds (None: no limit)."""
        try:
            return self._sock.recvfrom(size)
        except BlockingIOError:
            pass
        loop = asyncio.get_running_loop()
        readable = loop.create_future()

        def wake() -> None:
            if not readable.done():
                readable.set_result(None)

        fd = self._sock.fileno()
        loop.add_reader(fd, wake)
        deadline = loop.call_later(timeout, wake) if timeout is not None else None
        try:
            while True:
                await readable
                try:
                    return self._sock.recvfrom(size)
                except BlockingIOError:  # woken by the deadline, or a datagram already taken
                    if deadline is not None and loop.time() >= deadline.when():
                        raise dns.exception.Timeout(timeout=timeout) from None
                    readable = loop.create_future()
        finally:  # answered, timed out or cancelled: nothing stays registered
            loop.remove_reader(fd)
            if deadline is not None:
                deadline.cancel()

    async def close(self) -> None:
        self._sock.close()

    async def getpeername(self) -> Any:
        return self._sock.getpeername()

    async def getsockname(self) -> Any:
        return self._sock.getsockname()

    async def getpeercert(self, timeout: float | None) -> Any:
        raise NotImplementedError


class LeanBackend(dns._asyncio_backend.Backend):  # type: ignore[misc]
    """dnspython's asyncio backend with `_Datagram` for UDP; pass as `backend=` to resolve()."""

    async def make_socket(self, af: int, socktype: int, proto: int = 0, source: Any = None,
                          destination: Any = None, timeout: float | None = None, ssl_context: Any = None,
                          server_hostname: str | None = None) -> Any:
        if socktype != socket.SOCK_DGRAM:
            return await super().make_socket(af, socktype, proto, source, destination, timeout, ssl_context,
                                             server_hostname)
        sock = socket.socket(af, socket.SOCK_DGRAM, proto)
        try:
            sock.setblocking(False)
            if source is not None:
                sock.bind(source)
            if destination is not None:
                sock.connect(destination)
        except BaseException:
            sock.close()
            raise
        return _Datagram(af, sock)
