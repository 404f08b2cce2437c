"""`mtasts-policyd tlsrpt ingest|build|show` as an operator runs them: real files, the test DNS server
answering `_smtp._tls`, the recorded Postfix 3.7 log (tests/test_tlsrpt_postfix.py)."""

from __future__ import annotations

import datetime
import gzip
import json
import os
import re
from contextlib import closing

import pytest

from mtasts_policyd.core.policy import parse_policy
from mtasts_policyd.ops.tlsrpt_build import report_identity
from mtasts_policyd.ops.tlsrpt_postfix import parse_syslog
from mtasts_policyd.store.cache import PolicyCache
from mtasts_policyd.store.entry import Entry
from tests.conftest import free_port, write_config
from tests.conftest import run_cli as run
from tests.test_tlsrpt_postfix import RECORDED

FIRST = parse_syslog(RECORDED.read_text().splitlines()[0], datetime.datetime.now(datetime.UTC))
assert FIRST is not None
WHEN = FIRST.when  # the recording's time as this run reads it (the year is inferred from today)
DAY = datetime.datetime.fromtimestamp(WHEN, datetime.UTC).date()
ZONE = "e2e.test"


def fill_cache(path: str) -> None:
    """The daemon's cache as during the recording: enforce and testing policies, nothing for the rest."""
    with closing(PolicyCache(path)) as cache:
        for mode in ("enforce", "testing"):
            for behaviour in ("tls", "wrong-cert", "untrusted", "expired", "self-signed", "no-starttls",
                              "starttls-refused", "handshake-abort", "fallback"):
                domain = f"x-{mode}-{behaviour}.{ZONE}"
                body = f"version: STSv1\nmode: {mode}\nmx: *.{domain}\nmax_age: 86400\n".encode()
                assert cache.put(Entry(domain, txt_record="v=STSv1; id=1", policy_id="1", policy_body=body,
                                       policy=parse_policy(body), fetched_at=WHEN - 60)) is not None


@pytest.fixture
def setup(rig, tmp_path):
    config = write_config(rig, tmp_path, tlsrpt={"sender": "tlsrpt@reporter.example",
                                                 "organization_name": "Reporter Inc",
                                                 "sending_ips": ["192.0.2.1"]})
    fill_cache(str(tmp_path / "cache.sqlite3"))
    log = tmp_path / "mail.log"
    log.write_text(RECORDED.read_text())
    return config, str(log)


def test_ingest_counts_once(setup, tmp_path):
    config, log = setup
    result = run("tlsrpt", "ingest", "--config", config, "--postfix-log", log)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        "ingest: 95 lines, 24 sessions (certificate-expired 1, certificate-host-mismatch 2, certificate-not-trusted 4, "
        "starttls-not-supported 2, success 9, validation-failure 6), unparsed 0, local events (policy-map-error 1) "
        f"file={log}\n")
    assert (tmp_path / "tlsrpt.sqlite3").exists()  # default: beside the cache
    again = run("tlsrpt", "ingest", "--config", config, "--postfix-log", log)
    assert again.stdout.startswith("ingest: 0 lines, 0 sessions (none), unparsed 0, local events (none)")


