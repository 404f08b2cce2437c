"""The Exim ${readsocket} front end of a real daemon: one line in, one line out, then close."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from tests.bodies import NONE, TESTING


def exchange(port: int, request: bytes, *, half_close: bool = True, timeout: float = 15) -> bytes:
    """Behave like Exim: write the request, shut down the write side, read until EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
        return data


@pytest.fixture
def daemon(start_daemon):
    return start_daemon(exim={"read_timeout": 2})


def test_policy_replies(rig, daemon):
    enforce, testing, none, nothing = rig.domain(), rig.domain(), rig.domain(), rig.domain()
    rig.publish(enforce)
    rig.publish(testing, TESTING)
    rig.publish(none, NONE)
    port = daemon.exim_port
    assert exchange(port, f"{enforce}\n".encode()) == f"enforce mx1.{enforce} *.mx.{enforce}\n".encode()
    assert exchange(port, f"policy {enforce}\n".encode()) == f"enforce mx1.{enforce} *.mx.{enforce}\n".encode()
    assert exchange(port, f"policy {testing}\n".encode()) == f"testing mx1.{testing} *.mx.{testing}\n".encode()
    assert exchange(port, f"{none}\n".encode()) == b"none\n"
    assert exchange(port, f"{nothing}\n".encode()) == b"none\n"
    assert exchange(port, f"POLICY {enforce.upper()}.\r\n".encode()).startswith(b"enforce ")


def test_request_without_newline_ends_at_eof(rig, daemon):
    # Exim sends exactly the expanded request; with no "\n" in it, its half-close ends the line.
    domain = rig.domain()
    rig.publish(domain)
    assert exchange(daemon.exim_port, domain.encode()) == f"enforce mx1.{domain} *.mx.{domain}\n".encode()


def test_mx_match_is_exact_rfc_8461(rig, daemon):
    # RFC 8461 §4.1: "*.mx.d" matches exactly one label: a.mx.d yes, a.b.mx.d and mx.d no.
    domain = rig.domain()
    rig.publish(domain)
    port = daemon.exim_port
    ask = lambda host: exchange(port, f"mx {domain} {host}\n".encode())  # noqa: E731
    assert ask(f"mx1.{domain}") == b"match\n"
    assert ask(f"A.MX.{domain.upper()}.") == b"match\n"
    assert ask(f"a.b.mx.{domain}") == b"nomatch\n"
    assert ask(f"mx.{domain}") == b"nomatch\n"
    assert ask("mx1.elsewhere.test") == b"nomatch\n"
    assert exchange(port, f"mx {rig.domain()} mx1.x.test\n".encode()) == b"none\n"


def test_max_age_zero_policy_applies_to_each_request(rig, daemon):
    # RFC 8461 §3.2: max_age 0. Every request fetches and applies the policy, so Exim's router
    # ("policy") and its transport ("mx", per host) both see it.
    domain = rig.domain()
    rig.publish(domain, "version: STSv1\nmode: enforce\nmx: mx1.{d}\nmax_age: 0\n")
    port = daemon.exim_port
    assert exchange(port, f"policy {domain}\n".encode()) == f"enforce mx1.{domain}\n".encode()
    assert exchange(port, f"mx {domain} mx1.{domain}\n".encode()) == b"match\n"
    assert exchange(port, f"mx {domain} a.mx.{domain}\n".encode()) == b"nomatch\n"
    assert rig.https.count(domain) == 3


@pytest.mark.parametrize("request_bytes,reply", [
    (b"\n", b"error empty request\n"),
    (b"   \n", b"error empty request\n"),
    (b"mx only-a-domain.test\n", b"error usage: mx DOMAIN HOST\n"),
    (b"a b c d\n", b"error usage: [policy] DOMAIN\n"),
    (b"\xff\xfe\n", b"error request is not UTF-8 text\n"),
    (b"x" * 5000 + b"\n", b"error request longer than 1024 bytes\n"),
])
def test_bad_requests_get_one_error_line(daemon, request_bytes, reply):
    assert exchange(daemon.exim_port, request_bytes) == reply


def test_not_a_domain_is_none(daemon):
    assert exchange(daemon.exim_port, b"[192.0.2.1]\n") == b"none\n"
    assert exchange(daemon.exim_port, b".example.test\n") == b"none\n"


def test_slow_client_is_dropped_without_disturbing_others(rig, daemon):
    domain = rig.domain()
    rig.publish(domain)
    results: list[bytes] = []
    with socket.create_connection(("127.0.0.1", daemon.exim_port), timeout=15) as slow:
        slow.sendall(b"exa")  # half a request, then silence
        worker = threading.Thread(target=lambda: results.append(exchange(daemon.exim_port, f"{domain}\n".encode())))
        worker.start()
        worker.join(timeout=15)
        assert results == [f"enforce mx1.{domain} *.mx.{domain}\n".encode()]
        data = b""
        while chunk := slow.recv(4096):
            data += chunk
    assert data == b"error timeout waiting for the request line\n"


def test_reply_then_close_even_if_client_keeps_writing(rig, daemon):
    domain = rig.domain()
    rig.publish(domain)
    with socket.create_connection(("127.0.0.1", daemon.exim_port), timeout=15) as sock:
        sock.sendall(f"{domain}\n".encode())  # no half-close: Exim's shutdown=no
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    assert data == f"enforce mx1.{domain} *.mx.{domain}\n".encode()
    time.sleep(0.1)
    assert "exim verb=policy answer=enforce domain=" in daemon.logs()
