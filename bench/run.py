#!/usr/bin/env python3
"""Benchmark: mtasts-policyd against postfix-mta-sts-resolver 1.5.1 (the peer), same machine, same run.

Prints figures; it is not a test. Run as root from the project root:

    python bench/run.py

What it does (see bench/README.md for the reasoning):
  * creates bench/.venv-peer (git-ignored) with postfix-mta-sts-resolver==1.5.1 if it is missing;
  * re-runs itself inside a new mount + network namespace (`unshare -mn`): only a loopback
    interface exists there, and a private resolv.conf ("nameserver 127.0.0.1") is bind-mounted
    over /etc/resolv.conf, so the peer's system resolver (aiodns/c-ares) reaches only the test
    DNS server on 127.0.0.1:53, and its HTTPS client only the test policy server on 127.0.0.1:443
    (trusted through SSL_CERT_FILE = the throwaway test CA);
  * starts the test DNS server and HTTPS policy server (tests/rig) in two separate processes, then
    for each settings profile (defaults: nothing configured but the listener; tuned: quiet logs
    and the settings each documents for speed) both daemons; warms each up (every domain once), checks a
    sample of answers exactly, then measures cached lookups at 1/8/64 connections and cold bursts,
    every row --repeat times per daemon, alternating which goes first (medians are printed);
  * stops everything it started (try/finally, SIGALRM lifetime bound, parent-death signal).

Load generator: bench/loadgen.c (epoll, raw netstrings, one outstanding request per connection,
as Postfix does), compiled at run time; an asyncio client here is the fallback. Its CPU use is
printed per row, so a saturated client would show. Every reply is checked.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import ctypes
import json
import os
import platform
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PEER_PACKAGE = "postfix-mta-sts-resolver"
PEER_VERSION = "1.5.1"
DEFAULT_VENV = BENCH / ".venv-peer"
OURS_PORT = 18461
PEER_PORT = 18462
MAP_NAME = "postfix"
ENFORCE = "version: STSv1\nmode: enforce\nmx: mx1.{d}\nmx: *.mx.{d}\nmax_age: 86400\n"
LONG_TTL = 3600  # TXT and negative TTL: nothing expires or refreshes during the run
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------------------------
# Domain sets (deterministic, so every process derives the same names from the same numbers)
# --------------------------------------------------------------------------------------------

SETTINGS = ("defaults", "tuned")  # how both daemons are configured: see bench/README.md


def settings_of(args: argparse.Namespace) -> tuple[str, ...]:
    return SETTINGS if args.settings == "both" else (args.settings,)


def domain_sets(total: int, policy_share: float, cold: int, repeat: int, profile: bool = False,
                settings: tuple[str, ...] = SETTINGS) -> dict[str, list[str]]:
    n_policy = max(1, round(total * policy_share))
    sets = {
        "none": [f"n{i}.nopolicy.bench.test" for i in range(total - n_policy)],
        "policy": [f"p{i}.policy.bench.test" for i in range(n_policy)],
        "cold-profile": [f"c{i}.cold-profile.bench.test" for i in range(cold if profile else 0)],
    }
    for setting in settings:
        for name in ("ours", "peer"):  # a fresh set for every cold burst: never seen by anybody
            for rep in range(repeat):
                tag = f"{setting}-{name}-{rep}"
                sets[f"cold-{tag}"] = [f"c{i}.cold-{tag}.bench.test" for i in range(cold)]
    return sets


def published(sets: dict[str, list[str]]) -> list[str]:
    return [d for key, domains in sets.items() if key != "none" for d in domains]


# --------------------------------------------------------------------------------------------
# Child-process helpers
# --------------------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL if the benchmark driver dies, whatever the reason."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    os.setpgid(0, 0)


def cpu_seconds(pid: int, part: str = "all") -> float:
    """utime + stime (or one of them: part "user" / "sys") of a process, all its threads, from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    user, system = int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK
    return {"all": user + system, "user": user, "sys": system}[part]


def set_affinity(pid: int, cpus: set[int]) -> None:
    """Pin every thread of a process (threads created later inherit from their creator)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), cpus)
        except OSError:
            pass  # the thread ended meanwhile


def machine_busy() -> float:
    """CPU seconds spent busy by the whole machine (all CPUs, every process, any namespace)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLK_TCK  # minus idle and iowait


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(extra)
    return env


class Child:
    """A process started by the driver; always stopped by stop() (TERM, then KILL)."""

    def __init__(self, name: str, argv: list[str], *, log: Path | None = None, env: dict | None = None,
                 stdin: int | None = None, stdout: int | None = None, cwd: Path = ROOT) -> None:
        self.name = name
        self.log_path = log
        self.log = open(log, "ab") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen(argv, cwd=cwd, env=env or clean_env(), stdin=stdin,
                                     stdout=stdout if stdout is not None else self.log, stderr=self.log,
                                     preexec_fn=_die_with_parent)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.terminate()
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()
        if self.log is not subprocess.DEVNULL:
            self.log.close()

    def tail(self, lines: int = 15) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f}s")


# --------------------------------------------------------------------------------------------
# Role: DNS server process (tests/rig DnsServer on 127.0.0.1:53)
# --------------------------------------------------------------------------------------------

