"""The resolution rules (RFC 8461 §3.3, §5.1, §10.2) on in-memory DNS and policy hosts (tests/fakes.py).

The fast tier: the same rules as test_resolution.py, which drives them through the real test
servers; here every case runs in milliseconds, and the resolution's outcome is checked too.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from mtasts_policyd.answers.postfix import MapOptions, tls_policy
from mtasts_policyd.core.errors import DnsTemporaryFailure, FailureKind, NoRecord
from mtasts_policyd.core.overrides import make_override
from mtasts_policyd.core.policy import Mode
from mtasts_policyd.resolution.resolver import CacheState, Outcome

pytestmark = pytest.mark.fast

TESTING = "version: STSv1\nmode: testing\nmx: mx1.{d}\nmax_age: 86400\n"
WILD = "version: STSv1\nmode: enforce\nmx: *.mx.{d}\nmax_age: 86400\n"
ZERO = "version: STSv1\nmode: enforce\nmx: mx1.{d}\nmx: *.mx.{d}\nmax_age: 0\n"
D = "example.test"


def txt_queries(net, domain=D):
    return net.dns.count(f"_mta-sts.{domain}", "TXT")


class Counted:
    """A ResolutionCounters that remembers what it was told."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def fetched(self, result: str) -> None:
        self.calls.append(("fetched", result))

    def resolved(self, outcome: Outcome) -> None:
        self.calls.append(("resolved", outcome))

    def refresh_failed(self, kind: str) -> None:
        self.calls.append(("refresh_failed", kind))


def test_first_lookup_fetches_then_the_cache_answers(fake_net, make_fake_resolver):
    fake_net.publish(D)
    counters = Counted()
    resolver = make_fake_resolver(counters)
    assert resolver.cached(D) == (None, False)
    resolution = resolver.resolve(D)
    assert resolution.outcome is Outcome.FETCHED and resolution.previous_id is None
    decision = resolution.decision
    assert decision.state is CacheState.MISS and decision.mode is Mode.ENFORCE and decision.policy_id == "1"
    cached, due = resolver.cached(D)
    assert cached.state is CacheState.HIT and cached.policy == decision.policy and not due
    assert (txt_queries(fake_net), fake_net.https.count(D)) == (1, 1)
    assert counters.calls == [("fetched", "ok"), ("resolved", Outcome.FETCHED)]


@pytest.mark.parametrize("age, usable", [(0, True), (599, True), (600, False), (6000, False)])
def test_policy_used_until_max_age_whatever_dns_says(fake_net, make_fake_resolver, clock, age, usable):
    # RFC 8461 §5.1: a cached policy is used while its age is below max_age, and not after,
    # though neither the record nor the policy host can be asked meanwhile.
    fake_net.publish(D, "version: STSv1\nmode: enforce\nmx: mx1.{d}\nmax_age: 600\n", ttl=3600)
    resolver = make_fake_resolver(txt_ttl_max=3600)
    resolver.resolve(D)
    fake_net.dns.fault(f"_mta-sts.{D}", "servfail")
    fake_net.https.remove(D, unresolvable=True)
    clock.advance(age)
    decision, _ = resolver.cached(D)
    assert (decision is not None and decision.state is CacheState.HIT and decision.mode is Mode.ENFORCE) is usable


def test_unchanged_id_is_only_checked(fake_net, make_fake_resolver, clock):
    # RFC 8461 §3.3: the id says whether the policy changed; once the TXT TTL passes, a refresh is
    # due, and an unchanged id costs one TXT query and no fetch.
    fake_net.publish(D, ttl=60)
    resolver = make_fake_resolver()
    resolver.resolve(D)
    clock.advance(59)
    assert resolver.cached(D)[1] is False
    clock.advance(2)
    assert resolver.cached(D)[1] is True
    resolution = resolver.resolve(D)
    assert resolution.outcome is Outcome.UNCHANGED and resolution.decision.mode is Mode.ENFORCE
    assert (txt_queries(fake_net), fake_net.https.count(D)) == (2, 1)
    assert resolver.cached(D)[1] is False


