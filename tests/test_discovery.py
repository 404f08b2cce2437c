"""Discovery against the real loopback DNS server: the `_mta-sts` TXT record (RFC 8461 §3.1),
the addresses of the policy host and the MX list.

Every test publishes its own fresh domain on the session-wide server, so tests never see each
other's data; the one global knob (the negative TTL) is changed only through a fixture that
puts it back.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

import pytest

from mtasts_policyd.core.errors import (
    DnsTemporaryFailure,
    FailureKind,
    InvalidRecord,
    MtaStsError,
    NoRecord,
)
from mtasts_policyd.net.dns import DnsDiscovery, DnsSettings

NEGATIVE_TTL = 123  # distinct from the rig's default (60) and from every positive TTL used here


@pytest.fixture
def discovery(rig) -> DnsDiscovery:
    return DnsDiscovery(rig.dns_settings())


@pytest.fixture
def quick_discovery(rig) -> DnsDiscovery:
    """Short timeout for the "server never answers" case, so it costs half a second, not two."""
    return DnsDiscovery(DnsSettings(nameservers=(rig.dns.host,), port=rig.dns.port, timeout=0.5))


@pytest.fixture
def negative_ttl(rig) -> Iterator[int]:
    """The rig's negative TTL is global to the session-scoped server: set it, then restore it."""
    previous = rig.dns.negative_ttl
    rig.dns.set_negative_ttl(NEGATIVE_TTL)
    try:
        yield NEGATIVE_TTL
    finally:
        rig.dns.set_negative_ttl(previous)


# ----- the record itself: RFC 8461 §3.1 -----------------------------------------------------


def test_single_record_gives_id_text_and_ttl(rig, discovery: DnsDiscovery) -> None:
    """RFC 8461 §3.1: one TXT RR "v=STSv1; id=..." at _mta-sts.<domain> is the policy record;
    its TTL is the RRset's own TTL (RFC 1035 §3.2.1), which bounds how long we trust the id."""
    domain = rig.domain()
    rig.dns.set(f"_mta-sts.{domain}", "TXT", "v=STSv1; id=20240101T000000", ttl=4321)

    answer = discovery.sts_record(domain)

    assert answer.record.id == "20240101T000000"
    assert answer.record.text == "v=STSv1; id=20240101T000000"
    assert answer.record.extensions == ()
    assert answer.ttl == 4321
    assert rig.dns.count(f"_mta-sts.{domain}", "TXT") == 1


def test_record_split_into_strings_is_joined_without_spaces(rig, discovery: DnsDiscovery) -> None:
    """RFC 8461 §3.1: a TXT RR of several strings MUST be read as their concatenation with
    nothing added. The split falls inside "STSv1" and inside the id, so an added space would
    make the version or the id invalid."""
    domain = rig.domain()
    rig.dns.set(f"_mta-sts.{domain}", "TXT", ["v=STS", "v1; id=abc", "123"], ttl=300)

    answer = discovery.sts_record(domain)

    assert answer.record.id == "abc123"
    assert answer.record.text == "v=STSv1; id=abc123"


def test_cname_at_mta_sts_is_followed(rig, discovery: DnsDiscovery) -> None:
    """RFC 8461 §8.2: a domain may delegate with "_mta-sts.user IN CNAME _mta-sts.provider";
    the record found at the end of the chain is the user's record."""
    domain, provider = rig.domain("user"), rig.domain("provider")
    rig.dns.set(f"_mta-sts.{domain}", "CNAME", f"_mta-sts.{provider}.", ttl=600)
    rig.dns.set(f"_mta-sts.{provider}", "TXT", "v=STSv1; id=provider1", ttl=600)

    answer = discovery.sts_record(domain)

    assert answer.record.id == "provider1"
    assert answer.ttl == 600
    # The server chased the chain itself: one query, for the user's name only.
    assert rig.dns.count(f"_mta-sts.{domain}", "TXT") == 1
    assert rig.dns.count(f"_mta-sts.{provider}", "TXT") == 0


