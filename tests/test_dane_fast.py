"""DANE in the daemon (issue 9), rule by rule on the in-memory fakes (tests/fakes.py): the `dane`
settings, when a cached DANE branch answers, is refreshed or is waited for, the single flight of
both halves, the trust probe's modes, the store and its migration, the replies and the survey.
The same rules against real servers: tests/dane/test_daemon_dane.py."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from dataclasses import replace

import pytest

from mtasts_policyd.answers.postfix import MapOptions
from mtasts_policyd.core.dane_verdict import DaneBranch, DaneDecision, Verdict, decide
from mtasts_policyd.core.policy import Mode
from mtasts_policyd.frontends.exim import policy_reply
from mtasts_policyd.frontends.socketmap import map_reply
from mtasts_policyd.net.dane_lookup import dane_inputs
from mtasts_policyd.ops.metrics import Metrics
from mtasts_policyd.ops.survey import Surveyor, SurveySummary, render_csv, render_markdown, row_json
from mtasts_policyd.resolution.dane import STALE_LIMIT, DaneGate, DaneSettings, Need, not_on_loopback
from mtasts_policyd.resolution.resolver import CacheState, PolicyResolver
from mtasts_policyd.resolution.service import PolicyService
from mtasts_policyd.runtime.config import Config, ConfigError, build, checked
from mtasts_policyd.runtime.daemon import start_dane
from mtasts_policyd.store.cache import PolicyCache
from mtasts_policyd.store.entry import Entry, merge
from mtasts_policyd.store.memory import MemoryStore
from tests.bodies import TESTING_WEEK
from tests.conftest import secure
from tests.fakes import FakeDnssec, FakeNet

pytestmark = pytest.mark.fast

D = "example.test"
USABLE = "3 1 1 " + "5a" * 32  # DANE-EE SPKI SHA2-256 (RFC 7672 §3.1.1)


def dane_zone(dnssec: FakeDnssec, domain: str = D, *tlsa: str, ttl: int = 300) -> str:
    """A signed domain with one MX host, its addresses and `tlsa` (none: authenticated denial)."""
    host = f"mx.{domain}"
    dnssec.set(domain, "MX", f"10 {host}.", ttl=ttl)
    dnssec.set(host, "A", "192.0.2.25", ttl=ttl)
    dnssec.set(host, "AAAA", "2001:db8::25", ttl=ttl)
    if tlsa:
        dnssec.set(f"_25._tcp.{host}", "TLSA", *tlsa, ttl=ttl)
    return host


@pytest.fixture
def dnssec() -> FakeDnssec:
    return FakeDnssec()


@pytest.fixture
def daneful(make_fake_resolver, dnssec):
    """A resolver on the fakes with DANE (`settings` for the `dane` section), its probe asked."""
    def make(**settings: object) -> tuple[PolicyResolver, DaneGate]:
        resolver = make_fake_resolver()
        resolver.dane = DaneGate(DaneSettings(**settings), dnssec)  # type: ignore[arg-type]
        asyncio.run(resolver.dane.probe_now())
        return resolver, resolver.dane
    return make


def lookups(resolver: PolicyResolver, *domains: str):
    """Each domain looked up through the daemon's service, all at once; their decisions."""
    async def main():
        service = PolicyService(resolver, workers=2)
        try:
            return await asyncio.gather(*(service.lookup(domain) for domain in domains))
        finally:
            service.close()
    return asyncio.run(main())


def answer(decision) -> tuple[str, str]:
    return map_reply(decision, MapOptions()), policy_reply(decision)


# ----- the single flight of both halves --------------------------------------------------------