def test_build_writes_one_report_per_domain_with_a_valid_record(rig, setup, tmp_path):
    config, log = setup
    rig.dns.set(f"_smtp._tls.x-enforce-expired.{ZONE}", "TXT", "v=TLSRPTv1; rua=mailto:tls@x-enforce-expired.e2e.test")
    rig.dns.set(f"_smtp._tls.x-testing-untrusted.{ZONE}", "TXT", "v=TLSRPTv1; rua=https://r.example/tls")
    rig.dns.set(f"_smtp._tls.x-nopol-tls.{ZONE}", "TXT", "v=TLSRPTv1; rua=mailto:a@x.example,https://r.example/t")
    rig.dns.set(f"_smtp._tls.x-enforce-tls.{ZONE}", "TXT", "v=TLSRPTv1;")  # invalid: no rua (RFC 8460 §3)
    assert run("tlsrpt", "ingest", "--config", config, "--postfix-log", log).returncode == 0
    output = tmp_path / "out"
    result = run("tlsrpt", "build", "--config", config, "--day", DAY.isoformat(), "--output", str(output))
    assert result.returncode == 0, result.stderr
    start = int(datetime.datetime.combine(DAY, datetime.time(0), datetime.UTC).timestamp())
    names = {f"reporter.example!x-enforce-expired.{ZONE}!{start}!{start + 86399}.json.gz",
             f"reporter.example!x-testing-untrusted.{ZONE}!{start}!{start + 86399}.json.gz",
             f"reporter.example!x-nopol-tls.{ZONE}!{start}!{start + 86399}.json.gz"}
    assert set(os.listdir(output)) == names
    lines = result.stdout.splitlines()
    assert f"skipped domain=x-enforce-tls.{ZONE} detail=invalid-record: record has no rua= field (RFC 8460 §3: " \
           f"rua is required)" in lines
    assert any(line.startswith(f"skipped domain=x-enforce-wrong-cert.{ZONE} detail=no-record: ") for line in lines)
    assert lines[-1] == f"build: {DAY}: 3 built, 18 skipped (no valid TLSRPT record), 0 failed"
    built = next(line for line in lines if f"domain=x-testing-untrusted.{ZONE}" in line)
    assert built.endswith("successful=0 failed=1 rua=https://r.example/tls")
    report = json.loads(gzip.decompress((output / f"reporter.example!x-testing-untrusted.{ZONE}!{start}!"
                                                  f"{start + 86399}.json.gz").read_bytes()))
    assert report == {
        "organization-name": "Reporter Inc",
        "date-range": {"start-datetime": f"{DAY}T00:00:00Z", "end-datetime": f"{DAY}T23:59:59Z"},
        "contact-info": "tlsrpt@reporter.example",
        "report-id": f"{DAY:%Y%m%d}.x-testing-untrusted.{ZONE}@reporter.example",
        "policies": [{
            "policy": {"policy-type": "sts",
                       "policy-string": ["version: STSv1", "mode: testing", f"mx: *.x-testing-untrusted.{ZONE}",
                                         "max_age: 86400"],
                       "policy-domain": f"x-testing-untrusted.{ZONE}", "mx-host": [f"*.x-testing-untrusted.{ZONE}"]},
            "summary": {"total-successful-session-count": 0, "total-failure-session-count": 1},
            "failure-details": [{"result-type": "certificate-not-trusted", "sending-mta-ip": "192.0.2.1",
                                 "receiving-mx-hostname": f"mx.x-testing-untrusted.{ZONE}", "receiving-ip": "127.0.0.32",
                                 "failed-session-count": 1, "failure-reason-code": "untrusted-tls-connection"}]}]}
    nopol = json.loads(gzip.decompress(next(output.glob("*x-nopol-tls*")).read_bytes()))
    assert nopol["policies"] == [{"policy": {"policy-type": "no-policy-found", "policy-domain": f"x-nopol-tls.{ZONE}"},
                                  "summary": {"total-successful-session-count": 1, "total-failure-session-count": 0}}]
    # Idempotent: a second build writes the same bytes under the same names.
    before = {name: (output / name).read_bytes() for name in names}
    assert run("tlsrpt", "build", "--config", config, "--day", DAY.isoformat(), "--output", str(output)).returncode == 0
    assert {name: (output / name).read_bytes() for name in os.listdir(output)} == before


def test_build_reports_a_dns_failure_and_exits_1(setup, tmp_path):
    config, log = setup
    assert run("tlsrpt", "ingest", "--config", config, "--postfix-log", log).returncode == 0
    silent = write_config_with_dead_dns(tmp_path)
    result = run("tlsrpt", "build", "--config", silent, "--day", DAY.isoformat(), "--output", str(tmp_path / "out"))
    assert result.returncode == 1
    assert re.search(r"^failed domain=x-enforce-tls\.e2e\.test detail=dns-temporary: ", result.stdout, re.M)
    assert result.stdout.splitlines()[-1] == f"build: {DAY}: 0 built, 0 skipped (no valid TLSRPT record), 21 failed"
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