def test_ttl_through_cname_is_the_shortest_in_the_chain(rig, discovery: DnsDiscovery) -> None:
    """RFC 8461 §8.2 delegation by CNAME, and RFC 2181 §5.2/RFC 1035 §3.2.1: every RR may be
    kept only for its own TTL. The answer depends on the CNAME as much as on the TXT, so
    a provider's long TXT TTL must not let us trust the id after the user's CNAME expired
    (the user may have pointed it elsewhere)."""
    domain, provider = rig.domain("user"), rig.domain("provider")
    rig.dns.set(f"_mta-sts.{domain}", "CNAME", f"_mta-sts.{provider}.", ttl=90)
    rig.dns.set(f"_mta-sts.{provider}", "TXT", "v=STSv1; id=provider2", ttl=3000)

    assert discovery.sts_record(domain).ttl == 90


def test_only_the_stsv1_record_counts_among_other_txt_records(rig, discovery: DnsDiscovery) -> None:
    """RFC 8461 §3.1: records that do not begin with "v=STSv1;" are discarded, so SPF and
    site-verification strings sharing the name do not disturb discovery."""
    domain = rig.domain()
    name = f"_mta-sts.{domain}"
    rig.dns.set(name, "TXT", "v=spf1 -all", "google-site-verification=abcdef",
                "v=STSv1; id=only1", "v=STSv2; id=future", ttl=300)

    assert discovery.sts_record(domain).record.id == "only1"


def test_stsv1_without_semicolon_is_discarded_beside_a_valid_record(rig, discovery: DnsDiscovery) -> None:
    """RFC 8461 §3.1: "Records that do not begin with 'v=STSv1;' are discarded": a broken
    "v=STSv1 id=2" next to a valid record is discarded, leaving exactly one record."""
    domain = rig.domain()
    rig.dns.set(f"_mta-sts.{domain}", "TXT", "v=STSv1 id=2", "v=STSv1;id=1", ttl=300)

    assert discovery.sts_record(domain).record.id == "1"


def test_large_txt_rrset_truncated_over_udp_still_found(rig, discovery: DnsDiscovery) -> None:
    """RFC 8461 §3.1 (all TXT RRs at the name are considered) over RFC 7766 transport: an RRset too
    large for one UDP datagram comes back truncated and must be fetched again over TCP."""
    domain = rig.domain()
    filler = [f"verification-{n}=" + "x" * 200 for n in range(10)]
    rig.dns.set(f"_mta-sts.{domain}", "TXT", *filler, "v=STSv1; id=bigset", ttl=300)

    assert discovery.sts_record(domain).record.id == "bigset"


def test_extensions_are_kept_and_ignored(rig, discovery: DnsDiscovery) -> None:
    """RFC 8461 §3.1: unknown fields SHALL be ignored; whitespace around ";" is allowed by the
    ABNF's sts-field-delim (= *WSP ";" *WSP), as is a trailing ";"."""
    domain = rig.domain()
    rig.dns.set(f"_mta-sts.{domain}", "TXT", "v=STSv1 ;id=ext1 ;\tfoo=bar;", ttl=300)

    record = discovery.sts_record(domain).record

    assert record.id == "ext1"
    assert record.extensions == (("foo", "bar"),)


def test_id_of_32_characters_is_the_longest_accepted(rig, discovery: DnsDiscovery) -> None:
    """RFC 8461 §3.1: sts-id = "id=" 1*32(ALPHA / DIGIT); 32 is still valid (33 is not, below)."""
    domain = rig.domain()
    rig.dns.set(f"_mta-sts.{domain}", "TXT", "v=STSv1; id=" + "A1" * 16, ttl=300)

    assert discovery.sts_record(domain).record.id == "A1" * 16


