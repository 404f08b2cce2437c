"""The cache and refresh algorithm (RFC 8461 §3.3, §5.1, §10.2) against the real test servers.

The resolver runs on a settable clock, so expiry is tested by moving time, not by sleeping; the
servers' request counters show exactly when the network was used.
"""

from __future__ import annotations

import asyncio

import pytest

from mtasts_policyd.core.errors import DnsTemporaryFailure, FailureKind, NoRecord
from mtasts_policyd.core.policy import Mode
from mtasts_policyd.resolution.resolver import CacheState, Decision
from mtasts_policyd.resolution.service import PolicyService
from tests.bodies import NONE, TESTING_ONE_MX


def txt_queries(rig, domain):
    return rig.dns.count(f"_mta-sts.{domain}", "TXT")


def test_first_lookup_fetches_then_cache_answers(rig, make_resolver):
    domain = rig.domain()
    rig.publish(domain)
    resolver = make_resolver()
    assert resolver.cached(domain) == (None, False)
    decision = resolver.resolve(domain).decision
    assert decision.state is CacheState.MISS and decision.mode is Mode.ENFORCE and decision.policy_id == "1"
    assert decision.policy.mx == (f"mx1.{domain}", f"*.mx.{domain}")
    cached, due = resolver.cached(domain)
    assert cached.state is CacheState.HIT and cached.policy == decision.policy and not due
    assert (txt_queries(rig, domain), rig.https.count(domain)) == (1, 1)


def test_policy_used_until_max_age_then_not(rig, make_resolver, clock):
    # RFC 8461 §5.1: a cached policy is used while its age is below max_age, whatever DNS says.
    domain = rig.domain()
    rig.publish(domain, "version: STSv1\nmode: enforce\nmx: mx1.{d}\nmax_age: 600\n", ttl=3600)
    resolver = make_resolver(txt_ttl_max=3600)
    resolver.resolve(domain)
    rig.dns.remove(f"_mta-sts.{domain}")
    rig.https.remove(domain)
    clock.advance(599)
    decision, _ = resolver.cached(domain)
    assert decision.mode is Mode.ENFORCE
    clock.advance(1)
    assert resolver.cached(domain) == (None, False)


ZERO = "version: STSv1\nmode: enforce\nmx: mx1.{d}\nmx: *.mx.{d}\nmax_age: 0\n"


def test_max_age_zero_applies_to_the_lookup_that_fetched_it_and_is_never_cached(rig, make_resolver, clock):
    # RFC 8461 §3.2: max_age 0 is valid; §5.1 keeps a policy for max_age, i.e. not at all. The
    # resolution that fetched it applies it (an enforce answer, with the MX hosts for "*."), and
    # every later lookup asks again: nothing is answered from the cache, not even at once.
    domain = rig.domain()
    rig.publish(domain, ZERO)
    resolver = make_resolver()
    decision = resolver.resolve(domain).decision
    assert decision.state is CacheState.MISS and decision.mode is Mode.ENFORCE and decision.policy.max_age == 0
    assert decision.expires_at == decision.fetched_at
    assert tls_policy(decision, MapOptions()) == f"secure match=mx1.{domain}:a.mx.{domain} servername=hostname"
    assert resolver.cached(domain) == (None, False)
    clock.advance(1)
    assert resolver.cached(domain) == (None, False)
    assert resolver.resolve(domain).decision.mode is Mode.ENFORCE
    assert rig.https.count(domain) == 2
    # The next fetch fails: the policy that was applied once is not brought back from the cache.
    rig.https.set_policy(domain, ZERO.format(d=domain), status=503)
    clock.advance(1)
    failed = resolver.resolve(domain).decision
    assert failed.policy is None and failed.failure.kind is FailureKind.FETCH_ERROR
    assert resolver.cached(domain)[0].state is CacheState.BACKOFF


def test_max_age_zero_concurrent_lookups_share_the_fetch_and_its_policy(rig, make_resolver):
    # The daemon's single flight: lookups that arrive while the fetch runs share its decision, so
    # each of them applies the policy; a lookup after it fetches again (PolicyService over the rig).
    domain = rig.domain()
    rig.publish(domain, ZERO, delay=0.3)
    service = PolicyService(make_resolver(), workers=2)

    async def lookups() -> tuple[list[Decision], Decision]:
        # gather starts every lookup before the loop can see the fetch finish: all share one flight.
        together = await asyncio.wait_for(asyncio.gather(*(service.lookup(domain) for _ in range(10))), 30)
        return list(together), await asyncio.wait_for(service.lookup(domain), 30)

    try:
        together, later = asyncio.run(lookups())
    finally:
        service.close()
    assert len({id(decision) for decision in together}) == 1
    assert together[0].mode is Mode.ENFORCE and together[0].state is CacheState.MISS
    assert later.mode is Mode.ENFORCE and later is not together[0]
    assert rig.https.count(domain) == 2