def role_dns(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT))
    from tests.rig import DnsServer

    class BenchDnsServer(DnsServer):
        """The rig's server with an O(1) existence test: the zone is fixed once published, and the
        rig's linear scan over all names (fine for tests) would make every NXDOMAIN cost O(names)."""

        def freeze(self) -> None:
            names: set[str] = set()
            for key in self._data:
                labels = key.split(".")
                names.update(".".join(labels[i:]) for i in range(len(labels)))
            self._existing = names

        def _exists(self, key: str) -> bool:
            return key in self._existing

    sets = domain_sets(args.domains, args.policy_share, args.cold, args.repeat, args.profile)
    server = BenchDnsServer("127.0.0.1", 53, lifetime=args.lifetime, negative_ttl=LONG_TTL)
    for domain in published(sets):
        server.set(f"_mta-sts.{domain}", "TXT", "v=STSv1; id=1", ttl=LONG_TTL)
        server.set(f"mta-sts.{domain}", "A", "127.0.0.1", ttl=LONG_TTL)
        # MX hosts matching the policy's two patterns (mx1.D and *.mx.D), for daemons that look them up
        server.set(domain, "MX", f"10 mx1.{domain}.", f"20 a.mx.{domain}.", ttl=LONG_TTL)
    server.freeze()
    server.start()
    print("READY", flush=True)
    try:
        for line in sys.stdin:  # tiny control channel: count / reset; EOF ends the server
            command = line.strip()
            if command == "count":
                with server._lock:
                    print(len(server.queries), flush=True)
            elif command == "reset":
                server.reset_counts()
                print("ok", flush=True)
    finally:
        server.stop()


# --------------------------------------------------------------------------------------------
# Role: HTTPS policy server process (tests/rig PolicyServer on 127.0.0.1:443)
# --------------------------------------------------------------------------------------------

def role_https(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT))
    from tests.rig import PolicyServer
    sets = domain_sets(args.domains, args.policy_share, args.cold, args.repeat, args.profile)
    server = PolicyServer("127.0.0.1", 443, lifetime=args.lifetime)
    for domain in published(sets):
        server.set_policy(domain, ENFORCE.format(d=domain))
        # Issue every certificate now: issuing one costs ~1.5 ms and would otherwise be paid,
        # under a lock, inside the cold burst of whichever daemon came first.
        server.prepare_certificate(domain)
    server.start()
    print("READY", server.ca_file, flush=True)
    try:
        sys.stdin.read()  # EOF (driver closes the pipe or dies) ends the server
    finally:
        server.stop()


# --------------------------------------------------------------------------------------------
# Role: load generator (asyncio, raw netstrings, one outstanding request per connection)
# --------------------------------------------------------------------------------------------

class _Conn(asyncio.Protocol):
    def __init__(self, run: "_ClientRun", keys: list[int]) -> None:
        self.run = run
        self.keys = keys
        self.i = 0
        self.buf = b""
        self.sent_at = 0.0
        self.current = -1
        self.transport: asyncio.Transport | None = None
        self.finished = run.loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send_next(self) -> None:
        run = self.run
        if run.stopping or (run.once and self.i >= len(self.keys)):
            if not self.finished.done():
                self.finished.set_result(None)
            return
        self.current = self.keys[self.i % len(self.keys)]
        self.i += 1
        self.sent_at = time.perf_counter()
        self.transport.write(run.frames[self.current])  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        buf = self.buf + data if self.buf else data
        colon = buf.find(b":")
        if colon < 0:
            self.buf = buf
            return
        end = colon + 1 + int(buf[:colon])
        if len(buf) <= end:
            self.buf = buf
            return
        reply = buf[colon + 1:end]
        self.buf = buf[end + 1:]
        self.run.record(self.current, reply, now - self.sent_at, now)
        self.send_next()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.finished.done():
            if self.run.stopping or (self.run.once and self.i >= len(self.keys) and not self.buf):
                self.finished.set_result(None)
            else:
                self.finished.set_exception(ConnectionError(f"server closed the connection: {exc!r}"))


class _ClientRun:
    def __init__(self, loop: asyncio.AbstractEventLoop, domains: list[str], expect_policy: list[bool],
                 once: bool, window: tuple[float, float]) -> None:
        self.loop = loop
        self.frames = [b"%d:%s," % (len(MAP_NAME) + 1 + len(d), f"{MAP_NAME} {d}".encode()) for d in domains]
        self.domains = domains
        self.expect_policy = expect_policy
        self.once = once
        self.window = window  # perf_counter bounds in which completions count (loop mode)
        self.stopping = False
        self.latencies: list[float] = []
        self.total = 0
        self.wrong = 0
        self.examples: list[str] = []
        self.first_reply: float | None = None
        self.last_reply = 0.0

    def record(self, key: int, reply: bytes, latency: float, now: float) -> None:
        self.total += 1
        self.last_reply = now
        if self.expect_policy[key]:
            ok = reply.startswith(b"OK secure match=")
        else:
            ok = reply == b"NOTFOUND "
        if not ok:
            self.wrong += 1
            if len(self.examples) < 3:
                self.examples.append(f"{self.domains[key]} -> {reply[:120].decode(errors='replace')!r}")
        if self.once or self.window[0] <= now <= self.window[1]:
            self.latencies.append(latency)


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


