"""A fleet on a real Redis (README "Fleet (Redis)"): real daemons, real redis-server processes on
loopback (tests/rig/redis_server.py), the rig's DNS and HTTPS servers, whose fetch counts are the
proof of one fetch per fleet. The rules themselves are in test_fleet_fast.py."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import trustme
import yaml

from mtasts_policyd.store.cache import PolicyCache
from mtasts_policyd.store.redis import BREAK, RedisLevel
from mtasts_policyd.store.shared import encode, forget_message
from tests.bodies import ENFORCE, ENFORCE_ONE_MX, NONE
from tests.conftest import Daemon, SocketmapClient, free_port, run_cli, secure
from tests.rig.redis_server import RedisServer
from tests.test_fleet_fast import policy_entry
from tests.test_metrics import get, scrape

PREFIX = "mtasts:v1:"
LOOKUP_TIMEOUT = 20.0


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer(lifetime=300) as server:
        yield server


def node(start_daemon, tmp_path: Path, name: str, redis: dict, **extra: object) -> tuple[Daemon, int]:
    """A daemon of the fleet with its own cache file and a metrics port."""
    metrics = free_port()
    extra.setdefault("resolver", {})
    extra["resolver"] = {"lookup_timeout": LOOKUP_TIMEOUT, **extra["resolver"]}  # type: ignore[dict-item]
    daemon = start_daemon(tmp_path / f"{name}.sqlite3", cache={"redis": redis}, metrics={"listen": f"127.0.0.1:{metrics}"},
                          **extra)
    return daemon, metrics


def ask(daemon: Daemon, domain: str) -> str | None:
    client = SocketmapClient(daemon.port, timeout=LOOKUP_TIMEOUT + 10)
    try:
        return client.ask(domain)
    finally:
        client.close()


def health(metrics_port: int) -> dict:
    status, _, body = get(metrics_port, "/health")
    assert status == 200
    return json.loads(body)


def metric(metrics_port: int, name: str, **labels: str) -> float:
    return scrape(metrics_port)[name, frozenset(labels.items())]


def eventually(check, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def test_three_daemons_one_fetch_per_domain(rig, start_daemon, tmp_path, redis_server):
    """100 cold domains asked on all three nodes at once: exactly one HTTPS fetch each."""
    nodes = [node(start_daemon, tmp_path, f"n{i}", {"url": redis_server.url})[0] for i in range(3)]
    domains = [rig.domain("fleet") for _ in range(100)]
    for domain in domains:
        rig.publish(domain)
    start = threading.Barrier(3 * 8)

    def worker(daemon: Daemon, share: list[str]) -> list[tuple[str, str | None]]:
        client = SocketmapClient(daemon.port, timeout=LOOKUP_TIMEOUT + 10)
        start.wait(timeout=30)
        try:
            return [(d, client.ask(d)) for d in share]
        finally:
            client.close()

    with ThreadPoolExecutor(3 * 8) as pool:
        jobs = [pool.submit(worker, daemon, domains[k::8]) for daemon in nodes for k in range(8)]
        answers = [answer for job in jobs for answer in job.result(timeout=120)]
    assert len(answers) == 300
    assert all(reply == "OK " + secure(domain) for domain, reply in answers)
    assert {domain: rig.https.count(domain) for domain in domains} == dict.fromkeys(domains, 1)
    # Every node now answers from its own cache.
    for daemon in nodes:
        assert ask(daemon, domains[0]) == "OK " + secure(domains[0])
    assert rig.https.count(domains[0]) == 1


def test_key_expires_with_the_policy(rig, start_daemon, tmp_path, redis_server):
    """The shared copy lives as long as the policy's remaining max_age (RFC 8461 §5.1), never longer."""
    daemon, _ = node(start_daemon, tmp_path, "n", {"url": redis_server.url})
    domain = rig.domain("ttl")
    rig.publish(domain, ENFORCE.replace("86400", "7200"))
    before = time.time()
    assert ask(daemon, domain) == "OK " + secure(domain)
    client = redis_server.client()
    ttl = client.pttl(f"{PREFIX}d:{domain}") / 1000
    assert 7200 - (time.time() - before) - 2 <= ttl <= 7200
    assert client.zscore(f"{PREFIX}due", domain) is not None  # the warmers' index
    assert not client.exists(f"{PREFIX}lock:{domain}")  # the lock was let go after the write


