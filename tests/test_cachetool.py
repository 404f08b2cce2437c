"""`mtasts-policyd cache ...`: list, show, forget, export/import, also next to a running daemon."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest

from mtasts_policyd.core.errors import Failure, FailureKind
from mtasts_policyd.core.policy import parse_policy
from mtasts_policyd.store.cache import PolicyCache
from mtasts_policyd.store.codec import entry_from_record
from mtasts_policyd.store.entry import Entry
from tests.bodies import ENFORCE_ONE_MX, NONE, TESTING_TWO_WARNINGS
from tests.conftest import SocketmapClient, write_config
from tests.conftest import run_cli as run


def run_all(*commands: tuple[str, ...]) -> list[subprocess.CompletedProcess]:
    """Independent read-only commands side by side (the suite must stay fast)."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(lambda command: run(*command), commands))


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_list_show_forget(rig, tmp_path):
    enforce, testing, nothing, broken = rig.domain(), rig.domain(), rig.domain(), rig.domain()
    rig.publish(enforce, id="abc123")
    rig.publish(testing, TESTING_TWO_WARNINGS, id="t1")
    rig.publish(broken, cert="untrusted")
    config = write_config(rig, tmp_path)
    assert run("query", "--config", config, enforce, testing, nothing, broken).returncode == 0

    listed, listed_json, only_enforce, only_failing, shown, text, missing, absent = run_all(
        ("cache", "list", "--config", config), ("cache", "list", "--config", config, "--json"),
        ("cache", "list", "--config", config, "--json", "--mode", "enforce"),
        ("cache", "list", "--config", config, "--state", "failing"),
        ("cache", "show", enforce.upper() + ".", testing, "--config", config, "--json"),
        ("cache", "show", broken, "--cache", str(tmp_path / "cache.sqlite3")),
        ("cache", "show", "never.example.test", "--config", config),
        ("cache", "list", "--cache", str(tmp_path / "nope.sqlite3")))
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split()[:3] == ["DOMAIN", "STATE", "POLICY"] and len(rows) == 4
    expect = {enforce: ("enforce", "abc123", "-"), testing: ("testing", "t1", "-"),
              nothing: ("no-policy", "-", "no-record"), broken: ("failing", "-", "certificate-invalid")}
    for row in rows:
        domain = row.split()[0]
        state, policy_id, failure = expect[domain]
        # aligned columns: every cell starts where its header does
        assert row[header.index("STATE"):].startswith(state + " ")
        assert row[header.index("POLICY ID"):].startswith(policy_id + " ")
        assert row[header.index("LAST FAILURE"):] == failure
        assert row[header.index("EXPIRES"):].startswith("-" if domain == broken else "20")

    by_domain = {r["domain"]: r for r in json_lines(listed_json.stdout)}
    assert by_domain[enforce]["state"] == "enforce" and by_domain[enforce]["expires_at"].endswith("+00:00")
    assert by_domain[broken]["failure"] == "certificate-invalid" and by_domain[broken]["retry_after"]
    assert [r["domain"] for r in json_lines(only_enforce.stdout)] == [enforce]
    assert only_failing.stdout.splitlines()[1].split()[0] == broken

    shown = json_lines(shown.stdout)
    assert shown[0]["domain"] == enforce and shown[0]["txt_record"] == "v=STSv1; id=abc123"
    assert shown[0]["mx"] == [f"mx1.{enforce}", f"*.mx.{enforce}"] and shown[0]["max_age"] == 86400
    assert shown[0]["mx_hosts"] == [f"mx1.{enforce}", f"a.mx.{enforce}"]
    assert shown[0]["fetched_at"] and shown[0]["expires_at"] and shown[0]["failures"] == 0
    assert "mode: enforce" in shown[0]["policy_body"] and shown[0]["failure"] is None
    assert shown[1]["mode"] == "testing" and len(shown[1]["warnings"]) == 2
    text = text.stdout
    assert "  state: failing" in text and "  failure: certificate-invalid: " in text
    assert "  failures: 1" in text and "  retry_after: 20" in text and "  policy_body: -" in text

    assert missing.returncode == 1 and "never.example.test is not cached" in missing.stderr

    bad = run("cache", "forget", testing, "not a name", "--config", config)
    assert bad.returncode == 1 and "not a domain name" in bad.stderr
    forgot = run("cache", "forget", enforce, "never.example.test", "--config", config)
    assert forgot.returncode == 1 and "never.example.test was not cached" in forgot.stderr
    assert f"forgot {enforce} (enforce, policy id abc123)" in forgot.stdout
    assert "enforce policy" in forgot.stderr and "not protected" in forgot.stderr
    gone, kept = run_all(("cache", "show", enforce, "--config", config), ("cache", "show", testing, "--config", config))
    assert gone.returncode == 1 and kept.returncode == 0  # the bad name stopped everything

    assert absent.returncode == 1 and "no cache file" in absent.stderr
    assert not (tmp_path / "nope.sqlite3").exists()


