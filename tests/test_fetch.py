"""Fetching the policy file (RFC 8461 §3.3) against the real loopback HTTPS server and DNS server.

The fetcher resolves mta-sts.<domain> through the rig's DNS server and connects to the address it
finds, so every test sets both up (rig.publish does the usual case). Timeouts are one second so
that the slow-server cases stay cheap; the bounds are enforced with pytest timeouts, never by
asserting on elapsed time.
"""

from __future__ import annotations

import gzip
import zlib

import pytest

from mtasts_policyd.core.errors import CertificateInvalid, FailureKind, FetchError
from mtasts_policyd.net.dns import DnsDiscovery
from mtasts_policyd.net.https import WELL_KNOWN, PolicyFetcher
from tests.bodies import ENFORCE_ONE_MX

TIMEOUT = 1.0  # fetch timeout for these tests; the slow servers below take longer than this


@pytest.fixture
def fetcher(rig) -> PolicyFetcher:
    return PolicyFetcher(DnsDiscovery(rig.dns_settings()),
                         rig.fetch_settings(timeout=TIMEOUT, connect_timeout=TIMEOUT))


def expect_fetch_error(fetcher: PolicyFetcher, domain: str) -> FetchError:
    """The FetchError the fetch raises; a plain fetch error, not a certificate one."""
    with pytest.raises(FetchError) as caught:
        fetcher.fetch(domain)
    assert caught.value.kind is FailureKind.FETCH_ERROR
    assert not isinstance(caught.value, CertificateInvalid)
    return caught.value


# ----- the good case -------------------------------------------------------------------------


def test_valid_policy_is_returned_byte_for_byte(rig, fetcher: PolicyFetcher) -> None:
    """RFC 8461 §3.3: a 200 text/plain answer is the policy; the fetcher hands back the exact
    bytes (CRLF, trailing spaces and UTF-8 included) and leaves parsing to §3.2."""
    domain = rig.domain()
    body = f"version: STSv1\r\nmode: testing\r\nmx: mx1.{domain}   \r\nmax_age: 600\r\nnote: caf\u00e9\r\n"
    rig.publish(domain, body)

    assert fetcher.fetch(domain) == body.encode("utf-8")
    assert rig.https.count(domain) == 1


def test_request_is_get_of_well_known_path_with_sni(rig, fetcher: PolicyFetcher) -> None:
    """RFC 8461 §3.3: GET https://mta-sts.<domain>/.well-known/mta-sts.txt; §7 (and §3.3): the
    client MUST send SNI naming the policy host. The server records the SNI name when one is
    sent, and only presents the mta-sts.<domain> certificate (the only one that verifies) when
    SNI asks for it, so a successful fetch recorded under that name proves the SNI. Only GET
    is answered (any other method gets 501 and is not recorded)."""
    domain = rig.domain()
    rig.publish(domain, ENFORCE_ONE_MX)
    before = len(rig.https.requests)

    fetcher.fetch(domain)

    assert rig.https.requests[before:] == [(f"mta-sts.{domain}", WELL_KNOWN)]


@pytest.mark.parametrize("content_type", ["text/plain; charset=utf-8", "TEXT/PLAIN", "text/plain ;charset=us-ascii"])
def test_text_plain_with_parameters_or_other_case_is_accepted(rig, fetcher: PolicyFetcher, content_type: str) -> None:
    """RFC 8461 §3.2: the media type SHOULD be text/plain; parameters are ignored, and media
    types are case-insensitive (RFC 2045 §5.1)."""
    domain = rig.domain()
    rig.publish(domain, ENFORCE_ONE_MX, content_type=content_type)

    assert fetcher.fetch(domain) == ENFORCE_ONE_MX.format(d=domain).encode()


def test_body_of_exactly_64_kib_is_accepted(rig, fetcher: PolicyFetcher) -> None:
    """RFC 8461 §3.3: the suggested limit is 64 KiB; a policy of exactly that size is within it."""
    domain = rig.domain()
    head = ENFORCE_ONE_MX.format(d=domain)
    body = head + "x" * (65536 - len(head))
    assert len(body.encode()) == 65536
    rig.publish(domain, body)

    assert fetcher.fetch(domain) == body.encode()