def test_two_stsv1_records_are_invalid(rig, discovery: DnsDiscovery) -> None:
    """RFC 8461 §3.1: if more than one record begins with "v=STSv1;", the sender MUST assume
    no policy is available. The failure still carries the RRset's TTL: it is a DNS fact."""
    domain = rig.domain()
    rig.dns.set(f"_mta-sts.{domain}", "TXT", "v=STSv1; id=one", "v=STSv1; id=two", ttl=777)

    with pytest.raises(InvalidRecord) as caught:
        discovery.sts_record(domain)

    assert caught.value.kind is FailureKind.INVALID_RECORD
    assert caught.value.ttl == 777


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("v=STSv1;", id="no-id"),
        pytest.param("v=STSv1; foo=bar", id="extension-but-no-id"),
        pytest.param("v=STSv1; id=abc-123", id="id-with-hyphen"),
        pytest.param("v=STSv1; id=abc.123", id="id-with-dot"),
        pytest.param("v=STSv1; id=" + "a" * 33, id="id-of-33"),
        pytest.param("v=STSv1; id=", id="empty-id"),
        pytest.param("v=STSv1 id=x", id="no-semicolon"),
        pytest.param("v=STSv1; id=1;;", id="double-semicolon"),
        pytest.param("v=STSv1; id=1 ", id="trailing-whitespace"),
        pytest.param("v=STSv1; id=1; preload", id="field-without-equals"),
        pytest.param("v=STSv1; id=1; note=caf\u00e9", id="not-us-ascii"),
    ],
)
def test_malformed_record_is_invalid(rig, discovery: DnsDiscovery, text: str) -> None:
    """RFC 8461 §3.1: the record MUST be US-ASCII, MUST hold an id of 1-32 letters and digits
    (sts-id = "id=" 1*32(ALPHA / DIGIT)), and "v=STSv1" MUST be followed by ";". A malformed
    STSv1 record means no policy is available, reported as invalid (not as absent)."""
    domain = rig.domain()
    rig.dns.set(f"_mta-sts.{domain}", "TXT", text, ttl=300)

    with pytest.raises(InvalidRecord) as caught:
        discovery.sts_record(domain)

    assert caught.value.kind is FailureKind.INVALID_RECORD
    assert caught.value.ttl == 300


def test_duplicate_id_first_wins_and_stray_lookalike_is_discarded(rig, discovery: DnsDiscovery) -> None:
    """RFC 8461 §3.1: a field given twice is valid syntax (the first occurrence wins), and a
    "v=STSv1" not followed by ";" is discarded before the records are counted."""
    domain = rig.domain()
    rig.dns.set(f"_mta-sts.{domain}", "TXT", "v=STSv1", "v=STSv1; id=1; id=2", ttl=300)

    assert discovery.sts_record(domain).record.id == "1"


def test_version_is_case_sensitive(rig, discovery: DnsDiscovery) -> None:
    """RFC 8461 §3.1: sts-version = %s"v=STSv1" (case-sensitive, RFC 7405): "V=stsv1;" does not
    begin with "v=STSv1" and is discarded like any other TXT record."""
    domain = rig.domain()
    rig.dns.set(f"_mta-sts.{domain}", "TXT", "V=stsv1; id=1", ttl=300)

    with pytest.raises(NoRecord) as caught:
        discovery.sts_record(domain)

    assert caught.value.kind is FailureKind.NO_RECORD


# ----- absence and failure: RFC 8461 §3.1 with RFC 2308 negative caching ---------------------


def test_nxdomain_is_no_record_with_negative_ttl(rig, discovery: DnsDiscovery, negative_ttl: int) -> None:
    """RFC 8461 §3.1: no record means no policy; RFC 2308 §5: NXDOMAIN may be cached for the
    SOA's negative TTL, which must therefore travel with the failure."""
    domain = rig.domain()  # nothing published at all

    with pytest.raises(NoRecord) as caught:
        discovery.sts_record(domain)

    assert caught.value.kind is FailureKind.NO_RECORD
    assert caught.value.ttl == negative_ttl


def test_negative_ttl_through_cname_is_bounded_by_the_cname(rig, discovery: DnsDiscovery, negative_ttl: int) -> None:
    """RFC 8461 §8.2 delegation by CNAME, RFC 2308 §5: "no record" reached through a CNAME holds
    only while the CNAME does; a shorter CNAME TTL bounds the negative TTL."""
    domain, provider = rig.domain("user"), rig.domain("gone")
    rig.dns.set(f"_mta-sts.{domain}", "CNAME", f"_mta-sts.{provider}.", ttl=45)  # target: NXDOMAIN

    with pytest.raises(NoRecord) as caught:
        discovery.sts_record(domain)

    assert caught.value.ttl == 45 < negative_ttl