def test_changed_id_fetches_and_replaces_and_says_from_which_id(fake_net, make_fake_resolver, clock, caplog):
    # RFC 8461 §3.3/§5.1: another id means fetch again and replace the cached policy.
    fake_net.publish(D, ttl=60)
    resolver = make_fake_resolver()
    resolver.resolve(D)
    fake_net.publish(D, TESTING, id="2", ttl=60)
    clock.advance(61)
    with caplog.at_level(logging.INFO, logger="mtasts_policyd.resolution"):
        resolution = resolver.resolve(D)
    assert resolution.outcome is Outcome.CHANGED and resolution.previous_id == "1"
    assert resolution.decision.mode is Mode.TESTING and resolution.decision.policy_id == "2"
    assert resolver.cached(D)[0].policy_id == "2" and fake_net.https.count(D) == 2
    # README "Logs": the refresh line is unchanged by the outcome becoming a value.
    assert f"refresh domain={D} outcome=changed from id=1 reason=policy-testing id=2" in caplog.messages


def test_policy_fetched_again_after_refresh_after_even_with_the_same_id(fake_net, make_fake_resolver, clock):
    # RFC 8461 §10.2: refresh regularly regardless of the TXT record; max_age restarts at the fetch.
    fake_net.publish(D, ttl=3600)
    resolver = make_fake_resolver(txt_ttl_max=7200, refresh_after=3000)
    first = resolver.resolve(D).decision
    clock.advance(2999)
    assert resolver.cached(D)[1] is False
    clock.advance(2)
    assert resolver.cached(D)[1] is True
    second = resolver.resolve(D)
    assert second.outcome is Outcome.FETCHED and fake_net.https.count(D) == 2
    assert second.decision.expires_at == first.fetched_at + 3001 + 86400


def test_refetch_is_due_within_half_of_a_short_max_age(fake_net, make_fake_resolver, clock):
    # RFC 8461 §10.2 with max_age 600 < 2 * refresh_after: fetch again after 300 s.
    fake_net.publish(D, "version: STSv1\nmode: enforce\nmx: mx1.{d}\nmax_age: 600\n", ttl=3600)
    resolver = make_fake_resolver(txt_ttl_max=3600)
    resolver.resolve(D)
    entry = resolver.cache.get(D)
    assert not entry.refetch_due(clock.now + 299, 86400) and entry.refetch_due(clock.now + 300, 86400)
    assert not entry.refresh_due(clock.now + 299, 86400) and entry.refresh_due(clock.now + 300, 86400)
    clock.advance(300)
    assert resolver.resolve(D).outcome is Outcome.FETCHED and fake_net.https.count(D) == 2


def test_refetch_on_request_even_when_young(fake_net, make_fake_resolver, clock):
    # The warmer's refetch=True: §10.2's fetch whatever the id, so max_age restarts now.
    fake_net.publish(D)
    resolver = make_fake_resolver()
    resolver.resolve(D)
    clock.advance(10)
    resolution = resolver.resolve(D, refetch=True)
    assert resolution.outcome is Outcome.FETCHED and resolution.decision.fetched_at == clock.now
    assert fake_net.https.count(D) == 2


TXT = f"_mta-sts.{D}"
# Every way a refresh can go wrong, and whether it is the TXT record that is gone or broken.
BREAKS = {
    "servfail": (lambda net: net.dns.fault(TXT, "servfail"), False),
    "timeout": (lambda net: net.dns.fault(TXT, "timeout"), False),
    "nxdomain": (lambda net: net.dns.remove(TXT), True),
    "nodata": (lambda net: (net.dns.remove(TXT), net.dns.set(TXT, "A", "192.0.2.1")), True),
    "two-records": (lambda net: net.dns.set(TXT, "TXT", "v=STSv1; id=1", "v=STSv1; id=2"), True),
    "invalid-record": (lambda net: net.dns.set(TXT, "TXT", "v=STSv1; id=a-b"), True),
    "fetch-error": (lambda net: net.publish(D, TESTING, id="2", ttl=60, status=500), False),
    "certificate": (lambda net: net.publish(D, TESTING, id="2", ttl=60, cert="expired"), False),
    "unresolvable": (lambda net: (net.dns.set(TXT, "TXT", "v=STSv1; id=2", ttl=60),
                                  net.https.remove(D, unresolvable=True)), False),
    "invalid-policy": (lambda net: net.publish(D, "version: STSv1\nmode: enforced\n", id="2", ttl=60), False),
}