def test_policy_change_reaches_every_node(rig, start_daemon, tmp_path, redis_server):
    """One node refreshes and finds a new policy; the others answer it within a second, without
    a fetch of their own (their TXT TTL is an hour: only the invalidation can tell them)."""
    url = {"url": redis_server.url}
    quick, _ = node(start_daemon, tmp_path, "quick", url, resolver={"txt_ttl_min": 1, "txt_ttl_max": 1})
    others = [node(start_daemon, tmp_path, f"slow{i}", url,
                   resolver={"txt_ttl_min": 3600, "txt_ttl_max": 3600})[0] for i in range(2)]
    domain = rig.domain("change")
    rig.publish(domain, ttl=1)
    for daemon in (quick, *others):
        assert ask(daemon, domain) == "OK " + secure(domain)
    assert rig.https.count(domain) == 1
    rig.publish(domain, ENFORCE_ONE_MX, id="2", ttl=1)
    time.sleep(1.2)
    new = f"OK secure match=mx1.{domain} servername=hostname"
    ask(quick, domain)  # its TXT TTL has passed: this starts its refresh
    assert eventually(lambda: ask(quick, domain) == new, timeout=10)
    for daemon in others:  # asking them starts nothing: only the invalidation can change their answer
        assert eventually(lambda: ask(daemon, domain) == new, timeout=10)
    assert rig.https.count(domain) == 2


def test_lock_holder_killed_mid_fetch(rig, start_daemon, tmp_path, redis_server):
    """The node holding a domain's fetch lock dies while its fetch hangs: another node fetches
    once the lock expires (fetch timeout + 1 s), within its lookup_timeout."""
    url = {"url": redis_server.url}
    holder, _ = node(start_daemon, tmp_path, "holder", url)
    other, other_metrics = node(start_daemon, tmp_path, "other", url)
    domain = rig.domain("killed")
    rig.publish(domain, delay=4.0)  # below the rig's fetch timeout (5 s)
    asking = threading.Thread(target=ask, args=(holder, domain), daemon=True)
    asking.start()
    assert eventually(lambda: rig.https.count(domain) == 1, timeout=10)
    assert redis_server.client().exists(f"{PREFIX}lock:{domain}")
    assert holder.process is not None
    holder.process.send_signal(signal.SIGKILL)
    holder.process.wait(timeout=10)
    rig.publish(domain)  # no delay any more
    started = time.monotonic()
    assert ask(other, domain) == "OK " + secure(domain)
    assert time.monotonic() - started < LOOKUP_TIMEOUT
    assert rig.https.count(domain) == 2
    assert metric(other_metrics, "mtasts_redis_lock_waits_total") == 1


@pytest.mark.parametrize("how", ["SIGSTOP", "SIGTERM"])
def test_redis_stopped_during_load(rig, start_daemon, tmp_path, redis_server, how):
    """Redis frozen or gone: cached enforce domains still enforce, cold ones are fetched as by a
    single node, no lookup waits anywhere near lookup_timeout, /health and the metric say so;
    back up (restarted empty for SIGTERM), the node writes its next results again."""
    daemon, metrics_port = node(start_daemon, tmp_path, "n", {"url": redis_server.url})
    cached = [rig.domain("cached") for _ in range(10)]
    cold = [rig.domain("cold") for _ in range(10)]
    late = [rig.domain("late") for _ in range(3)]  # asked after the stop for certain: they ask Redis first
    for domain in cached + cold + late:
        rig.publish(domain)
    for domain in cached:
        assert ask(daemon, domain) == "OK " + secure(domain)

    def timed(domain: str) -> tuple[str, str | None, float]:
        started = time.monotonic()
        reply = ask(daemon, domain)
        return domain, reply, time.monotonic() - started

    slowest = 0.0
    try:
        with ThreadPoolExecutor(8) as pool:
            jobs = [pool.submit(timed, domain) for domain in cached + cold + cached]
            eventually(lambda: sum(job.done() for job in jobs) >= 3, timeout=10)
            if how == "SIGSTOP":  # during the load
                redis_server.signal(signal.SIGSTOP)
            else:
                redis_server.kill()
            for job in jobs:
                domain, reply, took = job.result(timeout=LOOKUP_TIMEOUT + 10)
                assert reply == "OK " + secure(domain)
                slowest = max(slowest, took)
        after = [timed(domain) for domain in cached + late]  # Redis certainly gone now
        assert all(reply == "OK " + secure(domain) for domain, reply, _ in after)
        slowest = max([slowest] + [took for _, _, took in after])
        assert slowest < LOOKUP_TIMEOUT
        state = health(metrics_port)["redis"]
        assert state["state"] == "down" and state["errors"] >= 1
        assert metric(metrics_port, "mtasts_redis_up") == 0
    finally:
        if how == "SIGSTOP":
            redis_server.signal(signal.SIGCONT)
        else:
            redis_server.restart()
    time.sleep(BREAK + 0.2)  # the circuit lets one probe through after BREAK seconds
    later = rig.domain("later")
    rig.publish(later)
    assert ask(daemon, later) == "OK " + secure(later)
    assert redis_server.client().exists(f"{PREFIX}d:{later}")
    assert health(metrics_port)["redis"]["state"] == "up"