def test_nodata_is_no_record_with_negative_ttl(rig, discovery: DnsDiscovery, negative_ttl: int) -> None:
    """RFC 8461 §3.1 and RFC 2308 §5 (NODATA): the name exists but has no TXT RRset."""
    domain = rig.domain()
    rig.dns.set(f"_mta-sts.{domain}", "A", "127.0.0.1")

    with pytest.raises(NoRecord) as caught:
        discovery.sts_record(domain)

    assert caught.value.kind is FailureKind.NO_RECORD
    assert caught.value.ttl == negative_ttl


def test_txt_without_stsv1_is_no_record_for_the_rrset_ttl(rig, discovery: DnsDiscovery, negative_ttl: int) -> None:
    """RFC 8461 §3.1: when every TXT RR is discarded, none is left, so no policy; the answer was
    positive DNS-wise, so it is kept for the TXT RRset's TTL, not the negative TTL."""
    domain = rig.domain()
    rig.dns.set(f"_mta-sts.{domain}", "TXT", "v=spf1 -all", ttl=456)

    with pytest.raises(NoRecord) as caught:
        discovery.sts_record(domain)

    assert caught.value.ttl == 456


@pytest.mark.parametrize("fault", ["servfail", "refused"])
def test_server_failure_is_temporary_never_no_record(rig, discovery: DnsDiscovery, fault: str) -> None:
    """RFC 8461 §3.1 only lets an *absent* record mean "no policy"; SERVFAIL and REFUSED say
    nothing about the domain (RFC 8460 §4.3.2.2 reports them as sts-policy-fetch-error), so they
    must be a temporary failure and never cacheable as NoRecord."""
    domain = rig.domain()
    name = f"_mta-sts.{domain}"
    rig.dns.set(name, "TXT", "v=STSv1; id=hidden", ttl=300)
    rig.dns.fault(name, fault)
    try:
        with pytest.raises(DnsTemporaryFailure) as caught:
            discovery.sts_record(domain)
    finally:
        rig.dns.fault(name, None)

    assert caught.value.kind is FailureKind.DNS_TEMPORARY
    assert caught.value.kind.temporary
    assert not isinstance(caught.value, NoRecord)
    assert rig.dns.count(name, "TXT") >= 1


@pytest.mark.timeout(5)
def test_timeout_is_temporary_never_no_record(rig, quick_discovery: DnsDiscovery) -> None:
    """RFC 8461 §3.1: a server that never answers tells us nothing; the lookup ends within the
    configured DNS timeout with a temporary failure, not "no record"."""
    domain = rig.domain()
    name = f"_mta-sts.{domain}"
    rig.dns.fault(name, "timeout")
    try:
        with pytest.raises(DnsTemporaryFailure) as caught:
            quick_discovery.sts_record(domain)
    finally:
        rig.dns.fault(name, None)

    assert caught.value.kind is FailureKind.DNS_TEMPORARY
    assert not isinstance(caught.value, NoRecord)
    assert rig.dns.count(name, "TXT") >= 1


# ----- the daemon's asyncio form: the same answers and the same failures ---------------------


def outcome(call) -> tuple:
    """What a TXT lookup gives, as comparable data: the answer, or the failure with its text and TTL."""
    try:
        answer = call()
    except MtaStsError as exc:
        return type(exc).__name__, exc.kind, str(exc), exc.ttl
    return "answer", answer.record, answer.ttl


PUBLISHED = {
    "single": lambda d: {"TXT": ["v=STSv1; id=async1"]},
    "split": lambda d: {"TXT": [["v=STS", "v1; id=abc", "123"]]},
    "two-records": lambda d: {"TXT": ["v=STSv1; id=a", "v=STSv1; id=b"]},
    "malformed": lambda d: {"TXT": ["v=STSv1; id=not-valid!"]},
    "no-stsv1": lambda d: {"TXT": ["google-site-verification=x"]},
    "truncated": lambda d: {"TXT": [*(f"verification-{n}=" + "x" * 200 for n in range(10)), "v=STSv1; id=bigset"]},
    "nxdomain": lambda d: {},
}


