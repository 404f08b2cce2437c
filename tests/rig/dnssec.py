"""A DNSSEC-signed test world: Debian's nsd serves zones signed at test time with dnspython, and
Debian's unbound validates in front of it, on loopback high ports.

Why real programs: DANE (RFC 7672) rests on the AD bit of a validating resolver (RFC 4035 §3.2.3,
RFC 6840 §5.8). Only a real validator tells "secure", "insecure" (delegated without DS), "bogus"
(data changed after signing: SERVFAIL) and "lame" (a child whose server fails: SERVFAIL) apart
the way the operator's resolver will, so the daemon's DNSSEC code is tested unchanged.

The world:
- the root zone "." is signed and is unbound's trust anchor, so the default probe ". NS" comes
  back with AD (no root hints: unbound forwards everything to nsd; nothing leaves loopback);
- "test." is signed and delegated from the root with a DS (unbound's default local zone for the
  RFC 6761 name "test." is switched off: `local-zone: "test." nodefault`);
- `zone()` adds child zones below "test." (or below another zone): signed (delegated with DS) or
  insecure (delegated without DS, served unsigned); `lame()` adds a delegated child whose only
  server is a rig DnsServer answering SERVFAIL or REFUSED (unbound forwards it there);
  `external()` adds an insecure child served by a server of the caller's (e.g. the plain rig
  DnsServer of the end-to-end world), which unbound asks without caching, so a change there is
  seen at once, as if the resolver were that server;
- the resolver listens on a free high port, or on the `resolver_port` given (53 in a private
  network namespace, where it becomes the system resolver);
- records are changed with `set`/`add`/`remove` and go live with `publish()`: every changed zone
  is signed again, written, reloaded by nsd (checked by its SOA serial) and unbound's cache is
  flushed, so the change is visible at the resolver when `publish()` returns;
- `bogus()` serves an RRset other than the one that was signed (its RRSIG stays): bogus.

Each process runs under coreutils `timeout` (its own process group, killed at `lifetime`), so a
test run that dies cannot leave nsd or unbound behind; `stop()` ends them earlier.
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import dns.dnssec
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.DNSKEY
import dns.rrset
import dns.zone
from cryptography.hazmat.primitives.asymmetric import ec

from .bounded import BoundedServer, require_loopback
from .dns_server import DnsServer, _make_rdata

ALGORITHM = dns.dnssec.Algorithm.ECDSAP256SHA256  # RFC 8624 §3.1: MUST implement, widely deployed
NAMESERVER = "ns.test."  # the NS of every zone; its glue points at nsd (unbound forwards there anyway)
SIGNATURE_SKEW = 3600  # inception this far in the past: clocks of test machines differ a little
READY_TIMEOUT = 15.0  # start-up, reload and flush each finish within this or the rig fails loudly
POLL = 0.02
TOOLS = ("nsd", "nsd-control", "unbound", "unbound-control", "timeout")
LAME_ANSWERS = ("servfail", "refused")  # what lame() servers answer (a rig DnsServer fault)
_labels = itertools.count(1)


def tool(name: str) -> str | None:
    """The path of a program: Debian puts nsd and unbound in /usr/sbin, outside a user's PATH."""
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))


def missing_tools() -> list[str]:
    """The programs the world needs that are not installed (Debian packages nsd, unbound, coreutils)."""
    return [name for name in TOOLS if tool(name) is None]


Key = tuple[ec.EllipticCurvePrivateKey, dns.rdtypes.ANY.DNSKEY.DNSKEY]


def _name(text: str | dns.name.Name) -> dns.name.Name:
    """Absolute names everywhere: "a.test", "a.test." and "A.Test" are the same owner."""
    if isinstance(text, dns.name.Name):
        return text.canonicalize()
    return dns.name.from_text(text.strip() or ".").canonicalize()


def _new_key() -> Key:
    """A combined signing key (SEP flag: KSK and ZSK in one, as many small zones are signed)."""
    private = ec.generate_private_key(ec.SECP256R1())
    return private, dns.dnssec.make_dnskey(private.public_key(), ALGORITHM, flags=257)