def test_export_import_round_trip(rig, tmp_path):
    domains = [rig.domain() for _ in range(6)]
    enforce, testing, none, nothing, broken, failing_refresh = domains
    idn = f"xn--bcher-kva.{rig.domain()}"
    rig.publish(enforce)
    rig.publish(testing, TESTING_TWO_WARNINGS)
    rig.publish(none, NONE)
    rig.publish(broken, cert="untrusted")
    rig.publish(failing_refresh, ENFORCE_ONE_MX)
    rig.publish(idn)
    config = write_config(rig, tmp_path)
    assert run("query", "--config", config, *domains, idn.replace("xn--bcher-kva", "bücher")).returncode == 0
    cache = PolicyCache(str(tmp_path / "cache.sqlite3"))
    now = time.time()
    entry = cache.get(failing_refresh)  # a usable policy whose refresh failed since
    assert cache.put(replace(entry, failure=Failure(FailureKind.FETCH_ERROR, "HTTP 503"), failure_at=now,
                             failures=2, retry_after=now + 600)) is not None
    cache.touch({enforce: now - 10, nothing: now - 20})
    cache.close()
    domains.append(idn)

    exported, to_stdout = run_all(("cache", "export", str(tmp_path / "export.json"), "--config", config),
                                  ("cache", "export", "--config", config))
    assert exported.returncode == 0 and "exported 7 entries" in exported.stderr
    document = json.loads((tmp_path / "export.json").read_text())
    assert document["format"] == "mtasts-policyd-cache" and document["version"] == 1
    records = {r["domain"]: r for r in document["entries"]}
    assert parse_policy(records[testing]["policy_body"].encode()).warnings  # the raw body, not a re-rendering
    assert json.loads(to_stdout.stdout)["entries"] == document["entries"]

    fresh = str(tmp_path / "fresh" / "cache.sqlite3")
    imported = run("cache", "import", str(tmp_path / "export.json"), "--cache", fresh)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.startswith("imported 7, kept 0 ") and "invalid 0" in imported.stdout
    results = run_all(*[("cache", *args, *where) for args in (["show", *domains, "--json"], ["list", "--json"])
                        for where in (["--config", config], ["--cache", fresh])])
    for before, after in (results[0:2], results[2:4]):
        assert before.returncode == after.returncode == 0
        assert before.stdout == after.stdout and len(before.stdout.splitlines()) == 7
    shown = {r["domain"]: r for r in json_lines(results[1].stdout)}
    assert shown[failing_refresh]["state"] == "enforce" and shown[failing_refresh]["failure"]["kind"] == "fetch-error"
    assert shown[nothing]["state"] == "no-policy" and shown[enforce]["last_lookup"]
    assert shown[broken]["state"] == "failing" and shown[none]["mode"] == "none"

    again = run("cache", "import", "-", "--cache", fresh, input=(tmp_path / "export.json").read_text())
    assert again.returncode == 0 and again.stdout.startswith("imported 0, kept 7 ")
    assert json.loads(run("cache", "export", "--cache", fresh).stdout)["entries"] == document["entries"]


def _record(domain: str, policy_id: str, fetched_at: float, **fields: object) -> dict:
    body = ENFORCE_ONE_MX.format(d=domain)
    return {"domain": domain, "txt_record": f"v=STSv1; id={policy_id}", "policy_id": policy_id,
            "policy_body": body, "fetched_at": fetched_at, **fields}


