"""Fixtures for the end-to-end tests: the world (DNS, HTTPS, MX hosts), the daemon, the MTAs."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest
import yaml

from tests.conftest import Daemon
from tests.e2e.daemon_dane import daemon_dane_config
from tests.e2e.world import (
    DANE_SCENARIOS,
    FACT_SCENARIOS,
    SCENARIOS,
    World,
    in_private_namespace,
    operator_environment,
    start_world,
    temp_dir,
)

SOCKETMAP_PORT = 8461
EXIM_PORT = 8462


@pytest.fixture(scope="session")
def world() -> Iterator[World]:
    if not in_private_namespace():
        message = "end-to-end tests run inside the private namespace that `bash .ci/run` makes (as root)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    directory = temp_dir("mtasts-e2e-")
    world = start_world(directory)
    for scenario in SCENARIOS + DANE_SCENARIOS + FACT_SCENARIOS:
        world.publish(scenario)
    try:
        yield world
    finally:
        world.stop()
        world.https.stop()
        world.signed.stop()
        world.dns.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def policyd(world: World) -> Iterator[Daemon]:
    """mtasts-policyd on its default ports, resolving through the world's validating resolver and
    trusting what the machine trusts (no fetch.ca_file, no variable choosing a CA store); with the
    contract's `dane` section (issue 9) once the daemon takes it (tests/e2e/daemon_dane.py)."""
    config = {
        "socketmap": {"listen": [f"127.0.0.1:{SOCKETMAP_PORT}"]},
        "exim": {"listen": [f"127.0.0.1:{EXIM_PORT}"]},
        "dns": {"nameservers": ["127.0.0.1"], "timeout": 3},
        "fetch": {"timeout": 5},
        "cache": {"path": str(world.directory / "policyd" / "cache.sqlite3")},
        # Short bounds so a changed policy id is followed within the test's TXT TTL.
        "resolver": {"txt_ttl_min": 1, "negative_ttl_min": 1, "backoff_min": 1, "dns_backoff_min": 1},
        "log_level": "debug",  # a line per map query, cached answers too: the tests count Postfix's queries
        **daemon_dane_config(),
    }
    path = world.directory / "policyd.yaml"
    path.write_text(yaml.safe_dump(config))
    daemon = Daemon(path, SOCKETMAP_PORT, world.directory / "policyd.log", env=operator_environment()).start()
    try:
        yield daemon
    finally:
        if daemon.process is not None and daemon.process.poll() is None:
            daemon.stop()