def test_max_age_zero_replacing_a_kept_policy(rig, make_resolver, clock):
    # A new id whose policy has max_age 0 replaces the cached one (its owner's choice, §3.3) and is
    # applied by that resolution; after it, nothing is cached for the domain.
    domain = rig.domain()
    rig.publish(domain, ttl=60)
    resolver = make_resolver()
    resolver.resolve(domain)
    rig.publish(domain, ZERO.replace("enforce", "testing"), id="2", ttl=60)
    clock.advance(61)
    decision = resolver.resolve(domain).decision
    assert decision.mode is Mode.TESTING and decision.policy_id == "2"
    assert resolver.cached(domain) == (None, False)


def test_unchanged_id_is_not_fetched_again(rig, make_resolver, clock):
    # RFC 8461 §3.3: the id tells whether the policy changed; an unchanged id needs no fetch.
    domain = rig.domain()
    rig.publish(domain, ttl=60)
    resolver = make_resolver()
    resolver.resolve(domain)
    clock.advance(59)
    assert resolver.cached(domain)[1] is False
    clock.advance(2)  # the TXT TTL has passed: re-check the id
    assert resolver.cached(domain)[1] is True
    assert resolver.resolve(domain).decision.mode is Mode.ENFORCE
    assert (txt_queries(rig, domain), rig.https.count(domain)) == (2, 1)
    assert resolver.cached(domain)[1] is False


def test_changed_id_means_new_fetch(rig, make_resolver, clock):
    # RFC 8461 §3.3/§5.1: a different id means fetch again and replace the cached policy.
    domain = rig.domain()
    rig.publish(domain, ttl=60)
    resolver = make_resolver()
    resolver.resolve(domain)
    rig.publish(domain, TESTING_ONE_MX, id="2", ttl=60)
    clock.advance(61)
    decision = resolver.resolve(domain).decision
    assert decision.mode is Mode.TESTING and decision.policy_id == "2"
    assert rig.https.count(domain) == 2
    assert resolver.cached(domain)[0].policy_id == "2"


def test_policy_fetched_again_daily_even_with_same_id(rig, make_resolver, clock):
    # RFC 8461 §10.2: refresh regularly regardless of the TXT record; max_age restarts at the fetch.
    domain = rig.domain()
    rig.publish(domain, ttl=3600)
    resolver = make_resolver(txt_ttl_max=7200, refresh_after=3000)
    first = resolver.resolve(domain).decision
    clock.advance(3001)
    assert resolver.cached(domain)[1] is True
    second = resolver.resolve(domain).decision
    assert rig.https.count(domain) == 2
    assert second.fetched_at == first.fetched_at + 3001
    assert second.expires_at == second.fetched_at + 86400


def test_fetch_failure_keeps_cached_policy_and_backs_off(rig, make_resolver, clock):
    # RFC 8461 §5.1: a failed refresh never replaces an unexpired policy; §3.3: wait before retrying.
    domain = rig.domain()
    rig.publish(domain, ttl=60)
    resolver = make_resolver(backoff_min=300)
    resolver.resolve(domain)
    rig.publish(domain, TESTING_ONE_MX, id="2", ttl=60, status=500)
    clock.advance(61)
    decision = resolver.resolve(domain).decision
    assert decision.mode is Mode.ENFORCE and decision.policy_id == "1"
    assert decision.failure.kind is FailureKind.FETCH_ERROR
    clock.advance(299)
    cached, due = resolver.cached(domain)
    assert cached.mode is Mode.ENFORCE and due is False  # backing off
    clock.advance(2)
    assert resolver.cached(domain)[1] is True
    rig.publish(domain, TESTING_ONE_MX, id="2", ttl=60)
    assert resolver.resolve(domain).decision.mode is Mode.TESTING


