"""TLSRPT from a real Postfix 3.7 log: real deliveries to MX hosts with each TLS defect, ingested.

What Postfix logs is the fact; the parser follows it (tests/test_tlsrpt_postfix.py holds a recording
of the same run). Domains rpt-<mode>-<behaviour>.e2e.test publish an enforce or testing policy or
none; their only MX is an SMTP sink with that TLS behaviour (tests/rig/smtp_server.py). Each message
is tried once per failure: a deferred message is deleted from the queue at its first deferral, and
the expected count per domain is the number of attempts Postfix logged for it, each with the
result type of the issue's mapping. The policy of each domain comes from the daemon's cache, which
Postfix's own map lookups filled.
"""

from __future__ import annotations

import datetime
import gzip
import json
import uuid
from collections import Counter

import pytest
import yaml

from mtasts_policyd.ops.tlsrpt_ingest import PostfixIngest, SourceAddresses, policy_from_cache
from mtasts_policyd.store.cache import PolicyCache
from mtasts_policyd.store.tlsrpt_store import TlsRptStore
from tests.conftest import free_port, run_cli
from tests.e2e.postfix_mta import PostfixInstance
from tests.e2e.world import Mx, Scenario, World, wait_until

BEHAVIOURS = ("tls", "wrong-cert", "untrusted", "expired", "self-signed", "no-starttls", "starttls-refused",
              "handshake-abort")
# Per mode and behaviour: the result of each attempt (None: success; "-": no TLS session, not counted).
ENFORCE = {"tls": None, "wrong-cert": "certificate-host-mismatch", "untrusted": "certificate-not-trusted",
           "expired": "certificate-expired", "self-signed": "validation-failure",  # as Postfix >= 3.10
           "no-starttls": "starttls-not-supported", "starttls-refused": "starttls-not-supported",
           "handshake-abort": "validation-failure"}
TESTING = {"tls": None, "wrong-cert": None, "untrusted": "certificate-not-trusted",
           "expired": "certificate-not-trusted", "self-signed": "certificate-not-trusted", "no-starttls": "-",
           "starttls-refused": "-", "handshake-abort": "validation-failure"}
NO_POLICY = {**{b: None for b in BEHAVIOURS}, "no-starttls": "-", "starttls-refused": "-",
             "handshake-abort": "validation-failure"}
EXPECTED = {"enforce": ENFORCE, "testing": TESTING, "nopol": NO_POLICY}
TIMEOUT = 60


def policy(mode: str) -> str | None:
    if mode == "nopol":
        return None
    return f"version: STSv1\nmode: {mode}\nmx: *.{{d}}\nmax_age: 86400\n"


@pytest.fixture(scope="module")
def delivered(world: World, policyd):
    """Every message tried and settled (sent, or deleted at its first deferral); Postfix stopped."""
    cases = {Scenario(f"rpt-{mode}-{behaviour}", policy(mode), (Mx("mx", behaviour),), None): (mode, behaviour)
             for mode in EXPECTED for behaviour in BEHAVIOURS}
    fallback = Scenario("rpt-enforce-fallback", policy("enforce"), (Mx("mx1", "wrong-cert", 10), Mx("mx2", "tls", 20)),
                        None)
    for scenario in [*cases, fallback]:
        world.publish(scenario)
    postfix = PostfixInstance().start()
    no_map = PostfixInstance(extra_main_cf={"smtp_tls_policy_maps": f"socketmap:inet:127.0.0.1:{free_port()}:postfix"})
    no_map.start()
    rcpts = {scenario.domain: f"u{uuid.uuid4().hex[:8]}@{scenario.domain}" for scenario in [*cases, fallback]}
    try:
        for rcpt in rcpts.values():
            postfix.send(rcpt, uuid.uuid4().hex)
        no_map.send(f"m@{fallback.domain}", uuid.uuid4().hex)

        deleted: set[str] = set()

        def settled() -> bool:
            done = True
            for rcpt in rcpts.values():
                status = postfix.status_of(rcpt)
                if status is None:
                    done = False
                elif status.status == "deferred" and rcpt not in deleted:
                    postfix.delete_queued(rcpt)  # one attempt per failure, as far as we are quick enough
                    deleted.add(rcpt)
            return done and not postfix.queue() and no_map.status_of(f"m@{fallback.domain}") is not None

        assert wait_until(settled, timeout=TIMEOUT, interval=0.2), postfix.log()[-4000:]
    finally:
        postfix.stop()
        no_map.stop()
    yield postfix, no_map, cases, rcpts
    postfix.remove()
    no_map.remove()


def days() -> list[datetime.date]:
    """Today and yesterday (UTC): the run may cross midnight."""
    today = datetime.datetime.now(datetime.UTC).date()
    return [today - datetime.timedelta(days=1), today]


def ingest(world: World, log_path: str, tmp_path) -> TlsRptStore:
    store = TlsRptStore(str(tmp_path / "tlsrpt.sqlite3"))
    cache = PolicyCache(str(world.directory / "policyd" / "cache.sqlite3"))
    try:
        PostfixIngest(store, policy_from_cache(cache), SourceAddresses()).ingest(log_path)
    finally:
        cache.close()
    return store