def test_cold_domain_both_halves_in_one_flight_and_dane_answers_first(fake_net: FakeNet, dnssec, daneful):
    """RFC 8461 §2: the enforce policy is fetched and cached, and the answer is DANE's; 20 lookups
    at once of the cold domain ask one set of questions (issue 9)."""
    fake_net.publish(D)
    dane_zone(dnssec, D, USABLE)
    resolver, _ = daneful()
    decisions = lookups(resolver, *[D] * 20)
    assert {answer(d) for d in decisions} == {("OK dane-only", "dane-only")}
    assert all(d.policy is not None and d.policy.mode is Mode.ENFORCE for d in decisions)  # MTA-STS kept beside
    assert [dnssec.count(n, t) for n, t in ((D, "MX"), (f"mx.{D}", "A"), (f"mx.{D}", "AAAA"),
                                            (f"_25._tcp.mx.{D}", "TLSA"))] == [1, 1, 1, 1]
    assert fake_net.dns.count(f"_mta-sts.{D}", "TXT") == 1 and fake_net.https.count(D) == 1
    asked = len(dnssec.queries)
    decision, due = resolver.cached(D)
    assert decision is not None and not due and decision.state is CacheState.HIT
    assert answer(decision) == ("OK dane-only", "dane-only") and len(dnssec.queries) == asked


@pytest.mark.parametrize(("tlsa", "secure_zone", "expected"), [
    ((), True, None),  # authenticated: no TLSA
    ((USABLE,), False, None),  # unsigned zone: TLSA ignored (RFC 7672 §2.2)
    (("1 1 1 " + "5a" * 32,), True, ("OK dane", "dane")),  # only unusable TLSA (RFC 7672 §3.1.3)
])
def test_no_secure_tlsa_leaves_the_mta_sts_answer_unchanged(fake_net, dnssec, daneful, tlsa, secure_zone, expected):
    fake_net.publish(D)
    dane_zone(dnssec, D, *tlsa)
    if not secure_zone:
        dnssec.insecure(D)
    resolver, _ = daneful()
    (decision,) = lookups(resolver, D)
    assert answer(decision) == (expected or (f"OK {secure(D)}", f"enforce mx1.{D} *.mx.{D}"))


def test_a_failed_lookup_is_temp_never_the_mta_sts_answer(fake_net, dnssec, daneful):
    fake_net.publish(D)
    dane_zone(dnssec, D, USABLE)
    dnssec.fault(f"_25._tcp.mx.{D}", "servfail")
    resolver, _ = daneful()
    (decision,) = lookups(resolver, D)
    socketmap, exim = answer(decision)
    assert socketmap.startswith("TEMP DNSSEC lookup failed: _25._tcp.mx.example.test. TLSA")
    assert exim == "temp" + socketmap[4:]


# ----- the branch's lifetime ----------------------------------------------------------------------


def test_due_branch_answers_then_is_refreshed_in_the_background(fake_net, dnssec, daneful, clock):
    """A cached domain never waits: past the branch's TTL the lookup is answered from it and the
    branch is asked again; TLSA published meanwhile is answered from then on. The MTA-STS half,
    not due, is not asked again."""
    fake_net.publish(D)
    host = dane_zone(dnssec, D, ttl=120)
    resolver, _ = daneful()
    (first,) = lookups(resolver, D)
    assert first.dane is not None and first.dane.verdict is Verdict.NONE and first.dane.decision.ttl == 60
    assert answer(first)[0] == f"OK {secure(D)}"
    dnssec.set(f"_25._tcp.{host}", "TLSA", USABLE)
    clock.advance(61)
    stale, due = resolver.cached(D)
    assert stale is not None and due and answer(stale)[0] == f"OK {secure(D)}"

    async def refresh() -> None:
        service = PolicyService(resolver, workers=2)
        try:
            assert service.cached(D) is not None  # answered at once, the refresh started
            while service.pending:
                await asyncio.sleep(0.01)
        finally:
            service.close()
    asyncio.run(refresh())
    fresh, due = resolver.cached(D)
    assert fresh is not None and not due and answer(fresh) == ("OK dane-only", "dane-only")
    assert fake_net.dns.count(f"_mta-sts.{D}", "TXT") == 1