@dataclass
class Zone:
    """One zone of the world: its records as published, how it is served and whether it is signed."""

    origin: dns.name.Name
    signed: bool
    negative_ttl: int
    key: Key = field(default_factory=_new_key)
    lame: str | None = None  # what the child's only server answers: "servfail" or "refused"
    server: str | None = None  # external(): "host@port" of the server that holds the zone
    records: dict[tuple[dns.name.Name, dns.rdatatype.RdataType], tuple[int, list[dns.rdata.Rdata]]] = \
        field(default_factory=dict)
    bogus: dict[tuple[dns.name.Name, dns.rdatatype.RdataType], list[dns.rdata.Rdata]] = field(default_factory=dict)
    serial: int = 0
    dirty: bool = True
    served: bool = False  # nsd (or, for a lame zone, the fault server via unbound) has been told about it

    @property
    def name(self) -> str:
        """Absolute, with the final dot: "z1.test."."""
        return self.origin.to_text()

    @property
    def domain(self) -> str:
        """As a mail domain is written: "z1.test"."""
        return self.origin.to_text(omit_final_dot=True)

    @property
    def file_name(self) -> str:
        return "root.zone" if self.origin == dns.name.root else f"{self.domain}.zone"

    def ds(self) -> dns.rdata.Rdata:
        """RFC 4509: the SHA-256 DS the parent publishes for this zone's key."""
        return dns.dnssec.make_ds(self.origin, self.key[1], "SHA256")