def test_each_session_is_counted_with_the_mapped_result(world: World, delivered, tmp_path):
    postfix, _, cases, rcpts = delivered
    store = ingest(world, str(postfix.log_path), tmp_path)
    found: dict[str, Counter] = {}
    for count in (count for day in days() for count in store.sessions(day)):
        found.setdefault(count.policy.policy_domain, Counter())[count.result.value if count.result else None] += \
            count.sessions
    for scenario, (mode, behaviour) in cases.items():
        expected = EXPECTED[mode][behaviour]
        attempts = len(postfix.statuses(rcpts[scenario.domain]))
        want = Counter() if expected == "-" else Counter({expected: attempts})
        assert found.get(scenario.domain, Counter()) == want, (scenario.domain, postfix.log_lines(scenario.domain))
    # MX 1 misnamed, MX 2 valid: two sessions in one delivery, the mail delivered by the second.
    assert found["rpt-enforce-fallback.e2e.test"] == Counter({"certificate-host-mismatch": 1, None: 1})
    assert [store.unparsed(day) for day in days()] == [{}, {}]


def test_sessions_carry_the_policy_from_the_daemons_cache(world: World, delivered, tmp_path):
    postfix, _, _, _ = delivered
    store = ingest(world, str(postfix.log_path), tmp_path)
    counts = [count for day in days() for count in store.sessions(day)]
    policies = {count.policy.policy_domain: count.policy for count in counts}
    enforce = policies["rpt-enforce-expired.e2e.test"]
    assert (enforce.policy_type.value, enforce.policy_string, enforce.mx_host) == (
        "sts", ("version: STSv1", "mode: enforce", "mx: *.rpt-enforce-expired.e2e.test", "max_age: 86400"),
        ("*.rpt-enforce-expired.e2e.test",))
    assert policies["rpt-testing-untrusted.e2e.test"].policy_string[1] == "mode: testing"
    assert policies["rpt-nopol-tls.e2e.test"].policy_type.value == "no-policy-found"
    rows = [count for count in counts if count.policy.policy_domain == "rpt-enforce-expired.e2e.test"]
    assert {(c.sending_ip, c.receiving_mx) for c in rows} == {("127.0.0.1", "mx.rpt-enforce-expired.e2e.test")}
    assert all(c.receiving_ip.startswith("127.0.0.") for c in rows)


def test_our_unreachable_map_is_a_local_event_not_a_report(world: World, delivered, tmp_path):
    _, no_map, _, _ = delivered
    store = ingest(world, str(no_map.log_path), tmp_path)
    assert [store.sessions(day) for day in days()] == [[], []]
    assert sum(store.local_events(day).get("policy-map-error", 0) for day in days()) >= 1
    assert [store.unparsed(day) for day in days()] == [{}, {}]


def test_the_commands_build_reports_for_domains_that_ask(world: World, delivered, tmp_path):
    """`tlsrpt ingest` then `tlsrpt build` on the real log, the world's DNS answering _smtp._tls."""
    postfix, _, _, rcpts = delivered
    world.dns.set("_smtp._tls.rpt-enforce-expired.e2e.test", "TXT", "v=TLSRPTv1; rua=mailto:tls@e2e.test")
    world.dns.set("_smtp._tls.rpt-enforce-tls.e2e.test", "TXT", "v=TLSRPTv1; rua=ftp://e2e.test/")  # invalid
    config = tmp_path / "tlsrpt.yaml"
    config.write_text(yaml.safe_dump({
        "dns": {"nameservers": ["127.0.0.1"], "timeout": 3},
        "cache": {"path": str(world.directory / "policyd" / "cache.sqlite3")},
        "tlsrpt": {"store": str(tmp_path / "counts.sqlite3"), "sender": "tlsrpt@sender.e2e.test"}}))
    result = run_cli("tlsrpt", "ingest", "--config", str(config), "--postfix-log", str(postfix.log_path))
    assert result.returncode == 0 and ", unparsed 0, " in result.stdout, result.stdout + result.stderr
    built = []
    for day in days():
        result = run_cli("tlsrpt", "build", "--config", str(config), "--day", day.isoformat(), "--output",
                         str(tmp_path / "reports"))
        assert result.returncode == 0, result.stdout + result.stderr
        assert ("is not over (UTC)" in result.stderr) == (day == days()[1])  # today: a warning
        built += [line for line in result.stdout.splitlines() if line.startswith("built ")]
        assert not any(line.startswith("built domain=rpt-enforce-tls.") for line in result.stdout.splitlines())
    assert len(built) == 1 and "domain=rpt-enforce-expired.e2e.test " in built[0]
    (path,) = (tmp_path / "reports").iterdir()
    assert path.name.startswith("sender.e2e.test!rpt-enforce-expired.e2e.test!") and path.name.endswith(".json.gz")
    report = json.loads(gzip.decompress(path.read_bytes()))
    attempts = len(postfix.statuses(rcpts["rpt-enforce-expired.e2e.test"]))
    (entry,) = report["policies"]
    assert entry["summary"] == {"total-successful-session-count": 0, "total-failure-session-count": attempts}
    assert [(d["result-type"], d["receiving-mx-hostname"], d["sending-mta-ip"]) for d in entry["failure-details"]] == [
        ("certificate-expired", "mx.rpt-enforce-expired.e2e.test", "127.0.0.1")]
