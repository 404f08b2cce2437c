"""The cache warmer (`mtasts-policyd warm`) against the real test DNS and HTTPS servers.

In-process tests drive `warm()` with the settable clock; the rest run the real command, beside a
real daemon, twice at once, and killed with SIGKILL mid-run.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest

from mtasts_policyd.core.overrides import make_override
from mtasts_policyd.core.policy import Mode
from mtasts_policyd.ops.warm import (
    DAY,
    AlertKind,
    Outcome,
    WarmOptions,
    select_domains,
    warm,
)
from mtasts_policyd.store.cache import PolicyCache
from tests.bodies import ENFORCE, NONE, TESTING
from tests.conftest import ROOT, SocketmapClient, cli_command, run_cli, stored_entry, write_config

NOW = WarmOptions(jitter=0)  # in-process runs: no random delays
WEEK = "version: STSv1\nmode: enforce\nmx: mx1.{d}\nmax_age: 604800\n"
MOVED = "version: STSv1\nmode: enforce\nmx: mx2.{d}\nmax_age: 86400\n"
V2 = ENFORCE.replace("max_age: 86400", "max_age: 86401")  # same answer, but a row shows which fetch it holds
FAST = ("--jitter", "0", "--refetch-after", "0")


def kinds(result) -> list[AlertKind]:
    return [alert.kind for alert in result.alerts]


def warm_one(resolver, domain, clock, options=NOW):
    summary = warm(resolver, [domain], options, clock=clock)
    assert summary.total == 1 and len(summary.results) == 1
    return summary.results[0]


# ----- in process ----------------------------------------------------------------------------------


def test_refresh_before_expiry_restarts_max_age(rig, make_resolver, clock):
    domain = rig.domain()
    rig.publish(domain, WEEK)
    resolver = make_resolver()
    resolver.resolve(domain)
    fetches = rig.https.count(domain)
    clock.advance(3 * DAY)
    summary = warm(resolver, [domain], NOW, clock=clock)
    [result] = summary.results
    assert result.outcome is Outcome.REFRESHED and result.alerts == ()
    assert rig.https.count(domain) == fetches + 1  # RFC 8461 §10.2: fetched though the id is unchanged
    stored = resolver.cache.reload(domain)
    assert stored.policy_id == "1" and stored.fetched_at == clock.now
    assert stored.expires_at == clock.now + 604800  # max_age restarts from this fetch
    assert summary.line() == "warm: 1 domains, refreshed 1, unchanged 0, changed 0, kept 0, failed 0, skipped 0, alerts 0"
    assert summary.exit_code == 0
    clock.advance(5 * DAY)  # 8 days after the first fetch: only the warmer's fetch keeps it usable
    assert resolver.cache.reload(domain).usable_policy(clock.now) is not None
    # A copy younger than --refetch-after only gets its TXT id checked: no HTTPS request.
    resolver.resolve(domain, refetch=True)
    clock.advance(60)
    txt = rig.dns.count(f"_mta-sts.{domain}", "TXT")
    assert warm_one(resolver, domain, clock).outcome is Outcome.UNCHANGED
    assert rig.https.count(domain) == fetches + 2 and rig.dns.count(f"_mta-sts.{domain}", "TXT") == txt + 1


def test_new_id_is_picked_up_even_for_a_fresh_copy(rig, make_resolver, clock):
    domain = rig.domain()
    rig.publish(domain)
    resolver = make_resolver()
    resolver.resolve(domain)
    clock.advance(600)  # well within --refetch-after: the TXT check finds the new id
    rig.publish(domain, MOVED, id="2")
    result = warm_one(resolver, domain, clock)
    assert result.outcome is Outcome.CHANGED and result.policy_id == "2" and "id 1 -> 2" in result.detail
    assert kinds(result) == [AlertKind.MX_CHANGED]
    assert result.alerts[0].line() == (f"ALERT kind=mx-changed domain={domain} detail=mx1.{domain},*.mx.{domain} "
                                       f"-> mx2.{domain} (id 1 -> 2)")
    stored = stored_entry(resolver.cache.path, domain)
    assert stored.policy_id == "2" and stored.policy.mx == (f"mx2.{domain}",)


@pytest.mark.parametrize("body, expected", [
    (TESTING, [AlertKind.MODE_DOWNGRADE]),
    (NONE, [AlertKind.MODE_DOWNGRADE]),  # withdrawal (§8.3): no mx-changed on top
    (WEEK, [AlertKind.MX_CHANGED]),  # still enforce, fewer patterns
])
def test_policy_changes_raise_alerts(rig, make_resolver, clock, body, expected):
    domain = rig.domain()
    rig.publish(domain)
    resolver = make_resolver()
    resolver.resolve(domain)
    clock.advance(2 * 3600)
    rig.publish(domain, body, id="2")
    result = warm_one(resolver, domain, clock)
    assert result.outcome is Outcome.CHANGED and kinds(result) == expected
    assert resolver.cache.reload(domain).policy_id == "2"


def _break(rig, domain: str, how: str) -> None:
    if how == "certificate":
        rig.publish(domain, TESTING, id="2", cert="untrusted")
    elif how == "http-500":
        rig.publish(domain, TESTING, id="2", status=500)
    elif how == "invalid-policy":
        rig.publish(domain, "version: STSv1\nmode: enforced\n", id="2")
    elif how == "dns-servfail":
        rig.dns.fault(f"_mta-sts.{domain}", "servfail")
    elif how == "record-gone":
        rig.dns.remove(f"_mta-sts.{domain}")


@pytest.mark.parametrize("how", ["certificate", "http-500", "invalid-policy", "dns-servfail", "record-gone"])
def test_failure_never_replaces_or_downgrades_a_good_policy(rig, make_resolver, clock, how):
    domain = rig.domain()
    rig.publish(domain)
    resolver = make_resolver()
    first = resolver.resolve(domain).decision
    clock.advance(2 * 3600)
    _break(rig, domain, how)
    try:
        result = warm_one(resolver, domain, clock)
        assert result.outcome is (Outcome.KEPT if how == "record-gone" else Outcome.FAILED)
        assert kinds(result) == [AlertKind.ENFORCE_NOT_REFRESHED]
        line = result.alerts[0].line()
        assert line.startswith(f"ALERT kind=enforce-not-refreshed domain={domain} detail=id=1 expires ")
        stored = stored_entry(resolver.cache.path, domain)
        assert stored.policy_id == "1" and stored.policy.mode is Mode.ENFORCE
        assert stored.fetched_at == first.fetched_at and stored.usable_policy(clock.now) is not None
        if how == "record-gone":
            return  # a vanished record is no reason to back off
        # Back-off: the next run does not ask again (and still alerts); --force does.
        assert stored.retry_after > clock.now
        asked = rig.dns.count(f"_mta-sts.{domain}")
        skipped = warm_one(resolver, domain, clock)
        assert skipped.outcome is Outcome.SKIPPED and kinds(skipped) == [AlertKind.ENFORCE_NOT_REFRESHED]
        assert rig.dns.count(f"_mta-sts.{domain}") == asked
        forced = warm_one(resolver, domain, clock, WarmOptions(jitter=0, force=True))
        assert forced.outcome is Outcome.FAILED and rig.dns.count(f"_mta-sts.{domain}") > asked
        assert resolver.cache.reload(domain).policy_id == "1"
    finally:
        rig.dns.fault(f"_mta-sts.{domain}", None)


@pytest.mark.parametrize("mode", ["enforce", "testing", "none"])
def test_vanished_record_is_the_same_outcome_for_every_mode(rig, make_resolver, clock, mode):
    """RFC 8461 §5.1: a vanished TXT record keeps the cached policy whatever its mode: the outcome
    is `kept` for all three (not a failure: §8.3 withdraws a policy so); only enforce alerts."""
    domain = rig.domain()
    body = ENFORCE if mode == "enforce" else TESTING if mode == "testing" else NONE
    rig.publish(domain, body)
    resolver = make_resolver()
    resolver.resolve(domain)
    clock.advance(2 * 3600)
    rig.dns.remove(f"_mta-sts.{domain}")
    result = warm_one(resolver, domain, clock)
    assert result.outcome is Outcome.KEPT and result.mode is Mode(mode)
    assert result.detail.startswith("no-record: ") and "keeping id 1 until " in result.detail
    assert kinds(result) == ([AlertKind.ENFORCE_NOT_REFRESHED] if mode == "enforce" else [])
    assert resolver.cache.reload(domain).usable_policy(clock.now).mode is Mode(mode)


def test_selection_hints_and_cheap_negative_recheck(rig, make_resolver, clock):
    recent, old, negative, hinted = (rig.domain(label) for label in ("recent", "old", "neg", "hint"))
    for domain in (recent, old, hinted):
        rig.publish(domain)
    resolver = make_resolver()
    for domain in (recent, old, negative):
        resolver.resolve(domain)
    resolver.cache.touch({recent: clock.now, negative: clock.now, old: clock.now - 30 * DAY})
    clock.advance(DAY)
    def entries():
        return resolver.cache.entries()

    assert select_domains(entries(), clock.now, NOW) == sorted([recent, negative])
    assert select_domains(entries(), clock.now, WarmOptions(all_policies=True)) == sorted([recent, old, negative])
    assert select_domains(entries(), clock.now, WarmOptions(recent=0), [hinted]) == [hinted]
    # A domain without a policy is re-checked with one TXT query, no HTTPS.
    txt = rig.dns.count(f"_mta-sts.{negative}", "TXT")
    result = warm_one(resolver, negative, clock)
    assert result.outcome is Outcome.UNCHANGED and result.detail == "no policy (no-record)"
    assert rig.dns.count(f"_mta-sts.{negative}", "TXT") == txt + 1 and rig.https.count(negative) == 0
    rig.publish(negative)
    result = warm_one(resolver, negative, clock)
    assert result.outcome is Outcome.CHANGED and result.alerts == () and "first policy" in result.detail
    first = warm_one(resolver, hinted, clock)
    assert first.outcome is Outcome.CHANGED and first.mode is Mode.ENFORCE
    resolver.overrides = {old: make_override(old, "ignore", reason="broken policy host")}
    assert warm_one(resolver, old, clock).outcome is Outcome.SKIPPED


# ----- the command ---------------------------------------------------------------------------------


def command(config: str, *args: str) -> list[str]:
    return cli_command("warm", "--config", config, *args)


def run_warm(config: str, *args: str) -> subprocess.CompletedProcess:
    return run_cli("warm", "--config", config, *args)


def consistent_entries(path: Path) -> dict:
    """The cache file passes SQLite's integrity check and every row reads back."""
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    cache = PolicyCache(str(path))
    try:
        return {entry.domain: entry for entry in cache.entries()}
    finally:
        cache.close()


