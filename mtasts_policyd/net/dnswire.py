"""The DNS messages of the daemon's event-loop questions, written and read by hand: a codec, no I/O.

Why: a cold domain costs the daemon three DNS questions on its event loop (the `_mta-sts` TXT
record, the policy host's A records, the MX hosts), and dnspython's message classes spend most of
each query's CPU building and parsing (bench/README.md, "Cold path"). This codec covers exactly
those questions: QTYPE TXT, A, AAAA or MX, class IN, one question (RFC 1035 §4.1).

A reply comes from the network, so it is hostile input. Every read is bounds-checked and every
violation raises `WireError` (never IndexError or struct.error), and what is accepted is read the
way dnspython reads it (tests/test_dnswire.py compares both on the same bytes, mutated ones too):
- `NotTheReply`: not an answer to the question asked (id, QR, opcode, question): the transport
  drops the datagram and keeps waiting (RFC 5452 §9.1).
- `Unsupported`: the codec does not read this (a name that is not plain letters, digits, "-" and
  "_"; a class other than IN; a record type beyond its list; an EDNS option dnspython checks
  further): the caller asks dnspython instead.
- any other `WireError`: a malformed reply, that server's failure.

The meaning (the CNAME chain, TTLs, deduplication, which SOA counts) is dnspython's resolver's
(`dns.message.QueryMessage.resolve_chaining`, `dns.rdataset.Rdataset.add`), so that net/dns.py maps
a `Reply` with the same rules (`_chain_ttl`, `_negative_ttl_of`, `_mx_order`) as a dnspython answer.
"""

from __future__ import annotations

import re
import socket
import struct
from dataclasses import dataclass
from typing import Any

import dns.ipv6

from mtasts_policyd.core.sts_record import join_strings

# Record types (RFC 1035 §3.2.2, RFC 3596, RFC 6672, RFC 6891) and the class this codec reads.
A, NS, CNAME, SOA, MX, TXT, AAAA, DNAME, OPT = 1, 2, 5, 6, 15, 16, 28, 39, 41
IN = 1
QTYPES = {"A": A, "AAAA": AAAA, "MX": MX, "TXT": TXT}  # what the event loop asks

# RFC 1035 §4.1.1 rcodes, and RFC 6895 §2.3 YXDOMAIN.
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED, YXDOMAIN = 0, 1, 2, 3, 4, 5, 6
ANSWERED = frozenset({NOERROR, NXDOMAIN, YXDOMAIN})  # the domain's answer; other rcodes: the server failed
# Replies that may leave the question out (dnspython's Message.is_response accepts them so).
_QUESTIONLESS = frozenset({FORMERR, SERVFAIL, NOTIMP, REFUSED})

MAX_CHAIN = 16  # CNAMEs followed before giving up (dns.message.MAX_CHAIN): a loop ends here too
MAX_POINTERS = 16  # compression pointers in one name (dns.name.MAX_COMPRESSION_POINTER_CHAIN)

_QR, _OPCODE, _TC, _RD = 0x8000, 0x7800, 0x0200, 0x0100
_HEADER = struct.Struct("!HHHHHH")
_QTAIL = struct.Struct("!HH")
_RR = struct.Struct("!HHIH")
_OPTION = struct.Struct("!HH")
_SOA_NUMBERS = 20  # serial, refresh, retry, expire, minimum (RFC 1035 §3.3.13)
_COOKIE, _EDE = 10, 15
# EDNS options dnspython parses further than their length (dns.edns: ECS, report channel, the
# extra-text language, the filtering options): not read here, so such a reply goes to dnspython.
_OPTIONS_FOR_DNSPYTHON = frozenset({8, 18, 22, 23, 24, 25})
_LDH_NAME = re.compile(r"(?:[A-Za-z0-9_-]{1,63}\.)+")  # absolute, one to 63 octets per label

# A label as dnspython writes it (dns.name._escapify, RFC 1035 §5.1): printable ASCII as is,
# the special characters behind a backslash, everything else as \DDD.
_TEXT = [("\\" + chr(c)) if c in b'"().;\\@$' else chr(c) if 0x20 < c < 0x7F else f"\\{c:03d}"
         for c in range(256)]


class WireError(ValueError):
    """A reply this codec does not take: malformed, unless a subclass says otherwise."""


class NotTheReply(WireError):
    """Not a reply to the question asked: another id, no QR, another opcode or question."""


class Unsupported(WireError):
    """Outside what this codec reads (name, class, record type, EDNS option): ask dnspython."""