@pytest.mark.parametrize("break_it", ["servfail", "timeout", "removed", "garbage", "invalid-policy", "bad-cert"])
def test_no_failure_downgrades_a_cached_enforce_policy(rig, make_resolver, clock, break_it):
    # RFC 8461 §5.1: DNS failures, a vanished or broken TXT record, bad policies and bad
    # certificates all leave the cached enforce policy in force until it expires.
    domain = rig.domain()
    rig.publish(domain, ttl=60)
    resolver = make_resolver()
    resolver.resolve(domain)
    name = f"_mta-sts.{domain}"
    if break_it in ("servfail", "timeout"):
        rig.dns.fault(name, break_it)
    elif break_it == "removed":
        rig.dns.remove(name)
    elif break_it == "garbage":
        rig.dns.set(name, "TXT", "v=STSv1; id=1", "v=STSv1; id=2")
    elif break_it == "invalid-policy":
        rig.publish(domain, "version: STSv1\nmode: enforced\n", id="2", ttl=60)
    else:
        rig.publish(domain, id="2", ttl=60, cert="expired")
    try:
        clock.advance(61)
        decision = resolver.resolve(domain).decision
        assert decision.mode is Mode.ENFORCE and decision.policy_id == "1"
        assert decision.failure is not None
        assert resolver.cached(domain)[0].mode is Mode.ENFORCE
    finally:
        rig.dns.fault(name, None)


def test_mode_none_replaces_enforce(rig, make_resolver, clock):
    # RFC 8461 §8.3: publishing mode none with a new id is how a domain withdraws its policy.
    domain = rig.domain()
    rig.publish(domain, ttl=60)
    resolver = make_resolver()
    resolver.resolve(domain)
    rig.publish(domain, NONE, id="2", ttl=60)
    clock.advance(61)
    decision = resolver.resolve(domain).decision
    assert decision.mode is Mode.NONE and decision.failure is None


def test_no_record_cached_for_negative_ttl(rig, make_resolver, clock):
    # RFC 8461 §3.1 + RFC 2308: NXDOMAIN is "no policy", cached for the zone's negative TTL.
    domain = rig.domain()
    resolver = make_resolver(negative_ttl_min=10, negative_ttl_max=3600)
    decision = resolver.resolve(domain).decision
    assert decision.policy is None and decision.failure.kind is FailureKind.NO_RECORD
    clock.advance(rig.dns.negative_ttl - 1)
    cached, due = resolver.cached(domain)
    assert cached.state is CacheState.NEGATIVE and not due
    assert txt_queries(rig, domain) == 1
    clock.advance(2)
    assert resolver.cached(domain) == (None, False)
    rig.publish(domain)  # the domain publishes a policy: found at the next lookup
    assert resolver.resolve(domain).decision.mode is Mode.ENFORCE


def test_negative_ttl_is_bounded(rig, make_resolver, clock):
    domain = rig.domain()
    resolver = make_resolver(negative_ttl_min=1, negative_ttl_max=20)
    resolver.resolve(domain)
    clock.advance(21)
    assert resolver.cached(domain) == (None, False)


def test_invalid_record_cached_like_no_record(rig, make_resolver, clock):
    domain = rig.domain()
    rig.dns.set(f"_mta-sts.{domain}", "TXT", "v=STSv1; id=a-b", ttl=120)
    resolver = make_resolver()
    decision = resolver.resolve(domain).decision
    assert decision.policy is None and decision.failure.kind is FailureKind.INVALID_RECORD
    clock.advance(119)
    assert resolver.cached(domain)[0].state is CacheState.NEGATIVE


def test_dns_failure_without_cache_is_not_cached_as_no_policy(rig, make_resolver, clock):
    # "Could not ask" is not "no record": a short back-off, then we ask again.
    domain = rig.domain()
    rig.dns.fault(f"_mta-sts.{domain}", "servfail")
    try:
        resolver = make_resolver(dns_backoff_min=30)
        decision = resolver.resolve(domain).decision
        assert decision.policy is None and decision.failure.kind is FailureKind.DNS_TEMPORARY
        assert resolver.cached(domain)[0].state is CacheState.BACKOFF
        clock.advance(31)
        assert resolver.cached(domain) == (None, False)
    finally:
        rig.dns.fault(f"_mta-sts.{domain}", None)
    rig.publish(domain)
    assert resolver.resolve(domain).decision.mode is Mode.ENFORCE