@pytest.mark.parametrize(("ttl", "kept"), [(90000, 600), (300, 300), (5, 10)])
def test_branch_lives_for_the_minimum_ttl_of_its_records_clamped(dnssec, daneful, ttl, kept):
    """Issue 9: a domain that starts publishing TLSA is seen within its DNS TTL (dane.ttl_min/ttl_max)."""
    dane_zone(dnssec, D, USABLE, ttl=ttl)
    resolver, _ = daneful(ttl_min=10, ttl_max=600)
    (decision,) = lookups(resolver, D)
    assert decision.dane.decision.ttl == kept and decision.dane.expires_at == decision.dane.decided_at + kept


def test_temp_is_held_for_temp_ttl_then_waited_for(dnssec, daneful, clock):
    """TEMP is never cached beyond its hold (dane.temp_ttl): after it the lookup asks again."""
    dane_zone(dnssec, D, USABLE)
    dnssec.fault(D, "timeout")
    resolver, _ = daneful()
    (decision,) = lookups(resolver, D)
    assert decision.dane_applied.verdict is Verdict.TEMP and decision.dane.decision.ttl == 5
    clock.advance(4)
    held, due = resolver.cached(D)
    assert held is not None and answer(held)[0].startswith("TEMP ") and not due
    clock.advance(2)
    assert resolver.cached(D) == (None, False)  # the lookup waits for a new answer
    dnssec.fault(D, None)
    (decision,) = lookups(resolver, D)
    assert answer(decision) == ("OK dane-only", "dane-only")


def test_branch_long_past_its_expiry_is_waited_for(fake_net, dnssec, daneful, clock):
    """Served stale while refreshed (RFC 8767 §5 bounds that to days), not forever."""
    fake_net.publish(D, TESTING_WEEK)
    dane_zone(dnssec, D, USABLE)
    resolver, gate = daneful()
    (decision,) = lookups(resolver, D)
    branch = decision.dane
    assert gate.need(branch, branch.expires_at - 1) is Need.NO
    assert gate.need(branch, branch.expires_at + STALE_LIMIT - 1) is Need.DUE
    assert gate.need(branch, branch.expires_at + STALE_LIMIT) is Need.WAIT
    clock.advance(branch.decision.ttl + STALE_LIMIT)
    assert resolver.cached(D) == (None, False)  # the policy is usable for a week; the DANE half waits


def test_unanswered_lookup_where_dane_applies_is_temp(fake_net, dnssec, daneful):
    """resolver.max_pending reached: the DNSSEC state of the domain is unknown, so TEMP (not the
    NOTFOUND a lookup without DANE gets, README "Limits")."""
    resolver, _ = daneful()
    resolver.settings = replace(resolver.settings, max_pending=1)
    dane_zone(dnssec, "other.test", USABLE)

    async def main():
        service = PolicyService(resolver, workers=1)
        try:
            first = asyncio.ensure_future(service.lookup("other.test"))
            await asyncio.sleep(0)
            assert service.pending == 1
            busy = await service.lookup(D)
            await first
            return busy
        finally:
            service.close()
    busy = asyncio.run(main())
    assert answer(busy)[0].startswith("TEMP DANE state unknown: 1 resolutions pending")


# ----- modes and the trust probe ---------------------------------------------------------------------


def test_mode_off_is_pure_mta_sts(fake_net, dnssec, daneful):
    fake_net.publish(D)
    dane_zone(dnssec, D, USABLE)
    resolver, gate = daneful(mode="off")
    (decision,) = lookups(resolver, D)
    assert answer(decision) == (f"OK {secure(D)}", f"enforce mx1.{D} *.mx.{D}")
    assert dnssec.queries == [("", "NS")] and gate.state == "off"  # the probe only (asked by the test)


def test_auto_while_the_resolver_does_not_validate_answers_mta_sts_alone(fake_net, dnssec, daneful):
    fake_net.publish(D)
    dane_zone(dnssec, D, USABLE)
    dnssec.validating = False
    resolver, gate = daneful()
    assert gate.state == "degraded" and "without AD" in gate.detail
    (decision,) = lookups(resolver, D)
    assert answer(decision) == (f"OK {secure(D)}", f"enforce mx1.{D} *.mx.{D}")
    assert decision.dane_applied is None and dnssec.queries == [("", "NS")]  # no DANE question


