"""A stand-in for the daemon's Exim listener: fixed `policy DOMAIN` replies for some domains, every
other request relayed to the real daemon.

Why: the MTA side of issue 9 (contrib/exim routing `dane-only`, `dane` and `temp` replies) must be
right on its own, before and apart from the daemon that gives those replies. The stand-in speaks
the listener's protocol (one request line, one reply line, then close) and answers what issue 9's
table says for the DANE scenarios; `mx DOMAIN HOST` and the other domains go to the daemon, so the
MTA-STS part of the recipe runs against the real thing. Loopback only, bounded in time.
"""

from __future__ import annotations

import socket
import socketserver
import threading

from tests.rig.bounded import BoundedServer

READ_TIMEOUT = 5.0
POLL_INTERVAL = 0.1
MAX_LINE = 1024


class _Handler(socketserver.StreamRequestHandler):
    timeout = READ_TIMEOUT  # a silent client only holds its own thread this long

    def handle(self) -> None:
        stand_in: StandIn = self.server.stand_in  # type: ignore[attr-defined]
        request = self.rfile.readline(MAX_LINE).decode(errors="replace").strip()
        stand_in.record(request)
        self.wfile.write(stand_in.reply(request).encode() + b"\n")


class StandIn(BoundedServer):
    """Answers `policy DOMAIN` (or `DOMAIN`) from `replies` (lower-case domain -> reply line);
    relays every other request to `daemon` (host, port) and hands back its reply."""

    def __init__(self, replies: dict[str, str], daemon: tuple[str, int], host: str = "127.0.0.1",
                 *, lifetime: float = 900) -> None:
        super().__init__(host, 0, lifetime)
        self.replies = {domain.lower(): reply for domain, reply in replies.items()}
        self.daemon = daemon
        self.requests: list[str] = []
        self._lock = threading.Lock()
        self._server: socketserver.ThreadingTCPServer | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _serve(self) -> None:
        server = socketserver.ThreadingTCPServer((self.host, self.port), _Handler)
        server.daemon_threads = True
        server.stand_in = self  # type: ignore[attr-defined]
        self._server = server
        self.port = server.server_address[1]
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": POLL_INTERVAL},
                         name=f"stand-in-{self.port}", daemon=True).start()

    def _shutdown(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def record(self, request: str) -> None:
        with self._lock:
            self.requests.append(request)

    def reply(self, request: str) -> str:
        words = request.split()
        if len(words) == 2 and words[0] == "policy" or len(words) == 1:
            fixed = self.replies.get(words[-1].rstrip(".").lower())
            if fixed is not None:
                return fixed
        with socket.create_connection(self.daemon, timeout=READ_TIMEOUT) as daemon:
            daemon.sendall(request.encode() + b"\n")
            return daemon.makefile("rb").readline(MAX_LINE).decode(errors="replace").strip()
