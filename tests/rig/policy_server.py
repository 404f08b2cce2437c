"""An HTTPS server on loopback that serves MTA-STS policies, with a throwaway test CA.

Why a real TLS server: RFC 8461 makes certificate validation (trusted chain, name
`mta-sts.<domain>`, expiry), status handling, redirects (which must not be followed)
and fetch timeouts part of the protocol. Those can only be tested honestly against
a server that really presents bad certificates, redirects, stalls or trickles.

One listening port serves every policy domain: the client connects to loopback and
names the virtual host through SNI, and the certificate is chosen per connection.
"""

from __future__ import annotations

import datetime
import http.server
import itertools
import logging
import shutil
import socket
import socketserver
import ssl
import tempfile
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import trustme

from .bounded import BoundedServer

log = logging.getLogger(__name__)

POLICY_PATH = "/.well-known/mta-sts.txt"
CERT_KINDS = frozenset({"valid", "wrong-name", "expired", "untrusted"})
WRONG_NAME = "wrong.invalid"
DEFAULT_NAME = "localhost"  # certificate shown to clients that send no SNI
HANDSHAKE_TIMEOUT = 5.0  # a client that stalls the handshake only blocks its own thread
IO_TIMEOUT = 5.0
POLL_INTERVAL = 0.1
TRICKLE_INTERVAL = 0.1
TRICKLE_BYTES = 16


def make_ca() -> trustme.CA:
    """A fresh CA for one test run; pass it to several servers so one bundle trusts them all."""
    return trustme.CA(organization_name="mtasts-policyd test CA")


@dataclass(frozen=True)
class Policy:
    """What to answer for one virtual host; see PolicyServer.set_policy."""

    body: bytes
    status: int = 200
    content_type: str = "text/plain"
    headers: tuple[tuple[str, str], ...] = ()
    delay: float = 0.0
    cert: str = "valid"
    location: str | None = None
    chunk_forever: bool = False


NOT_FOUND = Policy(body=b"not found\n", status=404)


@dataclass(frozen=True)
class Post:
    """One POST received (a TLSRPT report, RFC 8460 §5.4)."""

    host: str
    path: str
    content_type: str
    body: bytes