def test_require_while_the_resolver_does_not_validate(fake_net, dnssec, daneful, caplog):
    """Known domains keep what was learnt while the resolver validated; the others get TEMP. One
    warning per change of state, and the answers follow the state at once."""
    caplog.set_level(logging.INFO, logger="mtasts_policyd.dane")
    dane_zone(dnssec, D, USABLE)
    dane_zone(dnssec, "new.test", USABLE)
    fake_net.publish("new.test")
    resolver, gate = daneful(mode="require")
    lookups(resolver, D)
    dnssec.validating = False
    for _ in range(3):
        asyncio.run(gate.probe_now())
    assert gate.state == "degraded"
    assert [r.getMessage().split(" detail=")[0] for r in caplog.records if "state=" in r.getMessage()] == [
        "dane mode=require state=validating probe='. NS'", "dane mode=require state=degraded probe='. NS'"]
    known, unknown = lookups(resolver, D, "new.test")
    assert answer(known) == ("OK dane-only", "dane-only")
    assert answer(unknown)[0] == ("TEMP DANE required but the resolver does not validate DNSSEC "
                                  "(. NS: answer without AD: the resolver does not validate DNSSEC)")
    dnssec.validating = True
    asyncio.run(gate.probe_now())
    assert answer(resolver.cached("new.test")[0] or lookups(resolver, "new.test")[0]) == ("OK dane-only",
                                                                                          "dane-only")


class CountingGate(DaneGate):
    def next_probe(self) -> float:
        self.asked = getattr(self, "asked", 0) + 1
        return super().next_probe()


@pytest.mark.parametrize("mode", ["off", "auto"])
def test_prober_waits_between_probes(dnssec, mode):
    """Probes every probe_interval; with dane.mode off not at all (until a reload wakes it)."""
    gate = CountingGate(DaneSettings(mode=mode, probe_interval=60), dnssec)

    async def run_briefly() -> None:
        try:
            await asyncio.wait_for(gate.run_prober(), 0.3)
        except asyncio.TimeoutError:
            pass
    asyncio.run(run_briefly())
    assert getattr(gate, "asked", 0) <= 2  # no spinning
    assert dnssec.count(".", "NS") == (0 if mode == "off" else 1)


def test_probe_word_is_taken_over_on_restart_for_the_same_resolver_while_fresh(dnssec):
    notes = MemoryStore()
    settings = DaneSettings(probe_interval=300)
    first = DaneGate(settings, dnssec, notes=notes, identity="127.0.0.1@53")
    asyncio.run(first.probe_now())
    now = time.time()
    assert DaneGate(settings, dnssec, notes=notes, identity="127.0.0.1@53").restore(now)
    assert not DaneGate(settings, dnssec, notes=notes, identity="192.0.2.53@53").restore(now)
    assert not DaneGate(replace(settings, probe="test. SOA"), dnssec, notes=notes,
                        identity="127.0.0.1@53").restore(now)
    assert not DaneGate(settings, dnssec, notes=notes, identity="127.0.0.1@53").restore(now + 300)
    assert not DaneGate(replace(settings, mode="off"), dnssec, notes=notes, identity="127.0.0.1@53").restore(now)
    taken = DaneGate(settings, dnssec, notes=notes, identity="127.0.0.1@53")
    taken.restore(now)
    assert taken.state == "validating" and taken.next_probe() == pytest.approx(first.checked_at + 300)


def test_start_up_warns_for_a_resolver_off_loopback(dnssec, caplog):
    """Issue 9: the AD bit is only as trustworthy as the path to the resolver."""
    config = build(Config, {"dns": {"nameservers": ["127.0.0.1", "192.0.2.53"]}})
    gate = DaneGate(config.dane, dnssec)
    asyncio.run(start_dane(gate, config))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("dane resolver=192.0.2.53 is not on loopback")
    assert gate.state == "validating" and dnssec.count(".", "NS") == 1  # probed before the first lookup
    caplog.clear()
    asyncio.run(start_dane(DaneGate(replace(config.dane, mode="off"), dnssec), config))
    assert not caplog.records and dnssec.count(".", "NS") == 1  # off: no warning, no probe


