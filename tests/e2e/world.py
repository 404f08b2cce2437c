"""The end-to-end world: a private network namespace holding everything a real MTA talks to.

Inside the namespace (made by .ci/run with `unshare --mount --net`) the tests own loopback:
the authoritative DNS server answers on 127.0.0.1:53 and /etc/resolv.conf points at it (bind
mount, private to the namespace), the HTTPS policy server listens on 127.0.0.1:443, and SMTP
servers act as MX hosts on 127.0.0.11 and up, port 25. The MTAs resolve and connect exactly as
they would on the Internet.

The machine trusts the world's test CA the way an operator's machine trusts a private CA: the
system bundle /etc/ssl/certs/ca-certificates.crt is replaced (bind mount, private to the
namespace) by the system bundle plus the test CA, which is what update-ca-certificates makes of
a CA dropped into /usr/local/share/ca-certificates. The daemon (its default trust store),
Postfix (contrib's smtp_tls_CAfile) and Exim (`tls_verify_certificates = system`) all run on
that, without any CA setting of their own.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.rig import DnsServer, PolicyServer, SmtpServer, make_ca

ZONE = "e2e.test"
SENDER = f"sender@{ZONE}"
SYSTEM_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"  # Debian's ca-certificates bundle
TRUST_VARIABLES = ("SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE")


def operator_environment() -> dict[str, str]:
    """This process's environment without the variables that would choose a CA store: what a
    daemon started by systemd or an operator's shell has on a stock machine."""
    return {name: value for name, value in os.environ.items() if name not in TRUST_VARIABLES}


def in_private_namespace() -> bool:
    """Root, in a network namespace with only loopback, and in a mount namespace of our own."""
    host_mounts = os.environ.get("MTASTS_HOST_MNTNS")
    return (os.geteuid() == 0 and bool(host_mounts)
            and os.readlink("/proc/self/ns/mnt") != host_mounts
            and [name for _, name in socket.if_nameindex()] == ["lo"])


@dataclass(frozen=True)
class Mx:
    label: str  # host name is <label>.<domain>
    behaviour: str  # SmtpServer behaviour: tls, wrong-cert, untrusted, no-starttls
    preference: int = 10


@dataclass(frozen=True)
class Scenario:
    """One destination domain, its policy, its MX hosts, and where mail to it must end."""

    name: str
    policy: str | None  # policy body with {d} for the domain; None: no _mta-sts record at all
    mx: tuple[Mx, ...]
    delivered_to: str | None  # MX label that must receive the mail over TLS-or-not; None: deferred
    tls_required: bool = False  # the delivery must have used TLS (enforce)

    @property
    def domain(self) -> str:
        return f"{self.name}.{ZONE}"


def _policy(mode: str, *patterns: str) -> str:
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {p}" for p in patterns), "max_age: 86400"]
    return "\n".join(lines) + "\n"


SCENARIOS = [
    Scenario("enforce-ok", _policy("enforce", "mx.{d}"), (Mx("mx", "tls"),), "mx", tls_required=True),
    Scenario("enforce-badname", _policy("enforce", "mx.{d}"), (Mx("mx", "wrong-cert"),), None),
    Scenario("enforce-untrusted", _policy("enforce", "mx.{d}"), (Mx("mx", "untrusted"),), None),
    Scenario("enforce-notls", _policy("enforce", "mx.{d}"), (Mx("mx", "no-starttls"),), None),
    # RFC 8461 §4.1/§5.1: an MX outside the policy is skipped for one inside it.
    Scenario("enforce-outside", _policy("enforce", "good.{d}"),
             (Mx("rogue", "tls", 10), Mx("good", "tls", 20)), "good", tls_required=True),
    # RFC 8461 §4.1: "*.mx.d" covers a.mx.d but not a.b.mx.d (which has a valid certificate too).
    Scenario("wildcard", _policy("enforce", "*.mx.{d}"),
             (Mx("a.b.mx", "tls", 10), Mx("a.mx", "tls", 20)), "a.mx", tls_required=True),
    # RFC 8461 §5: testing, none and no policy deliver as before (opportunistic TLS).
    Scenario("testing", _policy("testing", "mx.{d}"), (Mx("mx", "wrong-cert"),), "mx"),
    Scenario("none", _policy("none"), (Mx("mx", "untrusted"),), "mx"),
    Scenario("nopolicy", None, (Mx("mx", "no-starttls"),), "mx"),
]