def test_import_keeps_newer_policies_and_rejects_invalid_records(tmp_path):
    path = tmp_path / "cache.sqlite3"
    now = time.time()
    cache = PolicyCache(str(path))
    for domain, policy_id, fetched_at in (("newer.test", "2", now - 100), ("older.test", "1", now - 5000)):
        body = ENFORCE_ONE_MX.format(d=domain).encode()
        cache.put(Entry(domain, f"v=STSv1; id={policy_id}", policy_id, body, parse_policy(body), fetched_at))
    cache.close()
    entries = [
        _record("newer.test", "1", now - 1000),  # older than the stored fetch: kept
        _record("older.test", "3", now - 50),  # newer: replaces
        _record("Fresh.TEST.", "9", now - 10, last_lookup=now),  # normalised to fresh.test
        {"domain": "negative.test", "negative_until": now + 60, "failure": {"kind": "no-record", "detail": "x"}},
        _record("not a domain", "1", now),
        _record("enforced.test", "1", now, policy_body="version: STSv1\nmode: enforced\nmx: a.test\nmax_age: 1\n"),
        _record("binary.test", "1", now, policy_body="//4=", policy_body_encoding="base64"),
        _record("future.test", "1", now + 86400),
        {**_record("mismatch.test", "1", now), "policy_id": "2"},
        _record("kind.test", "1", now, failure={"kind": "bad-weather", "detail": ""}),
        _record("typo.test", "1", now, fetchd_at=now),
        "not an object",
        {"domain": "empty.test"},  # nothing to import
        {"domain": "zeros.test", "negative_until": 0, "failure": None, "policy_body": None},
    ]
    (tmp_path / "in.json").write_text(json.dumps({"format": "mtasts-policyd-cache", "version": 1,
                                                  "entries": entries}))
    (tmp_path / "junk.json").write_text("{not json")
    (tmp_path / "v2.json").write_text(json.dumps({"format": "mtasts-policyd-cache", "version": 2, "entries": []}))
    dry, junk, future = run_all(*[("cache", "import", str(tmp_path / name), "--cache", str(path), "--dry-run")
                                  for name in ("in.json", "junk.json", "v2.json")])
    assert dry.returncode == 1 and "4 valid, 10 invalid" in dry.stdout  # and nothing written: see below
    assert junk.returncode == 1 and "is not JSON" in junk.stderr
    assert future.returncode == 1 and "format version 2" in future.stderr
    result = run("cache", "import", str(tmp_path / "in.json"), "--cache", str(path))
    assert result.returncode == 1
    assert result.stdout.startswith("imported 3, kept 1 ") and "invalid 10" in result.stdout
    for number, words in ((5, "not a domain name"), (6, "not a valid policy"), (7, "not UTF-8"), (8, "future"),
                          (9, "is not the id of txt_record"), (10, "unknown failure kind"),
                          (11, "unknown key(s) fetchd_at"), (12, "not a JSON object"),
                          (13, "holds nothing to import"), (14, "holds nothing to import")):
        assert words in next(line for line in result.stderr.splitlines() if re.search(rf"record #{number}\b", line))
    shown = {r["domain"]: r for r in json_lines(run("cache", "show", "newer.test", "older.test", "fresh.test",
                                                    "negative.test", "--json", "--cache", str(path)).stdout)}
    assert shown["newer.test"]["policy_id"] == "2" and shown["older.test"]["policy_id"] == "3"
    assert shown["fresh.test"]["state"] == "enforce" and shown["negative.test"]["state"] == "no-policy"
    assert run("cache", "show", "enforced.test", "--cache", str(path)).returncode == 1


def test_import_checks_a_bare_policy_id_as_an_id():
    # RFC 8461 §3.1: an id is 1-32 letters and digits. A policy_id without txt_record is checked
    # alone, not spliced into a record where ";id=2" would become a second, ignored field.
    now = time.time()
    failure = {"kind": "fetch-error", "detail": "x"}
    assert entry_from_record({"domain": "a.test", "policy_id": "abc1", "failure": failure}, now).policy_id == "abc1"
    for bad in ("1;id=2", "1 x", "", "a-b"):
        with pytest.raises(ValueError, match="policy_id: id is not 1-32 letters and digits"):
            entry_from_record({"domain": "a.test", "policy_id": bad}, now)


def test_forget_takes_effect_in_a_running_daemon(rig, start_daemon, tmp_path):
    domain = rig.domain()
    rig.publish(domain)
    daemon = start_daemon(cache_path=tmp_path / "shared.sqlite3")
    client = SocketmapClient(daemon.port)
    try:
        assert client.ask(domain).startswith("OK secure")
        assert client.ask(domain).startswith("OK secure") and rig.https.count(domain) == 1
        forgot = run("cache", "forget", domain, "--config", str(daemon.config_path))
        assert forgot.returncode == 0, forgot.stderr
        deadline = time.monotonic() + 3.0  # the daemon checks PRAGMA data_version once a second
        while rig.https.count(domain) == 1 and time.monotonic() < deadline:
            assert client.ask(domain).startswith("OK secure")
            time.sleep(0.05)
        assert rig.https.count(domain) == 2, "the daemon kept answering from memory after `cache forget`"
    finally:
        client.close()
    assert run("cache", "show", domain, "--config", str(daemon.config_path)).returncode == 0  # cached again


def test_list_while_the_daemon_writes(rig, start_daemon, tmp_path):
    daemon = start_daemon(cache_path=tmp_path / "busy.sqlite3")
    stop, asked = threading.Event(), []

    def lookups() -> None:  # each new domain is a DNS query and a cache write in the daemon
        client = SocketmapClient(daemon.port)
        try:
            while not stop.is_set():
                asked.append(client.ask(rig.domain("busy")))
        finally:
            client.close()

    writer = threading.Thread(target=lookups)
    writer.start()
    try:
        while len(asked) < 5:
            time.sleep(0.01)
        results = []
        for args in (["list"], ["export"], ["list", "--json"]):
            before = len(asked)
            results.append(run("cache", *args, "--config", str(daemon.config_path)))
            assert len(asked) > before  # the daemon did write meanwhile
    finally:
        stop.set()
        writer.join(timeout=10)
    for result in results:
        assert result.returncode == 0 and "locked" not in result.stderr, result.stderr
    assert len(results[-1].stdout.splitlines()) > 5 and set(asked) == {"NOTFOUND "}
    assert "locked" not in daemon.logs()