@pytest.mark.parametrize("how", sorted(BREAKS))
def test_no_failure_replaces_or_downgrades_a_usable_policy(fake_net, make_fake_resolver, clock, how):
    # RFC 8461 §5.1: DNS failures, a vanished or broken TXT record, bad policies and bad certificates
    # all leave the cached enforce policy in force until it expires.
    fake_net.publish(D, ttl=60)
    resolver = make_fake_resolver()
    first = resolver.resolve(D).decision
    break_it, record_gone = BREAKS[how]
    break_it(fake_net)
    clock.advance(61)
    resolution = resolver.resolve(D)
    assert resolution.outcome is (Outcome.KEPT if record_gone else Outcome.FAILED)
    decision = resolution.decision
    assert decision.mode is Mode.ENFORCE and decision.policy_id == "1" and decision.failure is not None
    assert decision.expires_at == first.expires_at  # not shortened, not extended
    cached, due = resolver.cached(D)
    assert cached.state is CacheState.HIT and cached.mode is Mode.ENFORCE
    # A vanished record is no reason to back off (§8.3 withdraws a policy so); a failure is (§3.3).
    assert due is False
    assert resolver.cache.get(D).retry_after == (0.0 if record_gone else clock.now + (
        30 if how in ("servfail", "timeout") else 300))


def test_no_record_cached_for_the_negative_ttl_then_asked_again(fake_net, make_fake_resolver, clock):
    # RFC 8461 §3.1 + RFC 2308: NXDOMAIN is "no policy", cached for the zone's negative TTL.
    resolver = make_fake_resolver(negative_ttl_min=10, negative_ttl_max=3600)
    resolution = resolver.resolve(D)
    assert resolution.outcome is Outcome.NO_POLICY
    assert resolution.decision.policy is None and resolution.decision.failure.kind is FailureKind.NO_RECORD
    clock.advance(fake_net.dns.negative_ttl - 1)
    cached, due = resolver.cached(D)
    assert cached.state is CacheState.NEGATIVE and not due and txt_queries(fake_net) == 1
    clock.advance(2)
    assert resolver.cached(D) == (None, False)
    fake_net.publish(D)
    assert resolver.resolve(D).decision.mode is Mode.ENFORCE


def test_negative_ttl_is_bounded(fake_net, make_fake_resolver, clock):
    fake_net.dns.negative_ttl = 86400
    resolver = make_fake_resolver(negative_ttl_min=1, negative_ttl_max=20)
    resolver.resolve(D)
    clock.advance(19)
    assert resolver.cached(D)[0].state is CacheState.NEGATIVE
    clock.advance(2)
    assert resolver.cached(D) == (None, False)


def test_invalid_record_cached_for_its_rrset_ttl(fake_net, make_fake_resolver, clock):
    fake_net.dns.set(f"_mta-sts.{D}", "TXT", "v=STSv1; id=a-b", ttl=120)
    resolver = make_fake_resolver()
    resolution = resolver.resolve(D)
    assert resolution.outcome is Outcome.NO_POLICY
    assert resolution.decision.failure.kind is FailureKind.INVALID_RECORD
    clock.advance(119)
    assert resolver.cached(D)[0].state is CacheState.NEGATIVE
    clock.advance(2)
    assert resolver.cached(D) == (None, False)


