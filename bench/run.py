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
  * starts the test DNS server and HTTPS policy server (tests/rig) in two separate processes,
    then each daemon in turn at its quiet log level, warms it up (every domain looked up once),
    checks a sample of answers, measures cached lookups at 1/8/64 connections and a cold burst,
    and stops everything (try/finally, SIGALRM lifetime bound, parent-death signal on children).

Load generator: one asyncio process with raw netstring framing, one outstanding request per
connection (as Postfix does); its own CPU use is printed per row so a saturated client shows.
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

def domain_sets(total: int, policy_share: float, cold: int) -> dict[str, list[str]]:
    n_policy = max(1, round(total * policy_share))
    return {
        "none": [f"n{i}.nopolicy.bench.test" for i in range(total - n_policy)],
        "policy": [f"p{i}.policy.bench.test" for i in range(n_policy)],
        "cold-ours": [f"c{i}.cold-ours.bench.test" for i in range(cold)],
        "cold-peer": [f"c{i}.cold-peer.bench.test" for i in range(cold)],
    }


def published(sets: dict[str, list[str]]) -> list[str]:
    return sets["policy"] + sets["cold-ours"] + sets["cold-peer"]


# --------------------------------------------------------------------------------------------
# Child-process helpers
# --------------------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL if the benchmark driver dies, whatever the reason."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    os.setpgid(0, 0)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


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

    sets = domain_sets(args.domains, args.policy_share, args.cold)
    server = BenchDnsServer("127.0.0.1", 53, lifetime=args.lifetime, negative_ttl=LONG_TTL)
    for domain in published(sets):
        server.set(f"_mta-sts.{domain}", "TXT", "v=STSv1; id=1", ttl=LONG_TTL)
        server.set(f"mta-sts.{domain}", "A", "127.0.0.1", ttl=LONG_TTL)
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

    sets = domain_sets(args.domains, args.policy_share, args.cold)
    server = PolicyServer("127.0.0.1", 443, lifetime=args.lifetime)
    for domain in published(sets):
        server.set_policy(domain, ENFORCE.format(d=domain))
        # Issue every certificate now: issuing one costs ~1.5 ms and would otherwise be paid,
        # under a lock, inside the cold burst of whichever daemon came first.
        server._context_for(f"mta-sts.{domain}", "valid")
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
        self.sets = domain_sets(args.domains, args.policy_share, args.cold)
        self.dns: Child | None = None
        self.ca_file = ""
        self.notes: list[str] = []
        self.warnings: list[str] = []

    # ----- infrastructure ------------------------------------------------------------------

    def role_argv(self, role: str) -> list[str]:
        a = self.args
        return [sys.executable, str(Path(__file__).resolve()), "--role", role, "--domains", str(a.domains),
                "--policy-share", str(a.policy_share), "--cold", str(a.cold), "--lifetime", str(a.lifetime)]

    def start_rig(self) -> None:
        self.dns = Child("dns", self.role_argv("dns"), log=self.tmp / "dns.log",
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.children.append(self.dns)
        https = Child("https", self.role_argv("https"), log=self.tmp / "https.log",
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.children.append(https)
        for child in (self.dns, https):
            line = child.proc.stdout.readline().decode().split()  # type: ignore[union-attr]
            if not line or line[0] != "READY":
                raise RuntimeError(f"{child.name} server did not start:\n{child.tail()}")
            if child is https:
                self.ca_file = line[1]

    def dns_command(self, command: str) -> str:
        assert self.dns is not None and self.dns.proc.stdin and self.dns.proc.stdout
        self.dns.proc.stdin.write(command.encode() + b"\n")
        self.dns.proc.stdin.flush()
        return self.dns.proc.stdout.readline().decode().strip()

    def dns_queries(self) -> int:
        return int(self.dns_command("count"))

    def client(self, port: int, domains: list[str], expect: list[bool], connections: int, *, once: bool,
               seed: int = 1) -> dict:
        a = self.args
        spec = {"port": port, "domains": domains, "expect_policy": expect, "connections": connections,
                "once": once, "ramp": a.ramp, "duration": a.duration, "seed": seed,
                "timeout": a.burst_timeout if once else a.ramp + a.duration + 30}
        path = self.tmp / "client-spec.json"
        path.write_text(json.dumps(spec))
        argv = [sys.executable, str(Path(__file__).resolve()), "--role", "client", "--spec", str(path)]
        out = subprocess.run(argv, cwd=ROOT, env=clean_env(), capture_output=True, timeout=spec["timeout"] + 30,
                             preexec_fn=_die_with_parent)
        if out.returncode != 0:
            raise RuntimeError(f"client failed: {out.stderr.decode(errors='replace')[-2000:]}")
        return json.loads(out.stdout)

    # ----- daemons -------------------------------------------------------------------------

    def start_ours(self) -> Child:
        import yaml
        config = {
            "dns": {"nameservers": ["127.0.0.1"], "port": 53, "timeout": 2},
            "fetch": {"ca_file": self.ca_file, "port": 443, "timeout": 5, "connect_timeout": 2},
            "cache": {"path": str(self.tmp / "ours-cache.sqlite3")},
            "socketmap": {"listen": [f"127.0.0.1:{OURS_PORT}"]},
        }
        path = self.tmp / "ours.yaml"
        path.write_text(yaml.safe_dump(config))
        argv = [sys.executable, "-m", "mtasts_policyd", "serve", "--config", str(path), "--log-level", "warning"]
        child = Child("ours", argv, log=self.tmp / "ours.log")
        self.children.append(child)
        wait_port(OURS_PORT, child.proc, "mtasts-policyd")
        return child

    def start_peer(self) -> Child:
        config = (
            f"host: 127.0.0.1\nport: {PEER_PORT}\nreuse_port: true\nshutdown_timeout: 5\n"
            # cache_grace (default 60 s) is how long a cached policy is used before the *request*
            # path re-checks DNS; raised so that every cached row really answers from cache.
            f"cache_grace: {LONG_TTL}\n"
            "cache:\n  type: internal\n  options:\n    cache_size: 10000\n"
            "default_zone:\n  strict_testing: false\n  timeout: 4\n"
            "proactive_policy_fetching:\n  enabled: false\n"
        )
        path = self.tmp / "peer.yml"
        path.write_text(config)
        argv = [str(self.args.peer_venv / "bin" / "mta-sts-daemon"), "-c", str(path), "-v", "warn"]
        # SSL_CERT_FILE points OpenSSL's default verify paths (what aiohttp uses) at the test CA.
        child = Child("peer", argv, log=self.tmp / "peer.log", env=clean_env(SSL_CERT_FILE=self.ca_file,
                                                                              PYTHONWARNINGS="ignore"))
        self.children.append(child)
        wait_port(PEER_PORT, child.proc, "mta-sts-daemon")
        return child

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
                    if words[:2] != ["OK", "secure"] or set(match.split(":")) != {f"mx1.{domain}", f".mx.{domain}"}:
                        problems.append(f"{name}: {domain} (enforce policy) -> {reply!r}")
                elif reply != "NOTFOUND ":
                    problems.append(f"{name}: {domain} (no policy) -> {reply!r}")
        return problems

    # ----- one daemon's whole session ------------------------------------------------------

    def bench_daemon(self, name: str) -> dict:
        a = self.args
        results: dict = {"rows": {}, "dns": {}, "cpu": {}}
        child = self.start_ours() if name == "ours" else self.start_peer()
        port = OURS_PORT if name == "ours" else PEER_PORT
        try:
            mix = self.sets["policy"] + self.sets["none"]
            expect = [True] * len(self.sets["policy"]) + [False] * len(self.sets["none"])
            # Warm-up: every domain once (policies fetched, negative answers cached where the daemon
            # caches them), then once more so the second pass shows what a cached pass asks DNS.
            q0 = self.dns_queries()
            warm = self.client(port, mix, expect, 64, once=True, seed=3)
            q1 = self.dns_queries()
            warm2 = self.client(port, mix, expect, 64, once=True, seed=4)
            q2 = self.dns_queries()
            results["warmup"] = {"first": warm, "second": warm2, "dns_first": q1 - q0, "dns_second": q2 - q1}
            for w in (warm, warm2):
                if w["wrong"] or w["error"]:
                    self.warnings.append(f"{name} warm-up: {w['wrong']} wrong answers {w['examples']} {w['error'] or ''}")
            problems = self.sample_check(name, port)
            results["sample_problems"] = problems
            self.warnings.extend(problems)

            rows = [
                ("mix 90/10, 1 conn", mix, expect, 1),
                ("mix 90/10, 8 conns", mix, expect, 8),
                ("mix 90/10, 64 conns", mix, expect, 64),
                ("100% policy, 64 conns", self.sets["policy"], [True] * len(self.sets["policy"]), 64),
            ]
            for label, domains, exp, conns in rows:
                q0, c0, t0 = self.dns_queries(), cpu_seconds(child.pid), time.perf_counter()
                r = self.client(port, domains, exp, conns, once=False)
                r["daemon_cpu"] = (cpu_seconds(child.pid) - c0) / (time.perf_counter() - t0)
                r["dns_per_lookup"] = (self.dns_queries() - q0) / max(1, r["total"])
                results["rows"][label] = r
                if r["wrong"] or r["error"]:
                    self.warnings.append(f"{name} [{label}]: {r['wrong']} wrong answers of {r['total']} "
                                         f"{r['examples']} {r['error'] or ''}")
            if a.profile and name == "ours":
                results["profile"] = self.profile_ours(child, port, mix, expect)

            cold = self.sets[f"cold-{name}"]
            q0, c0, t0 = self.dns_queries(), cpu_seconds(child.pid), time.perf_counter()
            r = self.client(port, cold, [True] * len(cold), 64, once=True, seed=5)
            r["daemon_cpu"] = (cpu_seconds(child.pid) - c0) / (time.perf_counter() - t0)
            r["dns_per_lookup"] = (self.dns_queries() - q0) / max(1, r["total"])
            results["rows"][f"cold burst {len(cold)} policy, 64 conns"] = r
            if r["wrong"] or r["error"] or r["total"] != len(cold):
                self.warnings.append(f"{name} [cold burst]: {r['wrong']} wrong answers, {r['total']}/{len(cold)} "
                                     f"answered {r['examples']} {r['error'] or ''}")
        finally:
            alive = child.proc.poll() is None
            self.stop_child(child)
            if not alive:
                self.warnings.append(f"{name} daemon died during the run; log tail:\n{child.tail()}")
        log_text = (self.tmp / f"{name}.log").read_text(errors="replace")
        results["log_lines"] = len(log_text.splitlines())
        results["log_tail"] = "\n".join(log_text.splitlines()[-5:])
        return results

    def profile_ours(self, child: Child, port: int, mix: list[str], expect: list[bool]) -> dict:
        """py-spy samples our daemon during an extra (unreported) 64-connection mix row."""
        py_spy = self.args.peer_venv / "bin" / "py-spy"
        if not py_spy.exists():
            return {"error": f"{py_spy} missing"}
        out = self.tmp / "ours-profile.txt"
        spy = Child("py-spy", [str(py_spy), "record", "--pid", str(child.pid), "--duration",
                                str(int(self.args.ramp + self.args.duration)), "--rate", "250", "--format", "raw",
                                "--nonblocking", "--output", str(out)], log=self.tmp / "py-spy.log")
        self.children.append(spy)
        time.sleep(0.5)
        r = self.client(port, mix, expect, 64, once=False)
        try:
            spy.proc.wait(timeout=30)
        finally:
            self.stop_child(spy)
        return {"row": r, "stacks": str(out), "summary": summarize_profile(out)}

    # ----- the whole run -------------------------------------------------------------------

    def run(self) -> tuple[dict, dict]:
        self.start_rig()
        ours = self.bench_daemon("ours")
        peer = self.bench_daemon("peer")
        return ours, peer

    def stop_all(self) -> None:
        for child in reversed(self.children):
            try:
                child.stop()
            except Exception as exc:  # keep stopping the others
                print(f"warning: could not stop {child.name}: {exc}", file=sys.stderr)
        self.children.clear()


def summarize_profile(path: Path, top: int = 15) -> dict:
    """Self and inclusive shares per function from py-spy's collapsed stacks (event-loop thread only)."""
    if not path.exists():
        return {"error": "no profile written"}
    self_t: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        frames = stack.split(";")
        if not any("run_forever" in f or "_run_once" in f for f in frames):
            continue  # worker threads idle in the pool: not the event loop's time
        count = int(count_text)
        total += count
        names = [f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].rsplit("/", 1)[-1] + ")"
                 if " (" in f else f for f in frames]
        self_t[names[-1]] += count
        for n in set(names):
            incl[n] += count
    return {
        "samples": total,
        "self": [(n, c / total) for n, c in self_t.most_common(top)] if total else [],
        "inclusive": [(n, c / total) for n, c in incl.most_common(top + 10)] if total else [],
    }


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def _fmt(value: float, spec: str) -> str:
    return "n/a" if value != value else format(value, spec)  # NaN check


def _ratio(a: float, b: float) -> str:
    return "n/a" if not b or a != a or b != b else f"{a / b:.2f}x"


def report(args: argparse.Namespace, ours: dict, peer: dict, driver: Driver, command: str, peer_python: str,
           started: float) -> None:
    print()
    print("=" * 100)
    print(f"mtasts-policyd vs {PEER_PACKAGE} {PEER_VERSION}  (socketmap, loopback only, same machine, same run)")
    print("=" * 100)
    cpu_model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), platform.processor() or "?")
    print(f"machine : nproc={os.cpu_count()} (usable {len(os.sched_getaffinity(0))}), {cpu_model}, "
          f"{platform.system()} {platform.release()}")
    print(f"python  : ours {platform.python_version()} ({sys.executable}); peer {peer_python} "
          f"({args.peer_venv / 'bin' / 'python'}); asyncio default loop for both (no uvloop installed)")
    print(f"logging : ours --log-level warning; peer -v warn (both at their quiet level)")
    print(f"caches  : ours SQLite + in-memory LRU (defaults); peer cache type internal (in-memory LRU), "
          f"cache_grace {LONG_TTL}s")
    print(f"load    : {args.domains} distinct domains ({len(driver.sets['policy'])} enforce-policy, "
          f"{len(driver.sets['none'])} no _mta-sts record = NXDOMAIN); each row {args.ramp:g}s ramp + "
          f"{args.duration:g}s measured; one outstanding request per connection")
    print()
    header = (f"{'row':<34}{'ours/s':>9}{'p50ms':>8}{'p99ms':>8}  |{'peer/s':>9}{'p50ms':>8}{'p99ms':>8}  |"
              f"{'ratio ours/peer: /s':>20}{'p50':>7}{'p99':>7}")
    print(header)
    print("-" * len(header))
    for label, o in ours["rows"].items():
        p = peer["rows"].get(label.replace("cold-ours", "cold-peer"))
        if p is None:
            continue
        print(f"{label:<34}{_fmt(o['rate'], '9.0f')}{_fmt(o['p50'], '8.2f')}{_fmt(o['p99'], '8.2f')}  |"
              f"{_fmt(p['rate'], '9.0f')}{_fmt(p['p50'], '8.2f')}{_fmt(p['p99'], '8.2f')}  |"
              f"{_ratio(o['rate'], p['rate']):>20}{_ratio(o['p50'], p['p50']):>7}{_ratio(o['p99'], p['p99']):>7}")
    cold_label = next(label for label in ours["rows"] if label.startswith("cold"))
    o, p = ours["rows"][cold_label], peer["rows"][cold_label]
    print(f"{'  cold burst total time (s)':<34}{o['elapsed']:>9.2f}{'':16}  |{p['elapsed']:>9.2f}{'':16}  |"
          f"{_ratio(o['elapsed'], p['elapsed']):>20}")
    print()
    print("diagnostics per row: daemon CPU (share of one core) / client CPU share / DNS queries per lookup / "
          "answers checked, wrong")
    for label, o in ours["rows"].items():
        p = peer["rows"][label]
        def diag(r: dict) -> str:
            wall = r["wall"] or 1
            return (f"{r['daemon_cpu'] * 100:4.0f}% {r['client_cpu'] / wall * 100:4.0f}% "
                    f"{r['dns_per_lookup']:5.2f} {r['total']:>7} {r['wrong']:>3}")
        print(f"  {label:<34} ours {diag(o)}   | peer {diag(p)}")
    for name, res in (("ours", ours), ("peer", peer)):
        w = res["warmup"]
        print(f"  warm-up {name}: first pass {w['first']['total']} lookups, {w['dns_first']} DNS queries; "
              f"second pass {w['second']['total']} lookups, {w['dns_second']} DNS queries "
              f"({w['second']['rate']:.0f}/s); daemon log lines: {res['log_lines']}")
    print()
    if driver.warnings:
        print("WARNING -- wrong or missing answers; the figures above are not a valid comparison:")
        for warning in driver.warnings:
            print("  WARNING", warning)
    else:
        print(f"correctness: every answer checked (policy domains 'OK secure match=...', others 'NOTFOUND '); "
              f"sample of {min(20, len(driver.sets['policy']))}+{min(20, len(driver.sets['none']))} "
              f"exact answers matched for both daemons")
    if "profile" in ours:
        prof = ours["profile"]
        summary = prof.get("summary", {})
        print()
        print(f"profile of ours (py-spy, extra mix 64-conn row at {prof.get('row', {}).get('rate', float('nan')):.0f}/s "
              f"under sampling; event-loop thread, {summary.get('samples', 0)} samples):")
        for title in ("self", "inclusive"):
            print(f"  by {title} time:")
            for fn, share in summary.get(title, []):
                print(f"    {share * 100:5.1f}%  {fn}")
    print()
    print(f"reproduce: cd {ROOT} && {command}")
    print(f"total run time {time.monotonic() - started:.0f}s")


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
        ours, peer = driver.run()
        signal.alarm(0)
        report(args, ours, peer, driver, command, peer_python, started)
        if args.json:
            Path(args.json).write_text(json.dumps({"ours": ours, "peer": peer, "warnings": driver.warnings},
                                                  indent=1, default=str))
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
    p.add_argument("--ramp", type=float, default=0.5, help="unmeasured seconds before each cached row")
    p.add_argument("--burst-timeout", type=float, default=120.0, help="bound on one warm-up pass or burst")
    p.add_argument("--lifetime", type=int, default=540, help="hard bound on the whole run, seconds")
    p.add_argument("--peer-venv", type=Path, default=DEFAULT_VENV, help="venv holding the peer (created if missing)")
    p.add_argument("--profile", action="store_true",
                   help="also sample our daemon with py-spy during an extra 64-connection row (installs py-spy "
                        "into the peer venv)")
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