def test_read_only_node_on_a_replica(rig, start_daemon, tmp_path, redis_server):
    """A read-only node reads from the replica, hears the fleet's writes there, and never sends a
    write: the replica's command stats show no write command at all."""
    with RedisServer(lifetime=300, replica_of=redis_server) as replica:
        writer, _ = node(start_daemon, tmp_path, "writer", {"url": redis_server.url},
                         resolver={"txt_ttl_min": 1, "txt_ttl_max": 1})
        reader, reader_metrics = node(start_daemon, tmp_path, "reader",
                                      {"url": redis_server.url, "read_url": replica.url, "read_only": True})
        domain = rig.domain("ro")
        rig.publish(domain, ttl=1)
        assert ask(writer, domain) == "OK " + secure(domain)
        assert eventually(lambda: replica.client().exists(f"{PREFIX}d:{domain}"))
        assert ask(reader, domain) == "OK " + secure(domain)
        assert rig.https.count(domain) == 1  # the reader took the writer's fetch from the replica
        # The writer sees a new policy; the reader hears of it through the replica's pub/sub.
        rig.publish(domain, ENFORCE_ONE_MX, id="2", ttl=1)
        time.sleep(1.2)
        ask(writer, domain)
        new = f"OK secure match=mx1.{domain} servername=hostname"
        assert eventually(lambda: ask(writer, domain) == new, timeout=10)
        assert eventually(lambda: ask(reader, domain) == new, timeout=10)
        # A domain the reader resolves itself is not written anywhere.
        own = rig.domain("ro-own")
        rig.publish(own)
        assert ask(reader, own) == "OK " + secure(own)
        assert not redis_server.client().exists(f"{PREFIX}d:{own}")
        # Never a write: no connection to the primary at all, nothing refused by the replica.
        state = health(reader_metrics)["redis"]
        assert state["state"] == "read-only" and state["errors"] == 0 and state["written"] == 0
        names = [c["name"] for c in redis_server.client().client_list()]
        assert not [n for n in names if state["node"] in n], names
        assert any(state["node"] in c["name"] for c in replica.client().client_list())
        stats = replica.client().info("commandstats")
        assert all(s.get("rejected_calls", 0) == 0 and s.get("failed_calls", 0) == 0 for s in stats.values()), stats
        assert not {"cmdstat_eval", "cmdstat_evalsha"} & set(stats)


def test_acl_user_in_the_url(rig, start_daemon, tmp_path):
    """redis://user:password@host: an ACL user works; a wrong password leaves the node alone, answering."""
    users = ("user fleet on >s3cret-pass ~mtasts:* &mtasts:* +@all",)
    with RedisServer(lifetime=300, users=users) as server:
        good, _ = node(start_daemon, tmp_path, "good", {"url": f"redis://fleet:s3cret-pass@127.0.0.1:{server.port}/0"})
        bad, bad_metrics = node(start_daemon, tmp_path, "bad",
                                {"url": f"redis://fleet:not-the-pass@127.0.0.1:{server.port}/0"})
        domain, other = rig.domain("acl"), rig.domain("acl")
        rig.publish(domain)
        rig.publish(other)
        assert ask(good, domain) == "OK " + secure(domain)
        assert server.client().exists(f"{PREFIX}d:{domain}")
        assert ask(bad, other) == "OK " + secure(other)
        assert health(bad_metrics)["redis"]["state"] == "down"
        assert "s3cret-pass" not in good.logs() and "not-the-pass" not in bad.logs()  # redacted


