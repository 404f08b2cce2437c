"""`mtasts-policyd survey`: the real command against the rig (DNS + HTTPS on loopback).

One set of domains covers every outcome a survey can report: the three modes, no record, an
invalid TXT record, a DNS failure, fetch errors of different causes, a bad certificate, an
invalid policy, MX hosts outside the policy, and valid, invalid and absent TLSRPT records.
The same domains are surveyed in every format, so the formats are checked against each other.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pty
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from mtasts_policyd.ops.domainlist import parse_domain_list
from mtasts_policyd.ops.pool import run_bounded
from mtasts_policyd.store.cache import PolicyCache
from tests.bodies import ENFORCE_ONE_MX, NONE, TESTING_WEEK
from tests.conftest import ROOT, cli_command, write_config
from tests.conftest import run_cli as run

ENFORCED = "version: STSv1\nmode: enforced\nmx: mx1.{d}\nmax_age: 86400\n"  # corpus typo: invalid
# Accepted with two warnings (a comment line, an empty line at the end), as in corpus 0100/0141.
QUIRKS = "# managed by hand\nversion: STSv1\nmode: enforce\nmx: mx1.{d}\nmx: *.mx.{d}\nmax_age: 86400\n\n"
QUIRK_WARNINGS = ["line 1: comment line ignored", "line 7: empty line at the end ignored"]

ROLES = ("enforce", "testing", "mismatch", "none", "norecord", "badtxt", "servfail", "notfound",
         "nohost", "untrusted", "badpolicy", "quirks", "txtspace")
# What the summary must count for ROLES (each domain exactly once among the outcomes).
OUTCOMES = {"enforce": 3, "testing": 1, "none": 1, "no-record": 1, "invalid-record": 2, "dns-temporary": 1,
            "fetch-error": 2, "invalid-policy": 1, "certificate-invalid": 1}
TLSRPT = {"valid": 2, "no-record": 10, "invalid-record": 1, "dns-temporary": 0}


@dataclass
class World:
    d: dict[str, str]  # role -> domain
    tmp: Path
    config: Path
    cache: Path
    domains_file: Path


@pytest.fixture(scope="module")
def world(rig, tmp_path_factory) -> World:
    tmp = tmp_path_factory.mktemp("survey")
    d = {role: rig.domain(role) for role in ROLES}
    rig.publish(d["enforce"], id="e1")
    rig.dns.set(f"_smtp._tls.{d['enforce']}", "TXT", f"v=TLSRPTv1; rua=mailto:tls@{d['enforce']}, "
                                                      f"https://reports.{d['enforce']}/tlsrpt")
    rig.publish(d["testing"], TESTING_WEEK)
    rig.dns.set(f"_smtp._tls.{d['testing']}", "TXT", "v=TLSRPTv1;rua=mailto:")  # corpus: empty rua URI
    rig.publish(d["mismatch"], ENFORCE_ONE_MX)  # forgets a.mx.{d}, an MX host publish() gives
    rig.publish(d["none"], NONE)
    rig.dns.set(f"_mta-sts.{d['badtxt']}", "TXT", "v=STSv1; id=2025-11-09")  # corpus: hyphen in id
    rig.dns.set(f"_smtp._tls.{d['badtxt']}", "TXT", "v=spf1 -all", f"v=TLSRPTv1; rua=mailto:tls@{d['badtxt']}")
    rig.publish(d["servfail"])
    rig.dns.fault(f"_mta-sts.{d['servfail']}", "servfail")
    rig.publish(d["notfound"], status=404)
    rig.publish(d["nohost"])
    rig.dns.remove(f"mta-sts.{d['nohost']}")
    rig.publish(d["untrusted"], cert="untrusted")
    rig.publish(d["badpolicy"], ENFORCED)
    rig.publish(d["quirks"], QUIRKS)
    rig.dns.set(f"_mta-sts.{d['txtspace']}", "TXT", "v=STSv1; id=1 ")  # RFC 8461 §3.1: trailing WSP
    cache = tmp / "cache.sqlite3"
    config = Path(write_config(rig, tmp, cache, create_cache=False, name="config.yaml"))
    lines = ["# domains to survey", ""]
    for role in ROLES:
        lines.append(f"{d[role]}  # {role}")
    lines.append(d["enforce"].upper() + ".")  # the same domain again, as an MTA might spell it
    domains_file = tmp / "domains.txt"
    domains_file.write_text("\n".join(lines) + "\n")
    return World(d, tmp, config, cache, domains_file)


def survey(world: World, *args: str) -> subprocess.CompletedProcess:
    result = run("survey", "--config", str(world.config), str(world.domains_file), *args)
    assert result.returncode == 0, result.stderr
    return result


def markdown_tables(text: str) -> list[list[list[str]]]:
    """Tables of a Markdown document, each a list of rows (header first), separator rows dropped."""
    tables: list[list[list[str]]] = []
    for block in text.strip().split("\n\n"):
        rows = [line.strip().strip("|").split(" | ") for line in block.splitlines()]
        tables.append([[cell.strip() for cell in row] for row in rows if not row[0].startswith("---")])
    return tables


@pytest.fixture(scope="module")
def markdown(world) -> subprocess.CompletedProcess:
    return survey(world)


@pytest.fixture(scope="module")
def json_report(world) -> dict:
    return json.loads(survey(world, "--format", "json").stdout)


def test_markdown_table(world, markdown):
    d = world.d
    table, summary = markdown_tables(markdown.stdout)
    assert table[0] == ["domain", "TXT record", "policy", "mode", "mx patterns", "max_age", "MX hosts match",
                        "TLSRPT"]
    rows = {row[0]: row for row in table[1:]}
    assert [row[0] for row in table[1:]] == [d[role] for role in ROLES]  # FILE order, duplicate dropped
    e = d["enforce"]
    assert rows[e] == [e, "v=STSv1; id=e1", "ok", "enforce", f"mx1.{e}, *.mx.{e}", "86400", "yes",
                       f"mailto:tls@{e}, https://reports.{e}/tlsrpt"]
    t = d["testing"]
    assert rows[t][1:7] == ["v=STSv1; id=1", "ok", "testing", f"mx1.{t}, *.mx.{t}", "604800", "yes"]
    assert rows[t][7] == "invalid-record: rua URI 'mailto:' has no mail address"
    m = d["mismatch"]
    assert rows[m][3:7] == ["enforce", f"mx1.{m}", "86400", f"no: a.mx.{m}"]
    assert rows[d["none"]][2:8] == ["ok", "none", "-", "86400", "-", "no-record"]
    assert rows[d["norecord"]][1:] == ["no-record", "-", "-", "-", "-", "-", "no-record"]
    assert rows[d["badtxt"]][1] == "invalid-record: id is not 1-32 letters and digits: '2025-11-09' (RFC 8461 §3.1)"
    assert rows[d["badtxt"]][2:] == ["-", "-", "-", "-", "-", f"mailto:tls@{d['badtxt']}"]
    assert rows[d["servfail"]][1].startswith(f"dns-temporary: _mta-sts.{d['servfail']}. TXT")
    assert rows[d["notfound"]][2] == f"fetch-error: GET mta-sts.{d['notfound']} answered HTTP 404"
    assert rows[d["nohost"]][2].startswith(f"fetch-error: policy host mta-sts.{d['nohost']} does not resolve")
    assert rows[d["untrusted"]][2].startswith(f"certificate-invalid: certificate of mta-sts.{d['untrusted']}")
    assert rows[d["badpolicy"]][2] == "invalid-policy: mode must be enforce, testing or none, not 'enforced'"
    # Every leniency is shown, and a broken record names the rule it breaks.
    assert rows[d["quirks"]][2:4] == [f"ok (2 warnings: {'; '.join(QUIRK_WARNINGS)})", "enforce"]
    assert rows[d["txtspace"]][1] == ("invalid-record: whitespace at the end of the record after 'id=1' "
                                      "(RFC 8461 §3.1: whitespace only around ';')")
    for role in ("notfound", "nohost", "untrusted", "badpolicy"):
        assert rows[d[role]][1] == "v=STSv1; id=1" and rows[d[role]][3:7] == ["-"] * 4

    counts = {label: int(n) for label, n in summary[1:]}
    assert summary[0] == ["summary", "domains"]
    assert {k: counts[k] for k in OUTCOMES} == OUTCOMES
    assert counts["mx-mismatch"] == 1 and counts["total"] == len(ROLES)
    assert {k: counts[f"tlsrpt-{k}"] for k in TLSRPT} == TLSRPT
    assert "survey [" not in markdown.stderr  # stderr is a pipe here: no progress bar


def test_json_report(world, json_report):
    d = world.d
    rows = {row["domain"]: row for row in json_report["domains"]}
    assert list(rows) == [d[role] for role in ROLES]
    e = rows[d["enforce"]]
    assert e["outcome"] == "enforce" and e["txt"] == "valid" and e["policy"] == "ok"
    assert e["txt_record"] == "v=STSv1; id=e1" and e["policy_id"] == "e1"
    assert e["mx"] == [f"mx1.{d['enforce']}", f"*.mx.{d['enforce']}"] and e["max_age"] == 86400
    assert e["mx_hosts"] == [f"mx1.{d['enforce']}", f"a.mx.{d['enforce']}"] and e["mx_match"] is True
    assert e["tlsrpt"] == "valid"
    assert e["tlsrpt_rua"] == [f"mailto:tls@{d['enforce']}", f"https://reports.{d['enforce']}/tlsrpt"]
    m = rows[d["mismatch"]]
    assert m["mx_match"] is False and m["mx_unmatched"] == [f"a.mx.{d['mismatch']}"]
    n = rows[d["none"]]
    assert n["mode"] == "none" and n["mx_hosts"] is None and n["mx_match"] is None
    assert rows[d["norecord"]]["txt_failure"]["kind"] == "no-record" and rows[d["norecord"]]["policy"] is None
    assert rows[d["testing"]]["tlsrpt_failure"] == {"kind": "invalid-record",
                                                    "detail": "rua URI 'mailto:' has no mail address"}
    expected = {"badtxt": ("txt_failure", "invalid-record"), "servfail": ("txt_failure", "dns-temporary"),
                "notfound": ("policy_failure", "fetch-error"), "nohost": ("policy_failure", "fetch-error"),
                "untrusted": ("policy_failure", "certificate-invalid"),
                "badpolicy": ("policy_failure", "invalid-policy"), "txtspace": ("txt_failure", "invalid-record")}
    for role, (field, kind) in expected.items():
        row = rows[d[role]]
        assert row[field]["kind"] == kind and row[field]["detail"], role
        assert row["outcome"] == kind and row["mode"] is None and row["mx_hosts"] is None
    assert rows[d["quirks"]]["policy_warnings"] == QUIRK_WARNINGS and rows[d["enforce"]]["policy_warnings"] == []
    assert "whitespace at the end" in rows[d["txtspace"]]["txt_failure"]["detail"]
    assert json_report["summary"] == {"domains": len(ROLES), "outcomes": {**OUTCOMES}, "mx_mismatch": 1,
                                      "tlsrpt": TLSRPT}


def test_csv_report_and_summary_on_stderr(world, json_report):
    result = survey(world, "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == len(ROLES)  # one rectangular table: the summary is not in it
    by_domain = {row["domain"]: row for row in rows}
    m = by_domain[world.d["mismatch"]]
    assert (m["outcome"], m["txt"], m["policy"], m["mode"], m["mx"], m["max_age"]) == (
        "enforce", "valid", "ok", "enforce", f"mx1.{world.d['mismatch']}", "86400")
    assert m["mx_hosts"] == f"mx1.{world.d['mismatch']} a.mx.{world.d['mismatch']}"
    assert (m["mx_match"], m["mx_unmatched"], m["tlsrpt"]) == ("no", f"a.mx.{world.d['mismatch']}", "no-record")
    assert by_domain[world.d["quirks"]]["policy_warnings"] == "; ".join(QUIRK_WARNINGS)
    assert by_domain[world.d["txtspace"]]["txt_detail"].startswith("whitespace at the end of the record")
    e = by_domain[world.d["enforce"]]
    assert e["tlsrpt_rua"] == f"mailto:tls@{world.d['enforce']} https://reports.{world.d['enforce']}/tlsrpt"
    # Every format reports the same thing.
    for row in json_report["domains"]:
        line = by_domain[row["domain"]]
        assert (line["outcome"], line["txt"], line["policy"], line["tlsrpt"]) == (
            row["outcome"], row["txt"], row["policy"] or "", row["tlsrpt"])
        failure = row["txt_failure"] or row["policy_failure"]
        assert (line["txt_detail"] or line["policy_detail"]) == (failure["detail"] if failure else "")
    summary = dict(csv.reader(io.StringIO(result.stderr[result.stderr.index("summary,domains"):])))
    assert summary["total"] == str(len(ROLES)) and summary["mx-mismatch"] == "1"
    assert {k: int(summary[k]) for k in OUTCOMES} == OUTCOMES


def test_output_file_and_the_cache_is_never_opened(world, markdown):
    out = world.tmp / "report.md"
    other_cache = world.tmp / "other-cache.sqlite3"
    result = survey(world, "--output", str(out), "--cache", str(other_cache))
    assert result.stdout == ""
    assert out.read_text() == markdown.stdout
    # Neither the configured cache nor the --cache one was created by any survey so far.
    assert not world.cache.exists() and not other_cache.exists()
    assert not list(world.tmp.glob("*.sqlite3*"))


def test_update_cache_resolves_through_the_daemon_cache(rig, world, json_report, tmp_path):
    cache = tmp_path / "daemon-cache.sqlite3"
    PolicyCache(str(cache)).close()  # the daemon's cache: only `serve` creates one
    result = survey(world, "--format", "json", "--update-cache", "--cache", str(cache))
    report = json.loads(result.stdout)
    assert report["summary"] == json_report["summary"]  # same outcomes as the direct survey
    e = next(row for row in report["domains"] if row["domain"] == world.d["enforce"])
    assert e["txt_record"] == "v=STSv1; id=e1" and e["mode"] == "enforce" and e["mx_match"] is True
    # The daemon's cache now holds the policy: `query` answers from it without fetching.
    fetches = rig.https.count(world.d["enforce"])
    query = run("query", "--json", "--config", str(world.config), "--cache", str(cache), world.d["enforce"])
    assert json.loads(query.stdout)["cache"] == "hit"
    # A second survey through the cache refetches nothing whose TXT id is unchanged.
    again = json.loads(survey(world, "--format", "json", "--update-cache", "--cache", str(cache)).stdout)
    assert again["summary"] == json_report["summary"]
    assert rig.https.count(world.d["enforce"]) == fetches


def test_progress_bar_only_on_a_terminal(world):
    """On a TTY stderr a bar is redrawn in place; the report itself still goes to stdout."""
    controller, terminal = pty.openpty()
    domains = world.tmp / "two.txt"
    domains.write_text(f"{world.d['enforce']}\n{world.d['norecord']}\n")
    process = subprocess.Popen(
        cli_command("survey", "--config", str(world.config), "--format", "json", str(domains)), cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=terminal)
    os.close(terminal)
    seen = bytearray()
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(controller)
    stdout, _ = process.communicate(timeout=60)
    assert process.returncode == 0
    assert json.loads(stdout)["summary"]["domains"] == 2
    assert b"\rsurvey [" in seen and b"] 2/2" in seen


def test_usage_errors(world):
    bad = world.tmp / "bad.txt"
    bad.write_text(f"{world.d['enforce']}\n\n192.0.2.1\nnot a domain\n")
    result = run("survey", "--config", str(world.config), str(bad))
    assert result.returncode == 2 and result.stdout == ""
    assert ":3: not a domain name: '192.0.2.1'" in result.stderr
    assert ":4: not a domain name: 'not a domain'" in result.stderr
    assert run("survey", "--config", str(world.config), str(world.tmp / "missing.txt")).returncode == 2
    assert run("survey", "--concurrency", "0", str(world.domains_file)).returncode == 2
    assert run("survey", "--format", "xml", str(world.domains_file)).returncode == 2


def test_stdin_and_empty_list(world):
    result = run("survey", "--config", str(world.config), "--format", "json", "-", input="# nothing\n\n")
    assert result.returncode == 0
    assert json.loads(result.stdout)["summary"]["domains"] == 0


def test_read_domains_folds_like_mta_keys():
    assert parse_domain_list(["Example.COM.", "example.com", "  bücher.example # idn", "# c", ""], "t") == [
        "example.com", "xn--bcher-kva.example"]


def test_run_bounded_keeps_order_and_bound():
    running = 0
    peak = 0
    lock = threading.Lock()
    done: list[int] = []

    def work(n: int) -> int:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.02)
        with lock:
            running -= 1
        return n * n

    assert run_bounded(work, list(range(20)), 3, lambda _: done.append(1)) == [n * n for n in range(20)]
    assert 2 <= peak <= 3 and len(done) == 20
