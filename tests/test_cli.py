"""The command line: `query` output and exit codes, config errors, --help."""

from __future__ import annotations

import json

from tests.conftest import ROOT, secure, write_config
from tests.conftest import run_cli as run


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


def test_query_shows_a_max_age_zero_policy_and_warnings(rig, tmp_path):
    # RFC 8461 §3.2: max_age 0. query resolves like the daemon: the fetch applies the policy (the
    # answer is OK) and it expires at its fetch time. Parser warnings are shown in both formats.
    domain = rig.domain()
    rig.publish(domain, "# generated\nversion: STSv1\nmode: enforce\nmx: mx1.{d}\nmx: *.mx.{d}\nmax_age: 0\n\n")
    config = write_config(rig, tmp_path)
    row = json.loads(run("query", "--config", config, "--json", domain).stdout)
    assert row["answer"] == "OK " + secure(domain) and row["cache"] == "miss" and row["usable"] is True
    assert row["max_age"] == 0 and row["expires_at"] == row["fetched_at"]
    assert row["warnings"] == ["line 1: comment line ignored", "line 7: empty line at the end ignored"]
    text = run("query", "--config", config, domain).stdout
    assert text.splitlines()[0] == f"{domain}: OK {secure(domain)}"  # fetched again: nothing cached
    assert "  warnings: line 1: comment line ignored; line 7: empty line at the end ignored" in text.splitlines()
    assert rig.https.count(domain) == 2


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


def test_query_human_output_has_no_python_reprs(rig, tmp_path):
    domain, broken = rig.domain(), rig.domain()
    rig.publish(domain)
    rig.publish(broken, cert="untrusted")
    result = run("query", "--config", write_config(rig, tmp_path), domain, broken)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert f"  mx: mx1.{domain} *.mx.{domain}" in lines
    assert "  usable: yes" in lines
    failure = next(line for line in lines if line.startswith("  failure: "))
    assert failure.startswith("  failure: certificate-invalid: certificate of mta-sts.")
    assert failure.endswith("(TLSRPT sts-webpki-invalid)")
    assert not any(mark in result.stdout for mark in ("{'", "['", "': ", "None", "True", "False"))


def test_commands_other_than_serve_never_create_the_cache(rig, tmp_path):
    """Only `serve` and `cache import` create a cache file: a typo must fail loudly, not warm nothing."""
    domain = rig.domain()
    rig.publish(domain)
    config = write_config(rig, tmp_path, create_cache=False)
    typo = tmp_path / "typo.sqlite3"
    result = run("query", "--config", config, domain)
    assert result.returncode == 1 and "no cache file at" in result.stderr and "--no-cache" in result.stderr
    result = run("warm", "--config", config, "--cache", str(typo))
    assert result.returncode == 1 and "ALERT kind=error" in result.stderr and "no cache file at" in result.stderr
    listing = tmp_path / "domains.txt"
    listing.write_text(domain + "\n")
    result = run("survey", "--config", config, "--update-cache", str(listing))
    assert result.returncode == 2 and "no cache file at" in result.stderr
    result = run("cache", "list", "--config", config)
    assert result.returncode == 1 and "no cache file at" in result.stderr
    assert not (tmp_path / "cache.sqlite3").exists() and not typo.exists()
    # --no-cache asks the network with an empty memory cache and still writes no file.
    result = run("query", "--config", config, "--no-cache", domain)
    assert result.returncode == 0 and result.stdout.startswith(f"{domain}: OK {secure(domain)}")
    assert not (tmp_path / "cache.sqlite3").exists()


def test_help_exim_example_fails_closed_like_contrib():
    """The --help example must defer on failure (no fail string) as contrib/exim/exim.conf does."""
    epilog = run("--help").stdout.split("exim", 1)[1]
    example = next(line.strip() for line in epilog.splitlines() if "${readsocket" in line)
    assert example == "${readsocket{inet:127.0.0.1:8462}{policy $domain\\n}{5s:cache=yes}{}}"
    contrib = (ROOT / "contrib" / "exim" / "exim.conf").read_text()
    assert "{policy $domain\\n}{5s:cache=yes}{}}" in contrib
