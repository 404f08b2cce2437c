"""The end-to-end world: a private network namespace holding everything a real MTA talks to.

Inside the namespace (made by .ci/run with `unshare --mount --net`) the tests own loopback:
a validating resolver (unbound) answers on 127.0.0.1:53 and /etc/resolv.conf points at it (bind
mount, private to the namespace, with `options trust-ad`: glibc >= 2.31 passes the AD bit on to
the MTAs only then), the HTTPS policy server listens on 127.0.0.1:443, and SMTP servers act as MX
hosts on 127.0.0.11 and up, port 25. The MTAs resolve and connect exactly as they would on the
Internet.

DNS is the DNSSEC world of tests/rig/dnssec.py: nsd serves a signed root and "test." (the
resolver's trust anchor is the root), and every DANE domain is a signed zone of its own below
"test." (`<name>.test`). The MTA-STS scenarios live in the unsigned zone "e2e.test", delegated
without DS (insecure) to the plain rig DnsServer, which unbound asks without caching: a change
there is seen at once, as when that server answered on :53 itself.

The machine trusts the world's test CA the way an operator's machine trusts a private CA: the
system bundle /etc/ssl/certs/ca-certificates.crt is replaced (bind mount, private to the
namespace) by the system bundle plus the test CA, which is what update-ca-certificates makes of
a CA dropped into /usr/local/share/ca-certificates. The daemon (its default trust store),
Postfix (contrib's smtp_tls_CAfile) and Exim (`tls_verify_certificates = system`) all run on
that, without any CA setting of their own.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.rig import DnsServer, PolicyServer, SmtpServer, make_ca
from tests.rig.dnssec import DnssecWorld, missing_tools

ZONE = "e2e.test"  # unsigned: the MTA-STS scenarios
SIGNED_PARENT = "test"  # signed, with a signed zone per DANE scenario below it
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


TLSA_KINDS = ("match", "mismatch", "bogus")


@dataclass(frozen=True)
class Mx:
    label: str  # host name is <label>.<domain>; with a final dot, the host name itself
    behaviour: str  # SmtpServer behaviour: tls, wrong-cert, untrusted, no-starttls
    preference: int = 10
    # The host's TLSA RRset (_25._tcp.<host>), one DANE-EE record (3 1 1, RFC 7672 §3.1.1):
    # "match" (the SHA-256 of the sink's public key), "mismatch" (of another key: the certificate
    # stays PKIX-valid for the test CA), "bogus" (the matching record signed, then a mismatching
    # one served under that signature: SERVFAIL from the resolver); None: no TLSA.
    tlsa: str | None = None


@dataclass(frozen=True)
class Scenario:
    """One destination domain, its policy, its MX hosts, and where mail to it must end."""

    name: str
    policy: str | None  # policy body with {d} for the domain; None: no _mta-sts record at all
    mx: tuple[Mx, ...]
    delivered_to: str | None  # MX label that must receive the mail over TLS-or-not; None: deferred
    tls_required: bool = False  # the delivery must have used TLS (enforce)
    signed: bool = False  # the domain is a DNSSEC-signed zone of its own, <name>.test
    # Issue 9's verdict for the domain ("dane-only", "dane", "temp"; None: no secure TLSA, the
    # MTA-STS answer stands): what the stand-in maps answer and what the daemon must answer.
    dane: str | None = None
    by_dane: bool = False  # the delivery must have been authenticated by DANE

    @property
    def domain(self) -> str:
        return f"{self.name}.{SIGNED_PARENT}" if self.signed else f"{self.name}.{ZONE}"

    def host(self, mx: Mx) -> str:
        """The MX host name of `mx` for this domain."""
        return mx.label.rstrip(".") if mx.label.endswith(".") else f"{mx.label}.{self.domain}"


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

# Issue 9: DANE takes precedence (RFC 8461 §2), each domain its own signed zone unless said.
DANE_SCENARIOS = [
    # DANE and MTA-STS, the TLSA matches: delivered, authenticated by DANE.
    Scenario("dane-match", _policy("enforce", "mx.{d}"), (Mx("mx", "tls", tlsa="match"),), "mx",
             tls_required=True, signed=True, dane="dane-only", by_dane=True),
    # The certificate is from a CA nobody trusts, the TLSA matches it: MTA-STS alone would defer,
    # so a delivery proves DANE authenticated the host (RFC 7672 §3.1.1: DANE-EE needs no CA).
    Scenario("dane-untrusted", _policy("enforce", "mx.{d}"), (Mx("mx", "untrusted", tlsa="match"),), "mx",
             tls_required=True, signed=True, dane="dane-only", by_dane=True),
    # DANE and MTA-STS, the TLSA does not match the (PKIX-valid) certificate: MTA-STS alone would
    # deliver; DANE must win, so deferred.
    Scenario("dane-mismatch", _policy("enforce", "mx.{d}"), (Mx("mx", "tls", tlsa="mismatch"),), None,
             signed=True, dane="dane-only"),
    # The TLSA RRset is bogus: the decision cannot be made, so deferred (never MTA-STS instead).
    Scenario("dane-bogus", _policy("enforce", "mx.{d}"), (Mx("mx", "tls", tlsa="bogus"),), None,
             signed=True, dane="temp"),
    # DANE only, no MTA-STS.
    Scenario("dane-nosts", None, (Mx("mx", "tls", tlsa="match"),), "mx", tls_required=True, signed=True,
             dane="dane-only", by_dane=True),
    # Two MX, the preferred one with a TLSA record that does not match, the other without TLSA:
    # "dane". The first is refused by DANE although MTA-STS lists it; the second gets the mail.
    Scenario("dane-twomx", _policy("enforce", "mx1.{d}", "mx2.{d}"),
             (Mx("mx1", "tls", 10, tlsa="mismatch"), Mx("mx2", "tls", 20)), "mx2", tls_required=True, signed=True,
             dane="dane"),
    # Signed, authenticated "no TLSA": MTA-STS still enforces, both ways.
    Scenario("signed-notlsa", _policy("enforce", "mx.{d}"), (Mx("mx", "tls"),), "mx", tls_required=True,
             signed=True),
    Scenario("signed-notlsa-badname", _policy("enforce", "mx.{d}"), (Mx("mx", "wrong-cert"),), None,
             signed=True),
    # Unsigned zone with MTA-STS and a TLSA record, which is ignored (RFC 7672 §2.2): MTA-STS
    # enforces and delivers.
    Scenario("unsigned-tlsa", _policy("enforce", "mx.{d}"), (Mx("mx", "tls", tlsa="mismatch"),), "mx",
             tls_required=True),
]


def spki_sha256(sink: SmtpServer) -> str:
    """RFC 6698 §2.1.2/§2.1.3: SHA-256 of the sink certificate's SubjectPublicKeyInfo (3 1 1)."""
    assert sink.cert is not None, f"{sink.hostname} has no certificate"
    cert = x509.load_pem_x509_certificate(sink.cert.cert_chain_pems[0].bytes())
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