async def _client_main(spec: dict) -> dict:
    loop = asyncio.get_running_loop()
    domains, expect = spec["domains"], spec["expect_policy"]
    conns_n, once = spec["connections"], spec["once"]
    order = list(range(len(domains)))
    random.Random(spec.get("seed", 1)).shuffle(order)
    if once:  # each domain exactly once, dealt round-robin over the connections
        shares = [order[c::conns_n] for c in range(conns_n)]
    else:  # every connection cycles through the whole shuffled list from its own offset
        step = max(1, len(order) // conns_n)
        shares = [order[(c * step) % len(order):] + order[:(c * step) % len(order)] for c in range(conns_n)]
    t0 = time.perf_counter()
    window = (t0 + spec["ramp"], t0 + spec["ramp"] + spec["duration"])
    run = _ClientRun(loop, domains, expect, once, window)
    conns: list[_Conn] = []
    for share in shares:
        if not share:
            continue
        _, proto = await loop.create_connection(lambda s=share: _Conn(run, s), "127.0.0.1", spec["port"])
        conns.append(proto)
    cpu0 = time.process_time()
    start = time.perf_counter()
    if not once:
        run.window = (start + spec["ramp"], start + spec["ramp"] + spec["duration"])
        loop.call_at(loop.time() + spec["ramp"] + spec["duration"], setattr, run, "stopping", True)
    for conn in conns:
        conn.send_next()
    error = None
    try:
        await asyncio.wait_for(asyncio.gather(*(c.finished for c in conns)), spec["timeout"])
    except (asyncio.TimeoutError, ConnectionError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    end = time.perf_counter()
    cpu = time.process_time() - cpu0
    for conn in conns:
        if conn.transport is not None:
            conn.transport.close()
    lat = sorted(run.latencies)
    if once:
        counted, elapsed = run.total, (run.last_reply or end) - start
    else:
        counted, elapsed = len(lat), spec["duration"]
    return {
        "counted": counted, "elapsed": elapsed, "rate": counted / elapsed if elapsed > 0 else 0.0,
        "total": run.total, "wall": end - start, "client_cpu": cpu,
        "p50": _percentile(lat, 0.50) * 1e3, "p90": _percentile(lat, 0.90) * 1e3,
        "p99": _percentile(lat, 0.99) * 1e3, "max": (lat[-1] * 1e3 if lat else float("nan")),
        "wrong": run.wrong, "examples": run.examples, "error": error,
    }


def role_client(args: argparse.Namespace) -> None:
    spec = json.loads(Path(args.spec).read_text())
    result = asyncio.run(_client_main(spec))
    print(json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------------
# The driver (runs inside the namespace)
# --------------------------------------------------------------------------------------------

class Lifetime(Exception):
    pass


def _alarm(signum: int, frame: object) -> None:
    raise Lifetime("benchmark lifetime exceeded; stopping everything")


class Driver:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.children: list[Child] = []
        self.settings = settings_of(args)
        self.sets = domain_sets(args.domains, args.policy_share, args.cold, args.repeat, args.profile,
                                self.settings)
        self.dns: Child | None = None
        self.rig: dict[str, Child] = {}
        self.ca_file = ""
        self.trust_file = ""
        self.warnings: list[str] = []
        self.loadgen: Path | None = None
        self.client_kind = "Python asyncio client (--python-client)"
        self.peer_versions = ""

    def build_loadgen(self) -> None:
        """Compile bench/loadgen.c (epoll, C); without a compiler the Python client is used."""
        if self.args.python_client:
            return
        binary = self.tmp / "loadgen"
        try:
            subprocess.run(["cc", "-O2", "-o", str(binary), str(BENCH / "loadgen.c")], check=True,
                           capture_output=True, timeout=60)
        except (OSError, subprocess.CalledProcessError) as exc:
            self.client_kind = f"Python asyncio client (no C compiler: {exc})"
            return
        self.loadgen = binary
        self.client_kind = "C epoll client (bench/loadgen.c)"

    # ----- infrastructure ------------------------------------------------------------------

    def role_argv(self, role: str) -> list[str]:
        a = self.args
        return [sys.executable, str(Path(__file__).resolve()), "--role", role, "--domains", str(a.domains),
                "--policy-share", str(a.policy_share), "--cold", str(a.cold), "--lifetime", str(a.lifetime),
                "--repeat", str(a.repeat), "--settings", a.settings,
                *(["--profile"] if a.profile else [])]

    def start_rig(self) -> None:
        self.dns = Child("dns", self.role_argv("dns"), log=self.tmp / "dns.log",
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.children.append(self.dns)
        https = Child("https", self.role_argv("https"), log=self.tmp / "https.log",
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.children.append(https)
        self.rig = {"dns": self.dns, "https": https}
        for child in (self.dns, https):
            line = child.proc.stdout.readline().decode().split()  # type: ignore[union-attr]
            if not line or line[0] != "READY":
                raise RuntimeError(f"{child.name} server did not start:\n{child.tail()}")
            if child is https:
                self.ca_file = line[1]
        self.trust_file = self.ca_file
        if self.args.trust_store == "full":
            # A production-sized trust store: certifi's bundle (~150 roots) plus the test CA.
            import certifi
            bundle = self.tmp / "trust-bundle.pem"
            bundle.write_text(Path(certifi.where()).read_text() + "\n" + Path(self.ca_file).read_text())
            self.trust_file = str(bundle)

    def dns_command(self, command: str) -> str:
        assert self.dns is not None and self.dns.proc.stdin and self.dns.proc.stdout
        self.dns.proc.stdin.write(command.encode() + b"\n")
        self.dns.proc.stdin.flush()
        return self.dns.proc.stdout.readline().decode().strip()

    def dns_queries(self) -> int:
        return int(self.dns_command("count"))

    def client(self, port: int, domains: list[str], expect: list[bool], connections: int, *, once: bool,
               seed: int = 1, cpus: set[int] | None = None) -> dict:
        a = self.args
        spec = {"port": port, "domains": domains, "expect_policy": expect, "connections": connections,
                "once": once, "ramp": a.ramp, "duration": a.duration, "seed": seed,
                "timeout": a.burst_timeout if once else a.ramp + a.duration + 30}
        if self.loadgen is not None:
            order = list(range(len(domains)))
            random.Random(seed).shuffle(order)
            keys = self.tmp / "keys.txt"
            keys.write_text("".join(f"{'P' if expect[i] else 'N'} {domains[i]}\n" for i in order))
            argv = [str(self.loadgen), str(port), str(connections), "once" if once else "loop", str(a.ramp),
                    str(a.duration), str(spec["timeout"]), str(keys)]
            out = subprocess.run(argv, capture_output=True, timeout=spec["timeout"] + 30,
                                 preexec_fn=lambda: (_die_with_parent(), cpus and os.sched_setaffinity(0, cpus)))
            if out.returncode != 0:
                raise RuntimeError(f"loadgen failed: {out.stderr.decode(errors='replace')[-2000:]}")
            result = json.loads(out.stdout)
            for field in ("p50", "p90", "p99", "max"):
                if result[field] < 0:
                    result[field] = float("nan")
            return result
        path = self.tmp / "client-spec.json"
        path.write_text(json.dumps(spec))
        argv = [sys.executable, str(Path(__file__).resolve()), "--role", "client", "--spec", str(path)]
        out = subprocess.run(argv, cwd=ROOT, env=clean_env(), capture_output=True, timeout=spec["timeout"] + 30,
                             preexec_fn=lambda: (_die_with_parent(), cpus and os.sched_setaffinity(0, cpus)))
        if out.returncode != 0:
            raise RuntimeError(f"client failed: {out.stderr.decode(errors='replace')[-2000:]}")
        return json.loads(out.stdout)

    # ----- daemons -------------------------------------------------------------------------

    def start_ours(self, setting: str) -> Child:
        """defaults: `serve` with no configuration at all (system resolver = the test DNS server through
        resolv.conf, system trust store = SSL_CERT_FILE, log level info); only the listener and the
        cache file are placed. tuned: the quiet log level and explicit DNS/trust settings."""
        argv = [sys.executable, "-m", "mtasts_policyd", "serve", "--socketmap", f"127.0.0.1:{OURS_PORT}",
                "--cache", str(self.tmp / f"ours-{setting}.sqlite3")]
        if setting == "tuned":
            import yaml
            config: dict = {
                "dns": {"nameservers": ["127.0.0.1"], "port": 53, "timeout": 2},
                "fetch": {"ca_file": self.trust_file, "port": 443, "timeout": 5, "connect_timeout": 2},
            }
            for key, value in json.loads(self.args.ours_config or "{}").items():  # e.g. {"workers": 64}
                config[key] = {**config[key], **value} if isinstance(value, dict) and key in config else value
            path = self.tmp / "ours.yaml"
            path.write_text(yaml.safe_dump(config))
            argv += ["--config", str(path), "--log-level", "warning"]
        child = Child("ours", argv, log=self.tmp / f"ours-{setting}.log",
                      env=clean_env(SSL_CERT_FILE=self.trust_file))
        self.children.append(child)
        wait_port(OURS_PORT, child.proc, "mtasts-policyd")
        return child

    def start_peer(self, setting: str) -> Child:
        """defaults: only the listener is configured. tuned: quiet log level, and cache_grace raised so
        that cached rows never re-check DNS on the request path (its default is 60 s)."""
        config = f"host: 127.0.0.1\nport: {PEER_PORT}\n"
        argv = [str(self.args.peer_venv / "bin" / "mta-sts-daemon"), "-c", str(self.tmp / f"peer-{setting}.yml")]
        if setting == "tuned":
            config += (
                "reuse_port: true\nshutdown_timeout: 5\n"
                f"cache_grace: {LONG_TTL}\n"
                "cache:\n  type: internal\n  options:\n    cache_size: 10000\n"
                "default_zone:\n  strict_testing: false\n  timeout: 4\n"
                "proactive_policy_fetching:\n  enabled: false\n"
            )
            argv += ["-v", "warn"]
        (self.tmp / f"peer-{setting}.yml").write_text(config)
        # SSL_CERT_FILE points OpenSSL's default verify paths (what aiohttp uses) at the test CA.
        child = Child("peer", argv, log=self.tmp / f"peer-{setting}.log",
                      env=clean_env(SSL_CERT_FILE=self.trust_file, PYTHONWARNINGS="ignore"))
        self.children.append(child)
        wait_port(PEER_PORT, child.proc, "mta-sts-daemon")
        return child

    def pinning(self) -> tuple[set[int], set[int]] | None:
        """(client CPUs, daemon CPUs) for the cached rows, or None (--no-pin, or a single CPU)."""
        cpus = sorted(os.sched_getaffinity(0))
        if self.args.no_pin or len(cpus) < 2:
            return None
        return {cpus[0]}, {cpus[1]}

    def stop_child(self, child: Child) -> None:
        child.stop()
        if child in self.children:
            self.children.remove(child)

    # ----- checks --------------------------------------------------------------------------

    def sample_check(self, name: str, port: int) -> list[str]:
        """Exact answers for a sample of domains, over one plain socket connection."""
        problems = []
        rng = random.Random(7)
        sample = [(d, True) for d in rng.sample(self.sets["policy"], min(20, len(self.sets["policy"])))]
        sample += [(d, False) for d in rng.sample(self.sets["none"], min(20, len(self.sets["none"])))]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            buf = b""
            for domain, has_policy in sample:
                req = f"{MAP_NAME} {domain}".encode()
                sock.sendall(b"%d:%s," % (len(req), req))
                while True:
                    colon = buf.find(b":")
                    if colon > 0 and len(buf) > colon + int(buf[:colon]) + 1:
                        break
                    chunk = sock.recv(65536)
                    if not chunk:
                        raise RuntimeError(f"{name} closed the connection during the sample check")
                    buf += chunk
                colon = buf.find(b":")
                end = colon + 1 + int(buf[:colon])
                reply = buf[colon + 1:end].decode()
                buf = buf[end + 1:]
                if has_policy:
                    words = reply.split()
                    match = next((w[6:] for w in words if w.startswith("match=")), "")
                    # "*.mx.D" may be answered as Postfix's ".mx.D" or expanded to the MX host a.mx.D
                    accepted = ({f"mx1.{domain}", f".mx.{domain}"}, {f"mx1.{domain}", f"a.mx.{domain}"})
                    if words[:2] != ["OK", "secure"] or set(match.split(":")) not in accepted:
                        problems.append(f"{name}: {domain} (enforce policy) -> {reply!r}")
                elif reply != "NOTFOUND ":
                    problems.append(f"{name}: {domain} (no policy) -> {reply!r}")
        return problems

    # ----- measurements ----------------------------------------------------------------------

    def warm_up(self, name: str, port: int) -> dict:
        """Every domain once (policies fetched; negative answers cached where the daemon caches them),
        then once more: the second pass shows how many DNS queries a fully cached pass still makes."""
        mix, expect = self.mix()
        q0 = self.dns_queries()
        first = self.client(port, mix, expect, 64, once=True, seed=3)
        q1 = self.dns_queries()
        second = self.client(port, mix, expect, 64, once=True, seed=4)
        q2 = self.dns_queries()
        for w in (first, second):
            if w["wrong"] or w["error"]:
                self.warnings.append(f"{name} warm-up: {w['wrong']} wrong answers {w['examples']} {w['error'] or ''}")
        self.warnings.extend(self.sample_check(name, port))
        return {"first": first, "second": second, "dns_first": q1 - q0, "dns_second": q2 - q1}

    def mix(self) -> tuple[list[str], list[bool]]:
        return (self.sets["policy"] + self.sets["none"],
                [True] * len(self.sets["policy"]) + [False] * len(self.sets["none"]))

    def measure(self, name: str, child: Child, port: int, label: str, domains: list[str], expect: list[bool],
                conns: int, once: bool, seed: int) -> dict:
        """One row for one daemon: the client's figures plus the daemon's CPU and the DNS queries made."""
        pin = None if once else self.pinning()
        if pin:  # daemon on one CPU, client on the other: steady cross-CPU wake-ups, as in production
            set_affinity(child.pid, pin[1])
        q0, c0, s0 = self.dns_queries(), cpu_seconds(child.pid), cpu_seconds(child.pid, "sys")
        rig0 = {k: cpu_seconds(c.pid) for k, c in self.rig.items()}
        busy0 = machine_busy()
        t0 = time.perf_counter()
        try:
            r = self.client(port, domains, expect, conns, once=once, seed=seed, cpus=pin[0] if pin else None)
        finally:
            if pin:
                set_affinity(child.pid, os.sched_getaffinity(0))
        elapsed = time.perf_counter() - t0
        r["daemon_cpu"] = (cpu_seconds(child.pid) - c0) / elapsed
        r["daemon_sys"] = (cpu_seconds(child.pid, "sys") - s0) / elapsed
        r["rig_cpu"] = {k: (cpu_seconds(c.pid) - rig0[k]) / elapsed for k, c in self.rig.items()}
        # CPU used meanwhile by anything else on the machine (other jobs, the idle daemon): noise indicator
        r["other_cpu"] = max(0.0, (machine_busy() - busy0) / elapsed - r["daemon_cpu"]
                             - r["client_cpu"] / elapsed - sum(r["rig_cpu"].values()))
        r["dns_per_lookup"] = (self.dns_queries() - q0) / max(1, r["total"])
        if r["wrong"] or r["error"] or (once and r["total"] != len(domains)):
            self.warnings.append(f"{name} [{label}]: {r['wrong']} wrong answers, {r['total']}"
                                 f"{'/' + str(len(domains)) if once else ''} answered {r['examples']} "
                                 f"{r['error'] or ''}")
        if child.proc.poll() is not None:
            raise RuntimeError(f"{name} daemon died during [{label}]; log tail:\n{child.tail()}")
        return r

    def rows(self) -> list[tuple[str, list[str], list[bool], int]]:
        mix, expect = self.mix()
        share = round(100 * len(self.sets["policy"]) / max(1, len(mix)))
        policy = self.sets["policy"]
        return [
            (f"mix {100 - share}/{share}, 1 conn", mix, expect, 1),
            (f"mix {100 - share}/{share}, 8 conns", mix, expect, 8),
            (f"mix {100 - share}/{share}, 64 conns", mix, expect, 64),
            ("100% policy, 64 conns", policy, [True] * len(policy), 64),
        ]

    def cold_label(self) -> str:
        return f"cold burst {self.args.cold} policy, 64 conns"

    def bench(self) -> dict:
        """Per settings (defaults, tuned): both daemons run side by side (the idle one costs nothing);
        every row is measured --repeat times per daemon, alternating which daemon goes first, so drift
        hits both alike."""
        return {setting: self.bench_settings(setting) for setting in self.settings}

    def bench_settings(self, setting: str) -> dict:
        a = self.args
        daemons = {"ours": (self.start_ours(setting), OURS_PORT), "peer": (self.start_peer(setting), PEER_PORT)}
        results: dict = {name: {"rows": collections.defaultdict(list)} for name in daemons}
        try:
            for name, (child, port) in daemons.items():
                results[name]["warmup"] = self.warm_up(name, port)
            order = list(daemons)
            for label, domains, expect, conns in ([] if a.cold_only else self.rows()):
                for rep in range(a.repeat):
                    for name in order if rep % 2 == 0 else order[::-1]:
                        child, port = daemons[name]
                        results[name]["rows"][label].append(
                            self.measure(name, child, port, label, domains, expect, conns, once=False, seed=10 + rep))
            for rep in range(a.repeat):
                for name in order if rep % 2 == 0 else order[::-1]:
                    child, port = daemons[name]
                    cold = self.sets[f"cold-{setting}-{name}-{rep}"]
                    results[name]["rows"][self.cold_label()].append(
                        self.measure(name, child, port, self.cold_label(), cold, [True] * len(cold), 64,
                                     once=True, seed=5))
            if a.profile and setting == self.settings[-1]:
                child, port = daemons["ours"]
                mix, expect = self.mix()
                policy = self.sets["policy"]
                cold = self.sets["cold-profile"]
                if not a.cold_only:
                    results["ours"]["profile"] = self.profile_ours(child, port, mix, expect, once=False, tag="mix")
                    results["ours"]["profile_policy"] = self.profile_ours(child, port, policy, [True] * len(policy),
                                                                          once=False, tag="policy")
                results["ours"]["profile_cold"] = self.profile_ours(child, port, cold, [True] * len(cold),
                                                                    once=True, tag="cold")
        finally:
            for name, (child, _) in daemons.items():
                self.stop_child(child)
                log_text = (self.tmp / f"{name}-{setting}.log").read_text(errors="replace")
                results[name]["log_lines"] = len(log_text.splitlines())
                results[name]["log_tail"] = "\n".join(log_text.splitlines()[-5:])
        for name in daemons:
            results[name]["rows"] = dict(results[name]["rows"])
        return results

    def profile_ours(self, child: Child, port: int, domains: list[str], expect: list[bool], once: bool,
                     tag: str) -> dict:
        """py-spy samples our daemon during an extra (unreported) 64-connection row or burst."""
        py_spy = self.args.peer_venv / "bin" / "py-spy"
        if not py_spy.exists():
            return {"error": f"{py_spy} missing"}
        out = self.tmp / f"ours-profile-{tag}.txt"
        spy = Child("py-spy", [str(py_spy), "record", "--pid", str(child.pid), "--rate", "250", "--format", "raw",
                                "--nonblocking", "--threads", *(["--gil"] if once else []), "--output", str(out)],
                    log=self.tmp / "py-spy.log")
        self.children.append(spy)
        time.sleep(1.0)  # py-spy attaches
        try:
            r = self.measure("ours", child, port, f"profile {tag}", domains, expect, 64, once=once, seed=6)
        finally:
            spy.proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                spy.proc.wait(timeout=30)
            finally:
                self.stop_child(spy)
        return {"row": r, "stacks": str(out), "summary": summarize_profile(out, loop_only=not once)}

    # ----- the whole run -------------------------------------------------------------------

    def run(self) -> dict:
        self.build_loadgen()
        self.start_rig()
        return self.bench()

    def stop_all(self) -> None:
        for child in reversed(self.children):
            try:
                child.stop()
            except Exception as exc:  # keep stopping the others
                print(f"warning: could not stop {child.name}: {exc}", file=sys.stderr)
        self.children.clear()


def summarize_profile(path: Path, top: int = 15, loop_only: bool = True) -> dict:
    """Self and inclusive shares per function from py-spy's collapsed stacks. py-spy leaves out idle
    samples (threads blocked in epoll_wait, queue waits, socket reads), so shares are of CPU time.
    loop_only: keep the event-loop (main) thread only."""
    if not path.exists():
        return {"error": "no profile written"}
    self_t: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        is_loop = any("_run_once" in f for f in frames)
        if loop_only and not is_loop:
            continue
        count = int(count_text)
        total += count
        threads["event loop" if is_loop else "worker threads"] += count
        names = []
        for frame in frames:
            func, _, where = frame.partition(" (")
            file = where.split(":")[0]
            short = file.split("site-packages/")[-1].split("/lib/python3")[-1].split("/work/main/")[-1]
            names.append(f"{func} ({short})")
        self_t[names[-1]] += count
        for name in set(names):
            incl[name] += count
    if not total:
        return {"samples": 0, "self": [], "inclusive": [], "threads": []}
    return {
        "samples": total,
        "threads": [(n, c / total) for n, c in threads.most_common()],
        "self": [(n, c / total) for n, c in self_t.most_common(top)],
        "inclusive": [(n, c / total) for n, c in incl.most_common(top + 15)],
    }


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def _fmt(value: float, spec: str) -> str:
    return "n/a" if value != value else format(value, spec)  # NaN check


def _ratio(a: float, b: float) -> str:
    return "n/a" if not b or a != a or b != b else f"{a / b:.2f}x"


def _median(values: list[float]) -> float:
    values = sorted(v for v in values if v == v)
    if not values:
        return float("nan")
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def summarize_row(reps: list[dict]) -> dict:
    """Medians over the repeats of one row, plus the spread of the rate."""
    out = {key: _median([r[key] for r in reps]) for key in ("rate", "p50", "p99", "elapsed", "daemon_cpu",
                                                            "daemon_sys", "dns_per_lookup", "other_cpu")}
    out["others"] = [r["other_cpu"] for r in reps]
    out["client_cpu"] = _median([r["client_cpu"] / (r["wall"] or 1) for r in reps])
    out["rates"] = [r["rate"] for r in reps]
    out["total"] = sum(r["total"] for r in reps)
    out["wrong"] = sum(r["wrong"] for r in reps)
    out["rig_cpu"] = {k: _median([r["rig_cpu"][k] for r in reps]) for k in reps[0].get("rig_cpu", {})}
    return out


def report(args: argparse.Namespace, results: dict, driver: Driver, command: str, peer_python: str,
           started: float) -> None:
    print()
    print("=" * 118)
    print(f"mtasts-policyd vs {PEER_PACKAGE} {PEER_VERSION}  (socketmap, loopback only, same machine, same run)")
    print("=" * 118)
    cpu_model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), platform.processor() or "?")
    print(f"machine : nproc={os.cpu_count()} (usable {len(os.sched_getaffinity(0))}), {cpu_model}, "
          f"{platform.system()} {platform.release()}")
    print(f"python  : ours {platform.python_version()} ({sys.executable}); peer {peer_python} "
          f"({args.peer_venv / 'bin' / 'python'}); stock asyncio loop for both (uvloop not installed)")
    print(f"peer    : {driver.peer_versions}")
    print("settings: defaults = both daemons with no configuration but their listener (ours: no config file,\n"
          "          log level info, system resolver and trust store; peer: host/port only, its default log level,\n"
          f"          cache and cache_grace 60 s); tuned = ours --log-level warning with dns/fetch settings, peer -v warn,\n"
          f"          cache internal 10,000, cache_grace {LONG_TTL}s so cached rows never re-check DNS on the request path")
    print(f"trust   : {'test CA only (' + str(args.trust_store) + ')' if args.trust_store == 'test-ca' else 'certifi bundle + test CA (--trust-store full)'}"
          f" -- both through SSL_CERT_FILE (OpenSSL's default verify path); ours also fetch.ca_file when tuned")
    print(f"dns     : test server negative TTL and TXT/A/MX TTL {LONG_TTL}s (nothing expires during the run)")
    print(f"load    : {args.domains} distinct domains ({len(driver.sets['policy'])} enforce-policy, "
          f"{len(driver.sets['none'])} without _mta-sts record = NXDOMAIN); cached rows {args.ramp:g}s ramp + "
          f"{args.duration:g}s measured; one outstanding request per connection")
    pin = driver.pinning()
    print(f"client  : {driver.client_kind}, one process; "
          + (f"cached rows: client pinned to CPU {min(pin[0])}, daemon (all threads) to CPU {min(pin[1])}; "
             "warm-up and cold bursts unpinned" if pin else "no CPU pinning"))
    print(f"method  : both daemons warmed up, then each row run {args.repeat}x per daemon, alternating which goes "
          f"first; figures are medians of the {args.repeat} runs (a fresh never-seen domain set per cold burst)")
    print()
    for setting, by_daemon in results.items():
        report_settings(setting, by_daemon["ours"], by_daemon["peer"], driver)
    if driver.warnings:
        print("WARNING -- wrong or missing answers; the figures above are not a valid comparison:")
        for warning in driver.warnings[:40]:
            print("  WARNING", warning)
    else:
        print(f"correctness: every answer of every row checked (enforce-policy domains 'OK secure match=...', others "
              f"'NOTFOUND '); exact answers for a sample of {min(20, len(driver.sets['policy']))} policy + "
              f"{min(20, len(driver.sets['none']))} no-policy domains matched for both daemons")
    ours = results[driver.settings[-1]]["ours"]
    for key, title in (("profile", "cached mix, 64 conns; event-loop thread"),
                       ("profile_policy", "cached 100% policy, 64 conns; event-loop thread"),
                       ("profile_cold", f"cold burst of {args.cold} fresh policy domains; samples holding the GIL, all threads")):
        if key not in ours:
            continue
        prof = ours[key]
        if "error" in prof:
            print(f"\nprofile {key}: {prof['error']}")
            continue
        summary = prof.get("summary", {})
        row = prof.get("row", {})
        print()
        print(f"profile of ours with py-spy -- extra {title} (not in the table; {row.get('rate', float('nan')):.0f} "
              f"lookups/s while sampled; {summary.get('samples', 0)} CPU samples"
              + (", threads: " + ", ".join(f"{n} {c * 100:.0f}%" for n, c in summary.get("threads", []))
                 if summary.get("threads") else "") + "):")
        for part in ("self", "inclusive"):
            print(f"  by {part} time:")
            for fn, share in summary.get(part, []):
                print(f"    {share * 100:5.1f}%  {fn}")
    print()
    print(f"reproduce: cd {ROOT} && {command}")
    print(f"total run time {time.monotonic() - started:.0f}s")




def report_settings(setting: str, ours: dict, peer: dict, driver: Driver) -> None:
    """The table and diagnostics of one settings profile (defaults or tuned)."""
    print(f"--- settings: {setting} ---")
    print()
    header = (f"{'row':<34}{'ours/s':>9}{'p50ms':>8}{'p99ms':>8}  |{'peer/s':>9}{'p50ms':>8}{'p99ms':>8}  |"
              f" ratio ours/peer:{'/s':>5}{'p50':>7}{'p99':>7}")
    print(header)
    print("-" * len(header))
    summaries = {name: {label: summarize_row(reps) for label, reps in res["rows"].items()}
                 for name, res in (("ours", ours), ("peer", peer))}
    for label, o in summaries["ours"].items():
        p = summaries["peer"][label]
        print(f"{label:<34}{_fmt(o['rate'], '9.0f')}{_fmt(o['p50'], '8.2f')}{_fmt(o['p99'], '8.2f')}  |"
              f"{_fmt(p['rate'], '9.0f')}{_fmt(p['p50'], '8.2f')}{_fmt(p['p99'], '8.2f')}  |"
              f"{'':16}{_ratio(o['rate'], p['rate']):>6}{_ratio(o['p50'], p['p50']):>7}{_ratio(o['p99'], p['p99']):>7}")
    o, p = summaries["ours"][driver.cold_label()], summaries["peer"][driver.cold_label()]
    print(f"{'  cold burst total time, s':<34}{o['elapsed']:>9.2f}{'':16}  |{p['elapsed']:>9.2f}{'':16}  |"
          f"{'':16}{_ratio(o['elapsed'], p['elapsed']):>6}")
    print("(ratio /s > 1: ours answers more lookups per second; ratio p50/p99 < 1: ours answers faster)")
    print()
    print("diagnostics (medians): lookups/s of each run | daemon CPU in % of one core (kernel part) | client CPU | "
          "CPU of everything else on the machine\n  during each run (other jobs) | DNS queries per lookup | "
          "answers checked, wrong")
    for label in summaries["ours"]:
        for name in ("ours", "peer"):
            r = summaries[name][label]
            rates = "/".join(f"{x:.0f}" for x in r["rates"])
            extra = ""
            if r["rig_cpu"] and label == driver.cold_label():
                extra = "  test servers: " + ", ".join(f"{k} {v * 100:.0f}%" for k, v in r["rig_cpu"].items())
            print(f"  {label if name == 'ours' else '':<34} {name}  {rates:<20} cpu {r['daemon_cpu'] * 100:4.0f}% "
                  f"({r['daemon_sys'] * 100:3.0f}%)  client {r['client_cpu'] * 100:3.0f}%  "
                  f"other {'/'.join(f'{x * 100:.0f}' for x in r['others'])}%  "
                  f"dns/lookup {r['dns_per_lookup']:4.2f}  {r['total']:>8} {r['wrong']:>3}{extra}")
    for name, res in (("ours", ours), ("peer", peer)):
        w = res["warmup"]
        print(f"  warm-up {name}: first pass {w['first']['total']} lookups, {w['dns_first']} DNS queries; "
              f"second pass {w['second']['total']} lookups, {w['dns_second']} DNS queries; "
              f"daemon log lines in the whole run: {res['log_lines']}")
    print()


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------

def ensure_peer_venv(venv: Path, profile: bool) -> None:
    daemon = venv / "bin" / "mta-sts-daemon"
    if not daemon.exists():
        print(f"creating {venv} with {PEER_PACKAGE}=={PEER_VERSION} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"{PEER_PACKAGE}=={PEER_VERSION}"], check=True)
    if profile and not (venv / "bin" / "py-spy").exists():
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "py-spy"], check=True)


def inside(args: argparse.Namespace, command: str) -> int:
    """Runs in the new mount+network namespace."""
    started = time.monotonic()
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    tmp = Path(tempfile.mkdtemp(prefix="mtasts-bench-"))
    resolv = tmp / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\noptions attempts:2 timeout:2\n")
    subprocess.run(["mount", "--bind", str(resolv), "/etc/resolv.conf"], check=True)
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(args.lifetime)
    driver = Driver(args, tmp)
    try:
        peer_python = subprocess.run([str(args.peer_venv / "bin" / "python"), "-c",
                                      "import platform; print(platform.python_version())"],
                                     capture_output=True, text=True).stdout.strip()
        driver.peer_versions = subprocess.run(
            [str(args.peer_venv / "bin" / "python"), "-c",
             "import importlib.metadata as m; print(', '.join(f'{p} {m.version(p)}' for p in "
             "('postfix-mta-sts-resolver', 'aiodns', 'pycares', 'aiohttp')));"
             "import pycares; print(f'  (bundled c-ares {pycares.ARES_VERSION})')"],
            capture_output=True, text=True).stdout.replace("\n", "").strip()
        try:
            results = driver.run()
        except Lifetime as exc:
            print(f"bench/run.py: {exc}", file=sys.stderr)
            return 124
        signal.alarm(0)
        report(args, results, driver, command, peer_python, started)
        if args.json:
            Path(args.json).write_text(json.dumps({**results, "warnings": driver.warnings}, indent=1, default=str))
        return 1 if driver.warnings else 0
    finally:
        signal.alarm(0)
        driver.stop_all()
        subprocess.run(["umount", "/etc/resolv.conf"], check=False)
        if not args.keep_tmp:
            subprocess.run(["rm", "-rf", str(tmp)], check=False)
        else:
            print(f"logs and configs kept in {tmp}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--domains", type=int, default=2000, help="distinct domains in the cached mix (default 2000)")
    p.add_argument("--policy-share", type=float, default=0.10, help="share of them with an enforce policy")
    p.add_argument("--cold", type=int, default=1000, help="never-seen policy domains in the cold burst")
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per cached row")
    p.add_argument("--repeat", type=int, default=3, help="runs of every row per daemon; medians are shown")
    p.add_argument("--ramp", type=float, default=0.5, help="unmeasured seconds before each cached row")
    p.add_argument("--burst-timeout", type=float, default=120.0, help="bound on one warm-up pass or burst")
    p.add_argument("--lifetime", type=int, default=1200, help="hard bound on the whole run, seconds")
    p.add_argument("--settings", choices=["defaults", "tuned", "both"], default="both",
                   help="configure both daemons at their defaults, tuned, or run both profiles (default)")
    p.add_argument("--peer-venv", type=Path, default=DEFAULT_VENV, help="venv holding the peer (created if missing)")
    p.add_argument("--cold-only", action="store_true",
                   help="measure the cold bursts only (after the warm-up), not the cached rows: a quick look at the cold path")
    p.add_argument("--profile", action="store_true",
                   help="also sample our daemon with py-spy during an extra 64-connection row (installs py-spy "
                        "into the peer venv)")
    p.add_argument("--ours-config", metavar="JSON",
                   help='extra settings merged into our daemon\'s config, e.g. \'{"workers": 64}\' (default: none)')
    p.add_argument("--trust-store", choices=["test-ca", "full"], default="test-ca",
                   help="CA file both daemons verify policy hosts with: the test CA alone (default), or a "
                        "production-sized bundle (certifi's roots + the test CA)")
    p.add_argument("--no-pin", action="store_true",
                   help="do not pin the daemon and the client to two different CPUs during the cached rows")
    p.add_argument("--python-client", action="store_true", help="use the Python asyncio client, not bench/loadgen.c")
    p.add_argument("--json", metavar="FILE", help="also write all figures as JSON")
    p.add_argument("--keep-tmp", action="store_true", help="keep logs and configs")
    p.add_argument("--role", choices=["driver", "inner", "dns", "https", "client"], default="driver",
                   help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--command", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.peer_venv = args.peer_venv.resolve()
    if args.role == "dns":
        role_dns(args)
        return 0
    if args.role == "https":
        role_https(args)
        return 0
    if args.role == "client":
        role_client(args)
        return 0
    if args.role == "inner":
        return inside(args, args.command or "python bench/run.py")
    # driver: outside the namespace
    if os.geteuid() != 0:
        print("bench/run.py needs root (unshare -mn, ports 53 and 443 in a private network namespace)",
              file=sys.stderr)
        return 2
    ensure_peer_venv(args.peer_venv, args.profile)
    command = shlex.join(["python", "bench/run.py", *argv])
    inner = ["unshare", "-mn", "--", sys.executable, str(Path(__file__).resolve()), *argv,
             "--role", "inner", "--command", command]
    proc = subprocess.Popen(inner, cwd=ROOT, start_new_session=True)
    try:
        return proc.wait(timeout=args.lifetime + 60)
    except subprocess.TimeoutExpired:
        print("benchmark exceeded its lifetime; killing it", file=sys.stderr)
        return 124
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


if __name__ == "__main__":
    sys.exit(main())
