"""A small authoritative DNS server on loopback, for tests.

Why a real server instead of mocking the resolver: the daemon must be exercised
through its real DNS code path (UDP, truncation, TCP retry, NXDOMAIN vs NODATA,
negative caching via the SOA minimum, SERVFAIL and timeouts). Serving real wire
format lets tests observe exactly what the daemon asks and how it reacts.

The server is authoritative for every name: anything not configured does not exist.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
from dataclasses import dataclass, field

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.rrset

from .bounded import BoundedServer

log = logging.getLogger(__name__)

FAULT_KINDS = frozenset({"servfail", "refused", "timeout"})
MAX_CNAME_DEPTH = 8
TCP_IDLE_TIMEOUT = 5.0
POLL_INTERVAL = 0.2  # how often blocking loops notice stop(); keeps shutdown quick
CLASSIC_UDP_LIMIT = 512
ROOT = "."  # the key of the root name (the rig answers for it too: doctor asks ". NS")


def _key(name: str | dns.name.Name) -> str:
    """Canonical lookup key: lowercased, no trailing dot, so the API is case/dot-insensitive."""
    if isinstance(name, str):
        name = dns.name.from_text(name.strip() or ".")
    return name.canonicalize().to_text(omit_final_dot=True)


def _apex(key: str) -> str:
    """Synthetic zone apex (last two labels): gives negative answers a plausible SOA owner."""
    labels = [label for label in key.split(".") if label]
    return ".".join(labels[-2:]) or ROOT


def _make_rdata(rdtype: dns.rdatatype.RdataType, value: str | list[str]) -> dns.rdata.Rdata:
    """TXT values are raw strings (a list means one RR split into several strings);
    everything else is presentation format, with relative names taken as absolute."""
    if rdtype == dns.rdatatype.TXT:
        strings = [value] if isinstance(value, str) else list(value)
        return dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, rdtype, [s.encode() for s in strings])
    if not isinstance(value, str):
        raise TypeError(f"only TXT accepts a list of strings, got {value!r} for {rdtype.name}")
    return dns.rdata.from_text(dns.rdataclass.IN, rdtype, value, origin=dns.name.root, relativize=False)


@dataclass
class _RRs:
    """Records of one type at one name; the whole RRset shares the latest TTL given."""

    ttl: int
    rdatas: list[dns.rdata.Rdata] = field(default_factory=list)


class DnsServer(BoundedServer):
    """Authoritative DNS server on UDP and TCP (same port), bounded by `lifetime` seconds."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        lifetime: float = 900,
        negative_ttl: int = 60,
    ) -> None:
        super().__init__(host, port, lifetime)
        self.negative_ttl = negative_ttl
        self.queries: list[tuple[str, str]] = []
        self._data: dict[str, dict[dns.rdatatype.RdataType, _RRs]] = {}
        self._faults: dict[str, str] = {}
        self._subtree_faults: dict[str, str] = {}
        self._lock = threading.RLock()
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._conns: set[socket.socket] = set()

    # ----- lifecycle -------------------------------------------------------

    def _serve(self) -> None:
        """Bind both transports and serve in daemon threads."""
        if self._udp is not None:
            raise RuntimeError("DnsServer already started")
        self._udp, self._tcp = self._bind_pair()
        self.port = self._udp.getsockname()[1]
        for target, name in ((self._serve_udp, "udp"), (self._serve_tcp, "tcp")):
            thread = threading.Thread(target=target, name=f"dns-{name}-{self.port}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _shutdown(self) -> None:
        for sock in (self._udp, self._tcp):
            if sock is not None:
                sock.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=2)

    def _bind_pair(self) -> tuple[socket.socket, socket.socket]:
        """UDP and TCP must share one port (clients retry truncated answers over TCP
        on the same port); with port 0 the kernel's UDP pick may be taken for TCP, so retry."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        attempts = 1 if self.port else 50
        last_error: OSError | None = None
        for _ in range(attempts):
            udp = socket.socket(family, socket.SOCK_DGRAM)
            tcp = socket.socket(family, socket.SOCK_STREAM)
            try:
                udp.bind((self.host, self.port))
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                tcp.bind((self.host, udp.getsockname()[1]))
                tcp.listen(16)
            except OSError as error:
                udp.close()
                tcp.close()
                last_error = error
                continue
            udp.settimeout(POLL_INTERVAL)
            tcp.settimeout(POLL_INTERVAL)
            return udp, tcp
        raise OSError(f"could not bind UDP and TCP on one port on {self.host}") from last_error

    # ----- zone data API ---------------------------------------------------

    def add(self, name: str, rdtype: str, *values: str | list[str], ttl: int = 300) -> None:
        """Append records; the RRset takes `ttl` (one RRset has one TTL)."""
        rtype = dns.rdatatype.from_text(rdtype)
        rdatas = [_make_rdata(rtype, value) for value in values]
        with self._lock:
            rrs = self._data.setdefault(_key(name), {}).setdefault(rtype, _RRs(ttl))
            rrs.ttl = ttl
            for rdata in rdatas:
                if rdata not in rrs.rdatas:  # an RRset is a set: duplicates are meaningless
                    rrs.rdatas.append(rdata)

    def set(self, name: str, rdtype: str, *values: str | list[str], ttl: int = 300) -> None:
        """Replace all records of `rdtype` at `name` (no values: same as remove)."""
        with self._lock:  # re-entrant: readers never see the gap between remove and add
            self.remove(name, rdtype)
            if values:
                self.add(name, rdtype, *values, ttl=ttl)

    def remove(self, name: str, rdtype: str | None = None) -> None:
        """Remove one type at `name`, or the whole name (it then becomes NXDOMAIN)."""
        key = _key(name)
        with self._lock:
            types = self._data.get(key)
            if types is None:
                return
            if rdtype is None:
                types.clear()
            else:
                types.pop(dns.rdatatype.from_text(rdtype), None)
            if not types:
                del self._data[key]

    def fault(self, name: str, kind: str | None, *, subtree: bool = False) -> None:
        """Make every query for `name` fail: "servfail", "refused" or "timeout" (no answer, the
        query is dropped). `subtree`: every name below `name` too (a zone whose servers never
        answer, for floods of distinct names). None clears the fault."""
        if kind is not None and kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}; expected one of {sorted(FAULT_KINDS)}")
        table = self._subtree_faults if subtree else self._faults
        with self._lock:
            if kind is None:
                table.pop(_key(name), None)
            else:
                table[_key(name)] = kind

    def _fault_for(self, key: str) -> str | None:
        fault = self._faults.get(key)
        if fault is None and self._subtree_faults:
            labels = key.split(".")
            for i in range(len(labels)):
                fault = self._subtree_faults.get(".".join(labels[i:]))
                if fault is not None:
                    break
        return fault

    def set_negative_ttl(self, seconds: int) -> None:
        """TTL and MINIMUM of the SOA in negative answers (what resolvers cache NXDOMAIN/NODATA for)."""
        with self._lock:
            self.negative_ttl = seconds

    # ----- observation -----------------------------------------------------

    def count(self, name: str, rdtype: str | None = None) -> int:
        """How many queries arrived for `name` (optionally of one type), over both transports."""
        key = _key(name)
        wanted = None if rdtype is None else dns.rdatatype.from_text(rdtype).name
        with self._lock:
            return sum(1 for n, t in self.queries if n == key and (wanted is None or t == wanted))

    def reset_counts(self) -> None:
        with self._lock:
            self.queries.clear()

    # ----- answering -------------------------------------------------------

    def _safe_answer(self, wire: bytes, *, udp: bool) -> bytes | None:
        """A rig bug must not kill the serving thread (every later test would time out);
        log it loudly and drop that one query instead."""
        try:
            return self._answer(wire, udp=udp)
        except Exception:
            log.exception("DnsServer failed to answer a query")
            return None

    def _answer(self, wire: bytes, *, udp: bool) -> bytes | None:
        """Turn a query into response bytes; None means stay silent (malformed or timeout fault)."""
        try:
            query = dns.message.from_wire(wire)
        except Exception:  # any parse failure: a real server would just drop it
            return None
        if query.flags & dns.flags.QR or len(query.question) != 1:
            return None
        question = query.question[0]
        key = _key(question.name)
        with self._lock:
            self.queries.append((key, dns.rdatatype.to_text(question.rdtype)))
            fault = self._fault_for(key)
            if fault == "timeout":
                return None
            response = dns.message.make_response(query)
            response.flags |= dns.flags.AA
            if fault == "servfail":
                response.set_rcode(dns.rcode.SERVFAIL)
            elif fault == "refused" or query.opcode() != dns.opcode.QUERY:
                response.set_rcode(dns.rcode.REFUSED)
            elif question.rdclass != dns.rdataclass.IN:
                response.set_rcode(dns.rcode.REFUSED)
            else:
                self._resolve(question.name, question.rdtype, response)
        wire_out = response.to_wire(max_size=65535)
        if udp:
            limit = max(CLASSIC_UDP_LIMIT, query.payload) if query.edns >= 0 else CLASSIC_UDP_LIMIT
            if len(wire_out) > limit:
                # Too big for this datagram: empty answer with TC tells the client to use TCP.
                truncated = dns.message.make_response(query)
                truncated.flags |= dns.flags.AA | dns.flags.TC
                truncated.set_rcode(response.rcode())
                wire_out = truncated.to_wire()
        return wire_out

    def _resolve(
        self, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType, response: dns.message.Message
    ) -> None:
        """Fill answer/authority from local data, following CNAMEs within this server."""
        name = qname
        for _ in range(MAX_CNAME_DEPTH + 1):
            key = _key(name)
            types = self._data.get(key, {})
            cname = types.get(dns.rdatatype.CNAME)
            if cname and rdtype != dns.rdatatype.CNAME:
                response.answer.append(self._rrset(name, dns.rdatatype.CNAME, cname))
                name = cname.rdatas[0].target
                continue
            rrs = types.get(rdtype)
            if rrs:
                response.answer.append(self._rrset(name, rdtype, rrs))
            elif rdtype == dns.rdatatype.SOA and key == _apex(key) and self._exists(key):
                response.answer.append(self._soa(key))
            else:
                if not self._exists(key):
                    response.set_rcode(dns.rcode.NXDOMAIN)
                response.authority.append(self._soa(_apex(key)))
            return
        # CNAME loop or chain too long: give up like a real server would.
        response.set_rcode(dns.rcode.SERVFAIL)

    def _exists(self, key: str) -> bool:
        """A name exists if it owns records or is an empty non-terminal above one that does."""
        if key in self._data:
            return True
        if key == ROOT:  # every name is below the root
            return bool(self._data)
        suffix = "." + key
        return any(other.endswith(suffix) for other in self._data)

    def _rrset(self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType, rrs: _RRs) -> dns.rrset.RRset:
        return dns.rrset.from_rdata_list(name, rrs.ttl, rrs.rdatas)

    def _soa(self, apex: str) -> dns.rrset.RRset:
        """Synthetic SOA whose TTL and MINIMUM both carry the negative TTL (RFC 2308)."""
        ttl = self.negative_ttl
        origin = "" if apex == ROOT else f"{apex}."
        text = f"ns.{origin} hostmaster.{origin} 1 3600 600 86400 {ttl}"
        rdata = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.SOA, text)
        owner = dns.name.root if apex == ROOT else dns.name.from_text(apex)
        return dns.rrset.from_rdata_list(owner, ttl, [rdata])

    # ----- transports ------------------------------------------------------

    def _serve_udp(self) -> None:
        assert self._udp is not None
        while not self._stopping.is_set():
            try:
                wire, peer = self._udp.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return  # socket closed by stop()
            for sock, reply in self._udp_replies(wire):
                try:
                    sock.sendto(reply, peer)
                except OSError:
                    pass

    def _udp_replies(self, wire: bytes) -> list[tuple[socket.socket, bytes]]:
        """The datagrams to send back for a UDP query, each with the socket it leaves from."""
        assert self._udp is not None
        reply = self._safe_answer(wire, udp=True)
        return [] if reply is None else [(self._udp, reply)]

    def _serve_tcp(self) -> None:
        assert self._tcp is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._tcp.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._serve_conn, args=(conn,), daemon=True)
            thread.start()

    def _serve_conn(self, conn: socket.socket) -> None:
        """Length-framed queries until the client goes quiet for TCP_IDLE_TIMEOUT or stop()."""
        conn.settimeout(TCP_IDLE_TIMEOUT)
        with self._lock:
            self._conns.add(conn)
        try:
            while not self._stopping.is_set():
                header = _recv_exact(conn, 2)
                if header is None:
                    return
                (length,) = struct.unpack("!H", header)
                wire = _recv_exact(conn, length)
                if wire is None:
                    return
                reply = self._safe_answer(wire, udp=False)
                if reply is not None:
                    conn.sendall(struct.pack("!H", len(reply)) + reply)
        except OSError:
            return
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()


def _recv_exact(conn: socket.socket, size: int) -> bytes | None:
    """Read exactly `size` bytes; None on EOF or idle timeout."""
    chunks = bytearray()
    while len(chunks) < size:
        try:
            chunk = conn.recv(size - len(chunks))
        except TimeoutError:
            return None
        if not chunk:
            return None
        chunks += chunk
    return bytes(chunks)

