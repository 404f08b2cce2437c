"""Start, reload and stop of a real daemon process: systemd readiness (sd_notify(3)), SIGHUP from
the first moment, and one daemon per unix socket path."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import yaml

from mtasts_policyd.runtime import sdnotify
from tests.conftest import ROOT, SocketmapClient, ask_unix, free_port, secure


class NotifySocket:
    """The service manager's end of NOTIFY_SOCKET: a unix datagram socket bound by the test."""

    def __init__(self, address: str) -> None:
        self.address = address  # a path, or "@name" for the abstract namespace
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)

    def receive(self, timeout: float = 20.0) -> dict[str, str] | None:
        """One notification as {VAR: VALUE}, or None if none came within `timeout`."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return None
        return dict(line.split("=", 1) for line in data.decode().splitlines())

    def close(self) -> None:
        self.sock.close()


def launch(rig, tmp_path: Path, notify: str | None = None, **extra: object) -> tuple[subprocess.Popen, int, Path]:
    """`mtasts-policyd serve` as systemd would start it (NOTIFY_SOCKET set); no waiting."""
    port = free_port()
    data = rig.config(tmp_path / "cache.sqlite3", socketmap={"listen": [f"127.0.0.1:{port}"]},
                      exim={"listen": []}, **extra)
    config = tmp_path / f"config-{port}.yaml"
    config.write_text(yaml.safe_dump(data))
    log = tmp_path / f"daemon-{port}.log"
    env = dict(os.environ, NOTIFY_SOCKET=notify) if notify else None
    with open(log, "ab") as out:
        process = subprocess.Popen([sys.executable, "-m", "mtasts_policyd", "serve", "--config", str(config)],
                                   cwd=ROOT, stdout=out, stderr=out, stdin=subprocess.DEVNULL, env=env)
    return process, port, log


def stop(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=5)


def test_ready_after_listeners_reloading_and_stopping(rig, tmp_path):
    domain = rig.domain()
    rig.publish(domain)
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    process, port, log = launch(rig, tmp_path, notify=notify.address)
    try:
        assert notify.receive() == {"READY": "1"}, log.read_text()
        # READY=1 only once the socketmap port accepts and lookups are answered.
        assert SocketmapClient(port).ask(domain) == "OK " + secure(domain)
        process.send_signal(signal.SIGHUP)
        reloading = notify.receive()
        assert reloading is not None and reloading["RELOADING"] == "1"
        # Type=notify-reload (systemd >= 253) wants the CLOCK_MONOTONIC time of the reload.
        assert abs(int(reloading["MONOTONIC_USEC"]) - time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000) < 60e6
        assert notify.receive() == {"READY": "1"}
        assert "reloaded configuration" in log.read_text()
        assert stop(process) == 0
        assert notify.receive() == {"STOPPING": "1"}
    finally:
        if process.poll() is None:
            process.kill()
        notify.close()


def _catches_hup(pid: int) -> bool:
    """Whether the process has a handler for SIGHUP (its first Python statements install one)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    caught = next(line for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) & (1 << (signal.SIGHUP - 1)))


def test_sighup_during_start_up_never_kills_and_is_applied_once_ready(rig, tmp_path):
    # From the first Python statement (before the imports, the configuration, the cache and the
    # listeners) until READY=1, a stream of SIGHUPs; the daemon must come up and then reload.
    # (Before that statement the interpreter itself is starting: no program can catch it then,
    # and systemd sends no reload before READY=1.)
    notify = NotifySocket(f"@mtasts-test-{uuid.uuid4().hex}")
    process, port, log = launch(rig, tmp_path, notify=notify.address)
    try:
        deadline = time.monotonic() + 15
        while not _catches_hup(process.pid):
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.001)
        with socket.socket() as probe:  # the storm begins while the daemon is still starting
            assert probe.connect_ex(("127.0.0.1", port)) != 0
        sent = 0
        message = None
        while message is None:
            assert time.monotonic() < deadline + 15, "no READY=1"
            process.send_signal(signal.SIGHUP)
            sent += 1
            message = notify.receive(timeout=0.005)
        assert process.poll() is None, log.read_text()
        assert message == {"READY": "1"} and sent > 1
        following = [notify.receive(timeout=10) for _ in range(2)]
        assert following[0] is not None and following[0]["RELOADING"] == "1"  # the queued SIGHUP, applied
        assert following[1] == {"READY": "1"}
        assert SocketmapClient(port).ask(".example.test") == "NOTFOUND "
        assert stop(process) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
        notify.close()


def test_sdnotify_without_or_with_a_dead_socket_is_harmless(tmp_path, monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert sdnotify.ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")  # not supported: ignored
    assert sdnotify.ready() is False
    listener = NotifySocket(str(tmp_path / "n.sock"))
    monkeypatch.setenv("NOTIFY_SOCKET", listener.address)
    assert sdnotify.stopping() is True and listener.receive(timeout=5) == {"STOPPING": "1"}
    listener.close()


# ----- one daemon per unix socket path -----------------------------------------------------------


def serve_once(rig, tmp_path: Path, path: Path) -> subprocess.CompletedProcess:
    """A daemon on the unix socket `path` that is expected to refuse to start."""
    data = rig.config(tmp_path / "second.sqlite3", socketmap={"listen": [f"unix:{path}"]}, exim={"listen": []})
    config = tmp_path / "second.yaml"
    config.write_text(yaml.safe_dump(data))
    return subprocess.run([sys.executable, "-m", "mtasts_policyd", "serve", "--config", str(config)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_second_daemon_on_a_unix_socket_path_refuses_and_a_stale_one_is_replaced(rig, start_daemon, tmp_path):
    domain = rig.domain()
    rig.publish(domain)
    path = tmp_path / "run" / "socketmap.sock"
    port = free_port()
    first = start_daemon(port=port, socketmap={"listen": [f"unix:{path}", f"127.0.0.1:{port}"]})
    assert ask_unix(path, domain) == "OK " + secure(domain)
    second = serve_once(rig, tmp_path, path)
    assert second.returncode == 1
    assert f"cannot start: unix:{path} is in use by another mtasts-policyd" in second.stderr
    assert "Traceback" not in second.stderr
    assert ask_unix(path, domain) == "OK " + secure(domain)  # the first one still serves, on its socket
    # A daemon killed without a chance to clean up leaves its socket file: the next one takes it.
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(timeout=10)
    first.log.close()
    assert path.is_socket()
    port = free_port()
    start_daemon(port=port, socketmap={"listen": [f"unix:{path}", f"127.0.0.1:{port}"]})
    assert ask_unix(path, domain) == "OK " + secure(domain)


def test_unix_socket_path_served_by_another_program_is_not_taken(rig, tmp_path):
    path = tmp_path / "other.sock"
    with socket.socket(socket.AF_UNIX) as other:
        other.bind(str(path))
        other.listen()
        result = serve_once(rig, tmp_path, path)
        assert result.returncode == 1 and "is in use by another process (it accepts connections)" in result.stderr
        assert path.is_socket()


def test_unix_socket_path_that_is_not_a_socket_is_left_alone(rig, tmp_path):
    path = tmp_path / "not-a-socket"
    path.write_text("a regular file")
    result = serve_once(rig, tmp_path, path)
    assert result.returncode == 1 and "exists and is not a socket" in result.stderr
    assert path.read_text() == "a regular file"
