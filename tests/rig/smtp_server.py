"""A receiving SMTP server (MX host) on loopback, for end-to-end delivery tests.

Why a real server: the point of MTA-STS is what a sending MTA does when it meets a
receiving MX - whether it insists on STARTTLS, verifies the certificate against the
policy's MX names, or refuses to deliver at all. Only real Postfix and real Exim
talking real SMTP (RFC 5321) with real STARTTLS (RFC 3207) to a server that really
offers a good, misnamed, untrusted or no certificate can show that honestly.

Each server is one MX host: it binds exactly `host:port` (tests give every MX its own
127.0.0.x address, usually on port 25) and presents a certificate for `hostname`,
normally signed by the same throwaway CA as the HTTPS policy server (see make_ca).
It accepts every recipient and records every message, plus counters so a test can
prove an MX was never contacted or that no TLS session was ever established.
"""

from __future__ import annotations

import datetime
import logging
import re
import shutil
import socket
import ssl
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import trustme

from .bounded import BoundedServer
from .policy_server import make_ca

log = logging.getLogger(__name__)

# What the MX does about TLS. tls: a valid certificate for its name; wrong-cert: valid, for another
# name; untrusted: for its name, from a CA nobody trusts; expired: for its name, from the trusted CA,
# expired yesterday; self-signed: for its name, signed by its own key; no-starttls: STARTTLS not
# offered; starttls-refused: offered, answered 454; handshake-abort: "220 Ready", then the TCP
# connection is closed before any TLS byte (the TLSRPT tests need each one, RFC 8460 §4.3.1).
BEHAVIOURS = frozenset({"tls", "wrong-cert", "no-starttls", "untrusted", "expired", "self-signed",
                        "starttls-refused", "handshake-abort"})
WRONG_NAME = "wrong.invalid"  # the name on the "wrong-cert" certificate
MAX_LINE = 4096  # bytes per command or data line, CRLF included (RFC 5321 needs 512/1000)
MAX_MESSAGE = 10 * 1024 * 1024  # advertised in SIZE and enforced while reading DATA
MAX_RECIPIENTS = 1000  # RFC 5321 4.5.3.1.8 asks for at least 100
IDLE_TIMEOUT = 30.0  # per read: a silent client only blocks its own thread this long
HANDSHAKE_TIMEOUT = 5.0
POLL_INTERVAL = 0.1  # how often the accept loop notices stop()

_MAIL_RE = re.compile(r"^FROM:\s*(<[^>]*>|\S*)(.*)$", re.IGNORECASE | re.DOTALL)
_RCPT_RE = re.compile(r"^TO:\s*(<[^>]*>|\S+)(.*)$", re.IGNORECASE | re.DOTALL)


def issue_cert(ca: trustme.CA, hostname: str) -> trustme.LeafCert:
    """A leaf certificate for `hostname` (a DNS name or an IP address) signed by `ca`."""
    return ca.issue_cert(hostname)


def self_signed_cert(hostname: str) -> trustme.LeafCert:
    """A certificate for `hostname` signed by its own key: no CA, so no trust store holds its issuer."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return trustme.LeafCert(key_pem, cert.public_bytes(serialization.Encoding.PEM), [])


def server_context(cert: trustme.LeafCert) -> ssl.SSLContext:
    """A TLS 1.2+ server context presenting `cert` (with its chain)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    cert.configure_cert(context)
    return context


@dataclass
class Received:
    """One accepted message, as the server saw it."""

    mail_from: str  # reverse path without angle brackets; "" for the null sender <>
    rcpt_to: list[str]  # forward paths without angle brackets, in RCPT order
    data: bytes  # message content after dot-unstuffing, CRLF line ends kept, final "." line excluded
    tls: bool  # whether the transaction ran inside a STARTTLS session
    tls_version: str | None  # e.g. "TLSv1.3"; None without TLS
    sni: str | None  # server name the client sent in its ClientHello (lowercased); None if none
    peer: str  # the client's IP address (no port)
    at: float  # time.time() when the final "." was accepted
    helo: str = ""  # the EHLO/HELO argument of the session that sent it


