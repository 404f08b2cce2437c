"""Self-tests for the loopback SMTP server (receiving MX) of the test rig, so end-to-end
delivery failures with Postfix/Exim can be trusted to be real. Kept fast: short
timeouts, high ports chosen by the kernel, smtplib as the client."""

from __future__ import annotations

import datetime
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Iterator

import pytest
import trustme
from cryptography import x509

from tests.rig import SmtpServer, make_ca
from tests.rig.smtp_server import MAX_MESSAGE, WRONG_NAME

MX = "mx1.example.test"
MESSAGE = b"Subject: hi\r\n\r\nhello\r\n"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return make_ca()


@pytest.fixture(scope="module")
def mx(ca: trustme.CA) -> Iterator[SmtpServer]:
    with SmtpServer("127.0.0.1", 0, hostname=MX, ca=ca, lifetime=60) as server:
        yield server


def client(server: SmtpServer, host: str | None = None) -> smtplib.SMTP:
    """smtplib connected to the server's IP but doing SNI and name checks for `host`
    (smtplib passes its _host as server_hostname when it wraps the socket)."""
    smtp = smtplib.SMTP(local_hostname="client.test", timeout=5)
    smtp.connect(server.host, server.port)
    smtp._host = host or server.hostname  # type: ignore[attr-defined]
    return smtp