def test_command_hint_list_summary_alerts_and_exit_codes(rig, tmp_path):
    good, bad = rig.domain(), rig.domain()
    rig.publish(good)
    rig.publish(bad)
    hints = tmp_path / "hints.txt"
    hints.write_text(f"# big providers\n{good}\n\n{bad.upper()}.  # trailing comment\nnot a domain\n")
    config = write_config(rig, tmp_path, tmp_path / "cli.sqlite3")
    refused = run_warm(config, "--domains", str(hints), "--jitter", "0")
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr == f"mtasts-policyd warm: {hints}:5: not a domain name: 'not a domain'\n"
    untouched = PolicyCache(str(tmp_path / "cli.sqlite3"))
    assert not list(untouched.entries())  # nothing started
    untouched.close()
    hints.write_text(f"# big providers\n{good}\n\n{bad.upper()}.  # trailing comment\n{good}\n")
    first = run_warm(config, "--domains", str(hints), "--jitter", "0")
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == [
        "warm: 2 domains, refreshed 0, unchanged 0, changed 2, kept 0, failed 0, skipped 0, alerts 0"]
    assert "ALERT" not in first.stderr and "\r" not in first.stderr  # no progress without a terminal
    rig.publish(bad, cert="untrusted")
    second = run_warm(config, "--all", "-v", *FAST)
    assert second.returncode == 1
    [alert] = [line for line in second.stderr.splitlines() if line.startswith("ALERT")]
    assert alert.startswith(f"ALERT kind=enforce-not-refreshed domain={bad} detail=id=1 expires ")
    assert "certificate-invalid" in alert
    lines = second.stdout.splitlines()
    assert any(line.startswith(f"warm domain={good} outcome=refreshed id=1 mode=enforce") for line in lines)
    assert any(line.startswith(f"warm domain={bad} outcome=failed id=1 mode=enforce") for line in lines)
    assert lines[-1] == "warm: 2 domains, refreshed 1, unchanged 0, changed 0, kept 0, failed 1, skipped 0, alerts 1"
    # Hint-list domains never count as looked up: without --all or the list, nothing is selected.
    third = run_warm(config, "--jitter", "0")
    assert third.returncode == 0 and third.stdout.startswith("warm: 0 domains,")


