"""DNS replies built with dnspython's own message classes, for the differential tests of the
daemon's DNS stub (net/dnswire.py, net/udp.py) against dnspython: test_dnswire.py (decode and
mapping, and mutations of these) and test_dns_stub.py (both paths over real sockets).

Each reply answers the query `query(name, rdtype)` would send with id QID, so a test server can
give it for any id by changing its first two octets (`for_id`).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rrset

QID = 0x4D54  # the id every reply here carries
TXT_NAME = "_mta-sts.example.test."
HOST_NAME = "mta-sts.example.test."
MX_NAME = "example.test."


def rrset(owner: str, ttl: int, rdtype: str, *values: str) -> dns.rrset.RRset:
    return dns.rrset.from_text(owner, ttl, "IN", rdtype, *values)


def soa(owner: str = "example.test.", ttl: int = 300, minimum: int = 120) -> dns.rrset.RRset:
    return rrset(owner, ttl, "SOA", f"ns.{owner} hostmaster.{owner} 1 3600 600 86400 {minimum}")


def response(name: str, rdtype: str, *, rcode: dns.rcode.Rcode = dns.rcode.NOERROR,
             answer: tuple[dns.rrset.RRset, ...] = (), authority: tuple[dns.rrset.RRset, ...] = (),
             additional: tuple[dns.rrset.RRset, ...] = (), question: bool = True, truncated: bool = False,
             edns_options: tuple[dns.edns.Option, ...] | None = None, ednsflags: int = 0) -> bytes:
    """The wire of a reply to `name` `rdtype` with id QID. Every RRset given is written as one
    run of RRs, in the order given (two RRsets of one owner and type: two runs, as some servers
    send them). `edns_options`: an OPT record with these options (None: no OPT)."""
    query = dns.message.make_query(name, rdtype)
    query.id = QID
    reply = dns.message.make_response(query)
    reply.set_rcode(rcode)
    if edns_options is not None:
        reply.use_edns(0, ednsflags, 1232, options=list(edns_options))
        reply.set_rcode(rcode)  # use_edns keeps the flags; the extended rcode lives in the OPT TTL
    reply.answer.extend(answer)
    reply.authority.extend(authority)
    reply.additional.extend(additional)
    if truncated:
        reply.flags |= dns.flags.TC
    if not question:
        reply.question = []
    return reply.to_wire(want_shuffle=False)


def for_id(wire: bytes, qid: int) -> bytes:
    """`wire` as the reply to a query with id `qid`."""
    return qid.to_bytes(2, "big") + wire[2:]


@dataclass(frozen=True)
class Case:
    name: str  # the name asked (absolute, lower case as the daemon asks)
    rdtype: str  # TXT, A, AAAA or MX
    build: Callable[[], bytes]  # the reply's wire (id QID)
    full: Callable[[], bytes] | None = None  # over TCP after a truncated UDP reply

    @property
    def wire(self) -> bytes:
        return self.build()


def _upper_owners() -> bytes:
    """The question echoed in mixed case and the answer's owner in upper case, not compressed
    (RFC 4343: names compare case-insensitively)."""
    def name(text: str) -> bytes:
        return dns.name.from_text(text).to_wire()

    txt = dns.rrset.from_text(TXT_NAME, 300, "IN", "TXT", '"v=STSv1; id=up"')[0].to_wire()
    return (struct.pack("!HHHHHH", QID, 0x8180, 1, 1, 0, 0) + name("_mta-sts.ExAmPlE.test.") + struct.pack("!HH", 16, 1)
            + name(TXT_NAME.upper()) + struct.pack("!HHIH", 16, 1, 300, len(txt)) + txt)


def _chain(*links: tuple[str, int]) -> tuple[dns.rrset.RRset, ...]:
    """CNAME RRsets from the first owner to the last: ((owner, ttl), ..., (target, _))."""
    return tuple(rrset(owner, ttl, "CNAME", target) for (owner, ttl), (target, _) in zip(links, links[1:]))


CASES: dict[str, Case] = {
    "txt-one": Case(TXT_NAME, "TXT", lambda: response(
        TXT_NAME, "TXT", answer=(rrset(TXT_NAME, 3600, "TXT", '"v=STSv1; id=1"'),))),
    "txt-many": Case(TXT_NAME, "TXT", lambda: response(
        TXT_NAME, "TXT", answer=(rrset(TXT_NAME, 900, "TXT", '"v=spf1 -all"', '"v=STSv1; id=many"',
                                       '"google-site-verification=x"'),))),
    "txt-multi-string": Case(TXT_NAME, "TXT", lambda: response(
        TXT_NAME, "TXT", answer=(rrset(TXT_NAME, 300, "TXT", '"v=STS" "v1; id=ab" "c123"'),))),
    "txt-two-stsv1": Case(TXT_NAME, "TXT", lambda: response(
        TXT_NAME, "TXT", answer=(rrset(TXT_NAME, 777, "TXT", '"v=STSv1; id=a"', '"v=STSv1; id=b"'),))),
    "txt-split-differently": Case(TXT_NAME, "TXT", lambda: response(  # two RRs, one text: not duplicates
        TXT_NAME, "TXT", answer=(rrset(TXT_NAME, 300, "TXT", '"v=STSv1; id=1"', '"v=STSv1;" " id=1"'),))),
    "txt-duplicate-rrs-ttls-differ": Case(TXT_NAME, "TXT", lambda: response(
        TXT_NAME, "TXT", answer=(rrset(TXT_NAME, 600, "TXT", '"v=STSv1; id=dup"'),
                                 rrset(TXT_NAME, 200, "TXT", '"v=STSv1; id=dup"')))),
    "txt-empty-string": Case(TXT_NAME, "TXT", lambda: response(
        TXT_NAME, "TXT", answer=(rrset(TXT_NAME, 300, "TXT", '""', '"v=STSv1; id=e"'),))),
    "txt-top-bit-ttl": Case(TXT_NAME, "TXT", lambda: response(  # RFC 2181 §8: read as 0
        TXT_NAME, "TXT", answer=(rrset(TXT_NAME, 0x80000001, "TXT", '"v=STSv1; id=t"'),))),
    "txt-upper-case-owners": Case(TXT_NAME, "TXT", _upper_owners),
    "cname-chain-ttls-differ": Case(TXT_NAME, "TXT", lambda: response(
        TXT_NAME, "TXT", answer=(*_chain((TXT_NAME, 600), ("_mta-sts.hop.test.", 90), ("_mta-sts.provider.test.", 0)),
                                 rrset("_mta-sts.provider.test.", 3000, "TXT", '"v=STSv1; id=provider"')))),
    "cname-chain-out-of-order": Case(TXT_NAME, "TXT", lambda: response(
        TXT_NAME, "TXT", answer=(rrset("_mta-sts.provider.test.", 50, "TXT", '"v=STSv1; id=p"'),
                                 *reversed(_chain((TXT_NAME, 600), ("_MTA-STS.hop.test.", 90),
                                                  ("_mta-sts.PROVIDER.test.", 0)))))),
    "cname-to-nxdomain": Case(TXT_NAME, "TXT", lambda: response(
        TXT_NAME, "TXT", rcode=dns.rcode.NXDOMAIN, answer=_chain((TXT_NAME, 45), ("_mta-sts.gone.test.", 0)),
        authority=(soa("gone.test.", 300, 120),))),
    "cname-to-nodata": Case(TXT_NAME, "TXT", lambda: response(
        TXT_NAME, "TXT", answer=_chain((TXT_NAME, 4000), ("_mta-sts.empty.test.", 0)),
        authority=(soa("empty.test.", 600, 500),))),
    "cname-unrelated-in-answer": Case(TXT_NAME, "TXT", lambda: response(  # bounds the negative TTL too
        TXT_NAME, "TXT", authority=(soa(ttl=300, minimum=300),),
        answer=(rrset("elsewhere.test.", 30, "CNAME", "there.test."),))),
    "cname-two-at-one-owner": Case(TXT_NAME, "TXT", lambda: response(  # the last one counts
        TXT_NAME, "TXT", answer=(rrset(TXT_NAME, 100, "CNAME", "_mta-sts.first.test."),
                                 rrset(TXT_NAME, 200, "CNAME", "_mta-sts.second.test."),
                                 rrset("_mta-sts.first.test.", 300, "TXT", '"v=STSv1; id=first"'),
                                 rrset("_mta-sts.second.test.", 300, "TXT", '"v=STSv1; id=second"')))),
    "cname-loop": Case(TXT_NAME, "TXT", lambda: response(
        TXT_NAME, "TXT", answer=_chain((TXT_NAME, 60), ("_mta-sts.loop.test.", 60), (TXT_NAME, 0)))),
    "cname-chain-of-16": Case(TXT_NAME, "TXT", lambda: response(
        TXT_NAME, "TXT", answer=(*_chain((TXT_NAME, 60), *((f"l{n}.test.", 60) for n in range(16))),
                                 rrset("l15.test.", 60, "TXT", '"v=STSv1; id=deep"')))),
    "cname-chain-of-15": Case(TXT_NAME, "TXT", lambda: response(
        TXT_NAME, "TXT", answer=(*_chain((TXT_NAME, 60), *((f"l{n}.test.", 60) for n in range(15))),
                                 rrset("l14.test.", 60, "TXT", '"v=STSv1; id=deep"')))),
    "nxdomain-with-answer": Case(TXT_NAME, "TXT", lambda: response(
        TXT_NAME, "TXT", rcode=dns.rcode.NXDOMAIN, answer=(rrset(TXT_NAME, 60, "TXT", '"v=STSv1; id=odd"'),))),
    "nxdomain-soa": Case(TXT_NAME, "TXT", lambda: response(
        TXT_NAME, "TXT", rcode=dns.rcode.NXDOMAIN, authority=(soa(ttl=3600, minimum=123),))),
    "nxdomain-soa-ttl-below-minimum": Case(TXT_NAME, "TXT", lambda: response(
        TXT_NAME, "TXT", rcode=dns.rcode.NXDOMAIN, authority=(soa(ttl=40, minimum=900),))),
    "nxdomain-no-soa": Case(TXT_NAME, "TXT", lambda: response(TXT_NAME, "TXT", rcode=dns.rcode.NXDOMAIN)),
    "nxdomain-ns-then-two-soas": Case(TXT_NAME, "TXT", lambda: response(
        TXT_NAME, "TXT", rcode=dns.rcode.NXDOMAIN,
        authority=(rrset("example.test.", 10, "NS", "ns1.example.test."), soa("example.test.", 500, 400),
                   soa("test.", 20, 20)))),
    "nodata-soa": Case(TXT_NAME, "TXT", lambda: response(TXT_NAME, "TXT", authority=(soa(ttl=700, minimum=800),))),
    "nodata-no-soa": Case(TXT_NAME, "TXT", lambda: response(TXT_NAME, "TXT")),
    "nodata-other-type-in-answer": Case(TXT_NAME, "TXT", lambda: response(
        TXT_NAME, "TXT", answer=(rrset(TXT_NAME, 60, "A", "192.0.2.1"),), authority=(soa(),))),
    "mx-preferences": Case(MX_NAME, "MX", lambda: response(
        MX_NAME, "MX", answer=(rrset(MX_NAME, 900, "MX", "20 MX2.example.test.", "10 Mx1.example.test.",
                                     "30 a.mx.example.test.", "10 b.MX.example.test."),),
        additional=(rrset("mx1.example.test.", 60, "A", "192.0.2.1"),
                    rrset("mx1.example.test.", 60, "AAAA", "2001:db8::1")))),
    "mx-same-host-twice-in-other-case": Case(MX_NAME, "MX", lambda: response(
        MX_NAME, "MX", answer=(rrset(MX_NAME, 900, "MX", "10 mx.example.test."),
                               rrset(MX_NAME, 300, "MX", "10 MX.example.TEST.", "5 other.test.")))),
    "mx-odd-characters": Case(MX_NAME, "MX", lambda: response(
        MX_NAME, "MX", answer=(rrset(MX_NAME, 900, "MX", r"10 we\.ird\032host\@\255x.example.test."),))),
    "mx-null": Case(MX_NAME, "MX", lambda: response(MX_NAME, "MX", answer=(rrset(MX_NAME, 3600, "MX", "0 ."),))),
    "mx-nodata": Case(MX_NAME, "MX", lambda: response(MX_NAME, "MX", authority=(soa(ttl=200, minimum=100),))),
    "mx-through-cname": Case(MX_NAME, "MX", lambda: response(
        MX_NAME, "MX", answer=(rrset(MX_NAME, 120, "CNAME", "mail.provider.test."),
                               rrset("mail.provider.test.", 3600, "MX", "10 in.provider.test.")))),
    "a-several": Case(HOST_NAME, "A", lambda: response(
        HOST_NAME, "A", answer=(rrset(HOST_NAME, 300, "A", "192.0.2.7", "192.0.2.8", "10.0.0.1"),),
        authority=(rrset("example.test.", 3600, "NS", "ns.example.test."),))),
    "aaaa-forms": Case(HOST_NAME, "AAAA", lambda: response(
        HOST_NAME, "AAAA", answer=(rrset(HOST_NAME, 300, "AAAA", "2001:db8::7", "::ffff:192.0.2.1", "::1",
                                         "2001:0:0:1:0:0:0:1", "fe80::"),))),
    "dname-and-cname": Case(HOST_NAME, "A", lambda: response(
        HOST_NAME, "A", answer=(rrset("example.test.", 600, "DNAME", "example.net."),
                                rrset(HOST_NAME, 600, "CNAME", "mta-sts.example.net."),
                                rrset("mta-sts.example.net.", 60, "A", "192.0.2.9")))),
    "servfail": Case(TXT_NAME, "TXT", lambda: response(TXT_NAME, "TXT", rcode=dns.rcode.SERVFAIL)),
    "servfail-with-ede": Case(TXT_NAME, "TXT", lambda: response(
        TXT_NAME, "TXT", rcode=dns.rcode.SERVFAIL, edns_options=(dns.edns.EDEOption(dns.edns.EDECode.DNSSEC_BOGUS,
                                                                                    "signature expired"),))),
    "servfail-without-question": Case(TXT_NAME, "TXT", lambda: response(
        TXT_NAME, "TXT", rcode=dns.rcode.SERVFAIL, question=False)),
    "refused": Case(TXT_NAME, "TXT", lambda: response(TXT_NAME, "TXT", rcode=dns.rcode.REFUSED)),
    "formerr": Case(TXT_NAME, "TXT", lambda: response(TXT_NAME, "TXT", rcode=dns.rcode.FORMERR)),
    "badvers": Case(TXT_NAME, "TXT", lambda: response(TXT_NAME, "TXT", rcode=dns.rcode.BADVERS, edns_options=())),
    "yxdomain": Case(TXT_NAME, "TXT", lambda: response(TXT_NAME, "TXT", rcode=dns.rcode.YXDOMAIN)),
    "edns-with-cookie-and-nsid": Case(TXT_NAME, "TXT", lambda: response(
        TXT_NAME, "TXT", answer=(rrset(TXT_NAME, 300, "TXT", '"v=STSv1; id=opt"'),),
        edns_options=(dns.edns.CookieOption(b"12345678", b"abcdefgh"), dns.edns.NSIDOption(b"ns1"),
                      dns.edns.GenericOption(12, b"\0\0\0")))),
    "truncated": Case(TXT_NAME, "TXT", lambda: response(TXT_NAME, "TXT", truncated=True),
                      full=lambda: response(TXT_NAME, "TXT", answer=(
                          rrset(TXT_NAME, 300, "TXT", '"v=STSv1; id=tcp"', *(f'"filler-{n}-{"x" * 200}"'
                                                                           for n in range(4))),))),
}
