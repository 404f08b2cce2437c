"""Real Exim delivering real mail with contrib/exim/exim.conf: MTA-STS enforced on the wire."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from tests.e2e.exim_mta import EximInstance
from tests.e2e.world import SCENARIOS, Mx, Scenario, World, temp_dir, wait_until

_serial = itertools.count(1)


@pytest.fixture(scope="module")
def exim(world: World, policyd) -> Iterator[EximInstance]:
    yield EximInstance(temp_dir("exim-"), "127.0.0.1:8462")


def marker(name: str) -> str:
    return f"exim-{name}-{next(_serial)}"


def test_exim_asks_the_daemon(exim: EximInstance, world: World):
    assert exim.expand("${readsocket{inet:127.0.0.1:8462}{policy enforce-ok.e2e.test\\n}{5s}{}{down}}") == \
        "enforce mx.enforce-ok.e2e.test"
    assert exim.expand("${readsocket{inet:127.0.0.1:8462}{mx wildcard.e2e.test a.b.mx.wildcard.e2e.test\\n}{5s}{}{down}}") == "nomatch"


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_delivery_outcome(exim: EximInstance, world: World, scenario: Scenario):
    rcpt = f"user@{scenario.domain}"
    tag = marker(scenario.name)
    exim.send(rcpt, tag)
    status = exim.status_of(rcpt)
    assert status is not None, exim.log()
    received = world.received(tag)
    if scenario.delivered_to is None:
        assert status.outcome == "deferred", status.line
        assert received == {}
        return
    host = f"{scenario.delivered_to}.{scenario.domain}"
    assert status.outcome == "delivered", status.line
    assert list(received) == [host], status.line
    message = received[host][0]
    if scenario.tls_required:
        assert message.tls and message.sni == host
        assert "CV=yes" in status.line


@pytest.mark.parametrize("name, refused, allowed", [("enforce-outside", "rogue", "good"), ("wildcard", "a.b.mx", "a.mx")])
def test_outside_hosts_never_contacted(world: World, policyd, name: str, refused: str, allowed: str):
    # RFC 8461 §4.1, §5.1: under enforce an MX outside the policy is not even connected to: the
    # transport's tcp:connect event refuses it (contrib/exim/exim.conf). It must be shown that Exim
    # tried it (first by preference; the log line says the event turned it down), that it got
    # nothing, and that the mail went to the policy's MX. A fresh Exim, so that no retry record of
    # an earlier test lets Exim skip the host without trying.
    exim = EximInstance(temp_dir("exim-refuse-"), "127.0.0.1:8462")
    domain = f"{name}.e2e.test"
    refused_host, allowed_host = f"{refused}.{domain}", f"{allowed}.{domain}"
    sink = world.sinks[refused_host]
    before = sink.connections
    rcpt, tag = f"user@{domain}", marker("never")
    exim.send(rcpt, tag)
    log = exim.log()
    refusals = [line for line in log.splitlines() if f" H={refused_host} [" in line]
    assert len(refusals) == 1 and refusals[0].endswith("Event requests alternate response"), log
    status = exim.status_of(rcpt)
    assert status is not None and status.outcome == "delivered" and f" H={allowed_host} [" in status.line, log
    assert log.index(refusals[0]) < log.index(status.line)  # tried first, as its MX preference says
    assert list(world.received(tag)) == [allowed_host]
    assert sink.connections == before  # not even a TCP connection


def test_changed_policy_id_followed_within_ttl(exim: EximInstance, world: World):
    # RFC 8461 §3.3/§5.1: a new id means a new policy; the daemon picks it up once the TXT TTL passed.
    old = Scenario("exim-change", "version: STSv1\nmode: enforce\nmx: old.{d}\nmax_age: 86400\n",
                   (Mx("new", "tls"),), None)
    world.publish(old, policy_id="1", ttl=1)
    rcpt = f"user@{old.domain}"
    tag = marker("change")
    exim.send(rcpt, tag)
    assert exim.status_of(rcpt).outcome == "deferred"
    new = Scenario(old.name, "version: STSv1\nmode: enforce\nmx: new.{d}\nmax_age: 86400\n", old.mx, "new")
    world.publish(new, policy_id="2", ttl=1)
    delivered = wait_until(lambda: exim.status_of(rcpt).outcome == "delivered", timeout=30, interval=1,
                           between=exim.flush)
    assert delivered, exim.log()
    assert list(world.received(tag)) == [f"new.{old.domain}"]
    assert world.received(tag)[f"new.{old.domain}"][0].tls


def test_daemon_down_fails_closed_by_default(exim: EximInstance, world: World, policyd):
    # Without MTASTS_FAIL_OPEN: no answer from the daemon means defer, for every remote domain.
    policyd.stop()
    try:
        for scenario in ("enforce-ok", "nopolicy"):
            rcpt = f"user@{scenario}.e2e.test"
            tag = marker(f"down-{scenario}")
            exim.send(rcpt, tag)
            status = exim.status_of(rcpt)
            assert status.outcome == "deferred", status.line
            assert world.received(tag) == {}
    finally:
        policyd.start()
    exim.flush()
    for scenario in ("enforce-ok", "nopolicy"):
        assert exim.status_of(f"user@{scenario}.e2e.test").outcome == "delivered"


def test_daemon_down_fail_open_delivers_as_without_policy(world: World, policyd):
    # With MTASTS_FAIL_OPEN the operator chose availability: delivery as if there were no policy.
    exim = EximInstance(temp_dir("exim-open-"), "127.0.0.1:8462", fail_open=True)
    policyd.stop()
    try:
        rcpt = "user@enforce-ok.e2e.test"
        tag = marker("open")
        exim.send(rcpt, tag)
        status = exim.status_of(rcpt)
        assert status.outcome == "delivered", exim.log()
        assert "R=dnslookup T=remote_smtp" in status.line  # delivered as without MTA-STS
        assert list(world.received(tag)) == ["mx.enforce-ok.e2e.test"]
    finally:
        policyd.start()
    # With the daemon back, the same configuration enforces again.
    rcpt, tag = "user@enforce-badname.e2e.test", marker("open-back")
    exim.send(rcpt, tag)
    assert exim.status_of(rcpt).outcome == "deferred" and world.received(tag) == {}