def test_command_usage_errors(rig, tmp_path):
    config = write_config(rig, tmp_path, tmp_path / "usage.sqlite3")
    for args in (["--concurrency", "0"], ["--jitter", "-1"], ["--recent", "soon"],
                 ["--domains", str(tmp_path / "missing.txt")]):
        result = run_warm(config, *args)
        assert result.returncode == 2, (args, result.stderr)
        assert "warm" in result.stderr and "Traceback" not in result.stderr


def test_progress_only_on_a_terminal(rig, tmp_path):
    domain = rig.domain()
    rig.publish(domain)
    config = write_config(rig, tmp_path, tmp_path / "tty.sqlite3")
    master, slave = os.openpty()
    try:
        result = subprocess.run(command(config, "--domains", "-", "--jitter", "0"), cwd=ROOT, input=f"{domain}\n",
                                stdout=subprocess.PIPE, stderr=slave, text=True, timeout=60, check=False)
    finally:
        os.close(slave)
    output = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        output += chunk
    os.close(master)
    assert result.returncode == 0
    assert f"\r[1/1] {domain}".encode() in output
    assert result.stdout.startswith("warm: 1 domains, refreshed 0, unchanged 0, changed 1,")


def _republish(rig, domains: list[str], body: str, id: str, delay: float = 0.0) -> None:
    for domain in domains:  # the policy first, then the id (as RFC 8461 §8.1 tells domain owners)
        rig.https.set_policy(domain, body.format(d=domain), delay=delay)
        rig.publish(domain, body, id=id, delay=delay)


