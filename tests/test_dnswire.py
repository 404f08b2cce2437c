"""The daemon's DNS codec (net/dnswire.py) against dnspython, without sockets.

The codec reads replies from the network, so these tests hold it to two things: every violation of
the wire format is a WireError (bounds, pointers, lengths; never IndexError or struct.error), and
what it accepts means exactly what dnspython's resolver and net/dns.py's mapping make of the same
bytes. The dnspython side runs the real thing: dnspython's Resolver (its rcode handling, its
`Answer` and CNAME chaining) over a nameserver that hands it the reply, then net/dns.py's mapping
(`_dns_errors`, `_answer_found`); the stub's side is `decode_reply` then `_reply_found`.
"""

from __future__ import annotations

import random
import struct

import dns.asyncresolver
import dns.edns
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rcode
import dns.resolver
import pytest

from mtasts_policyd.core.errors import DnsTemporaryFailure, MtaStsError
from mtasts_policyd.net import dnswire, udp
from mtasts_policyd.net.dns import _answer_found, _dns_errors, _reply_found, _stub_of
from tests.dns_replies import CASES, QID, TXT_NAME, for_id, response, rrset

pytestmark = pytest.mark.fast  # pure: no sockets, no processes

TXT = dnswire.TXT


class Canned(dns.nameserver.Do53Nameserver):
    """A nameserver that answers every query with one reply (its id made the query's), as
    dnspython's UDP query returns it: parsed, Truncated raised for TC over UDP."""

    def __init__(self, wire: bytes) -> None:
        super().__init__("192.0.2.53", 53)
        self.wire = wire

    def query(self, request: dns.message.QueryMessage, timeout: float, source: str | None, source_port: int,
              max_size: bool, one_rr_per_rrset: bool = False, ignore_trailing: bool = False) -> dns.message.Message:
        return dns.message.from_wire(for_id(self.wire, request.id), raise_on_truncation=not max_size)


def outcome(ask) -> tuple:
    """An answer's values and TTL, "server failure", or the failure's class, text and TTL."""
    try:
        values, ttl = ask()
    except DnsTemporaryFailure:
        return ("server failure",)
    except MtaStsError as exc:
        return type(exc).__name__, str(exc), exc.ttl
    return "answer", values, ttl


def stub_meaning(wire: bytes, name: str, rdtype: str) -> tuple:
    """What the stub makes of `wire` (WireError raised): net/udp.py's rule on the rcode, then the mapping."""
    reply = dnswire.decode_reply(wire, QID, dnswire.question(name, dnswire.QTYPES[rdtype]))
    if reply.truncated:
        return ("truncated",)
    if not reply.answered:
        return ("server failure",)
    return outcome(lambda: _reply_found(reply, name, rdtype))


def dnspython_meaning(wire: bytes, name: str, rdtype: str) -> tuple:
    """What dnspython's resolver and net/dns.py make of `wire`; ("rejected",) when dnspython
    does not parse it."""
    try:
        dns.message.from_wire(wire, raise_on_truncation=True)
    except dns.message.Truncated:
        return ("truncated",)
    except Exception:
        return ("rejected",)
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [Canned(wire)]

    def ask() -> tuple:
        with _dns_errors(name, rdtype):
            return _answer_found(resolver.resolve(name, rdtype, search=False, raise_on_no_answer=True), rdtype)
    return outcome(ask)


# ----- the query: what dnspython's resolver would send (RFC 1035 §4.1, RFC 6891 §6.1) ---------