def test_rediss_with_the_fleets_ca(rig, start_daemon, tmp_path):
    """rediss://: the node verifies Redis's certificate against `cache.redis.ca_file` (a fleet's
    private CA); without it, against the system's store, which does not know that CA: the node
    then works alone (Redis down for it), still answering."""
    ca = trustme.CA(organization_name="fleet test CA")
    ca_file = tmp_path / "fleet-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    with RedisServer(lifetime=300, tls=ca) as server:
        trusting, _ = node(start_daemon, tmp_path, "trusting", {"url": server.tls_url, "ca_file": str(ca_file)})
        stranger, stranger_metrics = node(start_daemon, tmp_path, "stranger", {"url": server.tls_url})
        domain, other = rig.domain("tls"), rig.domain("tls")
        rig.publish(domain)
        rig.publish(other)
        assert ask(trusting, domain) == "OK " + secure(domain)
        assert server.client().exists(f"{PREFIX}d:{domain}")  # written over TLS
        assert ask(stranger, other) == "OK " + secure(other)
        assert not server.client().exists(f"{PREFIX}d:{other}")
        assert health(stranger_metrics)["redis"]["state"] == "down"


@pytest.mark.parametrize("tamper", ["mode-none", "altered-body", "bad-hmac"])
def test_tampered_entry_never_downgrades(rig, start_daemon, tmp_path, redis_server, tamper):
    """RFC 8461 §5.1: an entry changed in Redis (a newer none policy, even rightly signed; a body
    altered under its claims; a wrong signature) and announced on the channel never replaces the
    node's enforce policy."""
    key = "fleet-hmac-key-0123456789"
    signing = {} if tamper == "altered-body" else {"hmac_key": key}
    daemon, metrics_port = node(start_daemon, tmp_path, "n", {"url": redis_server.url, **signing})
    domain = rig.domain("tamper")
    rig.publish(domain)
    assert ask(daemon, domain) == "OK " + secure(domain)
    client = redis_server.client()
    stored = json.loads(client.get(f"{PREFIX}d:{domain}"))
    now = time.time()
    if tamper == "mode-none":
        forged = encode(policy_entry(domain, NONE, now, pid="2"), key.encode())
    elif tamper == "altered-body":
        stored["record"]["policy_body"] = stored["record"]["policy_body"].replace("mode: enforce", "mode: none")
        stored["record"]["fetched_at"] = now  # still claims enforce
        forged = json.dumps(stored).encode()
    else:
        forged = encode(policy_entry(domain, NONE, now, pid="2"), b"another-key-0123456789")
    client.set(f"{PREFIX}d:{domain}", forged)
    client.publish(f"{PREFIX}invalidate", f"{domain} elsewhere")
    reason = {"mode-none": "downgrade", "altered-body": "mismatch", "bad-hmac": "signature"}[tamper]
    assert eventually(lambda: metric(metrics_port, "mtasts_redis_ignored_total", reason=reason) >= 1, timeout=10)
    assert ask(daemon, domain) == "OK " + secure(domain)


@pytest.mark.parametrize("forged", ["unsigned", "replayed", "wrong-key"])
def test_forged_forget_never_drops_a_nodes_policy(rig, start_daemon, tmp_path, redis_server, forged):
    """With `hmac_key`, a "forget" on the channel must be signed and fresh: anyone who can publish
    to Redis could otherwise make every node drop its enforce policies (a downgrade, RFC 8461
    §5.1). A genuine `cache forget` (signed with the fleet's key) still works."""
    key = "fleet-hmac-key-0123456789"
    daemon, metrics_port = node(start_daemon, tmp_path, "n", {"url": redis_server.url, "hmac_key": key})
    domain = rig.domain("forget")
    rig.publish(domain)
    assert ask(daemon, domain) == "OK " + secure(domain)
    rig.dns.remove(f"_mta-sts.{domain}")  # a node that dropped its copy would now answer NOTFOUND
    client = redis_server.client()
    client.delete(f"{PREFIX}d:{domain}")  # whoever can publish can also delete
    now = time.time()
    message = {"unsigned": f"{domain} elsewhere forget {int(now)}",
               "replayed": forget_message(domain, "elsewhere", now - 3600, key.encode()),
               "wrong-key": forget_message(domain, "elsewhere", now, b"another-key-0123456789")}[forged]
    client.publish(f"{PREFIX}invalidate", message)
    assert eventually(lambda: metric(metrics_port, "mtasts_redis_ignored_total", reason="signature") >= 1, timeout=10)
    assert ask(daemon, domain) == "OK " + secure(domain)
    forgot = run_cli("cache", "forget", "--config", str(daemon.config_path), domain)
    assert forgot.returncode == 0 and "for the whole fleet" in forgot.stdout, forgot.stdout + forgot.stderr
    assert eventually(lambda: ask(daemon, domain) == "NOTFOUND ", timeout=10)