def test_next_address_is_tried_when_one_refuses(rig, fetcher: PolicyFetcher) -> None:
    """RFC 8461 §3.3: the policy host is mta-sts.<domain> at whichever address answers; dead
    addresses (nothing listens on 127.0.0.2-4) must not hide the live one. The server shuffles
    the RRset (RFC 2181 §5: it has no order), so four fetches all but surely meet a dead
    address first at least once; every one of them must succeed."""
    assert rig.https.host == "127.0.0.1"  # the server listens on this address only
    domain = rig.domain()
    rig.publish(domain, ENFORCE_ONE_MX)
    rig.dns.set(f"mta-sts.{domain}", "A", "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.1")

    for _ in range(4):
        assert fetcher.fetch(domain) == ENFORCE_ONE_MX.format(d=domain).encode()
    assert rig.https.count(domain) == 4


def test_ipv6_is_not_asked_when_an_ipv4_address_answers(rig, fetcher: PolicyFetcher) -> None:
    """RFC 8461 §3.3: the policy host is reached at an address of mta-sts.<domain>; IPv4 comes
    first, so when an A address serves the policy the AAAA question is never needed (one DNS
    query fewer per cold domain)."""
    domain = rig.domain()
    rig.publish(domain, ENFORCE_ONE_MX)
    rig.dns.set(f"mta-sts.{domain}", "AAAA", "::1")

    assert fetcher.fetch(domain) == ENFORCE_ONE_MX.format(d=domain).encode()
    assert rig.dns.count(f"mta-sts.{domain}", "AAAA") == 0


@pytest.mark.parametrize("ipv4", [None, "127.0.0.2"])
def test_ipv6_is_asked_when_ipv4_gives_no_working_address(rig, fetcher: PolicyFetcher, ipv4: str | None) -> None:
    """RFC 8461 §3.3: with no A record, or an A address where nothing listens, the AAAA addresses
    are asked for and tried (here ::1, where nothing listens on the rig's port either: the fetch
    fails, after both families were tried, as a fetch error and not "does not resolve")."""
    domain = rig.domain()
    rig.publish(domain, ENFORCE_ONE_MX)
    rig.dns.remove(f"mta-sts.{domain}", "A")
    if ipv4 is not None:
        rig.dns.set(f"mta-sts.{domain}", "A", ipv4)
    rig.dns.set(f"mta-sts.{domain}", "AAAA", "::1")

    error = expect_fetch_error(fetcher, domain)

    assert "does not resolve" not in error.detail
    assert rig.dns.count(f"mta-sts.{domain}", "A") == 1
    assert rig.dns.count(f"mta-sts.{domain}", "AAAA") == 1
    assert rig.https.count(domain) == 0


# ----- HTTP answers that are not a policy: RFC 8461 §3.3 -------------------------------------


@pytest.mark.parametrize("status", [404, 500, 204])
def test_status_other_than_200_is_fetch_error(rig, fetcher: PolicyFetcher, status: int) -> None:
    """RFC 8461 §3.3: only HTTP 200 gives a policy."""
    domain = rig.domain()
    rig.publish(domain, ENFORCE_ONE_MX, status=status)

    error = expect_fetch_error(fetcher, domain)

    assert str(status) in error.detail
    assert rig.https.count(domain) == 1


def test_missing_policy_file_is_fetch_error(rig, fetcher: PolicyFetcher) -> None:
    """RFC 8461 §3.3: the host exists and has a valid certificate, but no policy (404)."""
    domain = rig.domain()
    rig.publish(domain, ENFORCE_ONE_MX)
    rig.https.remove(domain)  # the rig now answers 404 for this host

    expect_fetch_error(fetcher, domain)
    assert rig.https.count(domain) == 1


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_redirect_is_not_followed(rig, fetcher: PolicyFetcher, status: int) -> None:
    """RFC 8461 §3.3: "HTTP 3xx redirects MUST NOT be followed". The target serves a valid
    policy and must receive no request at all."""
    domain, target = rig.domain("moved"), rig.domain("target")
    rig.publish(target, ENFORCE_ONE_MX)
    location = f"https://mta-sts.{target}:{rig.https.port}{WELL_KNOWN}"
    rig.publish(domain, ENFORCE_ONE_MX, status=status, location=location)

    expect_fetch_error(fetcher, domain)

    assert rig.https.count(domain) == 1
    assert rig.https.count(target) == 0


@pytest.mark.parametrize("content_type", ["application/json", "text/html", "text/plain-ish", ""])
def test_other_media_type_is_fetch_error(rig, fetcher: PolicyFetcher, content_type: str) -> None:
    """RFC 8461 §3.2: the policy's media type is text/plain; anything else (or none) is refused,
    even when the body would parse as a policy."""
    domain = rig.domain()
    rig.publish(domain, ENFORCE_ONE_MX, content_type=content_type)

    expect_fetch_error(fetcher, domain)


