"""Helpers for tests of a real daemon answering DANE on the signed world (tests/rig/dnssec.py): its
configuration (DNS through the world's validating unbound, MTA-STS policies on the rig's HTTPS
server), publishing a domain's MX hosts, TLSA and MTA-STS records in the signed zones, and asking
the daemon through both front ends."""

from __future__ import annotations

import itertools
import re
import socket
from pathlib import Path
from typing import Any

import yaml

from mtasts_policyd.core.dane import tlsa_name
from tests.conftest import Daemon, Rig, SocketmapClient, free_port
from tests.rig.dnssec import DnssecWorld, Zone

TLSA = "3 1 1 " + "5a" * 32  # DANE-EE SPKI SHA2-256: usable (RFC 7672 §3.1.1)
PKIX_TLSA = "1 1 1 " + "5a" * 32  # PKIX-EE: unusable for SMTP (RFC 7672 §3.1.3)
_names = itertools.count(1)


def world_dns(world: DnssecWorld) -> dict[str, Any]:
    """The daemon's `dns` section: the world's validating resolver."""
    return {"nameservers": [world.host], "port": world.resolver_port, "timeout": 2}


def write_daemon_config(rig: Rig, world: DnssecWorld, directory: Path, cache: Path, **extra: Any) -> Path:
    """A config on the signed world: one resolver for MTA-STS and DANE, as issue 9's operator has."""
    data = rig.config(cache, dns=world_dns(world), **extra)
    data.setdefault("socketmap", {}).setdefault("listen", [f"127.0.0.1:{free_port()}"])
    data.setdefault("exim", {}).setdefault("listen", [f"127.0.0.1:{free_port()}"])
    path = directory / f"dane-{next(_names)}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def start(config: Path, log: Path) -> Daemon:
    data = yaml.safe_load(config.read_text())
    port = int(data["socketmap"]["listen"][0].rsplit(":", 1)[1])
    exim = int(data["exim"]["listen"][0].rsplit(":", 1)[1])
    return Daemon(config, port, log, exim_port=exim).start()


def mail_host(world: DnssecWorld, host: str, *tlsa: str, ttl: int = 300) -> None:
    """An MX host with both address families and its TLSA RRset (none: authenticated "no TLSA")."""
    world.set(host, "A", "127.0.0.40", ttl=ttl)
    world.set(host, "AAAA", "::1", ttl=ttl)
    if tlsa:
        world.set(tlsa_name(host), "TLSA", *tlsa, ttl=ttl)


def set_mx(world: DnssecWorld, zone: Zone, *hosts: str, ttl: int = 300) -> str:
    world.set(zone.domain, "MX", *(f"{10 * n} {host}" for n, host in enumerate(hosts, 1)), ttl=ttl)
    return zone.domain


def enforce_body(*hosts: str) -> str:
    return "version: STSv1\nmode: enforce\n" + "".join(f"mx: {h.rstrip('.')}\n" for h in hosts) + "max_age: 86400\n"


def publish_sts(world: DnssecWorld, rig: Rig, domain: str, *hosts: str, ttl: int = 300) -> None:
    """MTA-STS for `domain` (RFC 8461 §3.1, §3.3) served by the world's zones and the rig's HTTPS
    server: the _mta-sts TXT record, the policy host's address, an enforce policy naming `hosts`."""
    world.set(f"_mta-sts.{domain}", "TXT", "v=STSv1; id=1", ttl=ttl)
    world.set(f"mta-sts.{domain}", "A", "127.0.0.1", ttl=ttl)
    rig.https.set_policy(domain, enforce_body(*hosts))


def sts_answer(*hosts: str) -> tuple[str, str]:
    """The MTA-STS answers (socketmap, Exim) for enforce_body(hosts)."""
    names = [h.rstrip(".") for h in hosts]
    return f"OK secure match={':'.join(names)} servername=hostname", " ".join(["enforce", *names])


def ask_exim(port: int, request: str, timeout: float = 15) -> str:
    """As Exim's ${readsocket}: one line, half-close, read to EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request.encode() + b"\n")
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    return data.decode().rstrip("\n")


def answers(daemon: Daemon, domain: str) -> tuple[str | None, str]:
    """(socketmap reply for map `postfix`, Exim `policy DOMAIN` reply)."""
    client = SocketmapClient(daemon.port)
    try:
        reply = client.ask(domain)
    finally:
        client.close()
    assert daemon.exim_port is not None
    return reply, ask_exim(daemon.exim_port, f"policy {domain}")


def resolver_queries(world: DnssecWorld) -> int:
    """Questions the world's unbound has been asked so far (unbound-control stats_noreset)."""
    text = world._unbound_control("stats_noreset")  # the rig has no public counter for unbound
    match = re.search(r"^total\.num\.queries=(\d+)$", text, re.MULTILINE)
    assert match, text
    return int(match.group(1))
