"""The daemon's DNS stub (net/udp.py over net/dnswire.py) on real loopback sockets, against
dnspython asking the same servers: DnsDiscovery's asyncio forms (the stub, the daemon's path)
give what its sync forms (dnspython) give, byte-exact replies included; spoofed datagrams are
dropped; the nameservers are asked in order; truncated replies go on over TCP.

The zone-data side of the same promise (the rig's DnsServer) is in test_discovery.py.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import dns.message
import pytest

from mtasts_policyd.core.errors import MtaStsError
from mtasts_policyd.net.dns import DnsDiscovery, DnsSettings
from tests.dns_replies import CASES, HOST_NAME, MX_NAME, TXT_NAME, Case, for_id, response, rrset
from tests.rig import Datagram, DnsServer, ScriptedDns

DOMAIN = MX_NAME.rstrip(".")  # the domain of every name in tests/dns_replies.py


def query_id(query: bytes) -> int:
    return int.from_bytes(query[:2], "big")


def replying(case: Case) -> ScriptedDns:
    """A server giving `case`'s reply to every query (its full form over TCP, if it has one)."""
    def script(query: bytes, tcp: bool) -> list[Datagram]:
        wire = case.full() if tcp and case.full is not None else case.wire
        return [Datagram(for_id(wire, query_id(query)))]
    return ScriptedDns(script)


def forms(discovery: DnsDiscovery, rdtype: str):
    """The sync form (dnspython) and the asyncio form (the stub) of the question for `rdtype`."""
    if rdtype == "TXT":
        return (lambda: discovery.sts_record(DOMAIN)), (lambda: discovery.sts_record_async(DOMAIN))
    if rdtype == "MX":
        return (lambda: discovery.mx_hosts(DOMAIN)), (lambda: discovery.mx_hosts_async(DOMAIN))
    host = HOST_NAME.rstrip(".")
    return (lambda: discovery.addresses(host, (rdtype,))), (lambda: discovery.addresses_async(host, (rdtype,)))


def outcome(ask) -> tuple:
    """The answer, or the failure's class, text and TTL (what callers act on and log)."""
    try:
        return "answer", ask()
    except MtaStsError as exc:
        return type(exc).__name__, str(exc), exc.ttl


@pytest.mark.timeout(20)
@pytest.mark.parametrize("case", sorted(CASES))
def test_the_stub_gives_what_dnspython_gives_for_the_same_reply(case: str) -> None:
    """Every reply of tests/dns_replies.py (RFC rules in test_dnswire.py), from a real server:
    the same answer, TTL, failure class and failure text through the stub as through dnspython,
    the server failures (SERVFAIL, REFUSED, FORMERR, BADVERS, a CNAME loop) named alike."""
    rdtype = CASES[case].rdtype
    with replying(CASES[case]) as server:
        discovery = DnsDiscovery(DnsSettings(nameservers=(server.host,), port=server.port, timeout=2))
        sync, asynchronous = forms(discovery, rdtype)
        expected = outcome(sync)
        got = outcome(lambda: asyncio.run(asynchronous()))

    assert got == expected
    assert expected[0] != "DnsTemporaryFailure" or "no server answered" in expected[1]  # a reply, not a timeout


def test_the_stub_sends_what_dnspython_sends() -> None:
    """The same query octets as dnspython's resolver (RFC 1035 §4.1; the EDNS choice of the
    configured resolver: none with configured nameservers), only the random id differs."""
    def nodata(query: bytes, tcp: bool) -> list[Datagram]:
        return [Datagram(dns.message.make_response(dns.message.from_wire(query)).to_wire())]

    with ScriptedDns(nodata) as server:
        discovery = DnsDiscovery(DnsSettings(nameservers=(server.host,), port=server.port, timeout=2))
        for rdtype in ("TXT", "MX", "A", "AAAA"):
            sync, asynchronous = forms(discovery, rdtype)
            outcome(sync)
            outcome(lambda: asyncio.run(asynchronous()))
        queries = [wire for _, wire in server.received]

    assert len(queries) == 8
    assert [wire[2:] for wire in queries[0::2]] == [wire[2:] for wire in queries[1::2]]


