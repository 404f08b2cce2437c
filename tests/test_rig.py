"""Self-tests for the loopback test rig, so daemon test failures can be trusted to be
daemon bugs rather than rig bugs. Kept fast: module-scoped servers, sub-second timeouts."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.resolver
import pytest
import requests
from requests.adapters import HTTPAdapter

from tests.rig import DnsServer, PolicyServer

POLICY = "version: STSv1\nmode: enforce\nmx: mx1.example.test\nmax_age: 86400\n"
PATH = "/.well-known/mta-sts.txt"


# ----- DNS ------------------------------------------------------------------


@pytest.fixture(scope="module")
def dns_server() -> Iterator[DnsServer]:
    with DnsServer(lifetime=60) as server:
        yield server


def resolver(server: DnsServer, lifetime: float = 2.0) -> dns.resolver.Resolver:
    """A resolver that talks only to the rig (configure=False ignores /etc/resolv.conf)."""
    res = dns.resolver.Resolver(configure=False)
    res.nameservers = [server.host]
    res.port = server.port
    res.lifetime = lifetime
    return res


def udp_query(server: DnsServer, name: str, rdtype: str) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype)
    return dns.query.udp(query, server.host, port=server.port, timeout=2, raise_on_truncation=False)


def test_txt_single_and_split_strings(dns_server: DnsServer) -> None:
    dns_server.set("_mta-sts.single.test", "TXT", "v=STSv1; id=20240101;")
    dns_server.set("_mta-sts.split.test", "TXT", ["v=STSv1; ", "id=split1;"])
    single = resolver(dns_server).resolve("_MTA-STS.Single.Test.", "TXT")
    split = resolver(dns_server).resolve("_mta-sts.split.test", "TXT")
    assert [r.strings for r in single] == [(b"v=STSv1; id=20240101;",)]
    assert [r.strings for r in split] == [(b"v=STSv1; ", b"id=split1;")]
    assert single.response.flags & dns.flags.AA


def test_other_types_and_add_appends(dns_server: DnsServer) -> None:
    dns_server.set("types.test", "MX", "10 mx1.types.test.", ttl=120)
    dns_server.add("types.test", "MX", "20 mx2.types.test")  # relative names are taken as absolute
    dns_server.set("types.test", "AAAA", "::1")
    dns_server.set("_25._tcp.mx1.types.test", "TLSA", "3 1 1 " + "ab" * 32)
    mx = resolver(dns_server).resolve("types.test", "MX")
    assert sorted(r.to_text() for r in mx) == ["10 mx1.types.test.", "20 mx2.types.test."]
    assert mx.rrset.ttl == 300  # the latest add's TTL applies to the whole RRset
    assert resolver(dns_server).resolve("types.test", "AAAA")[0].address == "::1"
    assert resolver(dns_server).resolve("_25._tcp.mx1.types.test", "TLSA")[0].usage == 3


def test_cname_is_chased_within_the_server(dns_server: DnsServer) -> None:
    dns_server.set("_mta-sts.alias.test", "CNAME", "_mta-sts.target.test.")
    dns_server.set("_mta-sts.target.test", "TXT", "v=STSv1; id=viaalias;")
    answer = resolver(dns_server).resolve("_mta-sts.alias.test", "TXT")
    assert [r.strings for r in answer] == [(b"v=STSv1; id=viaalias;",)]
    response = udp_query(dns_server, "_mta-sts.alias.test", "TXT")
    assert [rrset.rdtype for rrset in response.answer] == [dns.rdatatype.CNAME, dns.rdatatype.TXT]
    cname_only = udp_query(dns_server, "_mta-sts.alias.test", "CNAME")
    assert [rrset.rdtype for rrset in cname_only.answer] == [dns.rdatatype.CNAME]


def test_nxdomain_vs_nodata_carry_negative_ttl_soa(dns_server: DnsServer) -> None:
    dns_server.set_negative_ttl(42)
    dns_server.set("_mta-sts.neg.test", "TXT", "v=STSv1; id=1;")
    nx = udp_query(dns_server, "missing.neg.test", "TXT")
    nodata = udp_query(dns_server, "_mta-sts.neg.test", "A")
    empty_non_terminal = udp_query(dns_server, "neg.test", "TXT")
    assert nx.rcode() == dns.rcode.NXDOMAIN
    assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer
    assert empty_non_terminal.rcode() == dns.rcode.NOERROR
    for response in (nx, nodata, empty_non_terminal):
        (soa,) = response.authority
        assert soa.name.to_text() == "neg.test."
        assert soa.ttl == 42 and soa[0].minimum == 42
        assert response.flags & dns.flags.AA
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolver(dns_server).resolve("missing.neg.test", "TXT")
    with pytest.raises(dns.resolver.NoAnswer):
        resolver(dns_server).resolve("_mta-sts.neg.test", "A")
    dns_server.set_negative_ttl(60)


def test_remove_makes_name_vanish(dns_server: DnsServer) -> None:
    dns_server.set("gone.test", "TXT", "x")
    dns_server.set("gone.test", "A", "127.0.0.2")
    dns_server.remove("gone.test", "TXT")
    assert udp_query(dns_server, "gone.test", "TXT").rcode() == dns.rcode.NOERROR
    dns_server.remove("gone.test")
    assert udp_query(dns_server, "gone.test", "A").rcode() == dns.rcode.NXDOMAIN


def test_faults(dns_server: DnsServer) -> None:
    dns_server.set("_mta-sts.faulty.test", "TXT", "v=STSv1; id=1;")
    dns_server.fault("_mta-sts.faulty.test", "servfail")
    assert udp_query(dns_server, "_mta-sts.faulty.test", "TXT").rcode() == dns.rcode.SERVFAIL
    with pytest.raises(dns.resolver.NoNameservers):
        resolver(dns_server).resolve("_mta-sts.faulty.test", "TXT")
    dns_server.fault("_mta-sts.faulty.test", "refused")
    assert udp_query(dns_server, "_mta-sts.faulty.test", "A").rcode() == dns.rcode.REFUSED
    dns_server.fault("_MTA-STS.faulty.test.", "timeout")
    with pytest.raises(dns.resolver.LifetimeTimeout):
        resolver(dns_server, lifetime=0.4).resolve("_mta-sts.faulty.test", "TXT")
    dns_server.fault("_mta-sts.faulty.test", None)
    assert resolver(dns_server).resolve("_mta-sts.faulty.test", "TXT")


def test_subtree_fault_drops_every_name_below(dns_server: DnsServer) -> None:
    dns_server.set("_mta-sts.a.dropped.test", "TXT", "v=STSv1; id=1;")
    dns_server.set("dropped.test.other", "A", "192.0.2.1")
    dns_server.fault("Dropped.Test.", "timeout", subtree=True)
    try:
        for name in ("_mta-sts.a.dropped.test", "b.c.dropped.test", "dropped.test"):
            with pytest.raises(dns.resolver.LifetimeTimeout):
                resolver(dns_server, lifetime=0.3).resolve(name, "TXT")
        assert resolver(dns_server).resolve("dropped.test.other", "A")  # not below: answered
        assert udp_query(dns_server, "notdropped.test", "A").rcode() == dns.rcode.NXDOMAIN
    finally:
        dns_server.fault("dropped.test", None, subtree=True)
    assert resolver(dns_server).resolve("_mta-sts.a.dropped.test", "TXT")


def test_large_rrset_truncates_over_udp_and_succeeds_over_tcp(dns_server: DnsServer) -> None:
    strings = [f"{i:02d}" + "x" * 200 for i in range(20)]  # ~4 KB, above any UDP limit used here
    dns_server.set("big.test", "TXT", *strings)
    truncated = udp_query(dns_server, "big.test", "TXT")
    assert truncated.flags & dns.flags.TC and not truncated.answer
    edns_query = dns.message.make_query("big.test", "TXT", use_edns=0, payload=8192)
    big_udp = dns.query.udp(edns_query, dns_server.host, port=dns_server.port, timeout=2)
    assert not big_udp.flags & dns.flags.TC and len(big_udp.answer[0]) == 20  # EDNS raises the limit
    dns_server.reset_counts()
    answer = resolver(dns_server).resolve("big.test", "TXT")  # dnspython retries over TCP on TC
    assert sorted(r.strings[0].decode() for r in answer) == strings
    assert dns_server.count("big.test", "TXT") == 2  # once over UDP, once over TCP
    # TCP connections carry several framed queries.
    with socket.create_connection((dns_server.host, dns_server.port), timeout=2) as sock:
        for _ in range(2):
            response = dns.query.tcp(dns.message.make_query("big.test", "TXT"), None, sock=sock, timeout=2)
            assert len(response.answer[0]) == 20


def test_malformed_query_is_ignored(dns_server: DnsServer) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.3)
        sock.sendto(b"\x00garbage", (dns_server.host, dns_server.port))
        with pytest.raises(TimeoutError):
            sock.recv(512)
    dns_server.set("alive.test", "A", "127.0.0.3")
    assert resolver(dns_server).resolve("alive.test", "A")[0].address == "127.0.0.3"


def test_query_counting(dns_server: DnsServer) -> None:
    dns_server.set("_mta-sts.count.test", "TXT", "v=STSv1; id=1;")
    dns_server.reset_counts()
    resolver(dns_server).resolve("_mta-sts.count.test", "TXT")
    resolver(dns_server).resolve("_MTA-STS.count.test.", "TXT")
    with pytest.raises(dns.resolver.NoAnswer):
        resolver(dns_server).resolve("_mta-sts.count.test", "MX")
    assert dns_server.count("_mta-sts.count.test") == 3
    assert dns_server.count("_mta-sts.count.test.", "txt") == 2
    assert ("_mta-sts.count.test", "MX") in dns_server.queries
    dns_server.reset_counts()
    assert dns_server.count("_mta-sts.count.test") == 0


def test_dns_server_stops_itself_after_lifetime() -> None:
    server = DnsServer(lifetime=0.3).start()
    server.set("short.test", "A", "127.0.0.4")
    assert resolver(server).resolve("short.test", "A")
    time.sleep(0.6)
    with pytest.raises((dns.resolver.LifetimeTimeout, dns.resolver.NoNameservers)):
        resolver(server, lifetime=0.3).resolve("short.test", "A")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((server.host, server.port), timeout=1).close()


def test_non_loopback_is_refused() -> None:
    with pytest.raises(ValueError):
        DnsServer("192.0.2.1")
    with pytest.raises(ValueError):
        PolicyServer("0.0.0.0")


# ----- HTTPS ----------------------------------------------------------------


class PinnedHostAdapter(HTTPAdapter):
    """Connects to the URL's IP address but performs SNI and certificate name checks
    for `hostname`, the way the daemon will when DNS for mta-sts.<domain> points at loopback."""

    def __init__(self, hostname: str, **kwargs: object) -> None:
        self.hostname = hostname  # set first: HTTPAdapter.__init__ calls init_poolmanager
        super().__init__(**kwargs)  # type: ignore[arg-type]

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: object) -> None:
        pool_kwargs.update(server_hostname=self.hostname, assert_hostname=self.hostname)
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)


def fetch(server: PolicyServer, domain: str, path: str = PATH, **kwargs: object) -> requests.Response:
    hostname = f"mta-sts.{domain}"
    with requests.Session() as session:
        session.mount("https://", PinnedHostAdapter(hostname))
        kwargs.setdefault("timeout", 5)
        return session.get(
            f"https://{server.host}:{server.port}{path}",
            headers={"Host": hostname},
            verify=server.ca_file,
            allow_redirects=False,
            **kwargs,  # type: ignore[arg-type]
        )


@pytest.fixture(scope="module")
def https() -> Iterator[PolicyServer]:
    with PolicyServer(lifetime=60) as server:
        yield server


def test_valid_policy_is_served_verbatim(https: PolicyServer) -> None:
    https.set_policy("valid.test", POLICY)
    response = fetch(https, "valid.test")
    assert response.status_code == 200
    assert response.content == POLICY.encode()
    assert response.headers["Content-Type"] == "text/plain"
    assert response.headers["Content-Length"] == str(len(POLICY))


@pytest.mark.parametrize(
    ("kind", "message"),
    [("wrong-name", "hostname"), ("expired", "expired"), ("untrusted", "issuer")],
)
def test_bad_certificates_are_rejected(https: PolicyServer, kind: str, message: str) -> None:
    https.set_policy(f"{kind}.test", POLICY, cert=kind)
    with pytest.raises(requests.exceptions.SSLError, match=message):
        fetch(https, f"{kind}.test")
    assert https.count(f"{kind}.test") == 0  # the request never got past TLS


def test_untrusted_cert_is_fine_for_its_own_ca(https: PolicyServer, tmp_path: object) -> None:
    """Proves the failures above come from the chosen defect, not a broken certificate."""
    https.set_policy("otherca.test", POLICY, cert="untrusted")
    bundle = f"{tmp_path}/untrusted.pem"
    https.untrusted_ca.cert_pem.write_to_path(bundle)
    with requests.Session() as session:
        session.mount("https://", PinnedHostAdapter("mta-sts.otherca.test"))
        response = session.get(
            f"https://{https.host}:{https.port}{PATH}",
            headers={"Host": "mta-sts.otherca.test"},
            verify=bundle,
            timeout=5,
        )
    assert response.status_code == 200


def test_unknown_host_and_wrong_path_get_404(https: PolicyServer) -> None:
    https.set_policy("known.test", POLICY)
    assert fetch(https, "unknown.test").status_code == 404  # still a valid certificate
    assert fetch(https, "known.test", "/mta-sts.txt").status_code == 404
    https.remove("known.test")
    assert fetch(https, "known.test").status_code == 404


def test_redirect_is_not_followed(https: PolicyServer) -> None:
    https.set_policy("redirect.test", status=302, location="https://mta-sts.elsewhere.test/.well-known/mta-sts.txt")
    response = fetch(https, "redirect.test")
    assert response.status_code == 302
    assert response.headers["Location"] == "https://mta-sts.elsewhere.test/.well-known/mta-sts.txt"


def test_content_type_status_and_extra_headers(https: PolicyServer) -> None:
    https.set_policy(
        "ctype.test", b"<html/>", status=500, content_type="text/html", headers={"X-Test": "yes"}
    )
    response = fetch(https, "ctype.test")
    assert (response.status_code, response.content) == (500, b"<html/>")
    assert response.headers["Content-Type"] == "text/html"
    assert response.headers["X-Test"] == "yes"


def test_delay(https: PolicyServer) -> None:
    https.set_policy("slow.test", POLICY, delay=0.5)
    started = time.monotonic()
    assert fetch(https, "slow.test").status_code == 200
    assert time.monotonic() - started >= 0.5
    with pytest.raises(requests.exceptions.ReadTimeout):
        fetch(https, "slow.test", timeout=0.2)


def test_chunk_forever_trickles(https: PolicyServer) -> None:
    https.set_policy("trickle.test", "abc", chunk_forever=True)
    with fetch(https, "trickle.test", stream=True) as response:
        assert response.status_code == 200
        assert "Content-Length" not in response.headers
        assert response.headers["Transfer-Encoding"] == "chunked"
        received = b""
        for piece in response.iter_content(chunk_size=None):
            received += piece
            if len(received) >= 40:
                break
    assert received.startswith(b"abcabcabc")


def test_request_counting(https: PolicyServer) -> None:
    https.set_policy("counted.test", POLICY)
    https.reset_counts()
    fetch(https, "counted.test")
    fetch(https, "Counted.TEST")  # SNI names are case-insensitive
    fetch(https, "counted.test", "/other")
    assert https.count("counted.test") == 3
    assert https.requests == [
        ("mta-sts.counted.test", PATH),
        ("mta-sts.counted.test", PATH),
        ("mta-sts.counted.test", "/other"),
    ]
    https.reset_counts()
    assert https.count("counted.test") == 0


def test_policy_server_stops_itself_after_lifetime() -> None:
    server = PolicyServer(lifetime=0.5).start()
    server.set_policy("short.test", POLICY)
    assert fetch(server, "short.test").status_code == 200
    time.sleep(0.9)
    with pytest.raises(requests.exceptions.ConnectionError):
        fetch(server, "short.test", timeout=1)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((server.host, server.port), timeout=1).close()
