"""The warmer's outcomes and alerts (README "Cache warmer") on in-memory DNS and policy hosts.

The fast tier beside test_warm.py, which runs the same rules against the real servers and the
real command. `warm()` maps each resolution's outcome to its own, adding what only it knows.
"""

from __future__ import annotations

import threading

import pytest

from mtasts_policyd.core.overrides import make_override
from mtasts_policyd.core.policy import Mode
from mtasts_policyd.ops.warm import DAY, AlertKind, Outcome, Summary, WarmOptions, warm

pytestmark = pytest.mark.fast

NOW = WarmOptions(jitter=0)
WEEK = "version: STSv1\nmode: enforce\nmx: mx1.{d}\nmax_age: 604800\n"
MOVED = "version: STSv1\nmode: enforce\nmx: mx2.{d}\nmax_age: 86400\n"
TESTING = "version: STSv1\nmode: testing\nmx: mx1.{d}\nmx: *.mx.{d}\nmax_age: 86400\n"
NONE = "version: STSv1\nmode: none\nmax_age: 86400\n"
D = "example.test"


def warm_one(resolver, clock, options=NOW, domain=D):
    summary = warm(resolver, [domain], options, clock=clock)
    assert summary.total == 1 and len(summary.results) == 1
    return summary.results[0]


def kinds(result) -> list[AlertKind]:
    return [alert.kind for alert in result.alerts]


def test_refreshed_restarts_max_age_and_a_young_copy_is_only_checked(fake_net, make_fake_resolver, clock):
    # RFC 8461 §10.2: fetched again though the id is unchanged, so max_age restarts.
    fake_net.publish(D, WEEK)
    resolver = make_fake_resolver()
    resolver.resolve(D)
    clock.advance(3 * DAY)
    summary = warm(resolver, [D], NOW, clock=clock)
    [result] = summary.results
    assert result.outcome is Outcome.REFRESHED and result.alerts == () and result.mode is Mode.ENFORCE
    assert resolver.cache.get(D).expires_at == clock.now + 604800 and fake_net.https.count(D) == 2
    assert summary.line() == "warm: 1 domains, refreshed 1, unchanged 0, changed 0, kept 0, failed 0, skipped 0, alerts 0"
    assert summary.exit_code == 0
    clock.advance(60)  # younger than --refetch-after: one TXT query, no fetch
    young = warm_one(resolver, clock)
    assert young.outcome is Outcome.UNCHANGED and young.detail == "id 1 unchanged"
    assert fake_net.https.count(D) == 2 and fake_net.dns.count(f"_mta-sts.{D}") == 3


def test_same_id_with_other_content_is_a_change(fake_net, make_fake_resolver, clock):
    fake_net.publish(D)
    resolver = make_fake_resolver()
    resolver.resolve(D)
    clock.advance(DAY)
    fake_net.publish(D, MOVED)  # the owner forgot to change the id (RFC 8461 §3.1 says to)
    result = warm_one(resolver, clock)
    assert result.outcome is Outcome.CHANGED and result.detail == "id 1 -> 1, mode enforce -> enforce"
    assert kinds(result) == [AlertKind.MX_CHANGED]


@pytest.mark.parametrize("body, expected", [
    (MOVED, [AlertKind.MX_CHANGED]),
    (TESTING, [AlertKind.MODE_DOWNGRADE]),
    (NONE, [AlertKind.MODE_DOWNGRADE]),  # withdrawal (§8.3): no mx-changed on top
])
def test_new_id_is_a_change_with_its_alerts(fake_net, make_fake_resolver, clock, body, expected):
    fake_net.publish(D)
    resolver = make_fake_resolver()
    resolver.resolve(D)
    clock.advance(600)  # a fresh copy: the TXT check finds the new id
    fake_net.publish(D, body, id="2")
    result = warm_one(resolver, clock)
    assert result.outcome is Outcome.CHANGED and result.policy_id == "2" and "id 1 -> 2" in result.detail
    assert kinds(result) == expected


def test_first_policy_and_still_no_policy(fake_net, make_fake_resolver, clock):
    resolver = make_fake_resolver()
    resolver.resolve(D)
    clock.advance(DAY)
    nothing = warm_one(resolver, clock)
    assert nothing.outcome is Outcome.UNCHANGED and nothing.detail == "no policy (no-record)"
    assert fake_net.https.count(D) == 0
    fake_net.publish(D)
    first = warm_one(resolver, clock)
    assert first.outcome is Outcome.CHANGED and first.alerts == () and first.detail.endswith("(first policy)")


@pytest.mark.parametrize("mode, body", [("enforce", WEEK), ("testing", TESTING), ("none", NONE)])
def test_vanished_record_keeps_the_policy_and_alerts_only_for_enforce(fake_net, make_fake_resolver, clock,
                                                                      mode, body):
    # RFC 8461 §5.1: kept until it expires, whatever its mode; §8.3: not a failure.
    fake_net.publish(D, body)
    resolver = make_fake_resolver()
    resolver.resolve(D)
    clock.advance(2 * 3600)
    fake_net.dns.remove(f"_mta-sts.{D}")
    result = warm_one(resolver, clock)
    assert result.outcome is Outcome.KEPT and result.mode is Mode(mode)
    assert result.detail.startswith("no-record: ") and "keeping id 1 until " in result.detail
    assert kinds(result) == ([AlertKind.ENFORCE_NOT_REFRESHED] if mode == "enforce" else [])