def test_resolver_off_loopback_is_named():
    assert not_on_loopback(("127.0.0.1", "::1", "127.0.0.53", "192.0.2.1", "2001:db8::1")) == [
        "192.0.2.1", "2001:db8::1"]


@pytest.mark.parametrize(("section", "key", "reason"), [
    ({"mode": "on"}, "dane.mode", "one of auto, require, off"),
    ({"probe": "NS"}, "dane.probe", "'NAME TYPE'"),
    ({"probe": ". NOSUCHTYPE"}, "dane.probe", "'NAME TYPE'"),
    ({"probe_interval": 0}, "dane.probe_interval", "at least 1"),
    ({"ttl_min": 7200}, "dane.ttl_min", "must not exceed dane.ttl_max"),
    ({"temp_ttl": 61}, "dane.temp_ttl", "at most 60"),
    ({"modes": "auto"}, "dane", "unknown key"),
])
def test_dane_keys_are_checked(section, key, reason):
    with pytest.raises(ConfigError) as error:
        checked(build(Config, {"dane": section}))
    assert str(error.value).startswith(key) and reason in str(error.value)


def test_dane_defaults():
    dane = Config().dane
    assert (dane.mode, dane.probe, dane.probe_interval) == ("auto", ". NS", 300)
    assert (dane.ttl.min, dane.ttl.max, dane.ttl.temp) == (60, 3600, 5)


# ----- replies -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("verdict", "socketmap", "exim"), [
    (Verdict.DANE_ONLY, "OK dane-only", "dane-only"),
    (Verdict.DANE, "OK dane", "dane"),
    (Verdict.TEMP, "TEMP why", "temp why"),
    (Verdict.NONE, f"OK {secure(D)}", f"enforce mx1.{D} *.mx.{D}"),
])
def test_replies_give_the_dane_verdict_first(fake_net, make_fake_resolver, verdict, socketmap, exim):
    fake_net.publish(D)
    decision = make_fake_resolver().resolve(D).decision
    decision = replace(decision, dane_applied=DaneDecision(D, verdict, 60, "why"))
    assert answer(decision) == (socketmap, exim)


# ----- the store -----------------------------------------------------------------------------------------


def branch_for(dnssec: FakeDnssec, domain: str = D, at: float = 1000.0) -> DaneBranch:
    dane_zone(dnssec, domain, USABLE, "1 1 1 " + "00" * 32)
    inputs = asyncio.run(dane_inputs(dnssec, domain))
    return DaneBranch(decide(inputs), inputs, at)


# The policies table as versions before issue 9 created it: no dane_* columns.
OLD_SCHEMA = """CREATE TABLE policies (domain TEXT PRIMARY KEY, txt_record TEXT, policy_id TEXT, policy_body BLOB,
    fetched_at REAL, txt_expires_at REAL NOT NULL DEFAULT 0, negative_until REAL NOT NULL DEFAULT 0,
    failure_kind TEXT, failure_detail TEXT, failure_at REAL, failures INTEGER NOT NULL DEFAULT 0,
    retry_after REAL NOT NULL DEFAULT 0, last_lookup REAL NOT NULL DEFAULT 0, mx_hosts TEXT,
    mx_expires_at REAL NOT NULL DEFAULT 0, version INTEGER NOT NULL DEFAULT 1)"""


def test_old_cache_file_gets_the_dane_columns_and_keeps_its_rows(tmp_path, dnssec):
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute(OLD_SCHEMA)
        db.execute("INSERT INTO policies (domain, negative_until, failure_kind, failure_detail, version) "
                   "VALUES (?, 2e9, 'no-record', 'none here', 3)", (D,))
    db.close()
    cache = PolicyCache(str(path))
    try:
        entry = cache.get(D)
        assert entry is not None and entry.negative_until == 2e9 and entry.dane is None and entry.version == 3
        branch = branch_for(dnssec)
        assert cache.put(replace(entry, dane=branch)) is not None
    finally:
        cache.close()
    with sqlite3.connect(path) as db:
        columns = {row[1] for row in db.execute("PRAGMA table_info(policies)")}
    db.close()
    assert {"dane_verdict", "dane_reason", "dane_decided_at", "dane_expires_at", "dane_inputs"} <= columns
    reopened = PolicyCache(str(path))
    try:
        kept = reopened.get(D)
        assert kept is not None and kept.dane == branch  # inputs, TLSA bytes, verdict, times: all of it
        assert kept.dane.inputs.hosts[0].tlsa.records[1].usable is False
    finally:
        reopened.close()