@dataclass(frozen=True, slots=True)
class Reply:
    """What a reply says about the question asked.

    `rrs`: the RRset of the asked type at the end of the CNAME chain, deduplicated, in wire order
    (empty when there is none): TXT as bytes (each RR's strings joined, RFC 8461 §3.1), A and AAAA
    as text addresses, MX as (preference, host) with the host as dnspython writes it.
    `chain_ttls`: the TTLs of the CNAME RRsets followed and of that RRset (positive answers).
    `cname_ttls`: the TTL of every CNAME RRset in the answer section (RFC 2308 §6).
    `soa`: TTL and MINIMUM of the first SOA RRset in the authority section (RFC 2308 §5).
    """

    rcode: int
    truncated: bool = False
    rrs: tuple[Any, ...] = ()
    chain_ttls: tuple[int, ...] = ()
    cname_ttls: tuple[int, ...] = ()
    soa: tuple[int, int] | None = None

    @property
    def answered(self) -> bool:
        """Whether the server answered for the domain (NOERROR, NXDOMAIN, YXDOMAIN); any other
        rcode means this server failed and says nothing about the domain."""
        return self.rcode in ANSWERED


def encode_name(name: str) -> bytes:
    """`name` ("label.label." absolute) in wire format, RFC 1035 §3.1. Only plain ASCII labels of
    letters, digits, "-" and "_" are encoded here, as dnspython would encode them; anything else
    (escapes, IDNA, empty or long labels, relative names) is dnspython's: Unsupported."""
    if _LDH_NAME.fullmatch(name) is None:
        raise Unsupported(f"{name!r}: not plain LDH labels")
    wire = b"".join(len(label).to_bytes(1, "big") + label for label in name.encode("ascii").split(b".")[:-1])
    if len(wire) + 1 > 255:
        raise Unsupported(f"{name!r}: longer than 255 octets")
    return wire + b"\0"


@dataclass(frozen=True, slots=True)
class Question:
    """One question (RFC 1035 §4.1.2), encoded once: written into the query and compared with the
    question of every datagram that claims to answer it."""

    wire: bytes  # QNAME as given, QTYPE, QCLASS IN
    match: bytes  # the same, QNAME in lower case: replies compare names case-insensitively
    rdtype: int


def question(name: str, rdtype: int) -> Question:
    """The question for `name` (absolute) and `rdtype`, class IN; Unsupported for a name
    dnspython must encode (encode_name)."""
    qname = encode_name(name)
    tail = _QTAIL.pack(rdtype, IN)
    return Question(qname + tail, qname.lower() + tail, rdtype)


def encode_query(qid: int, asked: Question, edns: int = -1, payload: int = 0, ednsflags: int = 0) -> bytes:
    """A query as dnspython's resolver sends it (RFC 1035 §4.1): RD set, the one question, and an
    OPT record (RFC 6891 §6.1) when `edns` >= 0 with `payload` and `ednsflags`, the resolver's
    `edns`, `payload` and `ednsflags`."""
    if edns < 0:
        return _HEADER.pack(qid, _RD, 1, 0, 0, 0) + asked.wire
    flags = (ednsflags & 0xFF00FFFF) | (edns << 16)  # RFC 6891 §6.1.3: the version in the TTL
    return _HEADER.pack(qid, _RD, 1, 0, 0, 1) + asked.wire + b"\0" + _RR.pack(OPT, payload, flags, 0)