@pytest.mark.parametrize("how", ["servfail", "certificate", "http-500", "invalid-policy"])
def test_failure_keeps_the_policy_alerts_backs_off_and_force_asks_again(fake_net, make_fake_resolver, clock, how):
    fake_net.publish(D)
    resolver = make_fake_resolver()
    first = resolver.resolve(D).decision
    clock.advance(2 * 3600)
    if how == "servfail":
        fake_net.dns.fault(f"_mta-sts.{D}", "servfail")
    elif how == "certificate":
        fake_net.publish(D, TESTING, id="2", cert="untrusted")
    elif how == "http-500":
        fake_net.publish(D, TESTING, id="2", status=500)
    else:
        fake_net.publish(D, "version: STSv1\nmode: enforced\n", id="2")
    result = warm_one(resolver, clock)
    assert result.outcome is Outcome.FAILED and result.policy_id == "1" and result.mode is Mode.ENFORCE
    assert kinds(result) == [AlertKind.ENFORCE_NOT_REFRESHED]
    assert result.alerts[0].line().startswith(f"ALERT kind=enforce-not-refreshed domain={D} detail=id=1 expires ")
    stored = resolver.cache.get(D)
    assert stored.policy_id == "1" and stored.fetched_at == first.fetched_at and stored.retry_after > clock.now
    asked = fake_net.dns.count(f"_mta-sts.{D}")
    skipped = warm_one(resolver, clock)
    assert skipped.outcome is Outcome.SKIPPED and kinds(skipped) == [AlertKind.ENFORCE_NOT_REFRESHED]
    assert skipped.detail.startswith("backing off until ") and fake_net.dns.count(f"_mta-sts.{D}") == asked
    forced = warm_one(resolver, clock, WarmOptions(jitter=0, force=True))
    assert forced.outcome is Outcome.FAILED and fake_net.dns.count(f"_mta-sts.{D}") == asked + 1


def test_overridden_domain_is_skipped_without_asking(fake_net, make_fake_resolver, clock):
    fake_net.publish(D)
    resolver = make_fake_resolver()
    resolver.overrides = {D: make_override(D, "ignore", reason="broken policy host")}
    result = warm_one(resolver, clock)
    assert result.outcome is Outcome.SKIPPED and result.detail == "override in the configuration"
    assert fake_net.dns.queries == []


def test_a_crash_is_one_failed_domain_with_an_error_alert(fake_net, make_fake_resolver, clock):
    fake_net.publish(D)
    resolver = make_fake_resolver()
    fake_net.dns.sts_record = None  # type: ignore[assignment,method-assign]  # calling it raises TypeError
    result = warm_one(resolver, clock)
    assert result.outcome is Outcome.FAILED and result.detail.startswith("internal error: TypeError")
    assert kinds(result) == [AlertKind.ERROR]


def test_summary_counts_every_outcome_and_exit_codes(fake_net, make_fake_resolver, clock):
    domains = [f"d{n}.test" for n in range(6)]
    for domain in domains:
        fake_net.publish(domain, ttl=60)
    resolver = make_fake_resolver()
    for domain in domains:
        resolver.resolve(domain)
    clock.advance(13 * 3600)  # past half of max_age: refetch due (RFC 8461 §10.2), still usable
    fake_net.publish(domains[1], MOVED, id="2")  # changed: mx-changed
    fake_net.dns.remove(f"_mta-sts.{domains[2]}")  # kept: enforce-not-refreshed
    fake_net.https.remove(domains[3])  # failed: enforce-not-refreshed
    resolver.overrides = {domains[4]: make_override(domains[4], "ignore", reason="test")}  # skipped
    summary = warm(resolver, domains, WarmOptions(jitter=0, concurrency=3), clock=clock)
    outcomes = {r.domain: r.outcome for r in summary.results}
    assert outcomes == {domains[0]: Outcome.REFRESHED, domains[1]: Outcome.CHANGED, domains[2]: Outcome.KEPT,
                        domains[3]: Outcome.FAILED, domains[4]: Outcome.SKIPPED, domains[5]: Outcome.REFRESHED}
    assert summary.line() == ("warm: 6 domains, refreshed 2, unchanged 0, changed 1, kept 1, failed 1, skipped 1, "
                              "alerts 3")
    assert summary.exit_code == 1
    assert Summary(1, interrupted=True).exit_code == 130


def test_stop_ends_the_run_and_says_so(fake_net, make_fake_resolver, clock):
    stop = threading.Event()
    stop.set()
    summary = warm(make_fake_resolver(), ["a.test", "b.test"], NOW, clock=clock, stop=stop)
    assert summary.interrupted and summary.results == [] and summary.exit_code == 130
    assert summary.line() == ("warm: 2 domains, refreshed 0, unchanged 0, changed 0, kept 0, failed 0, skipped 0, "
                              "alerts 0 (interrupted after 0)")