def test_unreadable_stored_branch_is_asked_again(tmp_path, dnssec, caplog):
    path = tmp_path / "cache.sqlite3"
    cache = PolicyCache(str(path))
    cache.put(Entry(D, negative_until=2e9, dane=branch_for(dnssec)))
    cache.close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE policies SET dane_inputs = ?", (json.dumps({"mx": {}}),))
    db.close()
    cache = PolicyCache(str(path))
    try:
        entry = cache.get(D)
        assert entry is not None and entry.dane is None and entry.negative_until == 2e9
    finally:
        cache.close()
    assert "stored DANE branch unreadable" in caplog.text


def test_merge_keeps_the_later_dane_decision(dnssec):
    """Writers work on their own schedules (the warmer knows no DANE): the DANE branch decided last
    wins, whichever policy fetch wins."""
    older, newer = branch_for(dnssec, at=100.0), branch_for(dnssec, at=200.0)
    stored = Entry(D, fetched_at=50.0, dane=newer, version=4)
    ours = Entry(D, fetched_at=60.0, dane=older)
    assert merge(stored, ours).dane is newer and merge(stored, ours).fetched_at == 60.0
    assert merge(stored, Entry(D, fetched_at=10.0)).dane is newer
    assert merge(Entry(D, fetched_at=99.0, version=1), Entry(D, dane=older)).dane is older


# ----- metrics and survey ----------------------------------------------------------------------------------


def test_metrics_count_dane():
    metrics = Metrics(["socketmap"])
    metrics.dane_decided("dane-only")
    metrics.dane_probed(False)
    metrics.frontend("socketmap").dane_answered("temp")
    text = metrics.render()
    assert 'mtasts_dane_lookups_total{verdict="dane-only"} 1\n' in text
    assert 'mtasts_dane_lookups_total{verdict="none"} 0\n' in text
    assert 'mtasts_dane_probes_total{result="not-validating"} 1\n' in text
    assert 'mtasts_dane_answers_total{frontend="socketmap",verdict="temp"} 1\n' in text


def test_survey_dane_columns(fake_net, dnssec):
    fake_net.publish(D)
    dane_zone(dnssec, D, USABLE)
    fake_net.publish("plain.test")
    dane_zone(dnssec, "plain.test")
    surveyor = Surveyor(fake_net.dns, fetcher=fake_net.https, dnssec=dnssec)
    rows = [surveyor.survey(D), surveyor.survey("plain.test")]
    assert [row.dane.verdict.value for row in rows] == ["dane-only", "none"]
    summary = SurveySummary.of(rows)
    assert summary.dane == {"dane-only": 1, "dane": 0, "none": 1, "temp": 0}
    markdown = render_markdown(rows, summary)
    assert markdown.splitlines()[0].endswith("| MX secure | TLSA | DANE |")
    assert f"| yes | mx.{D}: secure, 1 of 1 usable | dane-only |" in markdown
    assert "| dane-only | 1 |" in markdown and "| dane-none | 1 |" in markdown
    assert render_csv(rows).splitlines()[2].endswith(",none,no MX host has a secure TLSA RRset,yes,"
                                                      "mx.plain.test: secure-none")
    assert row_json(rows[0])["dane_hosts"][0]["tlsa"]["records"][0]["usable"] is True
    without = Surveyor(fake_net.dns, fetcher=fake_net.https).survey(D)
    assert without.dane is None and "MX secure" not in render_markdown([without], SurveySummary.of([without]))