def test_dns_failure_backs_off_briefly_and_is_never_no_policy(fake_net, make_fake_resolver, clock):
    fake_net.dns.fault(f"_mta-sts.{D}", "servfail")
    counters = Counted()
    resolver = make_fake_resolver(counters, dns_backoff_min=30)
    resolution = resolver.resolve(D)
    assert resolution.outcome is Outcome.FAILED
    assert resolution.decision.failure.kind is FailureKind.DNS_TEMPORARY
    assert resolver.cached(D)[0].state is CacheState.BACKOFF
    assert counters.calls == [("refresh_failed", "dns-temporary"), ("resolved", Outcome.FAILED)]
    clock.advance(31)
    assert resolver.cached(D) == (None, False)


def test_failed_fetch_backs_off_exponentially(fake_net, make_fake_resolver, clock):
    # RFC 8461 §3.3: wait before asking again after a failed fetch; doubling up to backoff_max.
    fake_net.publish(D, status=404)
    counters = Counted()
    resolver = make_fake_resolver(counters, backoff_min=300, backoff_max=1000)
    for delay in (300, 600, 1000, 1000):
        resolution = resolver.resolve(D)
        assert resolution.outcome is Outcome.FAILED and resolution.decision.failure.kind is FailureKind.FETCH_ERROR
        clock.advance(delay - 1)
        assert resolver.cached(D)[0].state is CacheState.BACKOFF
        clock.advance(1)
        assert resolver.cached(D) == (None, False)
    assert fake_net.https.count(D) == 4
    assert counters.calls[:3] == [("fetched", "fetch-error"), ("refresh_failed", "fetch-error"),
                                  ("resolved", Outcome.FAILED)]


def test_certificate_and_policy_failures_have_their_own_kinds(fake_net, make_fake_resolver):
    bad_cert, bad_policy = "cert.test", "policy.test"
    fake_net.publish(bad_cert, cert="wrong-name")
    fake_net.publish(bad_policy, "version: STSv1\nmode: enforced\nmx: mx1.{d}\nmax_age: 1\n")
    resolver = make_fake_resolver()
    assert resolver.resolve(bad_cert).decision.failure.kind is FailureKind.CERTIFICATE_INVALID
    assert resolver.resolve(bad_policy).decision.failure.kind is FailureKind.INVALID_POLICY


def test_max_age_zero_applies_to_its_own_resolution_only(fake_net, make_fake_resolver, clock):
    # RFC 8461 §3.2: max_age 0 is valid; §5.1 keeps a policy for max_age, i.e. not at all.
    fake_net.publish(D, ZERO)
    resolver = make_fake_resolver()
    decision = resolver.resolve(D).decision
    assert decision.mode is Mode.ENFORCE and decision.expires_at == decision.fetched_at
    assert tls_policy(decision, MapOptions()) == f"secure match=mx1.{D}:a.mx.{D} servername=hostname"
    assert resolver.cached(D) == (None, False)
    assert resolver.resolve(D).outcome is Outcome.FETCHED and fake_net.https.count(D) == 2
    fake_net.https.set_policy(D, ZERO.format(d=D), status=503)
    clock.advance(1)
    failed = resolver.resolve(D)
    assert failed.outcome is Outcome.FAILED and failed.decision.policy is None
    assert resolver.cached(D)[0].state is CacheState.BACKOFF


