#!/usr/bin/env python3
"""CPU per cold domain of the daemon's resolution path, in process. Prints figures; not a test.

    python bench/cold.py                          # 6 bursts of 250 never-seen policy domains
    python bench/cold.py --workers 32 8 4         # one variant per worker count, interleaved

The socketmap benchmark (run.py) says how the cold burst compares with the peer; this one says
where a change moves our own CPU per cold domain, with less noise (bench/README.md, "Cold path"):
`PolicyService` (the daemon's resolution path: TXT, A and MX on the event loop, the fetch and the
cache write in its worker threads) over the test rig, 64 lookups at a time, the rig in another
process, user + system CPU of this process per domain. Variants (here: worker counts) run in one
process with their bursts interleaved, as the machine's other load drifts between runs. No root
needed: the rig listens on ephemeral loopback ports and the daemon is configured to use them.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ENFORCE = "version: STSv1\nmode: enforce\nmx: mx1.{d}\nmx: *.mx.{d}\nmax_age: 86400\n"  # as run.py


def domains(burst: int, size: int) -> list[str]:
    return [f"c{i}.b{burst}.cold.test" for i in range(size)]


def serve_rig(bursts: int, size: int, ready: multiprocessing.Queue, lifetime: float) -> None:
    """The DNS and HTTPS test servers with every burst's domains published (certificates issued
    before the run, as run.py does), in a process of their own."""
    from tests.rig import DnsServer, PolicyServer
    dns = DnsServer("127.0.0.1", 0, lifetime=lifetime, negative_ttl=3600)
    https = PolicyServer("127.0.0.1", 0, lifetime=lifetime)
    for burst in range(bursts):
        for domain in domains(burst, size):
            dns.set(f"_mta-sts.{domain}", "TXT", "v=STSv1; id=1", ttl=3600)
            dns.set(f"mta-sts.{domain}", "A", "127.0.0.1", ttl=3600)
            dns.set(domain, "MX", f"10 mx1.{domain}.", f"20 a.mx.{domain}.", ttl=3600)
            https.set_policy(domain, ENFORCE.format(d=domain))
            https.prepare_certificate(domain)
    with dns, https:
        ready.put((dns.port, https.port, https.ca_file))
        time.sleep(lifetime)


async def burst(service, names: list[str], connections: int) -> int:
    """Look every name up, `connections` at a time; how many answers were exact."""
    gate = asyncio.Semaphore(connections)
    exact = 0

    async def one(name: str) -> None:
        nonlocal exact
        async with gate:
            decision = await service.lookup(name)
        exact += decision.policy is not None and decision.mx_hosts == (f"mx1.{name}", f"a.mx.{name}")

    await asyncio.gather(*(one(name) for name in names))
    return exact


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bursts", type=int, default=6, help="bursts per variant")
    parser.add_argument("--size", type=int, default=250, help="never-seen domains per burst")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[32], help="one variant per count")
    args = parser.parse_args()
    total = args.bursts * len(args.workers)
    ready: multiprocessing.Queue = multiprocessing.Queue()
    rig = multiprocessing.Process(target=serve_rig, args=(total, args.size, ready, 1800.0), daemon=True)
    rig.start()
    try:
        dns_port, https_port, ca_file = ready.get(timeout=600)
        from mtasts_policyd.net.dns import DnsDiscovery, DnsSettings
        from mtasts_policyd.net.https import FetchSettings, PolicyFetcher
        from mtasts_policyd.resolution.resolver import PolicyResolver
        from mtasts_policyd.resolution.service import PolicyService
        from mtasts_policyd.store.cache import PolicyCache
        tmp = tempfile.mkdtemp(prefix="mtasts-cold-")
        services = {}
        for workers in args.workers:
            discovery = DnsDiscovery(DnsSettings(nameservers=("127.0.0.1",), port=dns_port))
            fetcher = PolicyFetcher(discovery, FetchSettings(ca_file=ca_file, port=https_port))
            cache = PolicyCache(os.path.join(tmp, f"workers-{workers}.sqlite3"))
            services[f"workers={workers}"] = PolicyService(PolicyResolver(cache, discovery, fetcher), workers)
        figures: dict[str, list[tuple[float, float]]] = {name: [] for name in services}

        async def run() -> None:
            number = 0
            for round_ in range(args.bursts):
                order = list(services.items())
                for name, service in (order if round_ % 2 == 0 else order[::-1]):
                    names = domains(number, args.size)
                    number += 1
                    before, start = os.times(), time.perf_counter()
                    exact = await burst(service, names, args.connections)
                    after, end = os.times(), time.perf_counter()
                    if exact != len(names):
                        raise SystemExit(f"{name}: {len(names) - exact} answers were not exact")
                    cpu = (after.user - before.user + after.system - before.system) / len(names)
                    figures[name].append((cpu * 1000, len(names) / (end - start)))

        asyncio.run(run())
        for name, runs in figures.items():
            print(f"{name:12s} CPU per cold domain: median {statistics.median(c for c, _ in runs):.2f} ms "
                  f"({' '.join(f'{c:.2f}' for c, _ in runs)}); "
                  f"lookups/s median {statistics.median(r for _, r in runs):.0f}")
    finally:
        rig.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
