"""The command line: `query` output and exit codes, config errors, --help."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml

from tests.conftest import ROOT, secure


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mtasts_policyd", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def write_config(rig, tmp_path) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(rig.config(tmp_path / "cache.sqlite3")))
    return str(path)


def test_query_json_explains_each_domain(rig, tmp_path):
    enforce, nothing, broken = rig.domain(), rig.domain(), rig.domain()
    rig.publish(enforce, id="abc123")
    rig.publish(broken, cert="untrusted")
    result = run("query", "--config", write_config(rig, tmp_path), "--json", enforce, nothing, broken, ".x")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert rows[0]["answer"] == "OK " + secure(enforce)
    assert rows[0]["mode"] == "enforce" and rows[0]["policy_id"] == "abc123"
    assert rows[0]["txt_record"] == "v=STSv1; id=abc123" and rows[0]["max_age"] == 86400
    assert rows[0]["mx"] == [f"mx1.{enforce}", f"*.mx.{enforce}"] and rows[0]["cache"] == "miss"
    assert rows[0]["fetched_at"] and rows[0]["expires_at"]
    assert rows[1]["answer"] == "NOTFOUND " and rows[1]["failure"]["kind"] == "no-record"
    assert rows[2]["failure"]["kind"] == "certificate-invalid"
    assert rows[2]["failure"]["tlsrpt_result_type"] == "sts-webpki-invalid"
    assert rows[3] == {"key": ".x", "answer": "NOTFOUND ", "reason": "not-a-policy-domain"}


def test_query_names_the_trust_store(rig, tmp_path):
    """The store that verifies (or verified) the policy host, so a certificate-invalid failure can be
    read against it: JSON object and human line (README "Trust store")."""
    domain = rig.domain()
    rig.publish(domain)
    config = write_config(rig, tmp_path)
    row = json.loads(run("query", "--config", config, "--json", domain).stdout)
    assert row["trust_store"] == {"kind": "fetch.ca_file", "cafile": rig.https.ca_file, "capath": None, "cas": 1,
                                  "notes": []}
    lines = run("query", "--config", config, domain).stdout.splitlines()
    assert f"  trust_store: fetch.ca_file cafile={rig.https.ca_file} cas=1" in lines


def test_query_second_time_is_a_cache_hit(rig, tmp_path):
    domain = rig.domain()
    rig.publish(domain)
    config = write_config(rig, tmp_path)
    run("query", "--config", config, domain)
    before = len(rig.https.requests)
    result = run("query", "--config", config, domain)
    assert result.returncode == 0
    assert result.stdout.splitlines()[0] == f"{domain}: OK {secure(domain)}"
    assert "  cache: hit" in result.stdout and "  mode: enforce" in result.stdout
    assert len(rig.https.requests) == before


def test_usage_errors_exit_nonzero(tmp_path):
    assert run("query").returncode == 2
    assert run("serve", "--socketmap", "nonsense").returncode == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("dns: {nameserver: [127.0.0.1]}\n")
    result = run("query", "--config", str(bad), "example.test")
    assert result.returncode == 2 and "unknown key(s) nameserver" in result.stderr


def test_help_explains(tmp_path):
    result = run("--help")
    assert result.returncode == 0 and "socketmap" in result.stdout and "query" in result.stdout
    assert "--socketmap" in run("serve", "--help").stdout
    assert "doctor" in result.stdout and "--postconf-dir" in run("doctor", "--help").stdout
