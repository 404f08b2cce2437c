"""Resilience under abuse, against a real daemon process: each attack is measured by what matters
to the mail system: the daemon stays up, other clients are served, memory stays bounded, and
SIGTERM ends within the drain timeout.

Bounds are relative to the configured timeouts (or generous absolute memory figures), never a
speed: the machine running the suite is shared.
"""

from __future__ import annotations

import select
import signal
import socket
import time
from contextlib import ExitStack

import pytest

from mtasts_policyd.runtime.config import Config
from tests.conftest import Daemon, SocketmapClient, free_port, netstring, secure
from tests.test_exim_protocol import exchange
from tests.test_metrics import get, scrape, unit, value

FLOOD_ZONE = "flood.example.test"  # its DNS never answers (the rig drops every query below it)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def start_with_metrics(start_daemon, **extra: object) -> tuple[Daemon, int]:
    port = free_port()
    daemon = start_daemon(metrics={"listen": f"127.0.0.1:{port}"}, **extra)
    deadline = time.monotonic() + 10
    while f"listening metrics=127.0.0.1:{port}" not in daemon.logs():
        assert time.monotonic() < deadline and daemon.process.poll() is None, daemon.logs()
        time.sleep(0.02)
    return daemon, port


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def flood_zone(rig):
    rig.dns.fault(FLOOD_ZONE, "timeout", subtree=True)
    try:
        yield FLOOD_ZONE
    finally:
        rig.dns.fault(FLOOD_ZONE, None, subtree=True)


def open_lookups(port: int, keys: list[str], stack: ExitStack) -> list[socket.socket]:
    """One connection per key, each with its request sent and its reply not read (yet)."""
    socks = []
    for key in keys:
        sock = stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=30))
        sock.sendall(netstring(f"postfix {key}".encode()))
        socks.append(sock)
    return socks


# ----- back-pressure ------------------------------------------------------------------------------


def test_client_that_never_reads_its_replies_is_no_longer_read_from(rig, start_daemon):
    # One client pipelines requests with big replies and never reads them. The daemon stops
    # reading from it once its replies back up, so the client can push only what the kernel's
    # socket buffers hold, the daemon's memory does not grow with what is sent, and another
    # client's lookups are answered meanwhile.
    daemon = start_daemon()  # the defaults
    domain = rig.domain()
    rig.publish(domain)
    other = SocketmapClient(daemon.port, timeout=10)
    reply = other.ask(domain, "postfix-sts")
    assert reply.startswith("OK secure") and len(reply) > 300  # cached now: answered at once
    before = rss_kib(daemon.process.pid)

    flood = socket.create_connection(("127.0.0.1", daemon.port))
    flood.setblocking(False)
    chunk = netstring(f"postfix-sts {domain}".encode()) * 2000
    view, sent, last_progress = memoryview(b""), 0, time.monotonic()
    deadline = time.monotonic() + 60
    while time.monotonic() - last_progress < 2.0:  # until the daemon has stopped reading for 2 s
        assert time.monotonic() < deadline, f"the daemon kept reading: {sent} bytes taken"
        if not view:
            view = memoryview(chunk)
        try:
            n = flood.send(view)
        except BlockingIOError:
            time.sleep(0.02)
            continue
        view, sent, last_progress = view[n:], sent + n, time.monotonic()
    stalled = rss_kib(daemon.process.pid)
    requests_sent = sent // (len(chunk) // 2000)

    for _ in range(20):  # another client is served while the flood connection stays stuck
        assert other.ask(domain, "postfix-sts") == reply
    time.sleep(1.0)
    with pytest.raises(BlockingIOError):
        flood.send(chunk)  # still not read from
    after = rss_kib(daemon.process.pid)
    flood.close()

    # Without back-pressure each request read leaves a 350-byte reply in memory, and the client
    # never stops sending; here the kernel's socket buffers bound what it could send, and the
    # daemon holds at most a read, a queue and a write buffer of it.
    assert requests_sent > 1000
    assert stalled - before < 20_000, (before, stalled, requests_sent)
    assert after - stalled < 5_000, (stalled, after)
    assert daemon.process.poll() is None


# ----- slots and time limits ----------------------------------------------------------------------


def trickle_until_closed(sock: socket.socket, data: bytes, interval: float, limit: float) -> tuple[float, bytes]:
    """Send `data` a byte at a time every `interval` s until the server answers or closes.
    Returns (seconds from the first byte, what the server sent)."""
    started = time.monotonic()
    received = b""
    for byte in data * 1000:
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            break
        readable, _, _ = select.select([sock], [], [], interval)
        if readable:
            try:
                while chunk := sock.recv(4096):
                    received += chunk
            except OSError:
                pass
            break
        assert time.monotonic() - started < limit, "never closed"
    return time.monotonic() - started, received