OTHER_KEY = hashlib.sha256(b"a key no MX host of the world has").hexdigest()


# Cases for recording what the MTAs themselves do (not scenarios of the daemon's table).
# An unsigned MX record (in e2e.test) naming a host in a signed zone whose TLSA does not match:
# issue 9's "insecure MX pointing at a host with TLSA", verdict "dane".
INSECURE_MX = Scenario("insecure-mx", None, (Mx("mx.insecure-mx-host.test.", "tls", tlsa="mismatch"),), None,
                       dane="dane")
# Signed domains, no MTA-STS, one MX whose TLSA does not match: answered as a test needs.
MISMATCH = [Scenario(f"tlsa-mismatch-{n}", None, (Mx("mx", "tls", tlsa="mismatch"),), None, signed=True)
            for n in (1, 2)]
FACT_SCENARIOS = [INSECURE_MX, *MISMATCH]


@dataclass
class World:
    dns: DnsServer  # the unsigned zone e2e.test
    signed: DnssecWorld  # nsd and the validating resolver on 127.0.0.1:53
    https: PolicyServer
    ca_file: str  # the test CA alone (PEM); the machine's bundle holds it too
    directory: Path
    sinks: dict[str, SmtpServer] = field(default_factory=dict)  # by MX host name
    _next_ip: int = 11

    @staticmethod
    def is_signed(name: str) -> bool:
        """Whether `name` lives in the signed world (not in the unsigned zone e2e.test)."""
        name = name.rstrip(".").lower()
        return not (name == ZONE or name.endswith(f".{ZONE}"))

    def set(self, owner: str, rdtype: str, *values: str, ttl: int = 300) -> None:
        """Set an RRset where `owner` lives: at once in e2e.test; in its signed zone (made when
        needed: the last two labels, `<name>.test`) after publish_signed()."""
        if not self.is_signed(owner):
            self.dns.set(owner, rdtype, *values, ttl=ttl)
            return
        origin = ".".join(owner.rstrip(".").split(".")[-2:]) + "."
        if self.signed.zone_of(origin).name != origin:
            self.signed.zone(origin)
        self.signed.set(owner, rdtype, *values, ttl=ttl)

    def publish_signed(self) -> None:
        """Sign and serve what changed in the signed zones (seen by the resolver on return)."""
        self.signed.publish()

    def add_mx(self, host: str, behaviour: str) -> SmtpServer:
        ip = f"127.0.0.{self._next_ip}"
        self._next_ip += 1
        sink = SmtpServer(ip, 25, hostname=host, ca=self.https.ca, behaviour=behaviour, lifetime=1800).start()
        self.sinks[host] = sink
        self.set(host, "A", ip)
        return sink

    def set_tlsa(self, host: str, kind: str | None) -> None:
        """The TLSA RRset of MX host `host` (see Mx.tlsa); None removes it."""
        if kind is not None and kind not in TLSA_KINDS:
            raise ValueError(f"unknown TLSA kind {kind!r}; expected one of {TLSA_KINDS}")
        owner = f"_25._tcp.{host}"
        if kind is None:
            (self.signed.remove if self.is_signed(host) else self.dns.remove)(owner, "TLSA")
            return
        match, mismatch = f"3 1 1 {spki_sha256(self.sinks[host])}", f"3 1 1 {OTHER_KEY}"
        self.set(owner, "TLSA", mismatch if kind == "mismatch" else match)
        if kind == "bogus":
            # RFC 4035 §5.3: the RRSIG made for the matching record does not cover this one.
            self.signed.bogus(owner, "TLSA", mismatch)

    def publish(self, scenario: Scenario, policy_id: str = "1", ttl: int = 300) -> None:
        d = scenario.domain
        if scenario.policy is not None:
            self.set(f"_mta-sts.{d}", "TXT", f"v=STSv1; id={policy_id}", ttl=ttl)
            self.set(f"mta-sts.{d}", "A", "127.0.0.1")
            self.https.set_policy(d, scenario.policy.format(d=d))
        records = []
        for mx in scenario.mx:
            host = scenario.host(mx)
            if host not in self.sinks:
                self.add_mx(host, mx.behaviour)
            self.set_tlsa(host, mx.tlsa)
            records.append(f"{mx.preference} {host}.")
        self.set(d, "MX", *records, ttl=ttl)
        self.publish_signed()

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
    """Start the validating resolver on :53 (nsd and the e2e.test server behind it) and HTTPS on
    :443, and make the system resolver the world's."""
    missing = missing_tools()
    if missing:
        raise RuntimeError(f"{', '.join(missing)} not installed (Debian packages nsd, unbound: "
                           ".ci/install-debian.sh)")
    ca = make_ca()
    dns_server = DnsServer("127.0.0.1", 0, lifetime=1800, negative_ttl=5).start()
    signed = DnssecWorld("127.0.0.1", lifetime=1800, negative_ttl=5, resolver_port=53)
    signed.external(f"{ZONE}.", dns_server.host, dns_server.port)
    signed.start()
    https = PolicyServer("127.0.0.1", 443, lifetime=1800, ca=ca).start()
    resolv = directory / "resolv.conf"
    # trust-ad: glibc >= 2.31 clears the AD bit of answers unless told the resolver is trusted,
    # and Postfix (smtp_dns_support_level = dnssec) and Exim (DANE) decide on that bit.
    resolv.write_text("nameserver 127.0.0.1\noptions attempts:2 timeout:2 trust-ad\n")
    subprocess.run(["mount", "--bind", str(resolv), "/etc/resolv.conf"], check=True)
    hosts = directory / "hosts"
    hosts.write_text("127.0.0.1 localhost\n::1 localhost\n")
    subprocess.run(["mount", "--bind", str(hosts), "/etc/hosts"], check=True)
    dns_server.set(f"sender.{ZONE}", "A", "127.0.0.1")
    ca_file = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    os.chmod(ca_file, 0o644)
    trust_system_wide(ca_file, directory)
    return World(dns_server, signed, https, str(ca_file), directory)


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
