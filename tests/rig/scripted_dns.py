"""A DNS server on loopback whose replies a test writes, byte for byte.

Why beside DnsServer: the daemon's DNS stub must be shown the replies a zone never produces:
hand-built wire (odd case, compression, duplicate RRs, extended rcodes), and datagrams that are
not the reply at all (another id, another question, another source port: RFC 5452 spoofing).
It is a DnsServer (same UDP and TCP port, same lifetime bound) whose answers come from `script`.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass

from .dns_server import DnsServer


OTHER_ADDRESS = "127.0.0.2"  # where "other-address" datagrams come from (the server is on another)


@dataclass(frozen=True)
class Datagram:
    wire: bytes
    via: str = "server"  # or, as a spoofer would send it: "other-port" (the server's address), "other-address"


Script = Callable[[bytes, bool], list[Datagram]]  # (query wire, over TCP) -> what to send back


class ScriptedDns(DnsServer):
    """Every query goes to `script`; over UDP each Datagram it returns is sent in order (one `via`
    an address the server cannot send from is left out), over TCP the first one only (none:
    silence). `received`: (over TCP, query wire) in arrival order."""

    def __init__(self, script: Script, host: str = "127.0.0.1", port: int = 0, *, lifetime: float = 120) -> None:
        super().__init__(host, port, lifetime=lifetime)
        self.script = script
        self.received: list[tuple[bool, bytes]] = []
        self._decoys: dict[str, socket.socket] = {}

    def _serve(self) -> None:
        super()._serve()
        for via, address in (("other-port", (self.host, 0)), ("other-address", (OTHER_ADDRESS, self.port))):
            if via == "other-address" and (self.host == OTHER_ADDRESS or ":" in self.host):
                continue  # no other IPv4 loopback address to send from
            decoy = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_DGRAM)
            decoy.bind(address)
            self._decoys[via] = decoy

    def _shutdown(self) -> None:
        for decoy in self._decoys.values():
            decoy.close()
        super()._shutdown()

    def _sent(self, wire: bytes, tcp: bool) -> list[Datagram]:
        with self._lock:
            self.received.append((tcp, wire))
        return self.script(wire, tcp)

    def _answer(self, wire: bytes, *, udp: bool) -> bytes | None:  # TCP only (UDP: _udp_replies)
        replies = self._sent(wire, tcp=True)
        return replies[0].wire if replies else None

    def _udp_replies(self, wire: bytes) -> list[tuple[socket.socket, bytes]]:
        assert self._udp is not None
        try:
            replies = self._sent(wire, tcp=False)
        except Exception:  # a broken script must not kill the serving thread
            return []
        return [(self._udp if reply.via == "server" else self._decoys[reply.via], reply.wire)
                for reply in replies if reply.via == "server" or reply.via in self._decoys]