@pytest.mark.parametrize("case", sorted(PUBLISHED))
def test_async_form_gives_what_the_sync_form_gives(rig, discovery: DnsDiscovery, negative_ttl: int, case: str) -> None:
    """RFC 8461 §3.1 and RFC 2308 as above, through the event loop's DNS stub (the daemon's first
    step; dnspython for the truncated reply, over TCP): the answers, TTLs, failures and their texts
    of the sync form."""
    domain = rig.domain()
    for rdtype, values in PUBLISHED[case](domain).items():
        rig.dns.set(f"_mta-sts.{domain}", rdtype, *values, ttl=777)

    sync = outcome(lambda: discovery.sts_record(domain))
    asynchronous = outcome(lambda: asyncio.run(discovery.sts_record_async(domain)))

    assert asynchronous == sync
    assert sync[-1] == (negative_ttl if case == "nxdomain" else 777)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("fault", ["servfail", "refused", "timeout"])
def test_async_form_failures_are_temporary(rig, quick_discovery: DnsDiscovery, fault: str) -> None:
    """RFC 8461 §3.1 as for the sync form: SERVFAIL, REFUSED and silence say nothing about the
    domain; the asyncio form fails as the sync form does, with the same text, within the timeout."""
    domain = rig.domain()
    name = f"_mta-sts.{domain}"
    rig.dns.set(name, "TXT", "v=STSv1; id=hidden", ttl=300)
    rig.dns.fault(name, fault)
    try:
        sync = outcome(lambda: quick_discovery.sts_record(domain))
        asynchronous = outcome(lambda: asyncio.run(quick_discovery.sts_record_async(domain)))
    finally:
        rig.dns.fault(name, None)
    assert asynchronous == sync
    assert sync[0] == "DnsTemporaryFailure"
    assert asyncio.run(quick_discovery.sts_record_async(domain)).record.id == "hidden"


def test_fault_cleared_record_is_found_again(rig, discovery: DnsDiscovery) -> None:
    """RFC 8461 §3.1: a temporary failure must not stick; once the server answers, the record
    is there (nothing was cached as "no policy")."""
    domain = rig.domain()
    name = f"_mta-sts.{domain}"
    rig.dns.set(name, "TXT", "v=STSv1; id=back", ttl=300)
    rig.dns.fault(name, "servfail")
    try:
        with pytest.raises(DnsTemporaryFailure):
            discovery.sts_record(domain)
    finally:
        rig.dns.fault(name, None)

    assert discovery.sts_record(domain).record.id == "back"


# ----- hosts: policy host addresses (RFC 8461 §3.3) and MX (RFC 8461 §4.1, RFC 5321 §5.1) -----


def test_addresses_are_ipv4_then_ipv6(rig, discovery: DnsDiscovery) -> None:
    """RFC 8461 §3.3: the policy host mta-sts.<domain> is reached at its A and AAAA addresses.
    Order inside one RRset means nothing (RFC 2181 §5; the server shuffles it), so only the
    IPv4-before-IPv6 order is asserted."""
    host = f"mta-sts.{rig.domain()}"
    rig.dns.set(host, "A", "127.0.0.1", "127.0.0.2")
    rig.dns.set(host, "AAAA", "::1")

    found = discovery.addresses(host)

    assert sorted(found[:2]) == ["127.0.0.1", "127.0.0.2"]
    assert found[2:] == ["::1"]


def test_addresses_ipv6_only(rig, discovery: DnsDiscovery) -> None:
    """RFC 8461 §3.3: a host with AAAA only (NODATA for A) is still reachable."""
    host = f"mta-sts.{rig.domain()}"
    rig.dns.set(host, "AAAA", "::1")

    assert discovery.addresses(host) == ["::1"]


def test_addresses_of_missing_host_is_no_record(rig, discovery: DnsDiscovery) -> None:
    """RFC 8461 §3.3: no address at all: the host cannot be reached (NXDOMAIN is an answer)."""
    with pytest.raises(NoRecord) as caught:
        discovery.addresses(f"mta-sts.{rig.domain()}")

    assert caught.value.kind is FailureKind.NO_RECORD


