"""The DNSSEC-signed test world (tests/rig/dnssec.py) for the DANE tests: one per run, started on
first use. Without nsd and unbound (Debian packages; .ci/install-debian.sh installs them) the tests
that need it skip and say why."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from mtasts_policyd.net.dns import DnsSettings
from mtasts_policyd.net.dnssec import DnssecResolver
from tests.rig.dnssec import DnssecWorld, missing_tools


@pytest.fixture(scope="session")
def world() -> Iterator[DnssecWorld]:
    missing = missing_tools()
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (Debian packages nsd, unbound; .ci/install-debian.sh)")
    with DnssecWorld(lifetime=1800) as started:
        yield started


def resolver_settings(world: DnssecWorld, timeout: float = 5.0) -> DnsSettings:
    """The daemon's DNS settings pointing at the world's validating resolver."""
    return DnsSettings(nameservers=(world.host,), port=world.resolver_port, timeout=timeout)


@pytest.fixture
def resolver(world: DnssecWorld) -> DnssecResolver:
    return DnssecResolver(resolver_settings(world))