@dataclass
class World:
    dns: DnsServer
    https: PolicyServer
    ca_file: str  # the test CA alone (PEM); the machine's bundle holds it too
    directory: Path
    sinks: dict[str, SmtpServer] = field(default_factory=dict)  # by MX host name
    _next_ip: int = 11

    def add_mx(self, host: str, behaviour: str) -> SmtpServer:
        ip = f"127.0.0.{self._next_ip}"
        self._next_ip += 1
        sink = SmtpServer(ip, 25, hostname=host, ca=self.https.ca, behaviour=behaviour, lifetime=1800).start()
        self.sinks[host] = sink
        self.dns.set(host, "A", ip)
        return sink

    def publish(self, scenario: Scenario, policy_id: str = "1", ttl: int = 300) -> None:
        d = scenario.domain
        if scenario.policy is not None:
            self.dns.set(f"_mta-sts.{d}", "TXT", f"v=STSv1; id={policy_id}", ttl=ttl)
            self.dns.set(f"mta-sts.{d}", "A", "127.0.0.1")
            self.https.set_policy(d, scenario.policy.format(d=d))
        records = []
        for mx in scenario.mx:
            host = f"{mx.label}.{d}"
            if host not in self.sinks:
                self.add_mx(host, mx.behaviour)
            records.append(f"{mx.preference} {host}.")
        self.dns.set(d, "MX", *records, ttl=ttl)

    def received(self, marker: str) -> dict[str, list]:
        """Which MX hosts received a message carrying `marker` (a unique header value)."""
        found: dict[str, list] = {}
        for host, sink in self.sinks.items():
            hits = [m for m in sink.messages if marker.encode() in m.data]
            if hits:
                found[host] = hits
        return found

    def stop(self) -> None:
        for sink in self.sinks.values():
            sink.stop()


def start_world(directory: Path) -> World:
    """Start DNS on :53 and HTTPS on :443, and make the system resolver use our DNS server."""
    ca = make_ca()
    dns_server = DnsServer("127.0.0.1", 53, lifetime=1800, negative_ttl=5).start()
    https = PolicyServer("127.0.0.1", 443, lifetime=1800, ca=ca).start()
    resolv = directory / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\noptions attempts:2 timeout:2\n")
    subprocess.run(["mount", "--bind", str(resolv), "/etc/resolv.conf"], check=True)
    hosts = directory / "hosts"
    hosts.write_text("127.0.0.1 localhost\n::1 localhost\n")
    subprocess.run(["mount", "--bind", str(hosts), "/etc/hosts"], check=True)
    dns_server.set(f"sender.{ZONE}", "A", "127.0.0.1")
    ca_file = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    os.chmod(ca_file, 0o644)
    trust_system_wide(ca_file, directory)
    return World(dns_server, https, str(ca_file), directory)


def trust_system_wide(ca_file: Path, directory: Path) -> None:
    """Make the machine trust `ca_file` (see the module docstring): system bundle + CA, bind-mounted
    over the system bundle, world-readable like the original."""
    bundle = directory / "ca-certificates.crt"
    system = Path(SYSTEM_BUNDLE).read_text()
    bundle.write_text(system + ("" if system.endswith("\n") else "\n") + ca_file.read_text())
    os.chmod(bundle, 0o644)
    subprocess.run(["mount", "--bind", str(bundle), SYSTEM_BUNDLE], check=True)


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.2,
               between: Callable[[], object] | None = None) -> bool:
    """Poll `predicate` until true or `timeout`; `between` runs after each failed poll."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if between is not None:
            between()
        time.sleep(interval)
    return bool(predicate())


def temp_dir(prefix: str) -> Path:
    """A directory that the MTAs' unprivileged users can enter (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(path, 0o755)
    return path