def test_stale_write_is_refused(redis_server):
    """Compare-and-set on the fetch time: a slow node's older fetch never replaces a newer one."""
    level = RedisLevel(redis_server.url)
    try:
        now = time.time()
        newer = policy_entry("stale.test", ENFORCE, now, pid="2")
        older = policy_entry("stale.test", ENFORCE, now - 60, pid="1")
        assert level.put(newer, now + 300)
        assert not level.put(older, now + 300)
        got = level.get("stale.test", now)
        assert got is not None and got.policy_id == "2"
        assert level.put(policy_entry("stale.test", ENFORCE, now + 1, pid="3"), now + 300)
        # The index stays bounded: a member due long ago (nobody refreshed it) goes at the next write.
        redis_server.client().zadd(f"{PREFIX}due", {"forgotten.test": now - 31 * 86400})
        assert level.put(policy_entry("other.test", ENFORCE, now), now + 300)
        assert redis_server.client().zscore(f"{PREFIX}due", "forgotten.test") is None
    finally:
        level.close()


def test_cache_tools_and_warm_on_the_shared_cache(rig, start_daemon, tmp_path, redis_server):
    """`cache list/show` read the shared cache; `forget` removes a domain for the whole fleet (every
    node drops its copy and fetches again); `warm` finds the fleet's due domains in the index and
    takes what another node fetched instead of fetching it again."""
    url = {"url": redis_server.url}
    one, _ = node(start_daemon, tmp_path, "one", url)
    two, _ = node(start_daemon, tmp_path, "two", url)
    domain, gone = rig.domain("tools"), rig.domain("tools")
    for name in (domain, gone):
        rig.publish(name)
        assert ask(one, name) == "OK " + secure(name)
        assert ask(two, name) == "OK " + secure(name)
    assert rig.https.count(domain) == rig.https.count(gone) == 1
    # warm on a third cache that has never seen either domain: both are due within hours (TXT TTL)
    warmer = str(tmp_path / "warmer.yaml")
    Path(warmer).write_text(yaml.safe_dump(rig.config(tmp_path / "warmer.sqlite3", cache={"redis": url})))
    PolicyCache(str(tmp_path / "warmer.sqlite3")).close()  # as after the daemon's first start
    run = run_cli("warm", "--config", warmer, "-v", "--jitter", "0")
    assert f"warm domain={domain} outcome=unchanged" in run.stdout, run.stdout + run.stderr
    assert rig.https.count(domain) == 1
    listed = run_cli("cache", "list", "--config", str(one.config_path), "--json")
    assert listed.returncode == 0, listed.stderr
    assert {domain, gone} <= {json.loads(line)["domain"] for line in listed.stdout.splitlines()}
    assert "the shared cache at" in listed.stderr
    shown = run_cli("cache", "show", "--config", str(one.config_path), domain)
    assert shown.returncode == 0 and "mode: enforce" in shown.stdout, shown.stdout + shown.stderr
    forgot = run_cli("cache", "forget", "--config", str(one.config_path), gone)
    assert forgot.returncode == 0, forgot.stderr
    assert "for the whole fleet" in forgot.stdout
    assert not redis_server.client().exists(f"{PREFIX}d:{gone}")
    # The other node dropped its copy too: its next lookup fetches again (once, for the fleet).
    assert eventually(lambda: ask(two, gone) == "OK " + secure(gone) and rig.https.count(gone) == 2, timeout=10)