def test_request_trickling_in_is_closed_after_frame_timeout(rig, start_daemon):
    # Postfix sends a whole request at once; bytes trickling in do not extend the time a request
    # has from its first byte (frame_timeout), and the idle timeout (30 s here) does not apply.
    daemon = start_daemon(socketmap={"frame_timeout": 2, "idle_timeout": 30})
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=15) as sock:
        elapsed, received = trickle_until_closed(sock, netstring(b"postfix trickle.example.test"), 0.2, 20)
    assert received == netstring(b"PERM request not completed within 2s")
    assert 2.0 - 0.05 <= elapsed < 2.0 + 5, elapsed  # not before frame_timeout, long before idle_timeout
    # A request split in two parts within the bound is answered; the connection then idles on.
    domain = rig.domain()
    rig.publish(domain)
    client = SocketmapClient(daemon.port, timeout=15)
    request = netstring(f"postfix {domain}".encode())
    client.send(request[:5])
    time.sleep(1.0)
    client.send(request[5:])
    assert client.read_reply() == "OK " + secure(domain)
    time.sleep(2.5)  # longer than frame_timeout: between requests only the idle timeout counts
    assert client.ask(domain) == "OK " + secure(domain)


def test_full_socketmap_listener_makes_room_for_a_new_client(rig, start_daemon):
    # The default cap (1024) is full of connections that trickle or idle; a new Postfix
    # connection is still answered: the longest-stalled one is closed to make room.
    daemon, metrics_port = start_with_metrics(start_daemon)
    domain = rig.domain()
    rig.publish(domain)
    with ExitStack() as stack:
        stalled = []
        for n in range(Config().socketmap.max_connections):
            sock = stack.enter_context(socket.create_connection(("127.0.0.1", daemon.port), timeout=15))
            if n % 2 == 0:
                sock.sendall(b"1")  # an incomplete request: evicted before idle connections
            stalled.append(sock)
        wait_for(lambda: value(scrape(metrics_port), "mtasts_socketmap_connections") == 1024, 20, "1024 connections")
        client = SocketmapClient(daemon.port, timeout=15)
        assert client.ask(domain) == "OK " + secure(domain)
        assert stalled[0].recv(100) == b""  # the oldest incomplete request was closed
        assert client.ask(domain) == "OK " + secure(domain)
        m = scrape(metrics_port)
        assert value(m, "mtasts_socketmap_connections") == 1024
        assert value(m, "mtasts_connections_evicted_total", listener="socketmap") == 1
    assert daemon.process.poll() is None


def test_eviction_order_spares_connections_with_a_lookup_pending(rig, start_daemon, flood_zone):
    daemon = start_daemon(socketmap={"max_connections": 6, "idle_timeout": 60, "frame_timeout": 60})
    domain = rig.domain()
    rig.publish(domain)
    with ExitStack() as stack:
        busy = open_lookups(daemon.port, [f"busy.{flood_zone}"], stack)[0]  # waits on DNS
        idle = [stack.enter_context(socket.create_connection(("127.0.0.1", daemon.port), timeout=15))
                for _ in range(3)]
        partial = [stack.enter_context(socket.create_connection(("127.0.0.1", daemon.port), timeout=15))
                   for _ in range(2)]
        for sock in partial:
            sock.sendall(b"12:postfix")
        time.sleep(0.5)
        # Each newcomer takes the slot of: the partial requests (oldest first), then the idle
        # connections (idle longest first); the pending lookup is never closed.
        expected_victims = [*partial, *idle]
        for victim in expected_victims:
            client = SocketmapClient(daemon.port, timeout=15)
            stack.callback(client.close)
            assert client.ask(domain).startswith("OK secure")
            assert victim.recv(100) == b""
        # All six slots now have a lookup pending or were just answered; the busy one survives.
        busy.settimeout(0.5)
        with pytest.raises(TimeoutError):
            busy.recv(100)
    assert "socketmap connection closed to make room" in daemon.logs()