class _Reader:
    """Line reader over a socket with a bounded buffer.

    Owning the buffer (rather than using makefile) lets STARTTLS throw away any
    plaintext a client pipelined after the command (RFC 3207 section 4.2's injection
    concern) and lets the socket be swapped for its TLS wrapper mid-session.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = b""

    def discard(self) -> None:
        self._buf = b""

    def readline(self) -> tuple[bytes, bool]:
        """Next line including its LF, and whether it was longer than MAX_LINE (then only
        its first MAX_LINE bytes are returned; the rest is read and dropped).
        Raises EOFError if the peer closes before a full line."""
        overflow = False
        kept = b""
        while True:
            end = self._buf.find(b"\n")
            if end >= 0:
                line, self._buf = self._buf[: end + 1], self._buf[end + 1 :]
                if overflow:
                    return kept, True
                if len(line) > MAX_LINE:
                    return line[:MAX_LINE], True
                return line, False
            if len(self._buf) > MAX_LINE:
                if not overflow:
                    kept = self._buf[:MAX_LINE]
                overflow = True
                self._buf = b""
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self._buf += chunk


class _Session:
    """One SMTP connection, run in its own thread."""

    def __init__(self, server: SmtpServer, sock: socket.socket, peer: str, conn_id: int) -> None:
        self.server = server
        self.sock = sock
        self.peer = peer
        self.conn_id = conn_id
        self.reader = _Reader(sock)
        self.helo: str | None = None
        self.tls = False
        self.tls_version: str | None = None
        self.sni: str | None = None
        self._reset_transaction()

    def _reset_transaction(self) -> None:
        self.mail_from: str | None = None
        self.rcpt_to: list[str] = []

    # ----- I/O ---------------------------------------------------------------

    def reply(self, *lines: str) -> None:
        """Send one reply; several lines become a multiline reply (code-text ... code text)."""
        out = []
        for index, line in enumerate(lines):
            last = index == len(lines) - 1
            out.append(line if last else line[:3] + "-" + line[4:])
        self.sock.sendall("".join(part + "\r\n" for part in out).encode("utf-8", "replace"))

    # ----- main loop ---------------------------------------------------------

    def run(self) -> None:
        try:
            self.reply(f"220 {self.server.hostname} ESMTP test")
            while True:
                try:
                    raw, overflow = self.reader.readline()
                except TimeoutError:
                    self.reply("421 4.4.2 Idle timeout, closing connection")
                    return
                if overflow:
                    self.reply("500 5.5.2 Line too long")
                    continue
                if not self._command(raw.rstrip(b"\r\n").decode("utf-8", "replace")):
                    return
        except (EOFError, OSError):
            pass  # client went away, or stop() shut the socket: expected in tests
        except Exception:
            log.exception("SmtpServer session from %s failed", self.peer)
        finally:
            self.sock.close()

    def _command(self, line: str) -> bool:
        """Handle one command line; False ends the session."""
        verb, _, arg = line.strip().partition(" ")
        verb = verb.upper()
        arg = arg.strip()
        handler = getattr(self, f"_cmd_{verb.lower()}", None) if verb.isalpha() else None
        if handler is None:
            self.reply("500 5.5.2 Command not recognized")
            return True
        return handler(arg) is not False

    # ----- commands ----------------------------------------------------------

    def _cmd_ehlo(self, arg: str) -> None:
        if not arg:
            self.reply("501 5.5.4 Syntax: EHLO hostname")
            return
        self.helo = arg
        self._reset_transaction()
        lines = [f"250 {self.server.hostname} greets {arg}", "250 PIPELINING", "250 8BITMIME", f"250 SIZE {MAX_MESSAGE}"]
        if self.server.behaviour != "no-starttls" and not self.tls:
            lines.append("250 STARTTLS")
        self.reply(*lines)

    def _cmd_helo(self, arg: str) -> None:
        if not arg:
            self.reply("501 5.5.4 Syntax: HELO hostname")
            return
        self.helo = arg
        self._reset_transaction()
        self.reply(f"250 {self.server.hostname}")

    def _cmd_starttls(self, arg: str) -> bool:
        if self.server.behaviour == "no-starttls":
            self.reply("502 5.5.1 STARTTLS not supported")
            return True
        if self.server.behaviour == "starttls-refused":
            self.reply("454 4.7.0 TLS not available due to temporary reason")
            return True
        if self.tls:
            self.reply("503 5.5.1 TLS already active")
            return True
        if arg:
            self.reply("501 5.5.4 Syntax: STARTTLS")
            return True
        self.reply("220 2.0.0 Ready to start TLS")
        self.reader.discard()  # anything pipelined after STARTTLS was sent in clear: drop it
        if self.server.behaviour == "handshake-abort":
            self.server._count("tls_failures")
            return False  # the client's ClientHello meets a closed connection
        try:
            tls_sock = self.server._tls_context.wrap_socket(
                self.sock, server_side=True, do_handshake_on_connect=False
            )
            self.sock = tls_sock
            self.server._track(self.conn_id, tls_sock)
            if self.server._stopping.is_set():
                return False  # stop() may have missed the new socket
            tls_sock.settimeout(HANDSHAKE_TIMEOUT)
            tls_sock.do_handshake()
            tls_sock.settimeout(self.server.idle_timeout)
        except (ssl.SSLError, OSError) as exc:
            log.debug("SmtpServer TLS handshake with %s failed: %s", self.peer, exc)
            self.server._count("tls_failures")
            return False  # the session is unusable; the client sees the connection drop
        self.tls = True
        self.tls_version = tls_sock.version()
        self.sni = getattr(tls_sock, "_rig_sni", None)
        self.reader = _Reader(tls_sock)
        # RFC 3207 4.2: forget everything learned before TLS, including the EHLO.
        self.helo = None
        self._reset_transaction()
        self.server._handshake_done(self.sni)
        return True

    def _cmd_mail(self, arg: str) -> None:
        if self.helo is None:
            self.reply("503 5.5.1 Error: send HELO/EHLO first")
            return
        if self.mail_from is not None:
            self.reply("503 5.5.1 Error: nested MAIL command")
            return
        match = _MAIL_RE.match(arg)
        if not match:
            self.reply("501 5.5.4 Syntax: MAIL FROM:<address>")
            return
        for param in match.group(2).split():
            key, _, value = param.partition("=")
            if key.upper() == "SIZE":
                if not value.isdigit():
                    self.reply("501 5.5.4 Bad SIZE parameter")
                    return
                if int(value) > MAX_MESSAGE:
                    self.reply("552 5.3.4 Message size exceeds fixed limit")
                    return
        self.mail_from = match.group(1).strip("<>")
        self.reply("250 2.1.0 Ok")

    def _cmd_rcpt(self, arg: str) -> None:
        if self.mail_from is None:
            self.reply("503 5.5.1 Error: need MAIL command")
            return
        match = _RCPT_RE.match(arg)
        if not match or not match.group(1).strip("<>"):
            self.reply("501 5.5.4 Syntax: RCPT TO:<address>")
            return
        if len(self.rcpt_to) >= MAX_RECIPIENTS:
            self.reply("452 4.5.3 Too many recipients")
            return
        self.rcpt_to.append(match.group(1).strip("<>"))
        self.reply("250 2.1.5 Ok")

    def _cmd_data(self, arg: str) -> bool:
        if self.mail_from is None or not self.rcpt_to:
            self.reply("503 5.5.1 Error: need RCPT command" if self.mail_from is not None else "503 5.5.1 Error: need MAIL command")
            return True
        if arg:
            self.reply("501 5.5.4 Syntax: DATA")
            return True
        self.reply("354 End data with <CR><LF>.<CR><LF>")
        chunks: list[bytes] = []
        size = 0
        too_big = long_line = False
        while True:
            try:
                line, overflow = self.reader.readline()
            except TimeoutError:
                self.reply("421 4.4.2 Idle timeout during DATA, closing connection")
                return False
            if line in (b".\r\n", b".\n"):
                break
            long_line = long_line or overflow
            if line.startswith(b"."):
                line = line[1:]  # RFC 5321 4.5.2 transparency
            size += len(line)
            if size > MAX_MESSAGE:
                too_big = True
            elif not too_big:
                chunks.append(line)
        mail_from, rcpt_to = self.mail_from, self.rcpt_to
        self._reset_transaction()
        if too_big:
            self.reply("552 5.3.4 Message size exceeds fixed limit")
            return True
        if long_line:
            self.reply("500 5.5.2 Line too long")
            return True
        message = Received(
            mail_from=mail_from,
            rcpt_to=rcpt_to,
            data=b"".join(chunks),
            tls=self.tls,
            tls_version=self.tls_version,
            sni=self.sni,
            peer=self.peer,
            at=time.time(),
            helo=self.helo or "",
        )
        self.server._record(message)
        self.reply("250 2.0.0 Ok: queued")
        return True

    def _cmd_rset(self, arg: str) -> None:
        self._reset_transaction()
        self.reply("250 2.0.0 Ok")

    def _cmd_noop(self, arg: str) -> None:
        self.reply("250 2.0.0 Ok")

    def _cmd_vrfy(self, arg: str) -> None:
        self.reply("252 2.0.0 Cannot VRFY user, but will accept message")

    def _cmd_quit(self, arg: str) -> bool:
        self.reply("221 2.0.0 Bye")
        return False


class SmtpServer(BoundedServer):
    """A receiving MX host on `host:port` that presents a `behaviour`-chosen certificate
    for `hostname`; bounded by `lifetime` seconds."""

    def __init__(
        self,
        host: str,
        port: int = 25,
        *,
        hostname: str,
        ca: trustme.CA | None = None,
        behaviour: str = "tls",
        lifetime: float = 900,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        super().__init__(host, port, lifetime)
        if behaviour not in BEHAVIOURS:
            raise ValueError(f"unknown behaviour {behaviour!r}; expected one of {sorted(BEHAVIOURS)}")
        if not hostname:
            raise ValueError("hostname is required")
        self.hostname = hostname
        self.behaviour = behaviour
        self.idle_timeout = idle_timeout
        self.ca = ca or make_ca()  # the CA clients are told to trust
        self.untrusted_ca = make_ca()  # signs the "untrusted" certificate; nobody trusts it
        tmpdir = tempfile.mkdtemp(prefix="mtasts-smtp-")
        # Removed when this object goes away, so the bundle outlives stop().
        weakref.finalize(self, shutil.rmtree, tmpdir, ignore_errors=True)
        self.ca_file = str(Path(tmpdir) / "ca.pem")  # PEM of `ca`, for smtp_tls_CAfile etc.
        self.ca.cert_pem.write_to_path(self.ca_file)
        self.cert: trustme.LeafCert | None = self._issue()
        self._tls_context = self._make_context()
        self._messages: list[Received] = []
        self._connections = 0
        self._tls_handshakes = 0
        self._tls_failures = 0
        self._handshake_snis: list[str | None] = []
        self._open: dict[int, socket.socket] = {}
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def _issue(self) -> trustme.LeafCert | None:
        if self.behaviour == "no-starttls":
            return None
        if self.behaviour == "wrong-cert":
            return issue_cert(self.ca, WRONG_NAME)
        if self.behaviour == "untrusted":
            return issue_cert(self.untrusted_ca, self.hostname)
        if self.behaviour == "expired":
            now = datetime.datetime.now(datetime.timezone.utc)
            return self.ca.issue_cert(self.hostname, not_before=now - datetime.timedelta(days=30),
                                      not_after=now - datetime.timedelta(days=1))
        if self.behaviour == "self-signed":
            return self_signed_cert(self.hostname)
        return issue_cert(self.ca, self.hostname)

    def _make_context(self) -> ssl.SSLContext | None:
        if self.cert is None:
            return None
        context = server_context(self.cert)
        context.sni_callback = self._on_sni
        return context

    @staticmethod
    def _on_sni(sock: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext) -> None:
        # Only recorded: one MX host has one certificate, whatever name is asked for.
        sock._rig_sni = server_name.lower() if server_name else None  # type: ignore[union-attr]

    # ----- lifecycle -------------------------------------------------------

    def _serve(self) -> None:
        if self._listener is not None:
            raise RuntimeError("SmtpServer already started")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.host, self.port))
            listener.listen(128)
            listener.settimeout(POLL_INTERVAL)
        except OSError:
            listener.close()
            raise
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, name=f"smtp-{self.host}:{self.port}", daemon=True)
        self._thread.start()

    def _shutdown(self) -> None:
        """Stop listening and cut every open session."""
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2)
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            open_socks = list(self._open.values())
            self._arrived.notify_all()
        for sock in open_socks:
            try:
                # The base-class method: shuts the TCP stream down under a TLS socket too,
                # which wakes the session thread's blocking recv.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass

    @property
    def running(self) -> bool:
        return self._listener is not None and not self._stopping.is_set()

    # ----- observation -----------------------------------------------------

    @property
    def messages(self) -> list[Received]:
        """A snapshot of the messages accepted so far, oldest first."""
        with self._lock:
            return list(self._messages)

    @property
    def connections(self) -> int:
        """TCP connections accepted (0 proves the MX was never contacted)."""
        with self._lock:
            return self._connections

    @property
    def tls_handshakes(self) -> int:
        """STARTTLS handshakes that completed."""
        with self._lock:
            return self._tls_handshakes

    @property
    def tls_failures(self) -> int:
        """STARTTLS handshakes that failed. Note: a client that verifies inside the handshake
        (Python, many OpenSSL users) fails it on a bad certificate, but Postfix completes
        the handshake, verifies afterwards and then just hangs up; so to prove a sender
        refused an MX, assert on `messages`, not on this counter."""
        with self._lock:
            return self._tls_failures

    @property
    def handshake_snis(self) -> list[str | None]:
        """The SNI name (or None) of every completed handshake, in order, whether or not
        a message followed."""
        with self._lock:
            return list(self._handshake_snis)

    def wait_for(self, count: int = 1, timeout: float = 30) -> bool:
        """Block until at least `count` messages have arrived; False on timeout or stop."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while len(self._messages) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stopping.is_set():
                    return False
                self._arrived.wait(remaining)
            return True

    def reset(self) -> None:
        """Forget messages and counters (open sessions carry on)."""
        with self._lock:
            self._messages.clear()
            self._connections = self._tls_handshakes = self._tls_failures = 0
            self._handshake_snis.clear()

    # ----- internals -------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None
        ids = 0
        while not self._stopping.is_set():
            try:
                sock, address = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                log.exception("SmtpServer accept failed")
                time.sleep(POLL_INTERVAL)
                continue
            ids += 1
            sock.settimeout(self.idle_timeout)
            with self._lock:
                self._connections += 1
                self._open[ids] = sock
            session = _Session(self, sock, address[0], ids)
            threading.Thread(
                target=self._run_session, args=(session,), name=f"smtp-session-{self.port}-{ids}", daemon=True
            ).start()

    def _run_session(self, session: _Session) -> None:
        try:
            if self._stopping.is_set():
                return
            session.run()
        finally:
            session.sock.close()
            with self._lock:
                self._open.pop(session.conn_id, None)

    def _track(self, conn_id: int, sock: socket.socket) -> None:
        """Remember the socket a session now uses (its TLS wrapper after STARTTLS)."""
        with self._lock:
            if conn_id in self._open:
                self._open[conn_id] = sock

    def _count(self, name: str) -> None:
        with self._lock:
            setattr(self, f"_{name}", getattr(self, f"_{name}") + 1)

    def _handshake_done(self, sni: str | None) -> None:
        with self._lock:
            self._tls_handshakes += 1
            self._handshake_snis.append(sni)

    def _record(self, message: Received) -> None:
        with self._lock:
            self._messages.append(message)
            self._arrived.notify_all()