def verifying(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.load_verify_locations(cadata=ca.cert_pem.bytes().decode())
    return context


def raw_session(server: SmtpServer) -> tuple[socket.socket, socket.SocketIO]:
    sock = socket.create_connection((server.host, server.port), timeout=5)
    reader = sock.makefile("rb")
    assert reader.readline().startswith(b"220 ")
    return sock, reader


def read_reply(reader: object) -> list[bytes]:
    """One (possibly multiline) reply."""
    lines = []
    while True:
        line = reader.readline()  # type: ignore[attr-defined]
        assert line, "server closed the connection"
        lines.append(line)
        if line[3:4] != b"-":
            return lines


def latest(server: SmtpServer, before: int) -> object:
    assert server.wait_for(before + 1, timeout=5)
    return server.messages[before]


# ----- plain SMTP ---------------------------------------------------------


def test_greeting_and_ehlo_extensions(mx: SmtpServer) -> None:
    with client(mx) as smtp:
        code, features = smtp.ehlo()
        assert code == 250
        assert features.splitlines()[0] == f"{MX} greets client.test".encode()
        for extension in ("pipelining", "8bitmime", "size", "starttls"):
            assert smtp.has_extn(extension), extension
        assert int(smtp.esmtp_features["size"]) == MAX_MESSAGE
    with socket.create_connection((mx.host, mx.port), timeout=5) as sock, sock.makefile("rb") as reader:
        assert reader.readline() == f"220 {MX} ESMTP test\r\n".encode()


def test_plain_delivery_is_recorded(mx: SmtpServer) -> None:
    before = len(mx.messages)
    with client(mx) as smtp:
        refused = smtp.sendmail("sender@example.org", ["a@example.test", "B@Example.Test"], MESSAGE)
    assert refused == {}
    message = latest(mx, before)
    assert message.mail_from == "sender@example.org"
    assert message.rcpt_to == ["a@example.test", "B@Example.Test"]
    assert message.data == MESSAGE
    assert (message.tls, message.tls_version, message.sni) == (False, None, None)
    assert message.peer == "127.0.0.1"
    assert message.helo == "client.test"
    assert abs(message.at - time.time()) < 5


def test_null_sender_helo_and_8bit(mx: SmtpServer) -> None:
    before = len(mx.messages)
    with client(mx) as smtp:
        assert smtp.helo()[0] == 250
        smtp.sendmail("<>", ["x@example.test"], "Subject: é\r\n\r\nnaïve\r\n".encode())
    message = latest(mx, before)
    assert message.mail_from == ""
    assert message.data == "Subject: é\r\n\r\nnaïve\r\n".encode()


def test_dot_unstuffing(mx: SmtpServer) -> None:
    body = b"Subject: dots\r\n\r\n.leading dot\r\n..two dots\r\n.\r\nx.\r\n"
    before = len(mx.messages)
    with client(mx) as smtp:  # smtplib dot-stuffs; the server must undo it exactly
        smtp.sendmail("s@example.org", ["r@example.test"], body)
    assert latest(mx, before).data == body
    # And by hand, pipelined, to see the exact wire form.
    sock, reader = raw_session(mx)
    with sock, reader:
        sock.sendall(b"EHLO raw.test\r\nMAIL FROM:<s@example.org> SIZE=20 BODY=8BITMIME\r\nRCPT TO:<r@example.test>\r\nDATA\r\n")
        assert read_reply(reader)[-1].startswith(b"250 ")
        assert [read_reply(reader)[0][:3] for _ in range(3)] == [b"250", b"250", b"354"]
        sock.sendall(b"..a\r\n...\r\nb\r\n.\r\nQUIT\r\n")
        assert read_reply(reader)[0].startswith(b"250 ")
        assert read_reply(reader)[0].startswith(b"221 ")
    assert latest(mx, before + 1).data == b".a\r\n..\r\nb\r\n"


def test_command_handling(mx: SmtpServer) -> None:
    with client(mx) as smtp:
        assert smtp.docmd("MAIL FROM:<s@example.org>")[0] == 503  # no EHLO yet
        smtp.ehlo()
        assert smtp.docmd("RCPT TO:<r@example.test>")[0] == 503  # no MAIL yet
        assert smtp.docmd("DATA")[0] == 503
        assert smtp.docmd("BOGUS")[0] == 500
        assert smtp.docmd("")[0] == 500
        assert smtp.noop()[0] == 250
        assert smtp.docmd("VRFY", "someone")[0] == 252
        assert smtp.docmd("MAIL FROM:<s@example.org>")[0] == 250
        assert smtp.docmd("MAIL FROM:<s@example.org>")[0] == 503  # nested
        assert smtp.docmd("RCPT TO:<r@example.test>")[0] == 250
        assert smtp.rset()[0] == 250
        assert smtp.docmd("RCPT TO:<r@example.test>")[0] == 503  # RSET dropped the transaction
        assert smtp.docmd("MAIL FROM:<s@example.org> SIZE=%d" % (MAX_MESSAGE + 1))[0] == 552
        assert smtp.docmd("X" * 5000)[0] == 500  # overlong line: rejected, session survives
        assert smtp.noop()[0] == 250
        assert smtp.docmd("QUIT")[0] == 221


def test_oversized_message_is_refused(mx: SmtpServer) -> None:
    before = len(mx.messages)
    line = b"x" * 998 + b"\r\n"
    with client(mx) as smtp:
        smtp.ehlo()
        smtp.mail("s@example.org")  # no SIZE= here, so the limit must bite during DATA
        smtp.rcpt("r@example.test")
        assert smtp.data(line * (MAX_MESSAGE // len(line) + 2))[0] == 552
        assert smtp.noop()[0] == 250
        with pytest.raises(smtplib.SMTPSenderRefused) as info:  # smtplib declares SIZE=
            smtp.sendmail("s@example.org", ["r@example.test"], line * (MAX_MESSAGE // len(line) + 2))
        assert info.value.smtp_code == 552
    assert len(mx.messages) == before


def test_concurrent_sessions(mx: SmtpServer) -> None:
    before, connections = len(mx.messages), mx.connections
    errors: list[BaseException] = []

    def send(n: int) -> None:
        try:
            with client(mx) as smtp:
                smtp.sendmail("s@example.org", [f"r{n}@example.test"], b"n: %d\r\n" % n)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(n,)) for n in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert errors == []
    assert mx.wait_for(before + 20, timeout=5)
    assert sorted(m.rcpt_to[0] for m in mx.messages[before:]) == sorted(f"r{n}@example.test" for n in range(20))
    assert mx.connections == connections + 20


# ----- STARTTLS -----------------------------------------------------------


def test_starttls_verified_for_hostname(mx: SmtpServer, ca: trustme.CA) -> None:
    before, handshakes = len(mx.messages), mx.tls_handshakes
    with client(mx) as smtp:
        smtp.ehlo()
        assert smtp.starttls(context=verifying(ca))[0] == 220
        assert smtp.docmd("MAIL FROM:<s@example.org>")[0] == 503  # RFC 3207: EHLO again first
        smtp.ehlo()
        assert not smtp.has_extn("starttls")
        assert smtp.docmd("STARTTLS")[0] == 503
        smtp.sendmail("s@example.org", ["r@example.test"], MESSAGE)
        assert smtp.sock.getpeercert()["subjectAltName"] == (("DNS", MX),)
    message = latest(mx, before)
    assert message.tls is True
    assert message.tls_version in ("TLSv1.2", "TLSv1.3")
    assert message.sni == MX
    assert mx.tls_handshakes == handshakes + 1
    assert mx.handshake_snis[-1] == MX


def test_tls_12_is_accepted(mx: SmtpServer, ca: trustme.CA) -> None:
    context = verifying(ca)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    before = len(mx.messages)
    with client(mx) as smtp:
        smtp.starttls(context=context)
        smtp.sendmail("s@example.org", ["r@example.test"], MESSAGE)
    assert latest(mx, before).tls_version == "TLSv1.2"


def test_wrong_cert_fails_verification_for_hostname(ca: trustme.CA) -> None:
    with SmtpServer("127.0.0.1", 0, hostname=MX, ca=ca, behaviour="wrong-cert", lifetime=30) as server:
        with client(server) as smtp:
            with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
                smtp.starttls(context=verifying(ca))
        # Same CA, so the certificate itself is fine: only the name is wrong.
        with client(server, WRONG_NAME) as smtp:
            smtp.starttls(context=verifying(ca))
            smtp.sendmail("s@example.org", ["r@example.test"], MESSAGE)
        assert server.wait_for(1, timeout=5)
        assert server.messages[0].sni == WRONG_NAME
        assert server.tls_handshakes == 1
        assert _eventually(lambda: server.tls_failures == 1)
        assert server.handshake_snis == [WRONG_NAME]


def test_untrusted_cert_fails_verification(ca: trustme.CA) -> None:
    with SmtpServer("127.0.0.1", 0, hostname=MX, ca=ca, behaviour="untrusted", lifetime=30) as server:
        with client(server) as smtp:
            with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
                smtp.starttls(context=verifying(ca))
        with client(server) as smtp:  # trusted by its own CA: the defect is only the issuer
            smtp.starttls(context=verifying(server.untrusted_ca))
            assert smtp.ehlo()[0] == 250
        assert server.tls_handshakes == 1
        assert _eventually(lambda: server.tls_failures == 1)


def test_no_starttls(ca: trustme.CA) -> None:
    with SmtpServer("127.0.0.1", 0, hostname=MX, ca=ca, behaviour="no-starttls", lifetime=30) as server:
        with client(server) as smtp:
            smtp.ehlo()
            assert not smtp.has_extn("starttls")
            with pytest.raises(smtplib.SMTPNotSupportedError):
                smtp.starttls(context=verifying(ca))
            assert smtp.docmd("STARTTLS")[0] == 502
            smtp.sendmail("s@example.org", ["r@example.test"], MESSAGE)
        assert server.wait_for(1, timeout=5)
        assert server.messages[0].tls is False
        assert server.tls_handshakes == 0


@pytest.mark.parametrize("behaviour,error", [("expired", "certificate has expired"),
                                             ("self-signed", "self.signed certificate")])
def test_expired_and_self_signed_certs_fail_verification(ca: trustme.CA, behaviour: str, error: str) -> None:
    with SmtpServer("127.0.0.1", 0, hostname=MX, ca=ca, behaviour=behaviour, lifetime=30) as server:
        with client(server) as smtp:
            with pytest.raises(ssl.SSLCertVerificationError, match=error):
                smtp.starttls(context=verifying(ca))
        assert server.cert is not None
        leaf = x509.load_pem_x509_certificate(server.cert.cert_chain_pems[0].bytes())
        assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName) == [MX]  # the MX's own name: only the date, or only the issuer, is wrong
        now = datetime.datetime.now(datetime.timezone.utc)
        if behaviour == "expired":  # issued by the trusted CA
            assert leaf.not_valid_after_utc < now
            assert leaf.issuer == x509.load_pem_x509_certificate(ca.cert_pem.bytes()).subject
        else:  # its own issuer, valid dates
            assert leaf.issuer == leaf.subject and leaf.not_valid_before_utc < now < leaf.not_valid_after_utc


def test_starttls_refused(ca: trustme.CA) -> None:
    with SmtpServer("127.0.0.1", 0, hostname=MX, ca=ca, behaviour="starttls-refused", lifetime=30) as server:
        with client(server) as smtp:
            smtp.ehlo()
            assert smtp.has_extn("starttls")  # offered, then refused
            assert smtp.docmd("STARTTLS")[0] == 454
            smtp.sendmail("s@example.org", ["r@example.test"], MESSAGE)
        assert server.wait_for(1, timeout=5)
        assert server.messages[0].tls is False and server.tls_handshakes == 0


def test_handshake_abort(ca: trustme.CA) -> None:
    with SmtpServer("127.0.0.1", 0, hostname=MX, ca=ca, behaviour="handshake-abort", lifetime=30) as server:
        with client(server) as smtp:
            smtp.ehlo()
            assert smtp.has_extn("starttls")
            with pytest.raises((ssl.SSLError, OSError)):
                smtp.starttls(context=verifying(ca))
        assert server.tls_handshakes == 0
        assert _eventually(lambda: server.tls_failures == 1)


def test_plaintext_pipelined_after_starttls_is_discarded(mx: SmtpServer, ca: trustme.CA) -> None:
    """RFC 3207 4.2 / CVE-2011-0411: commands injected in clear after STARTTLS must not run."""
    before = len(mx.messages)
    sock, reader = raw_session(mx)
    with sock:
        sock.sendall(b"EHLO raw.test\r\n")
        read_reply(reader)
        sock.sendall(b"STARTTLS\r\nRSET\r\n")
        assert read_reply(reader)[0].startswith(b"220 ")
        reader.close()
        with verifying(ca).wrap_socket(sock, server_hostname=MX) as tls:
            tls_reader = tls.makefile("rb")
            tls.sendall(b"NOOP\r\n")
            assert read_reply(tls_reader)[0] == b"250 2.0.0 Ok\r\n"  # not RSET's answer first
            tls.sendall(b"QUIT\r\n")
            assert read_reply(tls_reader)[0].startswith(b"221 ")
            tls_reader.close()
    assert len(mx.messages) == before


# ----- lifecycle, limits, counters ----------------------------------------


def _eventually(condition: object, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return bool(condition())  # type: ignore[operator]


def test_connections_counter_and_exact_bind(ca: trustme.CA) -> None:
    with SmtpServer("127.0.0.7", 0, hostname="mx.counter.test", ca=ca, lifetime=30) as server:
        assert server.connections == 0 and server.tls_handshakes == 0
        with pytest.raises(ConnectionRefusedError):  # bound to 127.0.0.7 only
            socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
        assert server.connections == 0
        socket.create_connection((server.host, server.port), timeout=1).close()
        with client(server) as smtp:
            smtp.noop()
        assert _eventually(lambda: server.connections == 2)
        assert server.messages == [] and server.wait_for(1, timeout=0.2) is False
        server.reset()
        assert server.connections == 0
        assert server.handshake_snis == []


def test_idle_timeout_closes_silent_sessions(ca: trustme.CA) -> None:
    with SmtpServer("127.0.0.1", 0, hostname=MX, ca=ca, lifetime=30, idle_timeout=0.3) as server:
        sock, reader = raw_session(server)
        with sock, reader:
            assert reader.readline().startswith(b"421 ")
            assert reader.readline() == b""


def test_stop_cuts_open_sessions_and_lifetime_stops_server(ca: trustme.CA) -> None:
    server = SmtpServer("127.0.0.1", 0, hostname=MX, ca=ca, lifetime=0.5).start()
    sock, reader = raw_session(server)
    with sock, reader:
        started = time.monotonic()
        assert reader.readline() == b""  # the watchdog stopped the server and cut the session
        assert time.monotonic() - started < 3
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((server.host, server.port), timeout=1).close()
    server.stop()  # idempotent
    assert not server.running


def test_invalid_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        SmtpServer("192.0.2.1", hostname=MX)
    with pytest.raises(ValueError):
        SmtpServer("0.0.0.0", hostname=MX)
    with pytest.raises(ValueError):
        SmtpServer("localhost", hostname=MX)
    with pytest.raises(ValueError):
        SmtpServer("127.0.0.1", hostname=MX, behaviour="sometimes")
