"""A real redis-server (the Debian package) on loopback, for the fleet tests (README "Fleet (Redis)").

Each server is its own process on a free port, with no persistence, bounded like every rig server:
killed at `lifetime` by the watchdog, and by the kernel if the test process dies first (parent
death signal). The tests stop (SIGSTOP), kill and restart it; `replica_of` makes a read-only
replica (the primary syncs it at once: `--repl-diskless-sync-delay 0`).
"""

from __future__ import annotations

import ctypes
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis
import trustme

from .bounded import BoundedServer

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer(BoundedServer):
    """redis-server on 127.0.0.1:port; `users`: ACL lines (e.g. "user fleet on >secret ~* &* +@all")."""

    def __init__(self, *, lifetime: float = 300, replica_of: RedisServer | None = None,
                 users: tuple[str, ...] = (), tls: trustme.CA | None = None) -> None:
        super().__init__("127.0.0.1", _free_port(), lifetime)
        self.replica_of = replica_of
        self.users = users
        self.tls = tls  # also listen with TLS on tls_port, with a certificate for 127.0.0.1 from this CA
        self.tls_port = _free_port() if tls is not None else None
        self.dir = Path(tempfile.mkdtemp(prefix="mtasts-redis-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def tls_url(self) -> str:
        return f"rediss://127.0.0.1:{self.tls_port}/0"

    def client(self) -> redis.Redis:
        """An admin client (the default user) for the tests' own looks and changes."""
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def _argv(self) -> list[str]:
        argv = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.dir), "--repl-diskless-sync-delay", "0", "--daemonize", "no",
                "--logfile", str(self.dir / "redis.log")]
        if self.replica_of is not None:
            argv += ["--replicaof", "127.0.0.1", str(self.replica_of.port)]
        if self.tls is not None:
            cert = self.tls.issue_cert("127.0.0.1")
            cert.private_key_pem.write_to_path(str(self.dir / "key.pem"))
            cert.cert_chain_pems[0].write_to_path(str(self.dir / "cert.pem"))
            self.tls.cert_pem.write_to_path(str(self.dir / "ca.pem"))
            argv += ["--tls-port", str(self.tls_port), "--tls-cert-file", str(self.dir / "cert.pem"),
                     "--tls-key-file", str(self.dir / "key.pem"), "--tls-ca-cert-file", str(self.dir / "ca.pem"),
                     "--tls-auth-clients", "no"]
        if self.users:
            acl = self.dir / "users.acl"
            acl.write_text("user default on nopass ~* &* +@all\n" + "".join(f"{u}\n" for u in self.users))
            argv += ["--aclfile", str(acl)]
        return argv

    def _serve(self) -> None:
        self.process = subprocess.Popen(self._argv(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        self.wait_ready()

    def wait_ready(self, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self.log()}")
            try:
                with self.client() as c:
                    c.ping()
                    if self.replica_of is None or c.info("replication").get("master_link_status") == "up":
                        return
            except redis.RedisError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"redis-server not ready: {self.log()}")

    def log(self) -> str:
        path = self.dir / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def kill(self) -> None:
        """SIGTERM and wait: redis-server gone (its data too: nothing is saved)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)

    def restart(self) -> None:
        """A new, empty redis-server on the same port."""
        self.kill()
        self._serve()

    def _shutdown(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