def test_failed_fetch_backs_off_exponentially(rig, make_resolver, clock):
    domain = rig.domain()
    rig.publish(domain, status=404)
    resolver = make_resolver(backoff_min=300, backoff_max=1000)
    for expected_delay in (300, 600, 1000, 1000):
        decision = resolver.resolve(domain).decision
        assert decision.policy is None and decision.failure.kind is FailureKind.FETCH_ERROR
        clock.advance(expected_delay - 1)
        assert resolver.cached(domain)[0].state is CacheState.BACKOFF
        clock.advance(1)
        assert resolver.cached(domain) == (None, False)
    assert rig.https.count(domain) == 4


def test_certificate_failure_is_its_own_kind(rig, make_resolver):
    domain = rig.domain()
    rig.publish(domain, cert="wrong-name")
    decision = make_resolver().resolve(domain).decision
    assert decision.policy is None and decision.failure.kind is FailureKind.CERTIFICATE_INVALID
    assert decision.failure.kind.tlsrpt_result_type == "sts-webpki-invalid"


def test_cache_survives_a_new_process(rig, make_resolver, tmp_path):
    # The cache is on disk: a new resolver on the same file answers with no network at all.
    policy_domain, empty_domain = rig.domain(), rig.domain()
    rig.publish(policy_domain)
    first = make_resolver(tmp_path / "shared.sqlite3")
    first.resolve(policy_domain)
    first.resolve(empty_domain)
    first.cache.close()
    before = (len(rig.dns.queries), len(rig.https.requests))
    second = make_resolver(tmp_path / "shared.sqlite3")
    assert second.cached(policy_domain)[0].mode is Mode.ENFORCE
    assert second.cached(empty_domain)[0].state is CacheState.NEGATIVE
    assert (len(rig.dns.queries), len(rig.https.requests)) == before


# --- "*." patterns and the domain's MX hosts (exact answers for Postfix < 3.10.5) ---

from mtasts_policyd.answers.postfix import NO_MATCHING_MX, MapOptions, tls_policy  # noqa: E402

WILD = "version: STSv1\nmode: enforce\nmx: *.mx.{d}\nmax_age: 86400\n"


def test_wildcard_answer_lists_matching_mx_hosts_only(rig, make_resolver):
    # RFC 8461 §4.1: "*.mx.d" covers a.mx.d but not a.b.mx.d; Postfix's ".mx.d" would cover both.
    domain = rig.domain()
    rig.publish(domain, WILD)
    rig.dns.set(domain, "MX", f"10 a.b.mx.{domain}.", f"20 A.MX.{domain}.", f"30 other.{domain}.")
    decision = make_resolver().resolve(domain).decision
    assert decision.mx_hosts == (f"a.b.mx.{domain}", f"a.mx.{domain}", f"other.{domain}")
    assert tls_policy(decision, MapOptions()) == f"secure match=a.mx.{domain} servername=hostname"
    assert tls_policy(decision, MapOptions(exact_wildcards=False)) == f"secure match=.mx.{domain} servername=hostname"


def test_wildcard_with_no_matching_mx_gets_an_unmatchable_name(rig, make_resolver):
    # No MX host is valid under the policy: Postfix must defer, never accept some other name.
    domain = rig.domain()
    rig.publish(domain, WILD)
    rig.dns.set(domain, "MX", f"10 a.b.mx.{domain}.")
    decision = make_resolver().resolve(domain).decision
    assert tls_policy(decision, MapOptions()) == f"secure match={NO_MATCHING_MX} servername=hostname"


def test_wildcard_over_a_top_level_domain(rig, make_resolver):
    # RFC 8461 §3.2: "*.test" (like "*.com") is ["*."] Domain, a valid pattern; §4.1: it covers
    # exactly one label, so of these MX hosts only "mxonly.test" may be used.
    domain = rig.domain()
    rig.publish(domain, "version: STSv1\nmode: enforce\nmx: *.test\nmax_age: 86400\n")
    rig.dns.set(domain, "MX", "10 mxonly.test.", f"20 mx1.{domain}.", "30 a.b.test.")
    decision = make_resolver().resolve(domain).decision
    assert decision.policy.mx == ("*.test",) and decision.policy.warnings == ()
    assert tls_policy(decision, MapOptions()) == "secure match=mxonly.test servername=hostname"
    assert tls_policy(decision, MapOptions(exact_wildcards=False)) == "secure match=.test servername=hostname"