def test_full_exim_listener_makes_room_for_a_new_request(rig, start_daemon):
    # exim.max_connections (default 1024): silent connections beyond it do not make accept()
    # fail with EMFILE; the oldest silent one is told and closed, the new request is answered.
    daemon, metrics_port = start_with_metrics(start_daemon)
    domain = rig.domain()
    rig.publish(domain)
    with ExitStack() as stack:
        silent = [stack.enter_context(socket.create_connection(("127.0.0.1", daemon.exim_port), timeout=15))
                  for _ in range(Config().exim.max_connections)]
        wait_for(lambda: value(scrape(metrics_port), "mtasts_connections", listener="exim") == len(silent), 20,
                 "the connections to be accepted")
        assert exchange(daemon.exim_port, f"{domain}\n".encode()) == f"enforce mx1.{domain} *.mx.{domain}\n".encode()
        assert silent[0].recv(100) == b"error too many connections to mtasts-policyd\n"
        assert value(scrape(metrics_port), "mtasts_connections_evicted_total", listener="exim") == 1


def test_full_metrics_listener_still_answers_health(rig, start_daemon):
    # metrics.max_connections (default 64) full of incomplete requests: /health still answers.
    daemon, metrics_port = start_with_metrics(start_daemon)
    with ExitStack() as stack:
        partial = []
        for _ in range(Config().metrics.max_connections):
            sock = stack.enter_context(socket.create_connection(("127.0.0.1", metrics_port), timeout=15))
            sock.sendall(b"GET /hea")
            partial.append(sock)
        time.sleep(0.3)
        status, _, body = get(metrics_port, "/health")
        assert status == 200 and b'"status": "ok"' in body
        try:
            assert partial[0].recv(100) == b""
        except ConnectionResetError:
            pass  # aborted: either way, closed
    assert daemon.process.poll() is None


# ----- slow-DNS flood -----------------------------------------------------------------------------

DNS_TIMEOUT = 30  # the flood's queries cannot have failed before this


def test_slow_dns_flood_does_not_delay_a_normal_first_lookup(rig, start_daemon, flood_zone):
    # 3,000 lookups of domains whose DNS never answers are pending at once (clients waiting).
    # The first lookup of a normal domain is still answered before any of the flood's DNS
    # timeouts could have expired; when the flood's clients leave, their work is dropped.
    daemon, metrics_port = start_with_metrics(
        start_daemon, dns={"timeout": DNS_TIMEOUT},
        socketmap={"max_connections": 4000}, resolver={"max_pending": 4000})
    normal = rig.domain()
    rig.publish(normal)
    with ExitStack() as stack:
        flood_started = time.monotonic()
        flood = open_lookups(daemon.port, [f"f{n}.{flood_zone}" for n in range(3000)], stack)
        wait_for(lambda: value(scrape(metrics_port), "mtasts_resolutions_pending") >= 3000, DNS_TIMEOUT / 2,
                 "the flood to be pending")
        assert SocketmapClient(daemon.port, timeout=DNS_TIMEOUT).ask(normal) == "OK " + secure(normal)
        answered = time.monotonic()
        assert answered - flood_started < DNS_TIMEOUT
        assert value(scrape(metrics_port), "mtasts_resolutions_pending") >= 3000  # the flood is still there
        for sock in flood:
            sock.close()
        closed = time.monotonic()
        wait_for(lambda: value(scrape(metrics_port), "mtasts_resolutions_pending") == 0, DNS_TIMEOUT / 2,
                 "the abandoned flood to be dropped")
        assert time.monotonic() - flood_started < DNS_TIMEOUT  # dropped, not timed out
    m = scrape(metrics_port)
    assert value(m, "mtasts_resolutions_dropped_total", reason="abandoned") == 3000
    assert value(m, "mtasts_refreshes_total", outcome="failed") == 0  # none of them ran to a failure
    assert closed - flood_started < DNS_TIMEOUT
    assert daemon.process.poll() is None


def test_lookup_gets_the_dns_failure_answer_at_its_deadline(rig, start_daemon):
    # resolver.lookup_timeout: a lookup whose resolution is still running then gets the answer for
    # a DNS failure with nothing cached (NOTFOUND); the resolution carries on and is cached.
    daemon = start_daemon(resolver={"lookup_timeout": 1.5}, fetch={"timeout": 20})
    domain = rig.domain()
    rig.publish(domain, delay=4)
    client = SocketmapClient(daemon.port, timeout=20)
    started = time.monotonic()
    assert client.ask(domain) == "NOTFOUND "
    elapsed = time.monotonic() - started
    assert 1.5 - 0.05 <= elapsed < 1.5 + 2.0, elapsed  # at the deadline, long before the fetch ends
    assert f"lookup domain={domain} unanswered reason=timeout" in daemon.logs()
    wait_for(lambda: f"refresh domain={domain} outcome=fetched" in daemon.logs(), 15, "the fetch to finish")
    assert client.ask(domain) == "OK " + secure(domain)
    assert rig.https.count(domain) == 1


