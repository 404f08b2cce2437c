#!/usr/bin/env python3
"""Scale figures: mtasts-policyd with 100,000 cached domains. Prints figures; it is not a test.

Run as root from the project root (a private network namespace: the daemon reaches nothing):

    python bench/scale.py                     # 100,000 domains, ~1-2 min
    python bench/scale.py --domains 20000     # quicker look

What it does (bench/README.md, "Scale"):
  * writes the cache file directly through the store API (PolicyCache.put, the daemon's own
    write path), not through 100,000 fetches: a share of enforce policies (with their bodies,
    MX hosts and a valid max_age) and the rest "no policy" within its negative TTL;
  * starts `serve` on that file at its defaults (no config file) once, unmeasured (a file written
    here has not met a daemon yet: the first start notes the DANE trust probe's outcome in it, as
    any daemon's first start does), then --repeat times more, measuring the time from the process
    start to the first correct answer over socketmap: a restart with the 100k-row file;
  * measures lookups/s over socketmap with bench/loadgen.c (64 connections, one outstanding
    request each): one pass over every domain in random order right after a start (answers come
    from SQLite into the memory layer), then --duration seconds cycling over all of them;
  * reports the SQLite file size (after a checkpoint) and the daemon's RSS at idle after the
    start and after the passes (every entry in the memory layer).
Every answer is checked: "OK secure match=..." for policy domains, "NOTFOUND " for the others.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

import run as bench  # noqa: E402  (bench/run.py: the child-process helpers and the load generator)

PORT = 18463


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1


def write_cache(path: Path, domains: list[str], policy: set[str]) -> float:
    """Every domain through the store API, as the daemon writes a resolution; seconds taken."""
    from mtasts_policyd.core.errors import Failure, FailureKind
    from mtasts_policyd.core.policy import parse_policy
    from mtasts_policyd.store.cache import PolicyCache
    from mtasts_policyd.store.entry import Entry

    now = time.time()
    started = time.perf_counter()
    cache = PolicyCache(str(path))
    try:
        for domain in domains:
            if domain in policy:
                body = bench.ENFORCE.format(d=domain).encode()
                entry = Entry(domain, txt_record="v=STSv1; id=1", policy_id="1", policy_body=body,
                              policy=parse_policy(body), fetched_at=now, txt_expires_at=now + 86400,
                              mx_hosts=(f"mx1.{domain}", f"a.mx.{domain}"), mx_expires_at=now + 86400)
            else:
                entry = Entry(domain, negative_until=now + 86400, failure_at=now,
                              failure=Failure(FailureKind.NO_RECORD, f"_mta-sts.{domain} does not exist (NXDOMAIN)"))
            if cache.put(entry) is None:
                raise RuntimeError(f"cache write of {domain} conflicted")
    finally:
        cache.close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    return time.perf_counter() - started


def first_answer(port: int, proc: subprocess.Popen, domain: str, started: float, timeout: float = 60.0) -> float:
    """Seconds from `started` until `domain` is answered "OK secure ..." over socketmap."""
    request = f"{bench.MAP_NAME} {domain}".encode()
    frame = b"%d:%s," % (len(request), request)
    deadline = started + timeout
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode} before answering")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(frame)
                reply = b""
                while not reply.endswith(b","):
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    reply += chunk
            if b"OK secure match=" not in reply:
                raise RuntimeError(f"unexpected first answer for {domain}: {reply[:120]!r}")
            return time.perf_counter() - started
        except (ConnectionRefusedError, ConnectionResetError):
            time.sleep(0.002)
    raise RuntimeError(f"no answer within {timeout:.0f}s")


def inside(args: argparse.Namespace) -> int:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    tmp = Path(tempfile.mkdtemp(prefix="mtasts-scale-"))
    resolv = tmp / "resolv.conf"  # nothing answers on 127.0.0.1:53: no lookup leaves, none hangs
    resolv.write_text("nameserver 127.0.0.1\noptions attempts:1 timeout:1\n")
    subprocess.run(["mount", "--bind", str(resolv), "/etc/resolv.conf"], check=True)
    children: list[bench.Child] = []
    try:
        rng = random.Random(11)
        domains = [f"d{i}.scale.bench.test" for i in range(args.domains)]
        policy = set(rng.sample(domains, round(args.domains * args.policy_share)))
        path = tmp / "cache.sqlite3"
        write_seconds = write_cache(path, domains, policy)
        file_bytes = path.stat().st_size
        driver = bench.Driver(bench.parse_args(["--repeat", "1"]), tmp)
        driver.build_loadgen()
        if driver.loadgen is None:
            raise RuntimeError(f"bench/loadgen.c did not compile: {driver.client_kind}")
        keys = tmp / "keys.txt"
        order = list(domains)
        rng.shuffle(order)
        keys.write_text("".join(f"{'P' if d in policy else 'N'} {d}\n" for d in order))
        probe = next(d for d in order if d in policy)
        argv = [sys.executable, "-m", "mtasts_policyd", "serve", "--socketmap", f"127.0.0.1:{PORT}",
                "--cache", str(path)]
        starts: list[float] = []
        results: dict = {}
        for attempt in range(-1, args.repeat):  # -1: a first start, not measured (see "restart" above)
            started = time.perf_counter()
            child = bench.Child("ours", argv, log=tmp / "ours.log")
            children.append(child)
            seconds = first_answer(PORT, child.proc, probe, started)
            if attempt >= 0:
                starts.append(seconds)
            if attempt == args.repeat - 1:  # the last start also serves the load
                time.sleep(1.0)
                results["rss_idle_kib"] = rss_kib(child.pid)
                results["pass"] = loadgen(driver.loadgen, keys, "once", 0, 0, args)
                results["loop"] = loadgen(driver.loadgen, keys, "loop", 0.5, args.duration, args)
                results["rss_loaded_kib"] = rss_kib(child.pid)
            child.stop()
            children.remove(child)
        report(args, write_seconds, file_bytes, starts, results, len(policy))
        wrong = results["pass"]["wrong"] + results["loop"]["wrong"]
        if wrong:
            print(f"WARNING: {wrong} wrong answers, e.g. {results['pass']['examples'] or results['loop']['examples']}")
        return 1 if wrong else 0
    finally:
        for child in children:
            child.stop()
        subprocess.run(["umount", "/etc/resolv.conf"], check=False)
        subprocess.run(["rm", "-rf", str(tmp)], check=False)


def loadgen(binary: Path, keys: Path, mode: str, ramp: float, duration: float, args: argparse.Namespace) -> dict:
    out = subprocess.run([str(binary), str(PORT), "64", mode, str(ramp), str(duration), "120", str(keys)],
                         capture_output=True, timeout=200)
    if out.returncode != 0:
        raise RuntimeError(f"loadgen failed: {out.stderr.decode(errors='replace')[-2000:]}")
    return json.loads(out.stdout)


def report(args: argparse.Namespace, write_seconds: float, file_bytes: int, starts: list[float], results: dict,
           policies: int) -> None:
    starts_sorted = sorted(starts)
    median = starts_sorted[len(starts_sorted) // 2]
    p, loop = results["pass"], results["loop"]
    print()
    print(f"mtasts-policyd with {args.domains:,} cached domains ({policies:,} enforce policies, "
          f"{args.domains - policies:,} no-policy), `serve` at its defaults, socketmap, 64 connections")
    print(f"  cache written through the store API in {write_seconds:.1f} s")
    print(f"  SQLite file size            {file_bytes / 1e6:8.1f} MB ({file_bytes / args.domains:.0f} bytes per domain)")
    print(f"  start to first answer       {median * 1e3:8.0f} ms (median of {len(starts)} starts: "
          + ", ".join(f"{s * 1e3:.0f}" for s in starts) + " ms)")
    print(f"  RSS after start (idle)      {results['rss_idle_kib'] / 1024:8.1f} MiB")
    print(f"  first pass over every domain {p['rate']:7.0f} lookups/s (from SQLite into memory; "
          f"{p['total']:,} answers, p99 {p['p99']:.2f} ms)")
    print(f"  cycling over every domain   {loop['rate']:8.0f} lookups/s ({args.duration:g} s; from memory; "
          f"p99 {loop['p99']:.2f} ms)")
    print(f"  RSS with every entry loaded {results['rss_loaded_kib'] / 1024:8.1f} MiB")
    print(f"  answers checked: {p['total'] + loop['total']:,}, wrong: {p['wrong'] + loop['wrong']}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--domains", type=int, default=100_000, help="cached domains (default 100000)")
    p.add_argument("--policy-share", type=float, default=0.10, help="share of them with an enforce policy")
    p.add_argument("--repeat", type=int, default=3, help="daemon starts measured (default 3)")
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds cycling over the cache")
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.inner:
        return inside(args)
    if os.geteuid() != 0:
        print("bench/scale.py needs root (unshare -mn: a private network namespace)", file=sys.stderr)
        return 2
    proc = subprocess.Popen(["unshare", "-mn", "--", sys.executable, str(Path(__file__).resolve()), *argv, "--inner"],
                            cwd=BENCH.parent, start_new_session=True)
    try:
        return proc.wait(timeout=1800)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