def test_body_over_64_kib_is_fetch_error(rig, fetcher: PolicyFetcher) -> None:
    """RFC 8461 §3.3: senders MAY limit the policy size; 64 KiB is the suggested limit, and one
    byte more is over it."""
    domain = rig.domain()
    rig.publish(domain, "x" * 65537)

    error = expect_fetch_error(fetcher, domain)

    assert "larger than 65536" in error.detail


def test_limit_applies_to_the_decoded_body(rig, fetcher: PolicyFetcher) -> None:
    """RFC 8461 §3.3 size limit: what must stay under 64 KiB is the policy, i.e. the body after
    Content-Encoding is undone; a 1 KiB gzip that inflates to 1 MiB is over the limit."""
    domain = rig.domain()
    rig.publish(domain, ENFORCE_ONE_MX)
    rig.https.set_policy(domain, gzip.compress(b"x" * (1 << 20)), headers={"Content-Encoding": "gzip"})

    error = expect_fetch_error(fetcher, domain)

    assert "larger than 65536" in error.detail


def test_gzip_and_deflate_bodies_are_decoded(rig, fetcher: PolicyFetcher) -> None:
    """RFC 8461 §3.3 asks for the policy; a server that compresses it anyway (Content-Encoding
    gzip, or deflate, which RFC 9110 §8.4.1.2 defines as the zlib format) gives the same policy."""
    for encoding, compress in (("gzip", gzip.compress), ("deflate", zlib.compress)):
        domain = rig.domain()
        rig.publish(domain, ENFORCE_ONE_MX)
        body = ENFORCE_ONE_MX.format(d=domain).encode()
        rig.https.set_policy(domain, compress(body), headers={"Content-Encoding": encoding})

        assert fetcher.fetch(domain) == body


@pytest.mark.parametrize("encoding", ["br", "compress"])
def test_body_in_an_unknown_encoding_is_fetch_error(rig, fetcher: PolicyFetcher, encoding: str) -> None:
    """RFC 8461 §3.2: the policy is text; bytes in an encoding we cannot undo are not a policy,
    and are refused as a fetch error rather than handed to the parser."""
    domain = rig.domain()
    rig.publish(domain, ENFORCE_ONE_MX, headers={"Content-Encoding": encoding})

    error = expect_fetch_error(fetcher, domain)

    assert encoding in error.detail