def test_lookup_beyond_max_pending_is_answered_at_once(rig, start_daemon, flood_zone):
    daemon = start_daemon(dns={"timeout": DNS_TIMEOUT}, resolver={"max_pending": 3})
    cached, new = rig.domain(), rig.domain()
    rig.publish(cached)
    rig.publish(new)
    client = SocketmapClient(daemon.port, timeout=DNS_TIMEOUT)
    assert client.ask(cached) == "OK " + secure(cached)
    with ExitStack() as stack:
        open_lookups(daemon.port, [f"p{n}.{flood_zone}" for n in range(3)], stack)
        wait_for(lambda: rig.dns.count(f"_mta-sts.p2.{flood_zone}") >= 1, 10, "the lookups to ask DNS")
        started = time.monotonic()
        assert client.ask(new) == "NOTFOUND "  # busy: as for a DNS failure, nothing cached
        assert client.ask(cached) == "OK " + secure(cached)  # cached answers need no room
        assert time.monotonic() - started < DNS_TIMEOUT
    assert f"lookup domain={new} unanswered reason=busy" in daemon.logs()
    wait_for(lambda: SocketmapClient(daemon.port, timeout=DNS_TIMEOUT).ask(new) == "OK " + secure(new),
             10, "room again once the flood's clients left")


# ----- shutdown -----------------------------------------------------------------------------------


def test_sigterm_during_a_flood_ends_within_the_drain_timeout(rig, start_daemon, flood_zone):
    # Worker threads stuck in HTTPS fetches that will take a minute, more queued behind them, and
    # lookups waiting on DNS that never answers: SIGTERM still ends the process with exit 0 within
    # drain_timeout, and every waiting client is told the daemon is stopping.
    drain = 4.0
    daemon = start_daemon(drain_timeout=drain, dns={"timeout": 30}, fetch={"timeout": 60, "connect_timeout": 10},
                          socketmap={"idle_timeout": 120})
    hanging = [rig.domain("hang") for _ in range(40)]  # more than the 32 worker threads
    for domain in hanging:
        rig.publish(domain, delay=60)
    with ExitStack() as stack:
        socks = open_lookups(daemon.port, [*hanging, *(f"s{n}.{flood_zone}" for n in range(200))], stack)
        wait_for(lambda: sum(rig.https.count(d) for d in hanging) >= 32, 20, "the workers to be stuck")
        time.sleep(0.5)
        started = time.monotonic()
        daemon.process.send_signal(signal.SIGTERM)
        code = daemon.process.wait(timeout=30)
        elapsed = time.monotonic() - started
        replies = []
        for sock in socks:
            sock.settimeout(5)
            data = b""
            try:
                while chunk := sock.recv(4096):
                    data += chunk
            except OSError:
                pass
            replies.append(data)
    assert code == 0
    # The lookups had until drain_timeout less a reserve (a quarter, at most 3 s) to finish.
    assert drain * 3 / 4 - 0.1 <= elapsed < drain + 3, elapsed
    assert set(replies) == {netstring(b"TEMP mtasts-policyd is stopping; try again")}
    assert "stopped" in daemon.logs()


def test_default_drain_timeout_fits_the_units_stop_timeout():
    stop = unit("mtasts-policyd.service")["Service"]["TimeoutStopSec"]
    assert stop.endswith("s") and Config().drain_timeout + 10 <= float(stop[:-1])


def test_client_that_never_reads_is_closed_after_idle_timeout(rig, start_daemon):
    daemon, metrics_port = start_with_metrics(start_daemon, socketmap={"idle_timeout": 2})
    domain = rig.domain()
    rig.publish(domain)
    assert SocketmapClient(daemon.port).ask(domain, "postfix-sts").startswith("OK secure")
    with socket.create_connection(("127.0.0.1", daemon.port)) as flood:
        flood.setblocking(False)
        chunk = netstring(f"postfix-sts {domain}".encode()) * 2000
        stalled_at = None
        while stalled_at is None or time.monotonic() - stalled_at < 0.5:
            try:
                flood.send(chunk)
                stalled_at = None
            except BlockingIOError:
                stalled_at = stalled_at or time.monotonic()
                time.sleep(0.02)
            except OSError:
                break  # already closed
        wait_for(lambda: value(scrape(metrics_port), "mtasts_socketmap_connections") == 0, 2 + 10,
                 "the connection that reads nothing to be closed")
        assert time.monotonic() - stalled_at >= 2 - 0.6  # not before idle_timeout
    assert "socketmap connection closed: replies not read for 2s" in daemon.logs()