def write_config_with_dead_dns(tmp_path) -> str:
    """The same cache and store, and a DNS server that does not answer."""
    path = tmp_path / "dead-dns.yaml"
    path.write_text(json.dumps({"dns": {"nameservers": ["127.0.0.1"], "port": free_port(), "timeout": 0.2},
                                "cache": {"path": str(tmp_path / "cache.sqlite3")},
                                "tlsrpt": {"sender": "tlsrpt@reporter.example"}}))
    return str(path)


def test_show_prints_the_counts_of_a_day(setup):
    config, log = setup
    assert run("tlsrpt", "ingest", "--config", config, "--postfix-log", log).returncode == 0
    result = run("tlsrpt", "show", "--config", config, "--day", DAY.isoformat(), "--domain", f"x-enforce-fallback.{ZONE}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"x-enforce-fallback.{ZONE} policy=sts mode=enforce successful=1 failed=1",
        f"  certificate-host-mismatch sessions=1 mx=mx1.x-enforce-fallback.{ZONE} ip=127.0.0.46 from=192.0.2.1",
        "local event=policy-map-error count=1 (ours, not reported)"]
    document = json.loads(run("tlsrpt", "show", "--config", config, "--day", DAY.isoformat(), "--json").stdout)
    assert len(document["domains"]) == 21 and document["local_events"] == {"policy-map-error": 1}
    assert document["unparsed"] == {}
    by_domain = {d["domain"]: d["policies"] for d in document["domains"]}
    assert by_domain[f"x-nopol-untrusted.{ZONE}"][0]["summary"] == {
        "total-successful-session-count": 1, "total-failure-session-count": 0}
    empty = run("tlsrpt", "show", "--config", config, "--day", "2001-01-01", "--domain", "example.com")
    assert empty.stdout == "example.com: no sessions on 2001-01-01\n"


def test_missing_files_are_errors_not_empty_results(rig, tmp_path):
    config = write_config(rig, tmp_path, create_cache=False, tlsrpt={"sender": "tlsrpt@reporter.example"})
    for action in (["show", "--day", "2025-01-01"], ["build", "--day", "2025-01-01"]):
        result = run("tlsrpt", *action, "--config", config)
        assert result.returncode == 1 and "no TLSRPT store at" in result.stderr, result.stderr
    log = tmp_path / "mail.log"
    log.write_text("")
    result = run("tlsrpt", "ingest", "--config", config, "--postfix-log", str(log))
    assert result.returncode == 1 and "no cache file at" in result.stderr
    PolicyCache(str(tmp_path / "cache.sqlite3")).close()
    result = run("tlsrpt", "ingest", "--config", config, "--postfix-log", str(tmp_path / "missing.log"))
    assert result.returncode == 1 and "cannot read" in result.stderr
    assert not (tmp_path / "tlsrpt.sqlite3").exists()
    assert run("tlsrpt", "show", "--config", config, "--day", "tomorrow").returncode == 2  # not a day


@pytest.mark.fast
def test_report_identity_defaults():
    who = report_identity(None, None, None, "mail.example.com")
    assert (who.organization_name, who.contact_info, who.submitter) == (
        "mail.example.com", "tlsrpt-noreply@mail.example.com", "mail.example.com")
    who = report_identity("Reports@Example.ORG", "Example Org", "https://example.org/tls", "host")
    assert (who.organization_name, who.contact_info, who.submitter) == (
        "Example Org", "https://example.org/tls", "example.org")
    with pytest.raises(ValueError, match="set tlsrpt.sender"):
        report_identity(None, None, None, "localhost")