@pytest.mark.parametrize("name", [TXT_NAME, "EXAMPLE.test.", "a-b_c.x.", "x" * 63 + "." + "y" * 63 + "."])
@pytest.mark.parametrize("rdtype", sorted(dnswire.QTYPES))
@pytest.mark.parametrize("edns, payload, ednsflags", [(-1, 0, 0), (0, 1232, 0), (0, 4096, dns.flags.DO)])
def test_query_is_what_dnspython_sends(name: str, rdtype: str, edns: int, payload: int, ednsflags: int) -> None:
    """RFC 1035 §4.1: header with RD, one question of class IN; RFC 6891 §6.1: the OPT record as
    the resolver's `edns`, `payload` and `ednsflags` say (dnspython's resolver builds its query
    with make_query and use_edns from exactly these)."""
    expected = dns.message.make_query(name, rdtype)
    expected.id = 0xBEEF
    expected.use_edns(edns, ednsflags, payload)

    assert dnswire.encode_query(0xBEEF, dnswire.question(name, dnswire.QTYPES[rdtype]), edns, payload, ednsflags) == expected.to_wire()


@pytest.mark.parametrize("name", [
    pytest.param("example.test", id="relative"),
    pytest.param(".", id="root"),
    pytest.param("a..test.", id="empty-label"),
    pytest.param("x" * 64 + ".test.", id="label-of-64"),
    pytest.param(".".join(["x" * 63] * 4) + ".", id="name-of-256"),
    pytest.param("b\u00fccher.test.", id="not-ascii"),
    pytest.param("we\\.ird.test.", id="escape"),
    pytest.param("sp ace.test.", id="space"),
    pytest.param("plus+sign.test.", id="plus"),
])
def test_a_name_beyond_plain_labels_is_left_to_dnspython(name: str) -> None:
    """Only plain ASCII letters, digits, "-" and "_" in 1-63 octet labels, 255 octets in all (RFC
    1035 §2.3.4), are encoded here; escapes, IDNA and everything else are dnspython's."""
    with pytest.raises(dnswire.Unsupported):
        dnswire.encode_query(1, dnswire.question(name, TXT))


def test_the_longest_name_is_encoded() -> None:
    """RFC 1035 §2.3.4: 255 octets in wire format is the limit, and it is allowed."""
    name = ".".join(["x" * 63] * 3 + ["y" * 61]) + "."
    assert len(dnswire.encode_name(name)) == 255
    assert dnswire.encode_name(name) == dns.name.from_text(name).to_wire()


# ----- is it the reply? (RFC 1035 §4.1.1, RFC 5452 §9.1) --------------------------------------

TXT_ONE = CASES["txt-one"].wire


def patched(wire: bytes, at: int, value: bytes) -> bytes:
    return wire[:at] + value + wire[at + len(value):]


@pytest.mark.parametrize("wire, name", [
    pytest.param(for_id(TXT_ONE, QID + 1), TXT_NAME, id="another-id"),
    pytest.param(patched(TXT_ONE, 2, b"\x01\x00"), TXT_NAME, id="not-a-response"),
    pytest.param(patched(TXT_ONE, 2, b"\x90\x00"), TXT_NAME, id="opcode-status"),
    pytest.param(TXT_ONE, "_mta-sts.other.test.", id="another-name"),
    pytest.param(response(TXT_NAME, "A"), TXT_NAME, id="another-type"),
    pytest.param(patched(TXT_ONE, 12 + len(dnswire.encode_name(TXT_NAME)) + 2, b"\x00\x03"), TXT_NAME,
                 id="another-class"),
    pytest.param(patched(TXT_ONE, 4, b"\x00\x02"), TXT_NAME, id="two-questions"),
    pytest.param(response(TXT_NAME, "TXT", question=False), TXT_NAME, id="noerror-without-question"),
    pytest.param(TXT_ONE[:11], TXT_NAME, id="shorter-than-a-header"),
    pytest.param(TXT_ONE[:20], TXT_NAME, id="question-cut-short"),
])
def test_a_datagram_that_is_not_the_reply_is_told_apart(wire: bytes, name: str) -> None:
    """RFC 5452 §9.1: a reply is accepted only if its id and question match the query (and it is
    a response to a QUERY, RFC 1035 §4.1.1); anything else is not the reply, and the transport
    waits on (dnspython's is_response makes the same checks)."""
    with pytest.raises(dnswire.NotTheReply):
        dnswire.decode_reply(wire, QID, dnswire.question(name, TXT))


