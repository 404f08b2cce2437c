"""The fakes are worth trusting: for the same data they answer what the real seams answer from
the real servers (tests/rig), and the fast tier's guard refuses sockets and processes.

The parity tests open sockets (they ask the rig), so they are not in the fast tier themselves.
"""

from __future__ import annotations

import socket
import subprocess

import pytest

from mtasts_policyd.core.errors import MtaStsError
from mtasts_policyd.net.dns import DnsDiscovery
from mtasts_policyd.net.https import PolicyFetcher
from tests.fakes import FakeNet

CASES = {
    "one record": [("_mta-sts.{d}", "TXT", ("v=STSv1; id=abc",))],
    "split strings": [("_mta-sts.{d}", "TXT", (["v=STSv1; ", "id=split1"],))],
    "beside other TXT": [("_mta-sts.{d}", "TXT", ("v=spf1 -all", "v=STSv1; id=7"))],
    "two records": [("_mta-sts.{d}", "TXT", ("v=STSv1; id=1", "v=STSv1; id=2"))],
    "invalid id": [("_mta-sts.{d}", "TXT", ("v=STSv1; id=a-b",))],
    "no stsv1": [("_mta-sts.{d}", "TXT", ("v=spf1 -all",))],
    "nxdomain": [],
    "nodata": [("_mta-sts.{d}", "A", ("192.0.2.1",))],
}


def outcome(call):
    """What a seam call gives, comparable across implementations: the value, or the failure's
    kind and TTL (details are worded by each implementation)."""
    try:
        return call()
    except MtaStsError as exc:
        return (exc.kind, exc.ttl)


@pytest.mark.parametrize("case", sorted(CASES))
def test_fake_dns_answers_as_the_real_one(rig, case):
    domain = rig.domain("parity")
    fake = FakeNet()
    fake.dns.negative_ttl = rig.dns.negative_ttl
    for name, rdtype, values in CASES[case]:
        for world in (rig.dns, fake.dns):
            world.set(name.format(d=domain), rdtype, *values, ttl=123)
    real = DnsDiscovery(rig.dns_settings())
    assert outcome(lambda: fake.dns.sts_record(domain)) == outcome(lambda: real.sts_record(domain))
    assert outcome(lambda: fake.dns.tlsrpt_record(domain)) == outcome(lambda: real.tlsrpt_record(domain))


@pytest.mark.parametrize("fault", ["servfail", "timeout"])
def test_fake_dns_faults_are_temporary_as_the_real_ones(rig, fault):
    domain = rig.domain("fault")
    fake = FakeNet()
    rig.dns.fault(f"_mta-sts.{domain}", fault)
    fake.dns.fault(f"_mta-sts.{domain}", fault)
    try:
        real = outcome(lambda: DnsDiscovery(rig.dns_settings()).sts_record(domain))
    finally:
        rig.dns.fault(f"_mta-sts.{domain}", None)
    assert outcome(lambda: fake.dns.sts_record(domain)) == real


def test_fake_mx_and_addresses_as_the_real_ones(rig):
    domain, null, bare = rig.domain("mx"), rig.domain("null"), rig.domain("bare")
    fake = FakeNet()
    fake.dns.negative_ttl = rig.dns.negative_ttl
    for world in (rig.dns, fake.dns):
        world.set(domain, "MX", f"20 B.{domain}.", f"10 a.{domain}.", ttl=77)
        world.set(null, "MX", "0 .", ttl=77)
        world.set(bare, "A", "127.0.0.9")
        world.set(bare, "AAAA", "::1")
    real = DnsDiscovery(rig.dns_settings())
    for name in (domain, null, bare, rig.domain("missing")):
        assert outcome(lambda: fake.dns.mx_hosts(name)) == outcome(lambda: real.mx_hosts(name)), name
        assert outcome(lambda: fake.dns.addresses(name)) == outcome(lambda: real.addresses(name)), name


@pytest.mark.parametrize("serve", [{}, {"status": 404}, {"cert": "untrusted"}, {"cert": "expired"}])
def test_fake_fetcher_fails_as_the_real_one(rig, serve):
    domain = rig.domain("fetch")
    fake = FakeNet()
    rig.publish(domain, **serve)
    fake.publish(domain, **serve)
    real = PolicyFetcher(DnsDiscovery(rig.dns_settings()), rig.fetch_settings())
    assert outcome(lambda: fake.https.fetch(domain)) == outcome(lambda: real.fetch(domain))


@pytest.mark.fast
def test_the_fast_tier_refuses_sockets_and_processes(fast_tier_guard):
    with pytest.raises(RuntimeError, match="must not open sockets"):
        socket.create_connection(("127.0.0.1", 9), timeout=1)
    with pytest.raises(RuntimeError, match="must not open sockets or start processes"):
        subprocess.run(["true"], check=False)
    assert len(fast_tier_guard.violations) == 2
    for end in socket.socketpair():  # asyncio's self-pipe wraps existing descriptors: allowed
        end.close()
    fast_tier_guard.violations.clear()  # proven; the teardown would fail the test otherwise