def test_wildcard_policy_follows_the_mx_hosts_within_their_ttl(fake_net, make_fake_resolver, clock):
    # RFC 8461 §4.1: "*.mx.d" covers one label; the answer lists the matching MX hosts, looked up
    # again when the MX TTL passes, without fetching the policy again.
    fake_net.publish(D, WILD, ttl=3600)
    fake_net.dns.set(D, "MX", f"10 a.b.mx.{D}.", f"20 A.MX.{D}.", ttl=120)
    resolver = make_fake_resolver(txt_ttl_max=3600)
    decision = resolver.resolve(D).decision
    assert decision.mx_hosts == (f"a.b.mx.{D}", f"a.mx.{D}")
    assert tls_policy(decision, MapOptions()) == f"secure match=a.mx.{D} servername=hostname"
    fake_net.dns.set(D, "MX", f"10 b.mx.{D}.", ttl=120)
    clock.advance(119)
    assert resolver.cached(D)[1] is False
    clock.advance(2)
    assert resolver.cached(D)[1] is True
    resolution = resolver.resolve(D)
    assert resolution.outcome is Outcome.UNCHANGED and resolution.decision.mx_hosts == (f"b.mx.{D}",)
    assert fake_net.https.count(D) == 1


def test_mx_failure_keeps_the_known_hosts(fake_net, make_fake_resolver, clock):
    fake_net.publish(D, WILD, ttl=3600)
    fake_net.dns.set(D, "MX", f"10 a.mx.{D}.", ttl=60)
    resolver = make_fake_resolver(txt_ttl_max=3600)
    resolver.resolve(D)
    fake_net.dns.fault(D, "servfail")
    clock.advance(61)
    assert resolver.resolve(D).decision.mx_hosts == (f"a.mx.{D}",)


def test_no_mx_means_the_domain_itself_and_null_mx_no_host(fake_net, make_fake_resolver):
    # RFC 5321 §5.1: without MX records mail goes to the domain itself; RFC 7505: "." takes none.
    implicit, null = "implicit.test", "null.test"
    for domain in (implicit, null):
        fake_net.publish(domain, "version: STSv1\nmode: enforce\nmx: *.test\nmax_age: 86400\n")
    fake_net.dns.remove(implicit, "MX")
    fake_net.dns.set(implicit, "A", "192.0.2.1")
    fake_net.dns.set(null, "MX", "0 .")
    resolver = make_fake_resolver()
    decision = resolver.resolve(implicit).decision
    assert decision.mx_hosts == (implicit,)
    assert tls_policy(decision, MapOptions()) == f"secure match={implicit} servername=hostname"
    assert resolver.resolve(null).decision.mx_hosts == ()


def test_policy_without_wildcards_needs_no_mx_lookup(fake_net, make_fake_resolver):
    fake_net.publish(D, "version: STSv1\nmode: enforce\nmx: mx1.{d}\nmax_age: 86400\n")
    assert make_fake_resolver().resolve(D).decision.mx_hosts is None
    assert fake_net.dns.count(D, "MX") == 0


def test_txt_answer_handed_in_is_used_as_asked(fake_net, make_fake_resolver):
    # The daemon asks for the TXT record on its event loop and hands the answer (or the failure) over.
    fake_net.publish(D)
    resolver = make_fake_resolver()
    answer = asyncio.run(fake_net.dns.sts_record_async(D))
    assert resolver.resolve(D, txt=answer).decision.policy_id == "1"
    assert txt_queries(fake_net) == 1  # the caller's query only
    missing = resolver.resolve("missing.test", txt=NoRecord("no record", ttl=300))
    assert missing.outcome is Outcome.NO_POLICY and resolver.cached("missing.test")[0].state is CacheState.NEGATIVE
    failing = resolver.resolve("failing.test", txt=DnsTemporaryFailure("timed out"))
    assert failing.outcome is Outcome.FAILED and resolver.cached("failing.test")[0].state is CacheState.BACKOFF
    assert txt_queries(fake_net, "missing.test") == txt_queries(fake_net, "failing.test") == 0


def test_override_asks_nothing(fake_net, make_fake_resolver):
    fake_net.publish(D)
    resolver = make_fake_resolver()
    resolver.overrides = {D: make_override(D, "ignore", reason="broken policy host")}
    resolution = resolver.resolve(D)
    assert resolution.decision.state is CacheState.OVERRIDE and resolution.decision.policy is None
    assert resolver.cached(D)[0].state is CacheState.OVERRIDE
    assert fake_net.dns.queries == [] and fake_net.https.requests == []