class DnssecWorld(BoundedServer):
    """nsd (authoritative) and unbound (validating) on loopback, bounded by `lifetime` seconds.

    `resolver_port` is where clients ask (unbound, on `host`; 0: a free high port, chosen at start);
    `nsd_port` answers authoritatively. Thread-safe: one lock serialises changes and publishing.
    """

    def __init__(self, host: str = "127.0.0.1", *, lifetime: float = 900, negative_ttl: int = 60,
                 val_bogus_ttl: int = 1, resolver_port: int = 0) -> None:
        super().__init__(host, 0, lifetime)
        self.negative_ttl = negative_ttl
        self.val_bogus_ttl = val_bogus_ttl
        self.nsd_port = 0
        self.resolver_port = resolver_port
        self._fixed_resolver_port = resolver_port != 0
        self.directory = Path()  # made by start(): zone files, configurations, sockets, logs
        self.zones: dict[dns.name.Name, Zone] = {}
        self.fault_server = DnsServer(host, lifetime=lifetime)
        self._processes: dict[str, subprocess.Popen] = {}
        self._lock = threading.RLock()
        self._serials = itertools.count(int(time.time()) % 1_000_000_000)
        self.root = self._new_zone(dns.name.root, signed=True)
        self.tld = self._new_zone(_name("test."), signed=True)
        self.tld.records[(_name(NAMESERVER), dns.rdatatype.A)] = (3600, [_make_rdata(dns.rdatatype.A, host)])

    # ----- zones -----------------------------------------------------------

    def _new_zone(self, origin: dns.name.Name, *, signed: bool, lame: str | None = None,
                  server: str | None = None) -> Zone:
        with self._lock:
            if origin in self.zones:
                raise ValueError(f"zone {origin} exists already")
            zone = Zone(origin, signed, self.negative_ttl, lame=lame, server=server)
            self.zones[origin] = zone
            parent = self._parent_of(origin)
            if parent is not None:
                parent.dirty = True  # its delegation (NS, DS) changes
            return zone

    def _parent_of(self, origin: dns.name.Name) -> Zone | None:
        """The closest enclosing zone of the world (None for the root)."""
        name = origin
        while name != dns.name.root:
            name = name.parent()
            if name in self.zones:
                return self.zones[name]
        return None

    def zone(self, name: str | None = None, *, signed: bool = True, label: str = "z") -> Zone:
        """A new child zone, delegated from its closest enclosing zone; signed: with a DS in the
        parent (secure), else without (RFC 4035 §5.2: an insecure delegation). Default name: a
        fresh `<label>N.test.`. Served after the next publish()."""
        return self._new_zone(_name(name or f"{label}{next(_labels)}.test."), signed=signed)

    def lame(self, name: str | None = None, *, answer: str = "servfail", signed: bool = True,
             label: str = "lame") -> Zone:
        """A delegated child whose only server answers "servfail" or "refused" to everything.
        signed: the parent publishes a DS for it, as for a signed zone whose servers broke. A
        validating resolver answers SERVFAIL for every name in it."""
        if answer not in LAME_ANSWERS:
            raise ValueError(f"unknown answer {answer!r}; expected one of {LAME_ANSWERS}")
        return self._new_zone(_name(name or f"{label}{next(_labels)}.test."), signed=signed, lame=answer)

    def external(self, name: str, host: str, port: int) -> Zone:
        """An insecure child (delegated without DS, RFC 4035 §5.2) whose records live on the
        caller's server at host:port (a rig DnsServer, say), not here: unbound forwards every
        question in it there and caches none of the answers (`forward-no-cache`), so a change on
        that server is seen at once. Only before start(): the forward is part of unbound's
        configuration."""
        require_loopback(host)
        with self._lock:
            if self._processes:
                raise RuntimeError("external() zones must be added before start()")
            return self._new_zone(_name(name), signed=False, server=f"{host}@{port}")

    def set_signed(self, zone: Zone, signed: bool) -> None:
        """Make a zone secure or insecure (served unsigned, its DS gone from the parent)."""
        with self._lock:
            zone.signed = signed
            zone.dirty = True
            parent = self._parent_of(zone.origin)
            if parent is not None:
                parent.dirty = True

    def zone_of(self, owner: str | dns.name.Name) -> Zone:
        """The zone that holds `owner` (the closest enclosing one)."""
        name = _name(owner)
        with self._lock:
            while name not in self.zones:
                name = name.parent()
            return self.zones[name]

    # ----- records ---------------------------------------------------------

    def add(self, owner: str, rdtype: str, *values: str | list[str], ttl: int = 300) -> None:
        """Append records (presentation format; names in values are absolute; TXT values are raw
        strings). The RRset takes `ttl`. Live after publish()."""
        name, rtype = _name(owner), dns.rdatatype.from_text(rdtype)
        rdatas = [_make_rdata(rtype, value) for value in values]
        with self._lock:
            zone = self.zone_of(name)
            if zone.lame is not None or zone.server is not None:
                raise ValueError(f"{zone.name} is lame or external: its records are not served here")
            _, existing = zone.records.get((name, rtype), (ttl, []))
            zone.records[(name, rtype)] = (ttl, existing + [r for r in rdatas if r not in existing])
            zone.dirty = True

    def set(self, owner: str, rdtype: str, *values: str | list[str], ttl: int = 300) -> None:
        """Replace the RRset (no values: remove it). Live after publish()."""
        with self._lock:
            self.remove(owner, rdtype)
            if values:
                self.add(owner, rdtype, *values, ttl=ttl)

    def remove(self, owner: str, rdtype: str | None = None) -> None:
        """Remove one RRset, or every record at `owner` (it becomes NXDOMAIN). Live after publish()."""
        name = _name(owner)
        with self._lock:
            zone = self.zone_of(name)
            for key in [k for k in zone.records if k[0] == name and (rdtype is None or
                                                                     k[1] == dns.rdatatype.from_text(rdtype))]:
                del zone.records[key]
            zone.bogus = {k: v for k, v in zone.bogus.items() if k in zone.records}
            zone.dirty = True

    def bogus(self, owner: str, rdtype: str, *values: str | list[str]) -> None:
        """Serve `values` at owner/rdtype while the signature stays the one made for the RRset as
        set (RFC 4035 §5.3: the RRSIG no longer verifies): a validating resolver answers SERVFAIL.
        The RRset must exist. Undone by the next set/remove of that RRset. Live after publish()."""
        name, rtype = _name(owner), dns.rdatatype.from_text(rdtype)
        with self._lock:
            zone = self.zone_of(name)
            if (name, rtype) not in zone.records or not zone.signed:
                raise ValueError(f"{name} {rdtype}: only an RRset of a signed zone can be made bogus")
            zone.bogus[(name, rtype)] = [_make_rdata(rtype, value) for value in values]
            zone.dirty = True

    # ----- publishing ------------------------------------------------------

    def publish(self) -> None:
        """Sign and write every changed zone, have nsd load it (until it serves the new serial),
        wire lame children to the fault server, and flush unbound's cache: when this returns the
        resolver sees the new data."""
        with self._lock:
            changed = [zone for zone in self.zones.values() if zone.dirty]
            if not changed or self.directory == Path():
                return  # nothing to do, or not started yet (start() publishes)
            serial = next(self._serials)
            for zone in changed:
                zone.serial = serial
                if zone.lame is None and zone.server is None:
                    (self.directory / zone.file_name).write_text(self._render(zone))
            if self._processes:
                self._load(changed)
            for zone in changed:
                zone.dirty = False

    def _render(self, zone: Zone) -> str:
        """The zone file: SOA, NS, records, delegations of child zones; signed if `zone.signed`
        (NSEC, RFC 4035 §2.3), then bogus RRsets swapped in under the old signatures."""
        built = dns.zone.Zone(zone.origin, relativize=False)
        with built.writer() as txn:
            soa = f"{NAMESERVER} hostmaster.test. {zone.serial} 3600 600 86400 {zone.negative_ttl}"
            txn.add(zone.origin, zone.negative_ttl, _make_rdata(dns.rdatatype.SOA, soa))
            txn.add(zone.origin, 3600, _make_rdata(dns.rdatatype.NS, NAMESERVER))
            for (owner, rtype), (ttl, rdatas) in zone.records.items():
                for rdata in rdatas:
                    txn.add(owner, ttl, rdata)
            for child in self.zones.values():
                if child is not zone and self._parent_of(child.origin) is zone:
                    txn.add(child.origin, 3600, _make_rdata(dns.rdatatype.NS, NAMESERVER))
                    if child.signed:
                        txn.add(child.origin, 3600, child.ds())
            if zone.origin == dns.name.root:  # glue for the "test." delegation
                txn.add(_name(NAMESERVER), 3600, _make_rdata(dns.rdatatype.A, self.host))
        if zone.signed:
            now = int(time.time())
            dns.dnssec.sign_zone(built, keys=[zone.key], inception=now - SIGNATURE_SKEW,
                                 expiration=now + SIGNATURE_SKEW + int(self.lifetime) + 86400, dnskey_ttl=3600)
        with built.writer() as txn:
            for (owner, rtype), rdatas in zone.bogus.items():
                ttl = zone.records[(owner, rtype)][0]
                txn.replace(owner, dns.rrset.from_rdata_list(owner, ttl, rdatas))
        return built.to_text(relativize=False, want_origin=True)

    def _load(self, zones: list[Zone]) -> None:
        for zone in zones:
            if zone.server is not None:
                zone.served = True  # unbound.conf forwards it (external() comes before start())
            elif zone.lame is not None:
                if not zone.served:
                    self.fault_server.fault(zone.name, zone.lame, subtree=True)
                    # unbound asks the child's "server" (the fault server) for every name in it.
                    self._unbound_control("forward_add", zone.name, f"{self.host}@{self.fault_server.port}")
                    zone.served = True
            elif not zone.served:
                self._nsd_control("addzone", zone.domain, "world")
                zone.served = True
            else:
                self._nsd_control("reload", zone.name)
        for zone in zones:
            if zone.lame is None and zone.server is None:
                self._wait_for_serial(zone)
        self.flush()

    def flush(self) -> None:
        """Forget everything unbound cached (answers, keys, bogus and negative entries, server
        state), so the next question reaches nsd."""
        self._unbound_control("flush_zone", ".")
        self._unbound_control("flush_bogus")
        self._unbound_control("flush_negative")
        self._unbound_control("flush_infra", "all")
        self._unbound_control("flush_requestlist")

    def _wait_for_serial(self, zone: Zone) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            try:
                response = self.ask_nsd(zone.name, "SOA")
                if response.answer and response.answer[0][0].serial == zone.serial:
                    return
            except dns.exception.DNSException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"nsd did not load {zone.name} serial {zone.serial}: {self.logs('nsd')}")
            time.sleep(POLL)

    # ----- asking ----------------------------------------------------------

    def ask(self, name: str, rdtype: str, *, tcp: bool = False) -> dns.message.Message:
        """One question to the validating resolver with DO and AD set (RFC 6840 §5.7-5.8)."""
        query = dns.message.make_query(name, rdtype, want_dnssec=True, payload=1232)
        query.flags |= dns.flags.AD
        ask = dns.query.tcp if tcp else dns.query.udp
        return ask(query, self.host, timeout=5, port=self.resolver_port)

    def ask_nsd(self, name: str, rdtype: str) -> dns.message.Message:
        """One question straight to nsd (authoritative, no validation)."""
        query = dns.message.make_query(name, rdtype, want_dnssec=True, payload=1232)
        return dns.query.udp(query, self.host, timeout=1, port=self.nsd_port)

    @property
    def probe(self) -> str:
        """A "NAME TYPE" that comes back with AD from this world's resolver (issue 9's `dane.probe`)."""
        return ". NS"

    # ----- processes -------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether nsd or unbound still runs."""
        return any(process.poll() is None for process in self._processes.values())

    def _serve(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="dnssec-world-"))
        self.fault_server.start()
        self.publish()  # zone files for the root and "test." before nsd reads them
        self._start_nsd()
        self._start_unbound()
        self._wait_validating()
        early = [zone for zone in self.zones.values() if not zone.served]  # zones made before start()
        if early:
            self._load(early)

    def _shutdown(self) -> None:
        for name, process in self._processes.items():
            if process.poll() is None:
                process.terminate()  # timeout(1) passes it on to the whole process group
        for process in self._processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        self.fault_server.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def _run(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.directory / f"{name}.out", "ab")
        # timeout(1): own process group, TERM then KILL at the end of the lifetime even if we die.
        argv = [_path(argv[0]), *argv[1:]]
        process = subprocess.Popen([_path("timeout"), "-k", "5", str(int(self.lifetime) + 5), *argv],
                                   stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=self.directory)
        log.close()
        self._processes[name] = process
        return process

    def _start_nsd(self) -> None:
        for _ in range(5):  # the free port may be taken between choosing it and nsd binding it
            self.nsd_port = _free_port(self.host)
            (self.directory / "nsd.conf").write_text(self._nsd_conf())
            process = self._run("nsd", ["nsd", "-d", "-c", str(self.directory / "nsd.conf")])
            if self._until(lambda: self._nsd_serves(), process):
                for zone in (self.root, self.tld):
                    zone.served = True
                return
            process.wait(timeout=10)
        raise RuntimeError(f"nsd did not start: {self.logs('nsd')}")

    def _nsd_serves(self) -> bool:
        try:
            return bool(self.ask_nsd(".", "SOA").answer)
        except (dns.exception.DNSException, OSError):
            return False

    def _start_unbound(self) -> None:
        for _ in range(1 if self._fixed_resolver_port else 5):
            if not self._fixed_resolver_port:
                self.resolver_port = _free_port(self.host)
            (self.directory / "unbound.conf").write_text(self._unbound_conf())
            process = self._run("unbound", ["unbound", "-d", "-c", str(self.directory / "unbound.conf")])
            if self._until(lambda: (self.directory / "unbound.ctl").exists() and self._answers(), process):
                return
            process.wait(timeout=10)
        raise RuntimeError(f"unbound did not start: {self.logs('unbound')}")

    def _answers(self) -> bool:
        try:
            self.ask(".", "SOA")
            return True
        except (dns.exception.DNSException, OSError):
            return False

    def _wait_validating(self) -> None:
        if not self._until(lambda: bool(self.ask(".", "NS").flags & dns.flags.AD), None):
            raise RuntimeError(f"unbound does not validate the root: {self.logs('unbound')}")

    def _until(self, ready, process: subprocess.Popen | None) -> bool:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                return False
            if ready():
                return True
            time.sleep(POLL)
        return False

    def _control(self, program: str, config: str, *args: str) -> str:
        result = subprocess.run([_path(program), "-c", str(self.directory / config), *args], capture_output=True,
                                text=True, timeout=READY_TIMEOUT, check=False)
        if result.returncode != 0 or "error" in result.stdout.lower():
            raise RuntimeError(f"{program} {' '.join(args)}: {result.stdout}{result.stderr}")
        return result.stdout

    def _nsd_control(self, *args: str) -> str:
        return self._control("nsd-control", "nsd.conf", *args)

    def _unbound_control(self, *args: str) -> str:
        return self._control("unbound-control", "unbound.conf", *args)

    def logs(self, name: str) -> str:
        """What nsd or unbound wrote (their log file and their output), for failure messages."""
        parts = []
        for path in (self.directory / f"{name}.log", self.directory / f"{name}.out"):
            if path.exists():
                parts.append(path.read_text(errors="replace")[-4000:])
        return "\n".join(parts)

    # ----- configuration ---------------------------------------------------

    def _nsd_conf(self) -> str:
        d = self.directory
        return f"""server:
    ip-address: {self.host}@{self.nsd_port}
    port: {self.nsd_port}
    do-ip6: no
    username: ""
    chroot: ""
    zonesdir: "{d}"
    zonelistfile: "{d}/zone.list"
    database: ""
    pidfile: "{d}/nsd.pid"
    xfrdfile: "{d}/xfrd.state"
    xfrdir: "{d}"
    logfile: "{d}/nsd.log"
    server-count: 1
    xfrd-reload-timeout: 0
    verbosity: 1
    refuse-any: no
remote-control:
    control-enable: yes
    control-interface: "{d}/nsd.ctl"
pattern:
    name: "world"
    zonefile: "%s.zone"
zone:
    name: "."
    zonefile: "{self.root.file_name}"
zone:
    name: "test."
    zonefile: "{self.tld.file_name}"
"""

    def _unbound_conf(self) -> str:
        d = self.directory
        anchor = self.root.ds().to_text()
        return f"""server:
    interface: {self.host}@{self.resolver_port}
    port: {self.resolver_port}
    do-ip6: no
    do-daemonize: no
    chroot: ""
    username: ""
    directory: "{d}"
    pidfile: "{d}/unbound.pid"
    logfile: "{d}/unbound.log"
    use-syslog: no
    verbosity: 1
    val-log-level: 2
    num-threads: 1
    so-reuseport: no
    outgoing-range: 64
    do-not-query-localhost: no
    module-config: "validator iterator"
    trust-anchor: ". DS {anchor}"
    trust-anchor-signaling: no
    root-key-sentinel: no
    val-bogus-ttl: {self.val_bogus_ttl}
    local-zone: "test." nodefault
    qname-minimisation: no
    prefetch: no
    serve-expired: no
    ede: yes
remote-control:
    control-enable: yes
    control-interface: "{d}/unbound.ctl"
    control-use-cert: no
forward-zone:
    name: "."
    forward-addr: {self.host}@{self.nsd_port}
{self._external_forwards()}"""

    def _external_forwards(self) -> str:
        """A forward, without caching, for every external() zone."""
        return "".join(f"""forward-zone:
    name: "{zone.name}"
    forward-addr: {zone.server}
    forward-no-cache: yes
""" for zone in self.zones.values() if zone.server is not None)


def _path(name: str) -> str:
    found = tool(name)
    if found is None:
        raise FileNotFoundError(f"{name} is not installed (Debian packages nsd, unbound: .ci/install-debian.sh)")
    return found


def _free_port(host: str) -> int:
    """A port free for both UDP and TCP on `host` right now (nsd and unbound bind both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, socket.socket() as tcp:
            udp.bind((host, 0))
            port = udp.getsockname()[1]
            try:
                tcp.bind((host, port))
            except OSError:
                continue
            return port
    raise OSError(f"no port free for UDP and TCP on {host}")