def test_killed_mid_run_leaves_a_consistent_cache(rig, tmp_path):
    domains = [rig.domain("kill") for _ in range(40)]
    _republish(rig, domains, ENFORCE, "1")
    cache = tmp_path / "kill.sqlite3"
    config = write_config(rig, tmp_path, cache)
    hints = tmp_path / "hints.txt"
    hints.write_text("\n".join(domains) + "\n")
    assert run_warm(config, "--domains", str(hints), "--jitter", "0", "--concurrency", "16").returncode == 0
    _republish(rig, domains, V2, "2", delay=0.25)
    process = subprocess.Popen(command(config, "--all", "--concurrency", "4", *FAST), cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with sqlite3.connect(cache, timeout=5) as db:
                done = db.execute("SELECT count(*) FROM policies WHERE policy_id = '2'").fetchone()[0]
            if done >= 6:
                break
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        assert process.wait(timeout=10) == -signal.SIGKILL
    entries = consistent_entries(cache)
    assert sorted(entries) == sorted(domains)
    now = time.time()
    for entry in entries.values():  # nothing lost or downgraded, and each row is one whole write
        assert entry.usable_policy(now) is not None and entry.policy.mode is Mode.ENFORCE
        assert entry.policy.max_age == {"1": 86400, "2": 86401}[entry.policy_id]
    moved = sum(entry.policy_id == "2" for entry in entries.values())
    assert 6 <= moved < len(domains)  # killed mid-run
    _republish(rig, domains, V2, "2")
    rest = run_warm(config, "--all", "--concurrency", "16", "--jitter", "0")
    assert rest.returncode == 0, rest.stderr
    assert all(entry.policy_id == "2" for entry in consistent_entries(cache).values())


def test_two_warmers_at_once(rig, tmp_path):
    domains = [rig.domain("two") for _ in range(20)]
    _republish(rig, domains, ENFORCE, "1", delay=0.05)
    cache = tmp_path / "two.sqlite3"
    config = write_config(rig, tmp_path, cache)
    hints = tmp_path / "hints.txt"
    hints.write_text("\n".join(domains) + "\n")

    def both(*args: str) -> None:
        processes = [subprocess.Popen(command(config, *args), cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True) for _ in range(2)]
        for process in processes:
            out, err = process.communicate(timeout=60)
            assert process.returncode == 0, err
            assert out.startswith("warm: 20 domains,")
            # Under load a slow fetch may log a warning; errors, locks and crashes never.
            assert not any(word in err for word in ("ERROR", "locked", "Traceback", "ALERT")), err

    both("--domains", str(hints), "--jitter", "0")  # both insert the same new rows
    assert {e.policy_id for e in consistent_entries(cache).values()} == {"1"}
    _republish(rig, domains, V2, "2", delay=0.05)
    both("--all", *FAST)
    entries = consistent_entries(cache)
    assert sorted(entries) == sorted(domains)
    assert all(e.policy_id == "2" and e.policy.max_age == 86401 for e in entries.values())


def test_daemon_and_warmer_on_one_cache_lose_no_update(rig, start_daemon, tmp_path):
    domains = [rig.domain("busy") for _ in range(20)]
    for domain in domains:
        rig.publish(domain, ENFORCE, id="1", ttl=1, delay=0.02)
    cache = tmp_path / "busy.sqlite3"
    # A one-second TXT TTL: the hammered daemon refreshes in the background all the time too.
    daemon = start_daemon(cache_path=cache, resolver={"txt_ttl_min": 1, "txt_ttl_max": 1})
    config = write_config(rig, tmp_path, cache)
    client = SocketmapClient(daemon.port)
    assert all(client.ask(domain).startswith("OK secure") for domain in domains)  # all cached now
    client.close()
    asked, answers, stop = [0], [], threading.Event()

    def hammer() -> None:
        client = SocketmapClient(daemon.port)
        try:
            while not stop.is_set() and asked[0] < 200000:
                domain = domains[asked[0] % len(domains)]
                asked[0] += 1
                answers.append(client.ask(domain))
        finally:
            client.close()

    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        first = run_warm(config, "--all", *FAST)
        second = subprocess.Popen(command(config, "--all", *FAST), cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        time.sleep(0.2)
        for domain in domains:  # ids change while the second warmer and the daemon are at work
            rig.https.set_policy(domain, V2.format(d=domain), delay=0.02)
            rig.publish(domain, V2, id="2", ttl=1, delay=0.02)
        out, err = second.communicate(timeout=60)
        third = run_warm(config, "--all", *FAST)
        time.sleep(1.5)  # the daemon keeps refreshing from its (possibly stale) copies
    finally:
        stop.set()
        thread.join(timeout=30)
    assert daemon.stop() == 0
    for result in (first, third):
        assert result.returncode == 0 and result.stderr == "", result.stderr
    assert second.returncode == 0 and err == "", err
    for summary in (first.stdout, out, third.stdout):
        assert summary.startswith("warm: 20 domains,") and "failed 0, skipped 0, alerts 0" in summary
    # The daemon answered every lookup, and every answer was the enforce policy.
    assert asked[0] == len(answers) > 100
    assert all(answer is not None and answer.startswith("OK secure match=") for answer in answers)
    logs = daemon.logs()
    for bad in ("ERROR", "Traceback", "locked", "not stored"):
        assert bad not in logs
    # No lost update: the newest id (and its body) everywhere, on disk.
    entries = consistent_entries(cache)
    assert sorted(entries) == sorted(domains)
    assert all(e.policy_id == "2" and e.policy.max_age == 86401 for e in entries.values())


def test_withdrawn_policy_is_not_a_failure(rig, make_resolver, clock):
    domain = rig.domain()
    rig.publish(domain, NONE)  # RFC 8461 §8.3: mode none first, then the record goes
    resolver = make_resolver()
    resolver.resolve(domain)
    clock.advance(2 * 3600)
    rig.dns.remove(f"_mta-sts.{domain}")
    result = warm_one(resolver, domain, clock)
    assert result.outcome is Outcome.KEPT and result.alerts == () and result.mode is Mode.NONE