def test_mx_hosts_followed_within_the_mx_ttl(rig, make_resolver, clock):
    domain = rig.domain()
    rig.publish(domain, WILD, ttl=3600)
    rig.dns.set(domain, "MX", f"10 a.mx.{domain}.", ttl=120)
    resolver = make_resolver(txt_ttl_max=3600)
    resolver.resolve(domain)
    rig.dns.set(domain, "MX", f"10 b.mx.{domain}.", ttl=120)
    clock.advance(119)
    assert resolver.cached(domain) == (resolver.cached(domain)[0], False)
    clock.advance(2)
    assert resolver.cached(domain)[1] is True  # the MX TTL passed: refresh in the background
    decision = resolver.resolve(domain).decision
    assert decision.mx_hosts == (f"b.mx.{domain}",)
    assert rig.https.count(domain) == 1  # the policy itself was not fetched again


def test_mx_failure_keeps_known_mx_hosts(rig, make_resolver, clock):
    domain = rig.domain()
    rig.publish(domain, WILD, ttl=3600)
    rig.dns.set(domain, "MX", f"10 a.mx.{domain}.", ttl=60)
    resolver = make_resolver(txt_ttl_max=3600)
    resolver.resolve(domain)
    rig.dns.fault(domain, "servfail")
    try:
        clock.advance(61)
        assert resolver.resolve(domain).decision.mx_hosts == (f"a.mx.{domain}",)
    finally:
        rig.dns.fault(domain, None)


def test_policy_without_wildcards_needs_no_mx_lookup(rig, make_resolver):
    domain = rig.domain()
    rig.publish(domain, "version: STSv1\nmode: enforce\nmx: mx1.{d}\nmax_age: 86400\n")
    decision = make_resolver().resolve(domain).decision
    assert decision.mx_hosts is None and rig.dns.count(domain, "MX") == 0


def test_txt_answer_given_by_the_caller_is_used_as_asked(rig, make_resolver, clock):
    # The daemon asks for the TXT record on its event loop and hands the answer (or the failure)
    # to resolve(): the algorithm, and what reaches the network, are the same as asking here.
    domain, missing, failing = rig.domain(), rig.domain(), rig.domain()
    rig.publish(domain)
    resolver = make_resolver()
    answer = asyncio.run(resolver.discovery.sts_record_async(domain))
    decision = resolver.resolve(domain, txt=answer).decision
    assert decision.mode is Mode.ENFORCE and decision.policy_id == "1"
    assert (txt_queries(rig, domain), rig.https.count(domain)) == (1, 1)  # the caller's query only
    with pytest.raises(NoRecord) as no_record:
        asyncio.run(resolver.discovery.sts_record_async(missing))
    assert resolver.resolve(missing, txt=no_record.value).decision.state is CacheState.MISS
    assert resolver.cached(missing)[0].state is CacheState.NEGATIVE
    decision = resolver.resolve(failing, txt=DnsTemporaryFailure("timed out")).decision
    assert decision.failure.kind is FailureKind.DNS_TEMPORARY and decision.policy is None
    assert resolver.cached(failing)[0].state is CacheState.BACKOFF
    assert txt_queries(rig, failing) == 0


# --- the daemon's path: DNS on the event loop, one hand-off to a worker (bench/README.md "Cold path") ---

import threading  # noqa: E402

from mtasts_policyd.net.dns import DnsDiscovery  # noqa: E402


