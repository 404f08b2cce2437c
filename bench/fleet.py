#!/usr/bin/env python3
"""Fleet benchmark (README "Fleet (Redis)", "Benchmark"): N daemons on one Redis, a cold burst over all nodes.

Prints figures; it is not a test. Run from the project root after `bash .ci/run` made .venv:

    .venv/bin/python bench/fleet.py [--nodes 3] [--domains 300] [--connections 16] [--seconds 3]

What it does: starts the test DNS and HTTPS policy servers (tests/rig, loopback, in this process),
a redis-server (tests/rig/redis_server.py) and N daemons sharing it, each with its own cache file;
then

  1. a cold burst: every node asks for the same never-seen policy domains at once, `--connections`
     connections per node: HTTPS fetches per domain for the whole fleet (target 1), time, slowest lookup;
  2. cached lookups/s per node, all nodes loaded at once for `--seconds`;
  3. the cold burst again on new domains with Redis frozen (SIGSTOP) 0.2 s into it: every lookup is
     still answered (the nodes work alone), fetches per domain rise towards N.

The client is asyncio in the same process as the rig servers (2 cores shared): lookups/s are a floor
set by the client as much as by the daemons. Every reply is checked.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.rig import DnsServer, PolicyServer  # noqa: E402
from tests.rig.redis_server import RedisServer  # noqa: E402

ENFORCE = "version: STSv1\nmode: enforce\nmx: mx1.{d}\nmx: *.mx.{d}\nmax_age: 86400\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def expected(domain: str) -> bytes:
    return f"OK secure match=mx1.{domain}:a.mx.{domain} servername=hostname".encode()


def publish(dns: DnsServer, https: PolicyServer, domain: str) -> None:
    dns.set(f"_mta-sts.{domain}", "TXT", "v=STSv1; id=1", ttl=3600)
    dns.set(domain, "MX", f"10 mx1.{domain}.", f"20 a.mx.{domain}.", ttl=3600)
    dns.set(f"mta-sts.{domain}", "A", "127.0.0.1")
    https.set_policy(domain, ENFORCE.format(d=domain))


def start_node(directory: Path, n: int, dns: DnsServer, https: PolicyServer, redis_url: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    config = {
        "socketmap": {"listen": [f"127.0.0.1:{port}"]}, "exim": {"listen": []},
        "dns": {"nameservers": ["127.0.0.1"], "port": dns.port, "timeout": 2},
        "fetch": {"ca_file": https.ca_file, "port": https.port, "timeout": 5, "connect_timeout": 2},
        "cache": {"path": str(directory / f"node{n}.sqlite3"), "redis": {"url": redis_url}},
        "log_level": "warning",
    }
    path = directory / f"node{n}.yaml"
    path.write_text(yaml.safe_dump(config))
    log = open(directory / f"node{n}.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "mtasts_policyd", "serve", "--config", str(path)], cwd=ROOT,
                               stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return process, port
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"node {n} did not start: {(directory / f'node{n}.log').read_text()}")


async def ask_all(port: int, domains: list[str], connections: int, latencies: list[float]) -> int:
    """Ask every domain once over `connections` connections; the number of wrong replies."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    for domain in domains:
        queue.put_nowait(domain)
    wrong = 0

    async def worker() -> None:
        nonlocal wrong
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while not queue.empty():
                domain = queue.get_nowait()
                request = f"postfix {domain}".encode()
                started = time.monotonic()
                writer.write(b"%d:%s," % (len(request), request))
                length = int((await reader.readuntil(b":"))[:-1])
                reply = (await reader.readexactly(length + 1))[:-1]
                latencies.append(time.monotonic() - started)
                wrong += reply != expected(domain)
        finally:
            writer.close()
    await asyncio.gather(*(worker() for _ in range(connections)))
    return wrong


async def load(port: int, domains: list[str], connections: int, seconds: float) -> tuple[int, int]:
    """Cached lookups for `seconds`: (lookups, wrong replies)."""
    end = time.monotonic() + seconds
    count = wrong = 0

    async def worker() -> None:
        nonlocal count, wrong
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        rng = random.Random(port)
        try:
            while time.monotonic() < end:
                domain = rng.choice(domains)
                request = f"postfix {domain}".encode()
                writer.write(b"%d:%s," % (len(request), request))
                length = int((await reader.readuntil(b":"))[:-1])
                reply = (await reader.readexactly(length + 1))[:-1]
                count += 1
                wrong += reply != expected(domain)
        finally:
            writer.close()
    await asyncio.gather(*(worker() for _ in range(connections)))
    return count, wrong


def burst(ports: list[int], domains: list[str], connections: int, https: PolicyServer,
          during: float | None = None, redis: RedisServer | None = None) -> dict[str, float]:
    latencies: list[float] = []

    async def run() -> int:
        jobs = [asyncio.ensure_future(ask_all(port, domains, connections, latencies)) for port in ports]
        if during is not None and redis is not None:
            await asyncio.sleep(during)
            redis.signal(signal.SIGSTOP)
        return sum(await asyncio.gather(*jobs))
    before = {d: https.count(d) for d in domains}
    started = time.monotonic()
    wrong = asyncio.run(run())
    took = time.monotonic() - started
    fetches = [https.count(d) - before[d] for d in domains]
    return {"lookups": len(latencies), "wrong": wrong, "seconds": took, "fetches_per_domain": sum(fetches) / len(domains),
            "max_fetches": max(fetches), "slowest_ms": max(latencies) * 1000}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--domains", type=int, default=300)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="mtasts-fleet-bench-"))
    nodes: list[subprocess.Popen] = []
    with DnsServer(lifetime=900) as dns, PolicyServer(lifetime=900) as https, RedisServer(lifetime=900) as redis:
        try:
            cold = [f"cold{i}.fleet.test" for i in range(args.domains)]
            frozen = [f"frozen{i}.fleet.test" for i in range(args.domains)]
            for domain in cold + frozen:
                publish(dns, https, domain)
                https.prepare_certificate(domain)  # issuing certificates is not what is measured
            ports = []
            for n in range(args.nodes):
                process, port = start_node(directory, n, dns, https, redis.url)
                nodes.append(process)
                ports.append(port)
            first = burst(ports, cold, args.connections, https)
            counts: list[tuple[int, int]] = []

            async def loads() -> None:
                counts.extend(await asyncio.gather(*(load(p, cold, args.connections, args.seconds) for p in ports)))
            asyncio.run(loads())
            second = burst(ports, frozen, args.connections, https, during=0.2, redis=redis)
            redis.signal(signal.SIGCONT)
            print(f"fleet: {args.nodes} nodes on one Redis, {args.domains} cold policy domains, "
                  f"{args.connections} connections per node")
            print("| run | lookups | wrong | seconds | HTTPS fetches per domain (fleet) | most for one domain | slowest lookup ms |")
            print("|---|---|---|---|---|---|---|")
            for name, row in (("cold burst, Redis up", first), ("cold burst, Redis frozen 0.2 s in", second)):
                print(f"| {name} | {row['lookups']} | {row['wrong']} | {row['seconds']:.2f} | "
                      f"{row['fetches_per_domain']:.2f} | {row['max_fetches']} | {row['slowest_ms']:.0f} |")
            per_node = [c / args.seconds for c, _ in counts]
            print(f"cached lookups/s per node, all {args.nodes} loaded at once: "
                  + ", ".join(f"{v:,.0f}" for v in per_node) + f" (wrong replies: {sum(w for _, w in counts)})")
        finally:
            for process in nodes:
                process.terminate()
            for process in nodes:
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