def decode_reply(wire: bytes, qid: int, asked: Question) -> Reply:
    """The reply `wire` to query `qid` asking `asked`.

    Raises NotTheReply, Unsupported or WireError (module docstring); nothing else.
    """
    end = len(wire)
    if end < 12:
        raise NotTheReply("shorter than a DNS header")
    rid, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(wire)
    if rid != qid or not flags & _QR or flags & _OPCODE:  # RFC 1035 §4.1.1
        raise NotTheReply("another id, not a response, or not a QUERY")
    pos = 12
    if qdcount == 1:
        try:
            qname, pos = _name(wire, pos, end)
        except WireError:
            raise NotTheReply("question unreadable") from None
        if qname + wire[pos:pos + 4] != asked.match:  # RFC 5452 §9.1; names compare case-insensitively
            raise NotTheReply("another question, or one cut short")
        pos += 4
    elif not (qdcount == 0 and flags & 0xF in _QUESTIONLESS):
        raise NotTheReply("not one question")
    if flags & _TC:  # RFC 1035 §4.1.1, RFC 7766 §5: ask again over TCP; the rest may be cut anywhere
        return Reply(flags & 0xF, truncated=True)

    found: dict[bytes, list[Any]] = {}  # owner -> [TTL, {rdata key: value}] of the asked type
    cnames: dict[bytes, list[Any]] = {}  # owner -> [TTL, target]
    soas: dict[bytes, list[int]] = {}  # owner -> [TTL, MINIMUM], in order of appearance
    ednsflags = -1
    for section, count in enumerate((ancount, nscount, arcount)):
        for _ in range(count):
            owner, pos = _name(wire, pos, end)
            if pos + 10 > end:
                raise WireError("record header cut short")
            rtype, rclass, ttl, rdlen = _RR.unpack_from(wire, pos)
            pos += 10
            stop = pos + rdlen
            if stop > end:
                raise WireError("record data runs past the message")
            if rtype == OPT:  # RFC 6891 §6.1.1: at most one, in the additional section, owner root
                if section != 2 or ednsflags >= 0 or owner != b"\0":
                    raise WireError("misplaced OPT record")
                _check_options(wire, pos, stop)
                ednsflags = ttl
            elif rclass != IN:
                raise Unsupported(f"record of class {rclass}")
            else:
                if ttl > 0x7FFFFFFF:  # RFC 2181 §8: a TTL with the top bit set is zero
                    ttl = 0
                if rtype == CNAME:
                    target = _exact_name(wire, pos, stop)
                    if section == 0:  # one CNAME per owner (RFC 2181 §10.1): the last stays, TTL the least
                        _singleton(cnames, owner, ttl, target)
                elif rtype == SOA:
                    minimum = _soa_minimum(wire, pos, stop)
                    if section == 1:
                        _singleton(soas, owner, ttl, minimum)
                else:
                    key, value = _rdata(wire, pos, stop, rtype)
                    if section == 0 and rtype == asked.rdtype:
                        rrset = found.get(owner)
                        if rrset is None:
                            found[owner] = [ttl, {key: value}]
                        else:  # RFC 2181 §5.2: one TTL per RRset, the least; duplicates dropped
                            rrset[0] = min(rrset[0], ttl)
                            rrset[1].setdefault(key, value)
            pos = stop
    if pos != end:
        raise WireError("trailing bytes after the last record")

    rcode = (flags & 0xF) | ((max(ednsflags, 0) >> 20) & 0xFF0)  # RFC 6891 §6.1.3: EXTENDED-RCODE
    if qdcount == 0:
        if rcode not in _QUESTIONLESS:
            raise NotTheReply("no question")
        return Reply(rcode)
    if rcode not in (NOERROR, NXDOMAIN):
        return Reply(rcode)
    return _chain(qname, rcode, found, cnames, soas)


def _chain(qname: bytes, rcode: int, found: dict[bytes, list[Any]], cnames: dict[bytes, list[Any]],
           soas: dict[bytes, list[int]]) -> Reply:
    """Follow the CNAME chain from the question name through the answer section (RFC 1034 §3.6.2),
    as dnspython's resolve_chaining does."""
    owner, ttls, hops, rrset = qname, [], 0, None
    while hops < MAX_CHAIN:
        rrset = found.get(owner)
        if rrset is not None:
            ttls.append(rrset[0])
            break
        alias = cnames.get(owner)
        if alias is None:
            break
        ttls.append(alias[0])
        owner = alias[1]
        hops += 1
    # The texts are dnspython's (ChainTooLong, AnswerForNXDOMAIN): both paths log the same words.
    if hops >= MAX_CHAIN:
        raise WireError("The CNAME chain is too long.")  # a loop ends here too
    if rcode == NXDOMAIN and rrset is not None:
        raise WireError("The rcode is NXDOMAIN but an answer was found.")
    soa = next(iter(soas.values()), None)
    return Reply(rcode, rrs=tuple(rrset[1].values()) if rrset is not None else (),
                 chain_ttls=tuple(ttls) if rrset is not None else (),
                 cname_ttls=tuple(alias[0] for alias in cnames.values()),
                 soa=(soa[0], soa[1]) if soa is not None else None)


def _singleton(rrsets: dict[bytes, list[Any]], owner: bytes, ttl: int, value: Any) -> None:
    """A type of one RR per RRset (CNAME, SOA): a later RR replaces the earlier, the TTL is the least."""
    rrset = rrsets.get(owner)
    if rrset is None:
        rrsets[owner] = [ttl, value]
    else:
        rrset[0] = min(rrset[0], ttl)
        rrset[1] = value


