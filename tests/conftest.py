"""Shared fixtures: one real DNS server and one real HTTPS policy server for the whole run,
helpers that publish a domain on them, and a real daemon process started on demand."""

from __future__ import annotations

import itertools
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from mtasts_policyd.net.dns import DnsDiscovery, DnsSettings
from mtasts_policyd.net.https import FetchSettings, PolicyFetcher
from mtasts_policyd.resolution.resolver import PolicyResolver, ResolverSettings
from mtasts_policyd.store.cache import PolicyCache
from tests.bodies import ENFORCE
from tests.rig import DnsServer, PolicyServer

if TYPE_CHECKING:
    from mtasts_policyd.store.cache import Entry

ROOT = Path(__file__).resolve().parent.parent
# The real-world corpus (README "What the parser accepts") is carried in the repository, bytes
# exact (tests/corpus/.gitattributes), so a plain clone runs every test. SHARED_CORPUS is where the
# collected original lives beside a development checkout; test_corpus.py checks the copy against it.
CORPUS = ROOT / "tests" / "corpus"
SHARED_CORPUS = ROOT.parent / "shared" / "corpus"
_serial = itertools.count(1)


def secure(domain: str) -> str:
    """The Postfix answer for ENFORCE with the MX hosts `publish` gives: "*.mx.d" -> a.mx.d."""
    return f"secure match=mx1.{domain}:a.mx.{domain} servername=hostname"


@dataclass
class Rig:
    dns: DnsServer
    https: PolicyServer

    def domain(self, label: str = "d") -> str:
        """A fresh domain name, so tests sharing the servers never see each other's data."""
        return f"{label}{next(_serial)}.example.test"

    def publish(self, domain: str, body: str | None = None, *, id: str = "1", ttl: int = 300, **http: object) -> None:
        """Publish _mta-sts TXT, the policy host's address, the policy body and MX hosts."""
        self.dns.set(f"_mta-sts.{domain}", "TXT", f"v=STSv1; id={id}", ttl=ttl)
        self.dns.set(domain, "MX", f"10 mx1.{domain}.", f"20 a.mx.{domain}.", ttl=ttl)
        self.dns.set(f"mta-sts.{domain}", "A", "127.0.0.1")
        self.https.set_policy(domain, (body if body is not None else ENFORCE).format(d=domain), **http)

    def dns_settings(self) -> DnsSettings:
        return DnsSettings(nameservers=("127.0.0.1",), port=self.dns.port, timeout=2.0)

    def fetch_settings(self, **overrides: object) -> FetchSettings:
        values = dict(ca_file=self.https.ca_file, port=self.https.port, timeout=5.0, connect_timeout=2.0)
        values.update(overrides)
        return FetchSettings(**values)  # type: ignore[arg-type]

    def config(self, cache_path: Path, **extra: object) -> dict:
        """A daemon config file's contents pointing at the test servers."""
        data: dict = {
            "dns": {"nameservers": ["127.0.0.1"], "port": self.dns.port, "timeout": 2},
            "fetch": {"ca_file": self.https.ca_file, "port": self.https.port, "timeout": 5, "connect_timeout": 2},
            "cache": {"path": str(cache_path)},
        }
        for key, value in extra.items():
            data.setdefault(key, {})
            data[key] = {**data[key], **value} if isinstance(value, dict) else value
        return data


def cli_command(*args: str) -> list[str]:
    """argv of the `mtasts-policyd` command run from this checkout."""
    return [sys.executable, "-m", "mtasts_policyd", *args]


