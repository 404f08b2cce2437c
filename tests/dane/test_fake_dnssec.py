"""The in-memory validating resolver of the fast tier (tests/fakes.FakeDnssec) answers as the real
one does: for the same records, net/dane_lookup.py finds the same things through it as through the
signed world's unbound, and the decision is the same."""

from __future__ import annotations

import asyncio

import pytest

from mtasts_policyd.core.dane import DaneInputs, MxState
from mtasts_policyd.core.dane_verdict import decide
from mtasts_policyd.net.dane_lookup import dane_inputs
from mtasts_policyd.net.dnssec import DnssecResolver, ProbeTarget, probe
from mtasts_policyd.ops.views import tlsa_status
from tests.dane.daemon_world import PKIX_TLSA, TLSA
from tests.fakes import FakeDnssec
from tests.rig.dnssec import DnssecWorld

# name: (signed, TLSA of the one MX host, with an MX record)
SHAPES = {
    "signed with TLSA": (True, (TLSA,), True),
    "signed without TLSA": (True, (), True),
    "signed, unusable TLSA": (True, (PKIX_TLSA,), True),
    "unsigned with TLSA": (False, (TLSA,), True),
    "no MX, the domain itself": (True, (TLSA,), False),
}


def seen(inputs: DaneInputs) -> tuple[object, ...]:
    """What the decision reads, without names and TTLs (the zones differ in name)."""
    mx = inputs.mx
    assert isinstance(mx, MxState)
    return (mx.kind, mx.secure, len(mx.hosts), [tlsa_status(h.tlsa) for h in inputs.hosts],
            decide(inputs).verdict)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_fake_and_world_find_the_same(world: DnssecWorld, resolver: DnssecResolver, shape: str) -> None:
    signed, tlsa, has_mx = SHAPES[shape]
    zone = world.zone(label="parity", signed=signed)
    fake = FakeDnssec()
    host = f"mx.{zone.domain}" if has_mx else zone.domain
    for answerer in (world, fake):
        answerer.set(host, "A", "127.0.0.40")
        answerer.set(host, "AAAA", "::1")
        if tlsa:
            answerer.set(f"_25._tcp.{host}", "TLSA", *tlsa)
        if has_mx:
            answerer.set(zone.domain, "MX", f"10 {host}.")
    if not signed:
        fake.insecure(zone.domain)
    world.publish()
    real = asyncio.run(dane_inputs(resolver, zone.domain))
    assert seen(asyncio.run(dane_inputs(fake, zone.domain))) == seen(real)


def test_probe_of_the_fake_as_of_the_world(world: DnssecWorld, resolver: DnssecResolver) -> None:
    target = ProbeTarget.parse(world.probe)
    assert asyncio.run(probe(FakeDnssec(), target)).validating is asyncio.run(probe(resolver, target)).validating
    assert asyncio.run(probe(FakeDnssec(validating=False), target)).validating is False