def test_addresses_failure_is_temporary(rig, discovery: DnsDiscovery) -> None:
    """RFC 8461 §3.3: SERVFAIL for the policy host is "could not ask", not "has no address"."""
    host = f"mta-sts.{rig.domain()}"
    rig.dns.set(host, "A", "127.0.0.1")
    rig.dns.fault(host, "servfail")
    try:
        with pytest.raises(DnsTemporaryFailure) as caught:
            discovery.addresses(host)
    finally:
        rig.dns.fault(host, None)

    assert caught.value.kind is FailureKind.DNS_TEMPORARY


def test_mx_hosts_in_preference_order_normalised_with_ttl(rig, discovery: DnsDiscovery) -> None:
    """RFC 5321 §5.1: MX hosts are tried by preference, lowest first; RFC 8461 §4.1 matches
    their names case-insensitively, so they come back lowercased and without the final dot."""
    domain = rig.domain()
    rig.dns.set(domain, "MX", f"20 MX2.{domain}.", f"10 Mx1.{domain}.", f"30 mx3.{domain.upper()}.", ttl=900)

    hosts, ttl = discovery.mx_hosts(domain)

    assert hosts == [f"mx1.{domain}", f"mx2.{domain}", f"mx3.{domain}"]
    assert ttl == 900


def test_mx_of_domain_without_mx_is_no_record(rig, discovery: DnsDiscovery, negative_ttl: int) -> None:
    """RFC 5321 §5.1 / RFC 2308 §5: NODATA for MX is an answer, with the negative TTL."""
    domain = rig.domain()
    rig.dns.set(domain, "A", "127.0.0.1")

    with pytest.raises(NoRecord) as caught:
        discovery.mx_hosts(domain)

    assert caught.value.ttl == negative_ttl


ADDRESS_AND_MX_CASES = {
    "records": {"A": ["127.0.0.7", "127.0.0.8"], "MX": ["20 b.mx.{d}.", "10 A.MX.{d}."]},
    "null-mx": {"A": ["127.0.0.7"], "MX": ["0 ."]},
    "nodata": {"TXT": ["unrelated"]},
    "nxdomain": {},
}


@pytest.mark.parametrize("case", sorted(ADDRESS_AND_MX_CASES))
def test_async_addresses_and_mx_give_what_the_sync_forms_give(rig, discovery: DnsDiscovery, case: str) -> None:
    """RFC 8461 §3.3 (the policy host's addresses) and RFC 5321 §5.1 / RFC 7505 (MX hosts in
    preference order, the null MX) through the DNS stub the daemon asks on its event loop: the
    answers, TTLs, failures and their texts are those of the sync forms."""
    domain = rig.domain()
    for rdtype, values in ADDRESS_AND_MX_CASES[case].items():
        rig.dns.set(domain, rdtype, *(v.format(d=domain) for v in values), ttl=555)

    # The order of the addresses within one RRset means nothing (RFC 2181 §5): compared as sets.
    assert outcome_of(lambda: set(asyncio.run(discovery.addresses_async(domain, ("A",))))) == \
        outcome_of(lambda: set(discovery.addresses(domain, ("A",))))
    assert outcome_of(lambda: asyncio.run(discovery.mx_hosts_async(domain))) == \
        outcome_of(lambda: discovery.mx_hosts(domain))
    if case == "records":
        assert asyncio.run(discovery.mx_hosts_async(domain)) == ([f"a.mx.{domain}", f"b.mx.{domain}"], 555)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("fault", ["servfail", "timeout"])
def test_async_addresses_and_mx_failures_are_temporary(rig, quick_discovery: DnsDiscovery, fault: str) -> None:
    """RFC 8461 §3.3, RFC 5321 §5.1: a failed A or MX question is "could not ask", through the
    stub as through dnspython, with the same text."""
    domain = rig.domain()
    rig.dns.set(domain, "A", "127.0.0.7")
    rig.dns.set(domain, "MX", f"10 mx.{domain}.")
    rig.dns.fault(domain, fault)
    try:
        for sync, asynchronous in ((lambda: quick_discovery.addresses(domain, ("A",)),
                                    lambda: quick_discovery.addresses_async(domain, ("A",))),
                                   (lambda: quick_discovery.mx_hosts(domain), lambda: quick_discovery.mx_hosts_async(domain))):
            expected = outcome_of(sync)
            assert outcome_of(lambda: asyncio.run(asynchronous())) == expected
            assert expected[0] == "DnsTemporaryFailure"
    finally:
        rig.dns.fault(domain, None)