def run_cli(*args: str, input: str | None = None, timeout: float = 60,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `mtasts-policyd ARGS...` to completion, text output captured; never raises on exit status.
    `env`: the whole environment (None: this process's)."""
    return subprocess.run(cli_command(*args), cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          input=input, env=env, check=False)


def write_config(rig: "Rig", directory: Path, cache: Path | None = None, *, create_cache: bool = True,
                 name: str | None = None, **extra: object) -> str:
    """A YAML config on the test servers (see Rig.config) in `directory`; returns its path.

    The cache file exists afterwards, as after the daemon's first start (only `serve` and
    `cache import` create one); create_cache=False leaves it absent.
    """
    cache = cache or directory / "cache.sqlite3"
    path = directory / (name or f"{cache.stem}.yaml")
    path.write_text(yaml.safe_dump(rig.config(cache, **extra)))
    if create_cache:
        PolicyCache(str(cache)).close()
    return str(path)


def stored_entry(path: Path | str, domain: str) -> Entry | None:
    """What another process reads for `domain` from the cache file now (opened and closed here)."""
    with closing(PolicyCache(str(path))) as cache:
        return cache.get(domain)


@pytest.fixture
def open_cache() -> Iterator[Callable[..., PolicyCache]]:
    """Open caches for a test (`open_cache(path, **options)`); each is closed at its end, pass or fail."""
    opened: list[PolicyCache] = []

    def open_(path: Path | str, **options: Any) -> PolicyCache:
        cache = PolicyCache(str(path), **options)
        opened.append(cache)
        return cache

    yield open_
    for cache in opened:
        cache.close()


@pytest.fixture(scope="session")
def rig() -> Iterator[Rig]:
    with DnsServer(lifetime=1800) as dns_server, PolicyServer(lifetime=1800) as https:
        yield Rig(dns_server, https)


class Clock:
    """A settable clock for the resolver, so max_age and TTL expiry are tested without sleeping."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def fake_net():
    """In-memory DNS and policy hosts (tests/fakes.py) for the fast tier."""
    from tests.fakes import FakeNet  # here: tests/fakes.py imports this module
    return FakeNet()


@pytest.fixture
def make_fake_resolver(fake_net, clock: Clock):
    """Build a resolver on the fakes with an in-memory cache and the test clock: no sockets."""
    made: list[PolicyResolver] = []

    def make(counters: object = None, **settings: object) -> PolicyResolver:
        resolver = PolicyResolver(PolicyCache(None), fake_net.dns, fake_net.https,  # memory only
                                  ResolverSettings(**settings), clock=clock, counters=counters)  # type: ignore[arg-type]
        made.append(resolver)
        return resolver

    yield make
    for resolver in made:
        resolver.cache.close()


class FastTierGuard:
    """What a test marked `fast` tried and must not: every socket it opened (asyncio's own
    socketpair aside, which wraps descriptors that exist already) and every process it started.
    Each attempt raises, and the test fails at teardown even where the code under test caught the
    error (warm, for one, turns any exception into a `failed` domain)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.violations: list[str] = []
        real_socket_init = socket.socket.__init__

        def guarded_socket(sock: socket.socket, family: int = -1, type: int = -1, proto: int = -1,
                           fileno: int | None = None) -> None:
            if fileno is None:
                self._refuse(f"socket(family={family}, type={type})")
            real_socket_init(sock, family, type, proto, fileno)

        def guarded_popen(process: subprocess.Popen, args: object, *more: object, **options: object) -> None:
            self._refuse(f"subprocess {args!r}")

        monkeypatch.setattr(socket.socket, "__init__", guarded_socket)
        monkeypatch.setattr(subprocess.Popen, "__init__", guarded_popen)

    def _refuse(self, what: str) -> None:
        self.violations.append(what)
        raise RuntimeError(f"a test marked fast must not open sockets or start processes: {what}")


@pytest.fixture(autouse=True)
def fast_tier_guard(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[FastTierGuard | None]:
    """Keeps the fast tier honest (pyproject.toml's `fast` marker): no sockets, no subprocesses."""
    if request.node.get_closest_marker("fast") is None:
        yield None
        return
    guard = FastTierGuard(monkeypatch)
    yield guard
    if guard.violations:
        pytest.fail(f"marked fast, but tried: {'; '.join(guard.violations)}")


@pytest.fixture
def make_resolver(rig: Rig, tmp_path: Path, clock: Clock):
    """Build a resolver on the real servers with a disk cache in tmp_path and the test clock."""
    made: list[PolicyResolver] = []

    def make(cache_path: Path | None = None, **settings: object) -> PolicyResolver:
        discovery = DnsDiscovery(rig.dns_settings())
        cache = PolicyCache(str(cache_path or tmp_path / "cache.sqlite3"))
        resolver = PolicyResolver(cache, discovery, PolicyFetcher(discovery, rig.fetch_settings()),
                                  ResolverSettings(**settings), clock=clock)  # type: ignore[arg-type]
        made.append(resolver)
        return resolver

    yield make
    for resolver in made:
        resolver.cache.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Daemon:
    """A real `mtasts-policyd serve` process."""

    config_path: Path | None  # None: no --config, the embedded defaults
    port: int
    log_path: Path
    exim_port: int | None = None
    process: subprocess.Popen | None = None
    args: list[str] = field(default_factory=list)
    wrapper: list[str] = field(default_factory=list)  # e.g. nsenter into a mount namespace; must exec
    env: dict[str, str] | None = None  # None: this process's environment

    def start(self) -> "Daemon":
        self.log = open(self.log_path, "ab")
        config = [] if self.config_path is None else ["--config", str(self.config_path)]
        self.process = subprocess.Popen(
            [*self.wrapper, *cli_command("serve", *config, *self.args)],
            cwd=ROOT, stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL, env=self.env)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"daemon exited: {self.log_path.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("daemon did not start listening")

    def stop(self) -> int:
        assert self.process is not None
        self.process.terminate()
        try:
            code = self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait(timeout=5)
        self.log.close()
        return code

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def start_daemon(rig: Rig, tmp_path: Path):
    """Start real daemons; each is stopped at the end of the test."""
    running: list[Daemon] = []

    def start(cache_path: Path | None = None, port: int | None = None, *, wrapper: list[str] | None = None,
              env: dict[str, str] | None = None, **extra: object) -> Daemon:
        port = port or free_port()
        data = rig.config(cache_path or tmp_path / "cache.sqlite3", **extra)
        data.setdefault("socketmap", {}).setdefault("listen", [f"127.0.0.1:{port}"])
        exim_port = free_port()
        while exim_port == port:  # both are free until the daemon binds them: the kernel may hand out one twice
            exim_port = free_port()
        data.setdefault("exim", {}).setdefault("listen", [f"127.0.0.1:{exim_port}"])
        path = tmp_path / f"config{len(running)}.yaml"
        path.write_text(yaml.safe_dump(data))
        daemon = Daemon(path, port, tmp_path / f"daemon{len(running)}.log", exim_port=exim_port,
                        wrapper=wrapper or [], env=env).start()
        running.append(daemon)
        return daemon

    yield start
    for daemon in running:
        if daemon.process is not None and daemon.process.poll() is None:
            daemon.stop()


def netstring(data: bytes) -> bytes:
    return b"%d:%s," % (len(data), data)


def ask_unix(path: Path, key: str, name: str = "postfix") -> str:
    """One socketmap request over a unix socket; the reply without its netstring frame."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(netstring(f"{name} {key}".encode()))
        data = b""
        while not data.endswith(b","):
            chunk = sock.recv(4096)
            assert chunk, "connection closed before the reply"
            data += chunk
    return data.decode().split(":", 1)[1][:-1]


class SocketmapClient:
    """A minimal socketmap client for protocol tests (postmap is the real Postfix client)."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buffer = b""

    def send(self, raw: bytes) -> None:
        self.sock.sendall(raw)

    def read_reply(self) -> str | None:
        """One netstring reply, or None if the server closed the connection."""
        while True:
            colon = self.buffer.find(b":")
            if colon > 0:
                length = int(self.buffer[:colon])
                if len(self.buffer) >= colon + length + 2:
                    data = self.buffer[colon + 1:colon + 1 + length]
                    assert self.buffer[colon + 1 + length:colon + 2 + length] == b","
                    self.buffer = self.buffer[colon + length + 2:]
                    return data.decode()
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buffer += chunk

    def ask(self, key: str, name: str = "postfix") -> str | None:
        self.send(netstring(f"{name} {key}".encode()))
        return self.read_reply()

    def close(self) -> None:
        self.sock.close()