def _name(wire: bytes, pos: int, end: int, decompress: bool = True) -> tuple[bytes, int]:
    """The name at `pos` (labels before `end`) as lower-case uncompressed wire format, and where
    the record goes on. RFC 1035 §4.1.4 compression, with dnspython's limits: every pointer points
    before the previous one and the label run it points to ends before it; MAX_POINTERS pointers;
    255 octets in all (RFC 1035 §3.1)."""
    parts = []
    size = 1  # the root's length octet
    after = 0
    start = pos
    hops = 0
    while True:
        if pos >= end:
            raise WireError("name runs past its bounds")
        count = wire[pos]
        if count == 0:
            break
        if count < 64:
            stop = pos + 1 + count
            size += count + 1
            if stop > end or size > 255:
                raise WireError("label runs past its bounds, or name longer than 255 octets")
            parts.append(wire[pos:stop])
            pos = stop
        elif count >= 0xC0 and decompress:
            if pos + 2 > end:
                raise WireError("compression pointer cut short")
            target = ((count & 0x3F) << 8) | wire[pos + 1]
            hops += 1
            if target >= start or hops > MAX_POINTERS:
                raise WireError("compression pointer not backwards, or too many")
            if not after:
                after = pos + 2
            end = start  # the labels pointed to must end before the labels that point to them
            start = pos = target
        else:
            raise WireError("bad label type")
    return b"".join(parts).lower() + b"\0", after or pos + 1


def _exact_name(wire: bytes, pos: int, stop: int, decompress: bool = True) -> bytes:
    """A name that must fill the rdata from `pos` to `stop` exactly (CNAME, NS, DNAME)."""
    name, after = _name(wire, pos, stop, decompress)
    if after != stop:
        raise WireError("bytes left in the record data")
    return name


def _soa_minimum(wire: bytes, pos: int, stop: int) -> int:
    """SOA rdata (RFC 1035 §3.3.13): MNAME, RNAME, five 32-bit numbers; the MINIMUM is the last."""
    _, pos = _name(wire, pos, stop)
    _, pos = _name(wire, pos, stop)
    if stop - pos != _SOA_NUMBERS:
        raise WireError("SOA record data of the wrong length")
    return int.from_bytes(wire[stop - 4:stop], "big")


def _rdata(wire: bytes, pos: int, stop: int, rtype: int) -> tuple[Any, Any]:
    """An RR's data checked as dnspython checks it: (the key dnspython compares RRs by, the value)."""
    data = wire[pos:stop]
    if rtype == TXT:  # RFC 1035 §3.3.14: one or more <character-string>s filling the rdata
        strings = []
        at = 0
        while at < len(data):
            after = at + 1 + data[at]
            if after > len(data):
                raise WireError("TXT string runs past its record")
            strings.append(data[at + 1:after])
            at = after
        if not strings:
            raise WireError("TXT record without a string")
        return data, join_strings(strings)
    if rtype == A:
        if len(data) != 4:
            raise WireError("A record data not 4 octets")
        return data, socket.inet_ntop(socket.AF_INET, data)
    if rtype == AAAA:
        if len(data) != 16:
            raise WireError("AAAA record data not 16 octets")
        return data, dns.ipv6.inet_ntoa(data)  # dnspython's text form of the address
    if rtype == MX:  # RFC 1035 §3.3.9: PREFERENCE, EXCHANGE
        if len(data) < 3:
            raise WireError("MX record data too short")
        preference = (data[0] << 8) | data[1]
        exchange = _exact_name(wire, pos + 2, stop)
        return (preference, exchange), (preference, _text(exchange))
    if rtype == NS:
        return _exact_name(wire, pos, stop), None
    if rtype == DNAME:  # RFC 6672 §2.5: the target is never compressed
        return _exact_name(wire, pos, stop, decompress=False), None
    raise Unsupported(f"record type {rtype}")


def _check_options(wire: bytes, pos: int, stop: int) -> None:
    """The OPT record's options (RFC 6891 §6.1.2), checked where dnspython checks them: a cookie's
    lengths (RFC 7873 §4), an extended error's code and UTF-8 text (RFC 8914 §2)."""
    while pos < stop:
        if pos + 4 > stop:
            raise WireError("EDNS option header cut short")
        code, length = _OPTION.unpack_from(wire, pos)
        pos += 4
        if pos + length > stop:
            raise WireError("EDNS option runs past its record")
        if code == _COOKIE and not (length == 8 or 16 <= length <= 40):
            raise WireError("EDNS cookie of the wrong length")
        if code == _EDE:
            text = wire[pos + 2:pos + length]
            if length < 2:
                raise WireError("extended DNS error without a code")
            try:
                (text[:-1] if text[-1:] == b"\0" else text).decode("utf-8")
            except UnicodeDecodeError:
                raise WireError("extended DNS error text not UTF-8") from None
        elif code in _OPTIONS_FOR_DNSPYTHON:
            raise Unsupported(f"EDNS option {code}")
        pos += length


def _text(name: bytes) -> str:
    """A lower-case wire-format name as dnspython writes it with omit_final_dot ("." for the root)."""
    if name == b"\0":
        return "."
    labels = []
    at = 0
    while name[at]:
        after = at + 1 + name[at]
        labels.append("".join([_TEXT[c] for c in name[at + 1:after]]))
        at = after
    return ".".join(labels)