class ThreadNoting(DnsDiscovery):
    """The real discovery, noting which questions were asked in the blocking form, from a thread."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.blocking: list[tuple[str, str, str]] = []

    def addresses(self, host, families=("A", "AAAA")):
        self.blocking.append((host, ",".join(families), threading.current_thread().name))
        return super().addresses(host, families)

    def mx_hosts(self, domain):
        self.blocking.append((domain, "MX", threading.current_thread().name))
        return super().mx_hosts(domain)


def served(make_resolver, lookup_domains: list[str]) -> tuple[list[Decision], ThreadNoting]:
    """Lookups through PolicyService (as the daemon makes them), on a resolver over ThreadNoting."""
    resolver = make_resolver()
    discovery = ThreadNoting(resolver.discovery._settings)
    resolver._discovery = resolver._fetcher._discovery = discovery
    service = PolicyService(resolver, workers=2)

    async def lookups() -> list[Decision]:
        return [await asyncio.wait_for(service.lookup(domain), 30) for domain in lookup_domains]

    try:
        return asyncio.run(lookups()), discovery
    finally:
        service.close()


def test_cold_domain_asks_policy_host_and_mx_on_the_loop_once_each(rig, make_resolver):
    # RFC 8461 §3.3 (the policy host's address), §4.1 with RFC 5321 §5.1 (the MX hosts that make
    # "*." answers exact): asked once each, at once, on the event loop; no blocking DNS in a thread.
    domain = rig.domain()
    rig.publish(domain, WILD)
    rig.dns.set(domain, "MX", f"20 b.mx.{domain}.", f"10 a.mx.{domain}.", f"30 a.b.mx.{domain}.")
    (decision,), discovery = served(make_resolver, [domain])
    assert decision.mode is Mode.ENFORCE and decision.state is CacheState.MISS
    assert decision.mx_hosts == (f"a.mx.{domain}", f"b.mx.{domain}", f"a.b.mx.{domain}")
    assert tls_policy(decision, MapOptions()) == f"secure match=a.mx.{domain}:b.mx.{domain} servername=hostname"
    assert [rig.dns.count(name, rdtype) for name, rdtype in
            ((f"_mta-sts.{domain}", "TXT"), (f"mta-sts.{domain}", "A"), (f"mta-sts.{domain}", "AAAA"),
             (domain, "MX"))] == [1, 1, 0, 1]
    assert discovery.blocking == [] and rig.https.count(domain) == 1


def test_no_ipv4_on_the_loop_falls_back_to_ipv6_in_the_worker(rig, make_resolver):
    # RFC 8461 §3.3: the A lookup made on the loop found nothing, so the fetch asks for AAAA (::1,
    # where nothing listens on the rig's port: a fetch error, not "does not resolve").
    domain = rig.domain()
    rig.publish(domain)
    rig.dns.remove(f"mta-sts.{domain}", "A")
    rig.dns.set(f"mta-sts.{domain}", "AAAA", "::1")
    (decision,), discovery = served(make_resolver, [domain])
    assert decision.policy is None and decision.failure.kind is FailureKind.FETCH_ERROR
    assert "does not resolve" not in decision.failure.detail
    assert (rig.dns.count(f"mta-sts.{domain}", "A"), rig.dns.count(f"mta-sts.{domain}", "AAAA")) == (1, 1)
    assert [(host, families) for host, families, _ in discovery.blocking] == [(f"mta-sts.{domain}", "AAAA")]


def test_mx_failure_on_the_loop_keeps_the_plain_patterns(rig, make_resolver):
    # A failed MX lookup never costs the policy: the answer uses the policy's own patterns.
    domain = rig.domain()
    rig.publish(domain, WILD)
    rig.dns.set(domain, "MX", f"10 a.mx.{domain}.")
    rig.dns.fault(domain, "servfail")
    try:
        (decision,), discovery = served(make_resolver, [domain])
    finally:
        rig.dns.fault(domain, None)
    assert decision.mode is Mode.ENFORCE and decision.mx_hosts is None
    assert tls_policy(decision, MapOptions()) == f"secure match=.mx.{domain} servername=hostname"
    assert discovery.blocking == []


def test_look_ahead_asks_only_what_the_resolution_will_use(rig, make_resolver, clock):
    # RFC 8461 §3.3: an unchanged id is not fetched, so its policy host is not looked up; MX hosts
    # only for a policy with "*." patterns (or none known yet), when the fetch or the MX TTL wants them.
    wild, plain = rig.domain(), rig.domain()
    rig.publish(wild, WILD, ttl=3600)
    rig.dns.set(wild, "MX", f"10 a.mx.{wild}.", ttl=600)
    rig.publish(plain, "version: STSv1\nmode: enforce\nmx: mx1.{d}\nmax_age: 86400\n", ttl=3600)
    resolver = make_resolver(txt_ttl_max=3600)
    answers = {d: resolver.discovery.sts_record(d) for d in (wild, plain)}
    assert resolver.look_ahead(wild, answers[wild]) == (True, True)  # nothing cached
    for domain in (wild, plain):
        resolver.resolve(domain, txt=answers[domain])
    assert resolver.look_ahead(wild, answers[wild]) == (False, False)
    assert resolver.look_ahead(plain, answers[plain]) == (False, False)
    rig.publish(wild, WILD, id="2", ttl=3600)
    rig.publish(plain, "version: STSv1\nmode: enforce\nmx: mx1.{d}\nmax_age: 86400\n", id="2", ttl=3600)
    changed = {d: resolver.discovery.sts_record(d) for d in (wild, plain)}
    assert resolver.look_ahead(wild, changed[wild]) == (True, True)
    assert resolver.look_ahead(plain, changed[plain]) == (True, False)
    clock.advance(601)  # the MX TTL has passed; the id has not changed
    assert resolver.look_ahead(wild, answers[wild]) == (False, True)