def test_the_question_name_compares_case_insensitively() -> None:
    """RFC 4343 §3: the echoed question and the owners may differ in case from what was asked."""
    reply = dnswire.decode_reply(CASES["txt-upper-case-owners"].wire, QID, dnswire.question(TXT_NAME, TXT))
    assert reply.rrs == (b"v=STSv1; id=up",)


# ----- malformed replies: every read bounded, one exception type -------------------------------

QNAME = dnswire.encode_name(TXT_NAME)
HEADER_AND_QUESTION = struct.pack("!HHHHHH", QID, 0x8180, 1, 1, 0, 0) + QNAME + struct.pack("!HH", TXT, 1)
OWNER = b"\xc0\x0c"  # a pointer to the question name


def one_rr(owner: bytes, rdtype: int, rdata: bytes, rdlength: int | None = None, rdclass: int = 1) -> bytes:
    rdlength = len(rdata) if rdlength is None else rdlength
    return HEADER_AND_QUESTION + owner + struct.pack("!HHIH", rdtype, rdclass, 60, rdlength) + rdata


TXT_RDATA = b"\x0fv=STSv1; id=abc"
MALFORMED = {
    "pointer-forward": one_rr(b"\xc0\x40", TXT, TXT_RDATA),
    "pointer-to-itself": one_rr(bytes([0xC0, len(HEADER_AND_QUESTION)]), TXT, TXT_RDATA),
    "pointer-past-the-end": one_rr(b"\xff\xff", TXT, TXT_RDATA),
    "pointer-cut-short": HEADER_AND_QUESTION + b"\xc0",
    "pointer-into-itself-through-another": (HEADER_AND_QUESTION[:12] + b"\x01a\xc0\x0c"
                                             + HEADER_AND_QUESTION[12 + len(QNAME):]),
    "pointer-loop-of-two": one_rr(b"\x01a" + bytes([0xC0, len(HEADER_AND_QUESTION) + 4]) + b"\x01b"
                                  + bytes([0xC0, len(HEADER_AND_QUESTION)]), TXT, TXT_RDATA),
    "label-type-01": one_rr(b"\x41" + b"x" * 65 + b"\0", TXT, TXT_RDATA),
    "label-type-10": one_rr(b"\x81\0", TXT, TXT_RDATA),
    "label-past-the-end": HEADER_AND_QUESTION + b"\x3fabc",
    "name-of-256": one_rr(b"\x3f" + b"x" * 63 + b"\x3f" + b"x" * 63 + b"\x3f" + b"x" * 63 + b"\x3e" + b"x" * 62
                          + b"\0", TXT, TXT_RDATA),
    "name-of-256-through-a-pointer": (
        HEADER_AND_QUESTION[:4] + b"\0\x01\0\x02" + HEADER_AND_QUESTION[8:]
        + b"\x3f" + b"x" * 63 + b"\x3f" + b"x" * 63 + b"\x3f" + b"x" * 63 + b"\0" + struct.pack("!HHIH", 1, 1, 60, 4)
        + b"\x7f\0\0\x01" + b"\x3f" + b"y" * 63 + bytes([0xC0, len(HEADER_AND_QUESTION)])
        + struct.pack("!HHIH", TXT, 1, 60, len(TXT_RDATA)) + TXT_RDATA),
    "record-header-cut-short": HEADER_AND_QUESTION + OWNER + b"\0\x10\0\x01\0",
    "rdlength-past-the-end": one_rr(OWNER, TXT, TXT_RDATA, rdlength=len(TXT_RDATA) + 1),
    "txt-string-past-its-rdata": one_rr(OWNER, TXT, b"\x10v=STSv1; id=abc\x00", rdlength=len(TXT_RDATA))[:-1],
    "txt-string-past-rdlength": one_rr(OWNER, TXT, b"\x05abc", rdlength=4) + b"\0\0\0\0",
    "txt-without-string": one_rr(OWNER, TXT, b""),
    "a-of-5-octets": one_rr(OWNER, dnswire.A, b"\x7f\0\0\x01\x02"),
    "aaaa-of-4-octets": one_rr(OWNER, dnswire.AAAA, b"\x7f\0\0\x01"),
    "mx-name-short-of-rdlength": one_rr(OWNER, dnswire.MX, b"\0\x0a\0\0"),
    "mx-name-past-rdlength": one_rr(OWNER, dnswire.MX, b"\0\x0a\x02mx\0", rdlength=4) + b"\0\0\0",
    "mx-without-name": one_rr(OWNER, dnswire.MX, b"\0\x0a"),
    "cname-name-short-of-rdlength": one_rr(OWNER, dnswire.CNAME, b"\xc0\x0c\0"),
    "dname-compressed": one_rr(OWNER, dnswire.DNAME, b"\xc0\x0c"),
    "soa-numbers-short": one_rr(OWNER, dnswire.SOA, b"\0\0" + b"\0" * 19),
    "soa-numbers-long": one_rr(OWNER, dnswire.SOA, b"\0\0" + b"\0" * 21),
    "opt-in-the-answer": one_rr(b"\0", dnswire.OPT, b"", rdclass=1232),
    "opt-not-at-the-root": (HEADER_AND_QUESTION[:6] + b"\0\0\0\0\0\x01" + HEADER_AND_QUESTION[12:]
                            + OWNER + struct.pack("!HHIH", dnswire.OPT, 1232, 0, 0)),
    "two-opts": (HEADER_AND_QUESTION[:6] + b"\0\0\0\0\0\x02" + HEADER_AND_QUESTION[12:]
                 + (b"\0" + struct.pack("!HHIH", dnswire.OPT, 1232, 0, 0)) * 2),
    "opt-option-past-its-rdata": (HEADER_AND_QUESTION[:6] + b"\0\0\0\0\0\x01" + HEADER_AND_QUESTION[12:]
                                  + b"\0" + struct.pack("!HHIH", dnswire.OPT, 1232, 0, 6) + b"\0\x03\0\x05ns"),
    "ede-without-code": (HEADER_AND_QUESTION[:6] + b"\0\0\0\0\0\x01" + HEADER_AND_QUESTION[12:]
                         + b"\0" + struct.pack("!HHIH", dnswire.OPT, 1232, 0, 5) + b"\0\x0f\0\x01\0"),
    "ede-text-not-utf8": (HEADER_AND_QUESTION[:6] + b"\0\0\0\0\0\x01" + HEADER_AND_QUESTION[12:]
                          + b"\0" + struct.pack("!HHIH", dnswire.OPT, 1232, 0, 7) + b"\0\x0f\0\x03\0\x06\xff"),
    "cookie-of-9": (HEADER_AND_QUESTION[:6] + b"\0\0\0\0\0\x01" + HEADER_AND_QUESTION[12:]
                    + b"\0" + struct.pack("!HHIH", dnswire.OPT, 1232, 0, 13) + b"\0\x0a\0\x09" + b"c" * 9),
    "more-records-counted-than-sent": HEADER_AND_QUESTION,
    "trailing-bytes": one_rr(OWNER, TXT, TXT_RDATA) + b"\0",
    "cname-loop": CASES["cname-loop"].wire,
    "cname-chain-of-16": CASES["cname-chain-of-16"].wire,
    "nxdomain-with-an-answer": CASES["nxdomain-with-answer"].wire,
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_reply_is_a_wire_error(case: str) -> None:
    """RFC 1035 §4.1: every length stays inside the message and inside its record, compression
    pointers (§4.1.4) point backwards and never in a circle, names stay within 255 octets
    (§2.3.4), rdata is exactly as long as RDLENGTH for each type read, nothing trails the last
    record, at most one OPT record and only in the additional section (RFC 6891 §6.1.1), a CNAME
    chain ends (RFC 1034 §3.6.2). A violation is that server's failure: WireError, never
    IndexError or struct.error, and never an answer. dnspython refuses these too (or, for the
    chain rules, its resolver does)."""
    wire = MALFORMED[case]
    with pytest.raises(dnswire.WireError) as caught:
        dnswire.decode_reply(wire, QID, dnswire.question(TXT_NAME, TXT))

    assert type(caught.value) in (dnswire.WireError, dnswire.NotTheReply)
    assert dnspython_meaning(wire, TXT_NAME, "TXT") in (("rejected",), ("server failure",))


UNSUPPORTED = {
    "class-chaos": one_rr(OWNER, TXT, TXT_RDATA, rdclass=3),
    "rrsig": one_rr(OWNER, 46, b"\0" * 20),
    "hinfo-in-authority": response(TXT_NAME, "TXT", authority=(rrset("example.test.", 60, "HINFO", '"a" "b"'),)),
    "client-subnet-option": response(TXT_NAME, "TXT", edns_options=(dns.edns.ECSOption("192.0.2.0", 24, 0),)),
}


@pytest.mark.parametrize("case", sorted(UNSUPPORTED))
def test_what_the_codec_does_not_read_is_left_to_dnspython(case: str) -> None:
    """A class other than IN, a record type beyond the codec's list, an EDNS option that dnspython
    checks further: Unsupported, so that dnspython asks and reads the reply instead (the codec
    never guesses)."""
    with pytest.raises(dnswire.Unsupported):
        dnswire.decode_reply(UNSUPPORTED[case], QID, dnswire.question(TXT_NAME, TXT))


# ----- the meaning: what dnspython and net/dns.py make of the same bytes -----------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_stub_means_what_dnspython_means(case: str) -> None:
    """The same reply means the same through both paths: RFC 8461 §3.1 (TXT RRs, each one's
    strings joined), RFC 1034 §3.6.2 (the CNAME chain from the question name, owners compared
    case-insensitively, RFC 4343), RFC 2181 §5.2 (one TTL per RRset, the least; duplicate RRs
    dropped) and §8 (a TTL with the top bit set is 0), RFC 8461 §8.2 with RFC 2181 §5.2 (the
    shortest TTL along the chain), RFC 2308 §5/§6 (the negative TTL: min of the first SOA's TTL
    and MINIMUM and every CNAME's TTL; none without an SOA), RFC 5321 §5.1 (MX hosts by
    preference, lower case, no final dot, the null MX "."), and the rcodes: NXDOMAIN and NODATA
    are "no record", YXDOMAIN too, every other rcode a server failure, TC asks again."""
    wire = CASES[case].wire
    name, rdtype = CASES[case].name, CASES[case].rdtype
    expected = dnspython_meaning(wire, name, rdtype)
    try:
        got = stub_meaning(wire, name, rdtype)
    except dnswire.WireError:  # a rule net/dns.py's resolver applies after parsing: its server failure
        got = ("server failure",)

    assert got == expected
    assert expected != ("rejected",)


def test_the_table_has_the_answers_it_is_meant_to_have() -> None:
    """The table above is only worth as much as its cases: a few, spelled out."""
    assert stub_meaning(CASES["cname-chain-ttls-differ"].wire, TXT_NAME, "TXT") == \
        ("answer", [b"v=STSv1; id=provider"], 90)
    assert stub_meaning(CASES["cname-to-nxdomain"].wire, TXT_NAME, "TXT") == \
        ("NoRecord", f"{TXT_NAME} does not exist (NXDOMAIN)", 45)
    assert stub_meaning(CASES["nxdomain-soa-ttl-below-minimum"].wire, TXT_NAME, "TXT")[2] == 40
    assert stub_meaning(CASES["nodata-no-soa"].wire, TXT_NAME, "TXT")[2] is None
    assert stub_meaning(CASES["mx-preferences"].wire, "example.test.", "MX") == \
        ("answer", ["mx1.example.test", "b.mx.example.test", "mx2.example.test", "a.mx.example.test"], 900)
    assert stub_meaning(CASES["mx-null"].wire, "example.test.", "MX") == ("answer", ["."], 3600)
    assert stub_meaning(CASES["txt-duplicate-rrs-ttls-differ"].wire, TXT_NAME, "TXT") == \
        ("answer", [b"v=STSv1; id=dup"], 200)
    assert stub_meaning(CASES["cname-two-at-one-owner"].wire, TXT_NAME, "TXT") == \
        ("answer", [b"v=STSv1; id=second"], 100)
    assert stub_meaning(CASES["servfail-with-ede"].wire, TXT_NAME, "TXT") == ("server failure",)
    assert stub_meaning(CASES["truncated"].wire, TXT_NAME, "TXT") == ("truncated",)


# ----- mutations: a few thousand, deterministic ------------------------------------------------


def mutations(wire: bytes, rng: random.Random, count: int) -> list[bytes]:
    """Bit flips, truncations, changed length octets and counts, compression pointers aimed
    anywhere (loops included), inserted and deleted octets."""
    found = []
    for _ in range(count):
        data = bytearray(wire)
        kind = rng.randrange(7)
        at = rng.randrange(len(data))
        if kind == 0:
            for _ in range(rng.randint(1, 3)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif kind == 1:
            del data[rng.randrange(len(data)):]
        elif kind == 2:
            data[at] = rng.choice([0, 1, 2, 63, 64, 127, 191, 192, 255, (data[at] + 1) % 256, (data[at] - 1) % 256])
        elif kind == 3:
            data[4 + 2 * rng.randrange(4) + 1] = rng.randrange(4)  # QD/AN/NS/AR count
        elif kind == 4:
            target = rng.randrange(at + 8)
            data[at:at + 2] = bytes([0xC0 | target >> 8, target & 0xFF])
        elif kind == 5:
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 3)))
        else:
            del data[at:at + rng.randint(1, 4)]
        found.append(bytes(data))
    return found