class PolicyServer(BoundedServer):
    """HTTPS server for https://mta-sts.<domain>/.well-known/mta-sts.txt, bounded by `lifetime`."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        lifetime: float = 900,
        ca: trustme.CA | None = None,
    ) -> None:
        super().__init__(host, port, lifetime)
        self.ca = ca or make_ca()
        # Same shape as the trusted CA but nobody trusts it: the "untrusted" case.
        self.untrusted_ca = make_ca()
        tmpdir = tempfile.mkdtemp(prefix="mtasts-rig-")
        # Removed when this object goes away, not at stop(): the bundle stays usable
        # for assertions made after the server has stopped.
        weakref.finalize(self, shutil.rmtree, tmpdir, ignore_errors=True)
        self.ca_file = str(Path(tmpdir) / "ca.pem")
        self.ca.cert_pem.write_to_path(self.ca_file)
        self.requests: list[tuple[str, str]] = []
        self.host_headers: list[str] = []  # the Host header of every GET, as sent
        self._policies: dict[str, Policy] = {}
        # TLSRPT https rua endpoints (RFC 8460 §5.4): every POST, and the statuses to answer per URL.
        self.posts: list[Post] = []
        self._rua_statuses: dict[tuple[str, str], list[int]] = {}
        self._contexts: dict[tuple[str, str], ssl.SSLContext] = {}
        self._lock = threading.Lock()
        self._context_lock = threading.Lock()  # separate: issuing a cert is slow-ish
        self._httpd: _TLSServer | None = None
        self._thread: threading.Thread | None = None

    # ----- lifecycle -------------------------------------------------------

    def _serve(self) -> None:
        if self._httpd is not None:
            raise RuntimeError("PolicyServer already started")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self._httpd = _TLSServer((self.host, self.port), _Handler, rig=self, family=family)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": POLL_INTERVAL},
            name=f"https-{self.port}",
            daemon=True,
        )
        self._thread.start()

    def _shutdown(self) -> None:
        # _stopping is set by now: it also ends delays and trickles in handler threads.
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2)

    # ----- configuration ---------------------------------------------------

    def prepare_certificate(self, domain: str) -> None:
        """Issue the valid certificate for mta-sts.<domain> now rather than at its first handshake."""
        self._context_for(f"mta-sts.{domain}", "valid")

    def set_policy(
        self,
        domain: str,
        body: str | bytes | None = None,
        *,
        status: int = 200,
        content_type: str = "text/plain",
        headers: dict[str, str] | None = None,
        delay: float = 0.0,
        cert: str = "valid",
        location: str | None = None,
        chunk_forever: bool = False,
    ) -> None:
        """Configure the answer for mta-sts.<domain>. `headers` are sent last and replace
        defaults of the same name (e.g. a lying Content-Length)."""
        if cert not in CERT_KINDS:
            raise ValueError(f"unknown cert kind {cert!r}; expected one of {sorted(CERT_KINDS)}")
        raw = body.encode() if isinstance(body, str) else (body or b"")
        policy = Policy(
            body=raw,
            status=status,
            content_type=content_type,
            headers=tuple((headers or {}).items()),
            delay=delay,
            cert=cert,
            location=location,
            chunk_forever=chunk_forever,
        )
        with self._lock:
            self._policies[_vhost(domain)] = policy

    def set_rua(self, host: str, path: str, *statuses: int) -> None:
        """POSTs to https://<host><path> are answered with `statuses` in turn (the last one from then
        on; none given: 200). Any host name gets a valid certificate from the test CA."""
        with self._lock:
            self._rua_statuses[(host.lower(), path)] = list(statuses or (200,))

    def posts_to(self, host: str, path: str) -> list[Post]:
        with self._lock:
            return [post for post in self.posts if (post.host, post.path) == (host.lower(), path)]

    def _take_post(self, post: Post) -> int:
        with self._lock:
            self.posts.append(post)
            statuses = self._rua_statuses.get((post.host, post.path))
            if not statuses:
                return 404
            return statuses.pop(0) if len(statuses) > 1 else statuses[0]

    def remove(self, domain: str) -> None:
        with self._lock:
            self._policies.pop(_vhost(domain), None)

    # ----- observation -----------------------------------------------------

    def count(self, domain: str) -> int:
        """Requests that reached HTTP level for mta-sts.<domain> (failed handshakes don't count)."""
        name = _vhost(domain)
        with self._lock:
            return sum(1 for host, _ in self.requests if host == name)

    def reset_counts(self) -> None:
        with self._lock:
            self.requests.clear()

    # ----- internals used by the handler -----------------------------------

    def _policy_for(self, host: str) -> Policy | None:
        with self._lock:
            return self._policies.get(host)

    def _record(self, host: str, path: str) -> None:
        with self._lock:
            self.requests.append((host, path))

    def _context_for(self, name: str, kind: str) -> ssl.SSLContext:
        """Server context presenting a `kind` certificate for `name`; cached because
        issuing certificates costs far more than a handshake."""
        with self._context_lock:
            context = self._contexts.get((name, kind))
            if context is None:
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                self._issue(name, kind).configure_cert(context)
                self._contexts[(name, kind)] = context
            return context

    def _issue(self, name: str, kind: str) -> trustme.LeafCert:
        if kind == "wrong-name":
            return self.ca.issue_cert(WRONG_NAME)
        if kind == "untrusted":
            return self.untrusted_ca.issue_cert(name)
        if kind == "expired":
            now = datetime.datetime.now(datetime.timezone.utc)
            return self.ca.issue_cert(
                name,
                not_before=now - datetime.timedelta(days=30),
                not_after=now - datetime.timedelta(days=1),
            )
        return self.ca.issue_cert(name)

    def _default_context(self) -> ssl.SSLContext:
        """Context every connection starts with; its SNI callback swaps in the per-name one."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ca.issue_cert(DEFAULT_NAME, self.host).configure_cert(context)
        context.sni_callback = self._on_sni
        return context

    def _on_sni(self, sock: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext) -> None:
        if server_name is None:
            return  # keep the default certificate
        name = server_name.lower().rstrip(".")
        policy = self._policy_for(name)
        try:
            sock.context = self._context_for(name, policy.cert if policy else "valid")
        except Exception:
            log.exception("PolicyServer could not switch certificate for %s", name)
            return
        sock.sni_name = name  # type: ignore[union-attr]  # read back by the handler


def _vhost(domain: str) -> str:
    return "mta-sts." + domain.lower().rstrip(".")


class _TLSServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    """Accepts plain TCP and does the TLS handshake in the per-connection thread,
    so one client stuck in its handshake cannot hold up the accept loop."""

    daemon_threads = True
    block_on_close = False  # stop() must not wait for trickling handlers
    allow_reuse_address = True
    request_queue_size = 1024  # a burst of concurrent fetches must not meet dropped SYNs (1 s retry)

    def __init__(
        self, address: tuple[str, int], handler: type[_Handler], *, rig: PolicyServer, family: int
    ) -> None:
        self.address_family = family
        self.rig = rig
        self.ssl_context = rig._default_context()
        super().__init__(address, handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup of the address; skip it.
        socketserver.TCPServer.server_bind(self)
        self.server_name = self.server_address[0]
        self.server_port = self.server_address[1]

    def finish_request(self, request: socket.socket, client_address: tuple[str, int]) -> None:  # type: ignore[override]
        request.settimeout(HANDSHAKE_TIMEOUT)
        try:
            tls = self.ssl_context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return  # rejected certificate, stalled or vanished client: expected in tests
        try:
            tls.settimeout(IO_TIMEOUT)
            self.RequestHandlerClass(tls, client_address, self)
        except OSError:
            pass  # client went away mid-response
        finally:
            tls.close()

    def handle_error(self, request: object, client_address: object) -> None:
        log.exception("PolicyServer handler failed for %s", client_address)


class _Handler(http.server.BaseHTTPRequestHandler):
    """One request per connection; answers exactly what the Policy says."""

    server: _TLSServer
    protocol_version = "HTTP/1.1"  # needed for chunked transfer in chunk_forever

    def do_GET(self) -> None:
        rig = self.server.rig
        host = getattr(self.connection, "sni_name", None) or self._host_header()
        rig._record(host, self.path)
        with rig._lock:
            rig.host_headers.append(self.headers.get("Host", ""))
        policy = rig._policy_for(host) if urlsplit(self.path).path == POLICY_PATH else None
        policy = policy or NOT_FOUND
        self.close_connection = True
        if policy.delay and rig._stopping.wait(policy.delay):
            return
        self.send_response(policy.status)
        headers = {"Content-Type": policy.content_type, "Connection": "close"}
        if policy.chunk_forever:
            headers["Transfer-Encoding"] = "chunked"
        else:
            headers["Content-Length"] = str(len(policy.body))
        if policy.location is not None:
            headers["Location"] = policy.location
        overrides = {name.lower() for name, _ in policy.headers}
        for name, value in headers.items():
            if name.lower() not in overrides:
                self.send_header(name, value)
        for name, value in policy.headers:
            self.send_header(name, value)
        self.end_headers()
        if policy.chunk_forever:
            self._trickle(policy.body or b"x")
        else:
            self.wfile.write(policy.body)

    def do_POST(self) -> None:
        rig = self.server.rig
        host = getattr(self.connection, "sni_name", None) or self._host_header()
        length = min(int(self.headers.get("Content-Length", "0") or 0), 10_000_000)
        body = self.rfile.read(length)
        status = rig._take_post(Post(host, self.path, self.headers.get("Content-Type", ""), body))
        self.close_connection = True
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.send_header("Connection", "close")
        if 300 <= status < 400:
            self.send_header("Location", f"https://{host}/elsewhere")
        self.end_headers()

    def _trickle(self, body: bytes) -> None:
        """Endless chunked body, a few bytes at a time: a client without an overall
        deadline hangs here until the server stops."""
        stream = itertools.cycle(body)
        while not self.server.rig._stopping.wait(TRICKLE_INTERVAL):
            piece = bytes(itertools.islice(stream, TRICKLE_BYTES))
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.flush()

    def _host_header(self) -> str:
        """Fallback for clients that send no SNI (e.g. connecting by IP)."""
        host = self.headers.get("Host", "")
        if host.startswith("["):
            host = host[1 : host.find("]")]
        else:
            host = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
        return host.lower().rstrip(".")

    def log_message(self, format: str, *args: object) -> None:
        log.debug("PolicyServer: " + format, *args)