@pytest.mark.timeout(20)
def test_a_truncated_reply_is_asked_again_over_tcp() -> None:
    """RFC 1035 §4.2.1, RFC 7766 §5: a reply with TC set is incomplete; the question is asked
    again over TCP (the stub leaves it to dnspython, which does) and the full answer counts."""
    with replying(CASES["truncated"]) as server:
        discovery = DnsDiscovery(DnsSettings(nameservers=(server.host,), port=server.port, timeout=2))
        answer = asyncio.run(discovery.sts_record_async(DOMAIN))
        over_tcp = [tcp for tcp, _ in server.received]

    assert answer.record.id == "tcp"
    assert True in over_tcp and over_tcp[0] is False


# ----- spoofing: RFC 5452 ---------------------------------------------------------------------


@pytest.mark.timeout(20)
def test_spoofed_datagrams_are_dropped_and_the_real_reply_taken() -> None:
    """RFC 5452 §9.1: a reply is accepted only from the address and port asked, with the query's
    id and question. Datagrams that arrive first with another id, from another port or address,
    for another question, or not DNS at all, are dropped (the wait goes on, the server is not
    failed), and the real reply is taken."""
    real = response(TXT_NAME, "TXT", answer=(rrset(TXT_NAME, 300, "TXT", '"v=STSv1; id=real"'),))
    evil = response(TXT_NAME, "TXT", answer=(rrset(TXT_NAME, 300, "TXT", '"v=STSv1; id=evil"'),))
    elsewhere = response("_mta-sts.elsewhere.test.", "TXT",
                         answer=(rrset("_mta-sts.elsewhere.test.", 300, "TXT", '"v=STSv1; id=evil"'),))

    def script(query: bytes, tcp: bool) -> list[Datagram]:
        qid = query_id(query)
        return [Datagram(for_id(evil, qid ^ 0x5A5A)), Datagram(for_id(evil, qid), via="other-port"),
                Datagram(for_id(evil, qid), via="other-address"), Datagram(for_id(elsewhere, qid)),
                Datagram(b"\x00"), Datagram(b""), Datagram(for_id(real, qid))]

    with ScriptedDns(script) as server:
        discovery = DnsDiscovery(DnsSettings(nameservers=(server.host,), port=server.port, timeout=2))
        answers = asyncio.run(asyncio_gather(discovery.sts_record_async(DOMAIN) for _ in range(20)))
        asked = len(server.received)

    assert {answer.record.id for answer in answers} == {"real"}
    assert asked == 20  # one query each: no spoof made a server fail or a try time out


async def asyncio_gather(coroutines) -> list:
    return await asyncio.gather(*coroutines)


# ----- several nameservers: in order, the next one after a failure ----------------------------


@pytest.mark.timeout(40)
@pytest.mark.parametrize("first", ["servfail", "dead"])
def test_the_next_nameserver_answers_when_the_first_fails(first: str) -> None:
    """resolv.conf semantics (and dnspython's): the nameservers in order; a server that answers
    SERVFAIL is out of this question at once, a dead one after the per-try timeout (2 s); the
    next one's answer counts, through every form, as through dnspython."""
    with DnsServer("127.0.0.3", 0, lifetime=60) as good, DnsServer("127.0.0.4", good.port, lifetime=60) as bad:
        good.set(f"_mta-sts.{DOMAIN}", "TXT", "v=STSv1; id=second", ttl=600)
        good.set(DOMAIN, "MX", f"10 mx.{DOMAIN}.", ttl=600)
        good.set(HOST_NAME, "A", "192.0.2.1", ttl=600)
        bad.fault(DOMAIN, "servfail", subtree=True)
        first_address = bad.host if first == "servfail" else "127.0.0.5"  # nothing listens there
        discovery = DnsDiscovery(DnsSettings(nameservers=(first_address, good.host), port=good.port, timeout=4))
        asked = [forms(discovery, rdtype) for rdtype in ("TXT", "MX", "A")]
        with ThreadPoolExecutor(3) as pool:  # the dead server costs each question 2 s: ask at once
            expected = list(pool.map(outcome, [sync for sync, _ in asked]))

        async def ask_async() -> list[tuple]:
            async def one(asynchronous) -> tuple:
                try:
                    return "answer", await asynchronous()
                except MtaStsError as exc:
                    return type(exc).__name__, str(exc), exc.ttl
            return await asyncio.gather(*(one(asynchronous) for _, asynchronous in asked))

        got = asyncio.run(ask_async())

    assert got == expected
    assert got[0][1].record.id == "second" and got[1][1] == ([f"mx.{DOMAIN}"], 600) and got[2][1] == ["192.0.2.1"]