def test_mutated_replies_raise_only_wire_errors_and_agree_with_dnspython_when_accepted() -> None:
    """Hostile bytes: for thousands of mutations of the table's replies, the decoder either raises
    WireError or accepts, and whenever it accepts, dnspython parses the same bytes too and both
    paths mean the same (as in the table test). Deterministic: the same mutations every run."""
    rng = random.Random(8461)
    accepted = 0
    for case in CASES.values():
        for wire in mutations(case.wire, rng, 90):
            try:
                got = stub_meaning(wire, case.name, case.rdtype)
            except dnswire.WireError:
                continue
            accepted += 1
            assert got == dnspython_meaning(wire, case.name, case.rdtype), (case, wire.hex())
    assert accepted > 300  # the mutations reach the meaning, not only the parser's first checks


# ----- which resolver settings the stub stands in for -----------------------------------------


def stub_for(conf: str, tmp_path) -> udp.Stub | None:
    path = tmp_path / "resolv.conf"
    path.write_text(conf)
    return _stub_of(dns.asyncresolver.Resolver(filename=str(path)))


def test_the_stub_takes_the_system_resolvers_servers_port_and_edns(tmp_path) -> None:
    """With no nameservers configured the daemon asks the system's (/etc/resolv.conf, read by
    dnspython): the stub asks the same servers, in order, with the same EDNS and `rotate`."""
    stub = stub_for("nameserver 127.0.0.1\nnameserver ::1\noptions edns0 rotate\n", tmp_path)

    assert stub is not None
    assert [str(server) for server in stub.servers] == ["Do53:127.0.0.1@53", "Do53:::1@53"]
    assert (stub.edns, stub.payload, stub.rotate) == (0, dns.message.DEFAULT_EDNS_PAYLOAD, True)
    assert stub_for("nameserver 127.0.0.1\n", tmp_path).edns == -1  # type: ignore[union-attr]


def test_a_nameserver_that_is_not_a_plain_address_leaves_everything_to_dnspython(tmp_path) -> None:
    """A scoped IPv6 nameserver (resolv.conf may have one) is dnspython's to reach."""
    assert stub_for("nameserver 127.0.0.1\nnameserver fe80::1%lo\n", tmp_path) is None