def test_truncated_gzip_body_is_fetch_error(rig, fetcher: PolicyFetcher) -> None:
    """RFC 8461 §3.3: only a complete answer is a policy; a gzip stream cut short (a complete HTTP
    answer, but its content ends early) is refused, not parsed as whatever inflated so far."""
    domain = rig.domain()
    rig.publish(domain, ENFORCE_ONE_MX)
    whole = gzip.compress(ENFORCE_ONE_MX.format(d=domain).encode())
    rig.https.set_policy(domain, whole[: len(whole) // 2], headers={"Content-Encoding": "gzip"})

    error = expect_fetch_error(fetcher, domain)

    assert "truncated" in error.detail


def test_chunked_body_is_returned_whole(rig, fetcher: PolicyFetcher) -> None:
    """RFC 8461 §3.3 over HTTP/1.1 (RFC 9112 §7.1): a policy sent in chunks is the concatenation
    of the chunks; the framing never leaks into the policy."""
    domain = rig.domain()
    rig.publish(domain, ENFORCE_ONE_MX)
    body = ENFORCE_ONE_MX.format(d=domain).encode()
    pieces = [body[:7], body[7:20], body[20:]]
    framed = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    rig.https.set_policy(domain, framed, headers={"Transfer-Encoding": "chunked"})

    assert fetcher.fetch(domain) == body


def test_host_header_names_the_policy_host(rig, fetcher: PolicyFetcher) -> None:
    """RFC 8461 §3.3: the GET is for https://mta-sts.<domain>/...; a server that picks its
    virtual host by the Host header (no SNI routing) must be told that name, not the address we
    connected to. The rig falls back to the Host header only when there is no SNI, so this looks
    at what it received."""
    domain = rig.domain()
    rig.publish(domain, ENFORCE_ONE_MX)
    host = f"mta-sts.{domain}:{rig.https.port}"

    fetcher.fetch(domain)

    assert host in rig.https.host_headers


@pytest.mark.timeout(6)
def test_slow_server_is_fetch_error(rig, fetcher: PolicyFetcher) -> None:
    """RFC 8461 §3.3: senders MAY bound the fetch time; a server that takes longer than the
    configured timeout (1 s here, answering only after 3 s) gives a fetch error."""
    domain = rig.domain()
    rig.publish(domain, ENFORCE_ONE_MX, delay=3.0)

    expect_fetch_error(fetcher, domain)
    assert rig.https.count(domain) == 1


@pytest.mark.timeout(6)
def test_endless_trickle_is_cut_by_the_overall_timeout(rig, fetcher: PolicyFetcher) -> None:
    """RFC 8461 §3.3: the fetch timeout bounds the whole GET, not each read: a server that sends
    16 bytes every 0.1 s forever never trips a per-read timeout, and must still be given up on
    (the pytest timeout is the bound; the 64 KiB limit alone would take minutes here)."""
    domain = rig.domain()
    rig.publish(domain, ENFORCE_ONE_MX, chunk_forever=True)

    error = expect_fetch_error(fetcher, domain)

    assert "timeout" in error.detail
    assert rig.https.count(domain) == 1


def test_body_shorter_than_content_length_is_fetch_error(rig, fetcher: PolicyFetcher) -> None:
    """RFC 8461 §3.3: only a complete 200 answer is a policy. The headers promise 1000 bytes and
    the server closes after 15: a truncated file (e.g. one missing its mx lines) is refused,
    not parsed as if it were whole."""
    domain = rig.domain()
    rig.publish(domain, "version: STSv1\n", headers={"Content-Length": "1000"})

    expect_fetch_error(fetcher, domain)
    assert rig.https.count(domain) == 1


# ----- the policy host certificate: RFC 8461 §3.3 ---------------------------------------------


@pytest.mark.parametrize("cert", ["wrong-name", "expired", "untrusted"])
def test_bad_certificate_is_certificate_invalid(rig, fetcher: PolicyFetcher, cert: str) -> None:
    """RFC 8461 §3.3: the certificate MUST be valid for mta-sts.<domain> (RFC 6125 DNS-ID),
    chain to a trusted root and not be expired; otherwise no policy is fetched and the failure
    is reported as sts-webpki-invalid (RFC 8460 §4.3.2.2), distinct from a fetch error."""
    domain = rig.domain()
    rig.publish(domain, ENFORCE_ONE_MX, cert=cert)

    with pytest.raises(CertificateInvalid) as caught:
        fetcher.fetch(domain)

    assert caught.value.kind is FailureKind.CERTIFICATE_INVALID
    assert caught.value.kind.tlsrpt_result_type == "sts-webpki-invalid"
    assert rig.https.count(domain) == 0  # nothing was asked over an unverified connection


# ----- reaching the policy host: RFC 8461 §3.3 ------------------------------------------------


def test_policy_host_without_address_is_fetch_error(rig, fetcher: PolicyFetcher) -> None:
    """RFC 8461 §3.3: the policy is at mta-sts.<domain>; if that name has no address, there is
    nothing to fetch from (the TXT record alone is not a policy)."""
    domain = rig.domain()
    rig.dns.set(f"_mta-sts.{domain}", "TXT", "v=STSv1; id=1")
    rig.https.set_policy(domain, ENFORCE_ONE_MX.format(d=domain))

    error = expect_fetch_error(fetcher, domain)

    assert "does not resolve" in error.detail
    assert rig.dns.count(f"mta-sts.{domain}", "A") >= 1
    assert rig.https.count(domain) == 0


def test_policy_host_dns_failure_is_fetch_error(rig, fetcher: PolicyFetcher) -> None:
    """RFC 8461 §3.3 with RFC 8460 §4.3.2.2: a policy host we cannot resolve (SERVFAIL) is a
    temporary fetch failure."""
    domain = rig.domain()
    rig.publish(domain, ENFORCE_ONE_MX)
    rig.dns.fault(f"mta-sts.{domain}", "servfail")
    try:
        error = expect_fetch_error(fetcher, domain)
    finally:
        rig.dns.fault(f"mta-sts.{domain}", None)

    assert error.kind.temporary
    assert rig.https.count(domain) == 0


@pytest.mark.timeout(6)
def test_nothing_listening_at_policy_host_is_fetch_error(rig, fetcher: PolicyFetcher) -> None:
    """RFC 8461 §3.3: mta-sts.<domain> resolves, but nothing accepts HTTPS there (the server
    listens on 127.0.0.1 only, the A record says 127.0.0.2)."""
    assert rig.https.host == "127.0.0.1"
    domain = rig.domain()
    rig.publish(domain, ENFORCE_ONE_MX)
    rig.dns.set(f"mta-sts.{domain}", "A", "127.0.0.2")

    expect_fetch_error(fetcher, domain)
    assert rig.https.count(domain) == 0
