"""Prometheus metrics and /health of a real daemon process, and its SIGTERM drain."""

from __future__ import annotations

import configparser
import itertools
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import yaml

from mtasts_policyd.ops.metrics import FrontEndMetrics, Metrics, parse_metrics_address
from mtasts_policyd.resolution.resolver import CacheState, Decision, Outcome
from tests.conftest import ROOT, Daemon, SocketmapClient, free_port, secure
from tests.test_exim_protocol import exchange

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def http(port: int, raw: bytes, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read until the server closes; (status, headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(raw)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("ascii").split("\r\n")
    version, status, _ = lines[0].split(" ", 2)
    assert version == "HTTP/1.0"
    headers = dict(line.split(": ", 1) for line in lines[1:])
    assert raw.startswith(b"HEAD ") or int(headers["Content-Length"]) == len(body)
    return int(status), headers, body


def get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    return http(port, f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """Parse the text exposition format strictly: every line is a comment or a well-formed sample."""
    status, headers, body = get(port, "/metrics")
    assert status == 200 and headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    samples: dict[tuple[str, frozenset], float] = {}
    typed: set[str] = set()
    for line in body.decode().splitlines():
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
            continue
        if line.startswith("# HELP "):
            continue
        match = SAMPLE.match(line)
        assert match, f"bad sample line {line!r}"
        name, labels, value = match.groups()
        assert re.sub(r"_(bucket|sum|count)$", "", name) in typed, f"{name} has no TYPE line"
        key = (name, frozenset(LABEL.findall(labels or "")))
        assert key not in samples, f"duplicate sample {line!r}"
        samples[key] = float(value)
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture
def metrics_port() -> int:
    return free_port()


@pytest.fixture
def start_with_metrics(start_daemon, metrics_port):
    """start_daemon with a metrics listener, waiting for it too (it opens after the lookup listeners)."""

    def start(**extra: object) -> Daemon:
        daemon = start_daemon(metrics={"listen": f"127.0.0.1:{metrics_port}"}, **extra)
        deadline = time.monotonic() + 10
        while f"listening metrics=127.0.0.1:{metrics_port}" not in daemon.logs():
            assert time.monotonic() < deadline and daemon.process.poll() is None, daemon.logs()
            time.sleep(0.02)
        return daemon

    return start


def test_lookups_fetches_and_overrides_are_counted(rig, start_with_metrics, metrics_port):
    enforce, nothing, untrusted, missing = rig.domain(), rig.domain(), rig.domain(), rig.domain()
    ignored, forced = rig.domain(), rig.domain()
    rig.publish(enforce)
    rig.publish(untrusted, cert="untrusted")
    rig.publish(missing, status=404)
    daemon = start_with_metrics(overrides={
        ignored: {"action": "ignore", "reason": "ticket 1"},
        forced: {"action": "enforce", "mx": [f"mx.{forced}"], "reason": "ticket 2"},
    })
    client = SocketmapClient(daemon.port)
    assert client.ask(enforce) == "OK " + secure(enforce)  # miss
    assert client.ask(enforce) == "OK " + secure(enforce)  # hit
    assert client.ask(nothing) == "NOTFOUND "  # miss: no record
    assert client.ask(nothing) == "NOTFOUND "  # negative
    assert client.ask(untrusted) == "NOTFOUND "  # miss: certificate-invalid
    assert client.ask(untrusted) == "NOTFOUND "  # backoff
    assert client.ask(missing) == "NOTFOUND "  # miss: fetch-error
    assert client.ask(ignored) == "NOTFOUND "  # override ignore
    assert client.ask(forced).startswith("OK secure match=mx.")  # override enforce
    assert client.ask(forced).startswith("OK secure match=mx.")
    assert client.ask("." + enforce) == "NOTFOUND "  # not a policy domain
    assert client.ask(enforce, "nosuchmap").startswith("PERM ")
    assert exchange(daemon.exim_port, f"policy {enforce}\n".encode()).startswith(b"enforce ")
    assert exchange(daemon.exim_port, f"mx {ignored} mx.{ignored}\n".encode()) == b"none\n"
    assert exchange(daemon.exim_port, b"mx only-two-words\n").startswith(b"error ")

    m = scrape(metrics_port)
    lookups = {(dict(labels)["frontend"], dict(labels)["answer"], dict(labels)["cache"]): n
               for (name, labels), n in m.items() if name == "mtasts_lookups_total"}
    assert lookups == {
        ("socketmap", "OK", "miss"): 1, ("socketmap", "OK", "hit"): 1,
        ("socketmap", "NOTFOUND", "miss"): 3, ("socketmap", "NOTFOUND", "negative"): 1,
        ("socketmap", "NOTFOUND", "backoff"): 1, ("socketmap", "NOTFOUND", "override"): 1,
        ("socketmap", "OK", "override"): 2, ("socketmap", "NOTFOUND", "none"): 1,
        ("socketmap", "PERM", "none"): 1,
        ("exim", "enforce", "hit"): 1, ("exim", "none", "override"): 1, ("exim", "error", "none"): 1,
    }
    assert value(m, "mtasts_overrides_total", action="ignore") == 2
    assert value(m, "mtasts_overrides_total", action="enforce") == 2
    assert value(m, "mtasts_fetches_total", result="ok") == 1
    assert value(m, "mtasts_fetches_total", result="certificate-invalid") == 1
    assert value(m, "mtasts_fetches_total", result="fetch-error") == 1
    assert value(m, "mtasts_fetches_total", result="invalid-policy") == 0
    assert value(m, "mtasts_refresh_failures_total", kind="certificate-invalid") == 1
    assert value(m, "mtasts_refresh_failures_total", kind="fetch-error") == 1
    assert value(m, "mtasts_refresh_failures_total", kind="dns-temporary") == 0
    assert value(m, "mtasts_refreshes_total", outcome="fetched") == 1
    assert value(m, "mtasts_refreshes_total", outcome="no-policy") == 1
    assert value(m, "mtasts_refreshes_total", outcome="failed") == 2
    # The histogram observes every counted reply; buckets are cumulative and end at the count.
    for frontend, total in (("socketmap", 12), ("exim", 3)):
        assert value(m, "mtasts_lookup_seconds_count", frontend=frontend) == total
        buckets = sorted(((float(dict(labels)["le"]), n) for (name, labels), n in m.items()
                          if name == "mtasts_lookup_seconds_bucket" and dict(labels)["frontend"] == frontend))
        assert buckets[-1] == (float("inf"), total)
        assert all(a[1] <= b[1] for a, b in itertools.pairwise(buckets))
    assert value(m, "mtasts_lookup_seconds_sum", frontend="socketmap") > 0  # the misses were timed
    assert value(m, "mtasts_cache_entries", store="disk") == 4  # enforce, nothing, untrusted, missing
    assert value(m, "mtasts_cache_entries", store="memory") == 4
    assert value(m, "mtasts_cache_persistent") == 1
    assert value(m, "mtasts_socketmap_connections") == 1  # `client` is still open
    assert 0 < time.time() - value(m, "mtasts_process_start_time_seconds") < 120
    assert any(name == "mtasts_build_info" for name, _ in m)


def test_health(rig, start_with_metrics, metrics_port, tmp_path):
    daemon = start_with_metrics()
    status, headers, body = get(metrics_port, "/health")
    health = json.loads(body)
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert health["status"] == "ok" and health["cache"]["persistent"] is True
    assert health["cache"]["path"] == str(tmp_path / "cache.sqlite3") and health["uptime_seconds"] >= 0
    status, headers, body = http(metrics_port, b"HEAD /health HTTP/1.0\r\n\r\n")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0
    with socket.create_connection(("127.0.0.1", metrics_port), timeout=10) as sock:  # half-closing client
        sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.0 200 OK\r\n") and b"mtasts_build_info{" in data
    assert daemon.process.poll() is None


def test_health_reports_a_cache_that_is_not_persistent(rig, start_with_metrics, metrics_port, tmp_path):
    # Still 200: the daemon answers from memory; a restart would not mend the disk.
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the cache directory should be")
    start_with_metrics(cache_path=blocked / "cache.sqlite3")
    status, _, body = get(metrics_port, "/health")
    assert status == 200
    assert json.loads(body)["status"] == "degraded" and json.loads(body)["cache"]["persistent"] is False
    m = scrape(metrics_port)
    assert value(m, "mtasts_cache_persistent") == 0
    assert ("mtasts_cache_entries", frozenset({("store", "disk")})) not in m


BAD_REQUESTS = [
    (b"garbage\r\n\r\n", 400),
    (b"GET /metrics\r\n\r\n", 400),  # HTTP/0.9 request line
    (b"GET metrics HTTP/1.1\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.1\r\nX-Long: " + b"a" * 9000, 400),  # headers never end within the limit
    (b"GET /metrics HTTP/1.1\r\n", 400),  # EOF before the end of the headers
    (b"\xff\xfe\x00\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n\r\n", 404),
    (b"GET /metrics/../etc HTTP/1.1\r\n\r\n", 404),
    (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405),
]


def test_bad_http_requests(rig, start_with_metrics, metrics_port):
    daemon = start_with_metrics()
    for raw, expected in BAD_REQUESTS:
        data = b""
        try:
            with socket.create_connection(("127.0.0.1", metrics_port), timeout=10) as sock:
                sock.sendall(raw)
                if not raw.endswith(b"\r\n\r\n"):
                    sock.shutdown(socket.SHUT_WR)
                while chunk := sock.recv(65536):
                    data += chunk
        except ConnectionResetError:
            # Refused before all was read: closing with unread input resets, which may beat the reply.
            assert len(raw) > 8192 and not data
            continue
        assert data.startswith(b"HTTP/1.0 %d " % expected), (raw[:40], data[:40])
    # The daemon is undisturbed: lookups and scrapes still work.
    domain = rig.domain()
    rig.publish(domain)
    assert SocketmapClient(daemon.port).ask(domain) == "OK " + secure(domain)
    assert value(scrape(metrics_port), "mtasts_lookups_total", frontend="socketmap", answer="OK", cache="miss") == 1
    assert daemon.process.poll() is None
    assert "metrics http status=405 request=b'POST /metrics HTTP/1.1\\r'" in daemon.logs()


def test_metrics_listener_only_when_configured(rig, start_daemon, tmp_path):
    daemon = start_daemon()
    logs = daemon.logs()
    assert "listening socketmap=" in logs and "listening exim=" in logs
    assert "listening metrics=" not in logs
    # --metrics with a bare port: loopback.
    port, metrics_port = free_port(), free_port()
    data = rig.config(tmp_path / "flag.sqlite3", socketmap={"listen": [f"127.0.0.1:{port}"]}, exim={"listen": []})
    path = tmp_path / "flag.yaml"
    path.write_text(yaml.safe_dump(data))
    flagged = Daemon(path, port, tmp_path / "flag.log", args=["--metrics", str(metrics_port)]).start()
    try:
        deadline = time.monotonic() + 10
        while "listening metrics=" not in flagged.logs() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert f"listening metrics=127.0.0.1:{metrics_port}" in flagged.logs()
        assert get(metrics_port, "/health")[0] == 200
    finally:
        assert flagged.stop() == 0


def test_bad_metrics_address_is_a_config_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("metrics: {listen: 'nonsense'}\n")
    result = subprocess.run([sys.executable, "-m", "mtasts_policyd", "serve", "--config", str(path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "metrics.listen" in result.stderr
    assert parse_metrics_address(":9461") == parse_metrics_address("127.0.0.1:9461")


def test_sigterm_drains_lookups_in_flight(rig, start_with_metrics, metrics_port):
    # A lookup waiting on a slow policy fetch when SIGTERM arrives is still answered; then exit 0.
    domain = rig.domain()
    rig.publish(domain, delay=2)
    daemon = start_with_metrics()
    replies: dict[str, object] = {}
    exim = threading.Thread(target=lambda: replies.update(exim=exchange(daemon.exim_port, f"{domain}\n".encode())))
    exim.start()
    deadline = time.monotonic() + 10
    while rig.https.count(domain) < 1 and time.monotonic() < deadline:  # Exim's lookup is fetching
        time.sleep(0.02)
    client = SocketmapClient(daemon.port)
    socketmap = threading.Thread(target=lambda: replies.update(socketmap=client.ask(domain)))
    socketmap.start()
    while value(scrape(metrics_port), "mtasts_socketmap_connections") < 1 and time.monotonic() < deadline:
        time.sleep(0.02)  # accepted: a connection the daemon has taken is served until the end
    assert rig.https.count(domain) == 1 and not replies
    daemon.process.send_signal(signal.SIGTERM)
    while "stopping: draining" not in daemon.logs() and time.monotonic() < deadline:
        time.sleep(0.02)
    status, _, body = get(metrics_port, "/health")  # still answering, but saying it is going away
    assert status == 503 and json.loads(body)["status"] == "stopping"
    socketmap.join(timeout=15)
    exim.join(timeout=15)
    assert replies == {"socketmap": "OK " + secure(domain), "exim": f"enforce mx1.{domain} *.mx.{domain}\n".encode()}
    assert daemon.process.wait(timeout=15) == 0
    assert "stopped" in daemon.logs()
    with pytest.raises(OSError):  # the listeners are gone
        socket.create_connection(("127.0.0.1", daemon.port), timeout=2)


def test_registry_render_and_thread_counters():
    metrics = Metrics()
    front: FrontEndMetrics = metrics.frontends["socketmap"]
    hit = Decision("example.com", None, CacheState.HIT)
    front.answered("OK", hit)
    front.answered("OK", hit, 0.3)
    front.answered("NOTFOUND", None, 50.0)
    threads = [threading.Thread(target=lambda: [metrics.fetched("ok") for _ in range(1000)]) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    metrics.resolved(Outcome.CHANGED)
    text = metrics.render([("x_gauge", "gauge", "a \"test\"", [({"l": 'a"b\\c\nd'}, 1.5)])])
    assert 'mtasts_lookups_total{frontend="socketmap",answer="OK",cache="hit"} 2\n' in text
    assert 'mtasts_lookups_total{frontend="socketmap",answer="NOTFOUND",cache="none"} 1\n' in text
    assert 'mtasts_lookup_seconds_bucket{frontend="socketmap",le="5e-05"} 1\n' in text  # untimed: 0 s
    assert 'mtasts_lookup_seconds_bucket{frontend="socketmap",le="0.25"} 1\n' in text
    assert 'mtasts_lookup_seconds_bucket{frontend="socketmap",le="0.5"} 2\n' in text
    assert 'mtasts_lookup_seconds_bucket{frontend="socketmap",le="30.0"} 2\n' in text
    assert 'mtasts_lookup_seconds_bucket{frontend="socketmap",le="+Inf"} 3\n' in text
    assert 'mtasts_lookup_seconds_sum{frontend="socketmap"} 50.3\n' in text
    assert 'mtasts_lookup_seconds_count{frontend="socketmap"} 3\n' in text
    assert 'mtasts_fetches_total{result="ok"} 4000\n' in text
    assert 'mtasts_refreshes_total{outcome="changed"} 1\n' in text
    assert 'x_gauge{l="a\\"b\\\\c\\nd"} 1.5\n' in text


CONTRIB = ROOT / "contrib"


def unit(name: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False)  # systemd repeats keys (SystemCallFilter=)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((CONTRIB / "systemd" / name).read_text())
    return parser


def test_service_files(tmp_path):
    daemon = unit("mtasts-policyd.service")
    assert daemon["Service"]["User"] == "mtasts-policyd" and daemon["Service"]["StateDirectory"] == "mtasts-policyd"
    assert daemon["Service"]["ExecStart"].endswith("mtasts-policyd serve --config /etc/mtasts-policyd.yaml")
    assert daemon["Service"]["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert daemon["Service"]["Type"] == "notify"  # the daemon sends READY=1 (tests/test_lifecycle.py)
    warm = unit("mtasts-policyd-warm.service")
    assert warm["Service"]["User"] == "mtasts-policyd" and warm["Service"]["Type"] == "oneshot"
    assert warm["Service"]["ExecStart"].endswith("mtasts-policyd warm --config /etc/mtasts-policyd.yaml")
    timer = unit("mtasts-policyd-warm.timer")
    assert timer["Timer"]["OnCalendar"] == "daily" and timer["Timer"]["RandomizedDelaySec"]
    cron = [line.split(None, 6) for line in (CONTRIB / "cron" / "mtasts-policyd").read_text().splitlines()
            if line.strip() and not line.startswith("#") and "=" not in line.split()[0]]
    assert len(cron) == 1 and cron[0][5] == "mtasts-policyd"
    assert cron[0][6].startswith("mtasts-policyd warm --config /etc/mtasts-policyd.yaml")
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return  # the INI checks above are what we can do here
    for name in ("mtasts-policyd.service", "mtasts-policyd-warm.service", "mtasts-policyd-warm.timer"):
        # ExecStart must name an existing binary for `verify`: point it at this Python.
        text = (CONTRIB / "systemd" / name).read_text().replace("/opt/mtasts-policyd/bin/mtasts-policyd", sys.executable)
        (tmp_path / name).write_text(text)
    result = subprocess.run([analyze, "verify", "--man=no", *sorted(str(p) for p in tmp_path.iterdir())],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