def outcome_of(ask) -> tuple:
    """An answer, or the failure's class, kind, text and TTL: what callers act on and log."""
    try:
        return "answer", ask()
    except MtaStsError as exc:
        return type(exc).__name__, exc.kind, str(exc), exc.ttl


@pytest.mark.timeout(30)
def test_async_queries_leave_no_socket_or_reader_behind(rig, quick_discovery: DnsDiscovery) -> None:
    """The event loop's DNS sockets (net/udp.py) are closed and their readers and timers gone
    whatever the end of the query: an answer, NXDOMAIN, SERVFAIL, a timeout (the server never
    answers), or the lookup cancelled meanwhile; a few hundred of them at once."""
    answered, silent, failing = rig.domain(), rig.domain(), rig.domain()
    rig.dns.set(f"_mta-sts.{answered}", "TXT", "v=STSv1; id=open1")
    rig.dns.set(f"_mta-sts.{silent}", "TXT", "v=STSv1; id=never")
    rig.dns.fault(f"_mta-sts.{silent}", "timeout")
    rig.dns.fault(f"_mta-sts.{failing}", "servfail")

    async def ask() -> tuple[list[object], int, int]:
        loop = asyncio.get_running_loop()
        await quick_discovery.sts_record_async(answered)  # the resolver, the stub and the imports are made
        fds, readers = len(os.listdir("/proc/self/fd")), len(loop._selector.get_map())  # type: ignore[attr-defined]
        asked = [quick_discovery.sts_record_async(answered) for _ in range(200)]
        asked += [quick_discovery.sts_record_async(rig.domain()) for _ in range(50)]  # NXDOMAIN
        asked += [quick_discovery.sts_record_async(failing) for _ in range(30)]
        asked += [quick_discovery.sts_record_async(silent) for _ in range(10)]
        results = await asyncio.gather(*asked, return_exceptions=True)
        abandoned = [asyncio.ensure_future(quick_discovery.sts_record_async(which))
                     for which in [silent] * 10 + [answered] * 10]
        await asyncio.sleep(0.1)
        for task in abandoned:
            task.cancel()
        await asyncio.gather(*abandoned, return_exceptions=True)
        await asyncio.sleep(0)  # the loop runs the callbacks of the cancellations
        return results, len(os.listdir("/proc/self/fd")) - fds, len(loop._selector.get_map()) - readers  # type: ignore[attr-defined]

    try:
        results, more_fds, more_readers = asyncio.run(ask())
    finally:
        rig.dns.fault(f"_mta-sts.{silent}", None)
        rig.dns.fault(f"_mta-sts.{failing}", None)
    assert [type(r).__name__ for r in results] == \
        ["StsAnswer"] * 200 + ["NoRecord"] * 50 + ["DnsTemporaryFailure"] * 40
    assert (more_fds, more_readers) == (0, 0)


def test_a_name_the_stub_does_not_encode_is_asked_through_dnspython(rig, discovery: DnsDiscovery) -> None:
    """The stub encodes only plain letters, digits, "-" and "_" (net/dnswire.py); any other name
    the daemon is given is asked through dnspython's asyncio resolver, with the sync form's result."""
    domain = f"plus+sign.{rig.domain()}"
    rig.dns.set(f"_mta-sts.{domain}", "TXT", "v=STSv1; id=plus", ttl=321)

    answer = asyncio.run(discovery.sts_record_async(domain))

    assert (answer.record.id, answer.ttl) == ("plus", 321)
    assert outcome(lambda: asyncio.run(discovery.sts_record_async("a..b"))) == \
        outcome(lambda: discovery.sts_record("a..b"))  # dnspython's own refusal, its own words
