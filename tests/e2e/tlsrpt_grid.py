"""The TLSRPT grid of issue 10, shared by the Postfix and the Exim end-to-end tests.

One table of policy domains (`cells`): each has a mode (an `enforce` or `testing` MTA-STS policy,
or none), one MX host with one TLS behaviour of tests/rig/smtp_server.py, and a `_smtp._tls`
record with an https rua, a mailto rua, both, an INVALID record, or none. The table covers every
(mode, rua) pair with a domain that has sessions, and every TLS behaviour under `enforce` and under
`testing` or no policy (checked by `coverage_gaps`), in 24 domains, not in one per combination.

The real MTA delivers a message to each domain; the commands an operator runs do the rest on the
MTA's real log: `tlsrpt ingest`, `tlsrpt build`, `tlsrpt send` (https POSTs to the world's HTTPS
server, report mail through the same MTA to the mailto ruas, DKIM-signed with an `s=tlsrpt` key
published in the world's DNS). The expected report of a domain follows from its mode, its
behaviour and the MTA's mapping (README "TLSRPT"), and from the number of attempts the MTA logged.

The mailto ruas are mailboxes of one more domain, `<prefix>-rua.e2e.test`: `enforce`, its only MX
presenting a certificate for another name. Ordinary mail to it is deferred by our own policy; report
mail must reach it anyway (RFC 8460 §5.3), past our enforcement (contrib's tlsrpt transport and
router), and must not be counted as a session.
"""

from __future__ import annotations

import datetime
import email
import email.policy
import gzip
import json
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dkim
import yaml

from tests.conftest import run_cli
from tests.e2e.world import Mx, Scenario, World, wait_until
from tests.rig.smtp_server import Received
from tests.test_tlsrpt_send import rsa_key

BEHAVIOURS = ("tls", "wrong-cert", "untrusted", "expired", "self-signed", "no-starttls", "starttls-refused",
              "handshake-abort")
MODES = ("enforce", "testing", "nopol")
RUAS = ("https", "mailto", "both", "invalid", "none")
NO_SESSION = "-"  # a mapping's value for a delivery that is no TLS session (plaintext, TLS not required)

SENDER = "tlsrpt-noreply@sender.e2e.test"  # tlsrpt.sender; its domain signs (DKIM) and submits
SUBMITTER = "sender.e2e.test"
SENDING_IP = "127.0.0.1"  # the routing table's source address towards 127.0.0.0/8
RUA_HOST, RUA_PATH = "rua.e2e.test", "/v1/tlsrpt"
# RFC 8460 §3: rua is a list of https: or mailto: URIs; another scheme makes the record invalid.
INVALID_RECORD = "v=TLSRPTv1; rua=ftp://rua.e2e.test/tlsrpt"


def policy(mode: str) -> str | None:
    """The MTA-STS policy of a grid domain in `mode` ({d}: the domain); None for no policy."""
    if mode == "nopol":
        return None
    return f"version: STSv1\nmode: {mode}\nmx: *.{{d}}\nmax_age: 86400\n"


@dataclass(frozen=True)
class Cell:
    """One policy domain of the grid."""

    prefix: str  # per MTA: the grids of both MTAs live in the same world
    mode: str
    behaviour: str
    rua: str  # https, mailto, both, invalid, none
    mx: tuple[Mx, ...] = ()  # default: one MX "mx" with `behaviour`
    suffix: str = ""

    @property
    def name(self) -> str:
        return f"{self.prefix}-{self.mode}-{self.behaviour}{self.suffix}"

    @property
    def scenario(self) -> Scenario:
        return Scenario(self.name, policy(self.mode), self.mx or (Mx("mx", self.behaviour),), None)

    @property
    def domain(self) -> str:
        return self.scenario.domain

    @property
    def https_rua(self) -> str:
        return f"https://{RUA_HOST}{RUA_PATH}/{self.domain}"

    def mailto_rcpt(self) -> str:
        return f"rua-{self.mode}-{self.behaviour}{self.suffix}@{rua_domain(self.prefix)}"

    def ruas(self) -> list[str]:
        """The rua URIs of a valid record, in record order; [] for an invalid record or none."""
        return {"https": [self.https_rua], "mailto": [f"mailto:{self.mailto_rcpt()}"],
                "both": [f"mailto:{self.mailto_rcpt()}", self.https_rua]}.get(self.rua, [])

    def record(self) -> str | None:
        if self.rua == "invalid":
            return INVALID_RECORD
        return f"v=TLSRPTv1; rua={','.join(self.ruas())}" if self.ruas() else None


def rua_domain(prefix: str) -> str:
    return f"{prefix}-rua.e2e.test"


def rua_scenario(prefix: str) -> Scenario:
    """The domain of the mailto ruas: enforce, its only MX misnamed (ordinary mail is deferred)."""
    return Scenario(f"{prefix}-rua", policy("enforce"), (Mx("mx", "wrong-cert"),), None)


def cells(prefix: str) -> list[Cell]:
    """Every (mode, behaviour) once; the rua variants rotate so that each mode meets each variant
    on a domain with sessions (`coverage_gaps` checks that for a given mapping)."""
    return [Cell(prefix, mode, behaviour, RUAS[(b + m) % len(RUAS)])
            for m, mode in enumerate(MODES) for b, behaviour in enumerate(BEHAVIOURS)]


def coverage_gaps(grid: Iterable[Cell], mapping: dict[str, dict[str, str | None]]) -> list[str]:
    """What the grid fails to cover (issue 10's list): every (mode, rua) pair on a domain with
    sessions, every TLS behaviour under enforce and under testing or no policy."""
    grid = list(grid)
    counted = [c for c in grid if mapping[c.mode][c.behaviour] != NO_SESSION]
    gaps = [f"mode={m} rua={r}" for m in MODES for r in RUAS
            if not any((c.mode, c.rua) == (m, r) for c in counted)]
    gaps += [f"behaviour={b} under enforce" for b in BEHAVIOURS
             if not any((c.mode, c.behaviour) == ("enforce", b) for c in grid)]
    gaps += [f"behaviour={b} under testing/no policy" for b in BEHAVIOURS
             if not any(c.mode != "enforce" and c.behaviour == b for c in grid)]
    return gaps


def days() -> list[datetime.date]:
    """Yesterday and today (UTC): the run may cross midnight."""
    today = datetime.datetime.now(datetime.UTC).date()
    return [today - datetime.timedelta(days=1), today]


# ----- the world's side --------------------------------------------------------------------------


def publish(world: World, grid: list[Cell], prefix: str, directory: Path) -> Path:
    """Publish the grid's domains, their TLSRPT records, the rua domain, the https endpoints and
    the DKIM key (RFC 8460 §7.3: `s=tlsrpt`); returns the private key file."""
    world.publish(rua_scenario(prefix))
    world.dns.set(RUA_HOST, "A", "127.0.0.1")
    for cell in grid:
        world.publish(cell.scenario)
        record = cell.record()
        if record is not None:
            world.dns.set(f"_smtp._tls.{cell.domain}", "TXT", record)
        world.https.set_rua(RUA_HOST, f"{RUA_PATH}/{cell.domain}", 200)
    pem, key_record = rsa_key()
    # Long TXT data as several strings (RFC 7208 §3.3 style; DKIM concatenates them).
    world.dns.set(f"tlsrpt._domainkey.{SUBMITTER}", "TXT", [key_record[i:i + 200]
                                                          for i in range(0, len(key_record), 200)])
    key_file = directory / "dkim.pem"
    key_file.write_bytes(pem)
    return key_file


def write_config(world: World, directory: Path, key_file: Path | None = None, sendmail: str | None = None) -> Path:
    """The operator's configuration for the `tlsrpt` commands: the world's resolver, the daemon's
    cache, a counts store of this run, the sender, the MTA's sendmail and the DKIM key."""
    tlsrpt: dict[str, Any] = {"store": str(directory / "counts.sqlite3"), "sender": SENDER}
    if sendmail is not None:
        tlsrpt["sendmail"] = sendmail
    if key_file is not None:
        tlsrpt["dkim"] = {"domain": SUBMITTER, "selector": "tlsrpt", "key_file": str(key_file)}
    path = directory / "tlsrpt.yaml"
    path.write_text(yaml.safe_dump({
        "dns": {"nameservers": ["127.0.0.1"], "timeout": 3},
        "cache": {"path": str(world.directory / "policyd" / "cache.sqlite3")},
        "tlsrpt": tlsrpt,
    }))
    return path


# ----- running the commands ----------------------------------------------------------------------


@dataclass
class Commands:
    """`mtasts-policyd tlsrpt ...` on one configuration, reports written to `reports`."""

    config: Path
    reports: Path
    outputs: list[str] = field(default_factory=list)  # everything printed, for failure messages

    def run(self, *args: str) -> str:
        result = run_cli("tlsrpt", *args, "--config", str(self.config), timeout=120)
        self.outputs.append(f"$ tlsrpt {' '.join(args)}\n{result.stdout}{result.stderr}")
        assert result.returncode == 0, self.outputs[-1]
        return result.stdout

    def ingest(self, option: str, log: Path) -> dict[str, int]:
        """`tlsrpt ingest`: its summary line as numbers (lines, sessions, unparsed)."""
        line = next(l for l in self.run("ingest", option, str(log)).splitlines() if l.startswith("ingest: "))
        # "ingest: N lines, S sessions (RESULT N, ...), unparsed U, local events (...) file=FILE"
        words = line.replace(",", "").split()
        return {"lines": int(words[1]), "sessions": int(words[3]), "unparsed": int(words[words.index("unparsed") + 1])}

    def build(self) -> tuple[dict[str, dict], list[str]]:
        """`tlsrpt build` for yesterday and today: the reports written (policy domain -> report
        JSON, the days' policies together), and the domains skipped for want of a valid record."""
        reports: dict[str, dict] = {}
        skipped: list[str] = []
        for day in days():
            for line in self.run("build", "--day", day.isoformat(), "--output", str(self.reports)).splitlines():
                words = dict(word.split("=", 1) for word in line.split()[1:] if "=" in word)
                if line.startswith("built "):
                    report = json.loads(gzip.decompress(Path(words["file"]).read_bytes()))
                    merged = reports.setdefault(words["domain"], {**report, "policies": []})
                    merged["policies"] += report["policies"]
                elif line.startswith("skipped "):
                    skipped.append(words["domain"])
        return reports, skipped

    def show(self) -> dict[str, list[dict]]:
        """`tlsrpt show --json` for yesterday and today: every domain's counted policies, whether
        it asks for reports or not (policy domain -> policies, as a report has them)."""
        found: dict[str, list[dict]] = {}
        for day in days():
            for entry in json.loads(self.run("show", "--day", day.isoformat(), "--json"))["domains"]:
                found.setdefault(entry["domain"], []).extend(entry["policies"])
        return found

    def send(self, *extra: str) -> list[tuple[str, str, str]]:
        """`tlsrpt send` for yesterday and today: (outcome, domain, rua) per report and rua."""
        found = []
        for day in days():
            for line in self.run("send", "--day", day.isoformat(), "--output", str(self.reports), *extra).splitlines():
                if " rua=" in line:
                    words = dict(word.split("=", 1) for word in line.split()[1:] if "=" in word)
                    found.append((line.split()[0], words["domain"], words["rua"]))
        return found


def report_files(reports: Path) -> dict[str, dict]:
    """The written report files by report-id (what send sends: built again, the same bytes)."""
    found = {}
    for path in reports.iterdir():
        report = json.loads(gzip.decompress(path.read_bytes()))
        found[report["report-id"]] = report
    return found


# ----- what the reports must say -----------------------------------------------------------------


def expected_policies(cell: Cell, mapping: dict[str, dict[str, str | None]], attempts: dict[str, int],
                      ips: dict[str, str]) -> list[dict[str, Any]]:
    """The report's `policies` for `cell` (RFC 8460 §4.4), failure-reason-code left out: `attempts`
    per MX host name (sessions the MTA opened), `ips` the hosts' addresses."""
    d = cell.domain
    if cell.mode == "nopol":
        report_policy: dict[str, Any] = {"policy-type": "no-policy-found", "policy-domain": d}
    else:
        report_policy = {"policy-type": "sts", "policy-string": policy(cell.mode).format(d=d).splitlines(),
                         "policy-domain": d, "mx-host": [f"*.{d}"]}
    successful, details = 0, []
    for mx in cell.scenario.mx:
        host = cell.scenario.host(mx)
        result = mapping[cell.mode][mx.behaviour]
        if result is None:
            successful += attempts[host]
        elif result != NO_SESSION:
            details.append({"result-type": result, "sending-mta-ip": SENDING_IP, "receiving-mx-hostname": host,
                            "receiving-ip": ips[host], "failed-session-count": attempts[host]})
    if not successful and not details:
        return []
    entry: dict[str, Any] = {"policy": report_policy,
                             "summary": {"total-successful-session-count": successful,
                                         "total-failure-session-count": sum(d["failed-session-count"] for d in details)}}
    if details:
        entry["failure-details"] = sorted(details, key=lambda d: (d["result-type"], d["receiving-mx-hostname"]))
    return [entry]


def without_reason_codes(policies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`policies` of a report with the days merged and failure-reason-code left out."""
    merged: dict[str, dict[str, Any]] = {}
    for entry in policies:
        key = json.dumps(entry["policy"], sort_keys=True)
        into = merged.setdefault(key, {"policy": entry["policy"], "successful": 0, "details": Counter()})
        into["successful"] += entry["summary"]["total-successful-session-count"]
        for detail in entry.get("failure-details", []):
            into["details"][tuple(sorted((k, v) for k, v in detail.items()
                                         if k not in ("failed-session-count", "failure-reason-code")))] += \
                detail["failed-session-count"]
    out = []
    for into in merged.values():
        details = sorted(({**dict(k), "failed-session-count": n} for k, n in into["details"].items()),
                         key=lambda d: (d["result-type"], d["receiving-mx-hostname"]))
        entry = {"policy": into["policy"],
                 "summary": {"total-successful-session-count": into["successful"],
                             "total-failure-session-count": sum(d["failed-session-count"] for d in details)}}
        if details:
            entry["failure-details"] = details
        out.append(entry)
    return out


def reason_codes(report: dict[str, Any]) -> dict[str, set[str]]:
    """result-type -> the failure-reason-codes a report gives it."""
    found: dict[str, set[str]] = {}
    for entry in report["policies"]:
        for detail in entry.get("failure-details", []):
            found.setdefault(detail["result-type"], set()).add(detail.get("failure-reason-code", ""))
    return found


# ----- report mail --------------------------------------------------------------------------------


def attached_report(received: Received) -> dict[str, Any]:
    """The RFC 8460 §5.3 message's report: the application/tlsrpt+gzip part, gunzipped."""
    message = email.message_from_bytes(received.data, policy=email.policy.default)
    assert message.get_content_type() == "multipart/report" and message.get_param("report-type") == "tlsrpt"
    [part] = [p for p in message.walk() if p.get_content_type() == "application/tlsrpt+gzip"]
    payload = part.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return json.loads(gzip.decompress(payload))


def report_headers(received: Received) -> tuple[str, str]:
    """(TLS-Report-Domain, TLS-Report-Submitter) of a report mail (RFC 8460 §5.3)."""
    message = email.message_from_bytes(received.data, policy=email.policy.default)
    return str(message["TLS-Report-Domain"]), str(message["TLS-Report-Submitter"])


# ----- one run, and the tests both MTAs pass -------------------------------------------------------


@dataclass
class GridRun:
    """What one MTA's run of the grid produced (filled by the MTA's test module)."""

    world: World
    cells: list[Cell]  # the grid, plus the MTA's extra domains
    mapping: dict[str, dict[str, str | None]]  # mode -> behaviour -> result type (README "TLSRPT")
    attempts: dict[str, int]  # MX host -> sessions the MTA opened to it (delivery attempts)
    commands: Commands
    first_ingest: dict[str, int] = field(default_factory=dict)
    counted: dict[str, list[dict]] = field(default_factory=dict)  # `show`: policy domain -> policies
    reports: dict[str, dict] = field(default_factory=dict)  # policy domain -> report (days merged)
    skipped: list[str] = field(default_factory=list)
    dry_run: list[tuple[str, str, str]] = field(default_factory=list)
    first_send: list[tuple[str, str, str]] = field(default_factory=list)
    second_send: list[tuple[str, str, str]] = field(default_factory=list)
    report_mail: list[Received] = field(default_factory=list)  # at the rua domain's MX, after both sends
    report_deliveries: list[str] = field(default_factory=list)  # the MTA's log lines of report mail
    second_ingest: dict[str, int] = field(default_factory=dict)  # the log read again after the sends

    def ips(self) -> dict[str, str]:
        return {host: sink.host for host, sink in self.world.sinks.items()}

    def expected(self, cell: Cell) -> list[dict[str, Any]]:
        return expected_policies(cell, self.mapping, self.attempts, self.ips())

    def reported(self) -> list[Cell]:
        """The domains that must get a report: a valid record and sessions."""
        return [cell for cell in self.cells if cell.ruas() and self.expected(cell)]

    def files(self) -> dict[str, dict]:
        return report_files(self.commands.reports)

    def report_ids(self, cell: Cell) -> list[str]:
        return sorted(rid for rid, report in self.files().items()
                      if report["policies"][0]["policy"]["policy-domain"] == cell.domain)


def report_and_send(run: GridRun, log_option: str, log: Path, wait_delivered: Callable[[int], list[str]],
                    flush: Callable[[], object]) -> None:
    """What an operator's timer does, on the MTA's real log: ingest, build, send --dry-run, send;
    then (the report mail arrived, `wait_delivered(n)` returning the MTA's n log lines of report
    deliveries) send again, `flush` (the MTA retries all it holds), and ingest again."""
    prefix = run.cells[0].prefix
    sink = run.world.sinks[f"mx.{rua_domain(prefix)}"]

    def report_mail() -> list[Received]:
        return [m for m in sink.messages if m.mail_from == SENDER]

    run.first_ingest = run.commands.ingest(log_option, log)
    run.counted = run.commands.show()
    run.reports, run.skipped = run.commands.build()
    run.dry_run = run.commands.send("--dry-run")
    assert not any(run.world.https.posts_to(RUA_HOST, f"{RUA_PATH}/{c.domain}") for c in run.cells)
    run.first_send = run.commands.send()
    mails = sum(len(run.report_ids(c)) for c in run.reported() for rua in c.ruas() if rua.startswith("mailto:"))
    assert wait_until(lambda: len(report_mail()) >= mails, timeout=60), "\n".join(run.commands.outputs)
    run.report_deliveries = wait_delivered(mails)
    run.second_send = run.commands.send()
    flush()
    wait_until(lambda: len(report_mail()) > mails, timeout=3)  # nothing more may come
    run.report_mail = report_mail()
    run.second_ingest = run.commands.ingest(log_option, log)


class GridTests:
    """The tests of issue 10's grid; a module per MTA subclasses this with a `run` fixture."""

    def test_the_grid_covers_issue_10s_list(self, run: GridRun) -> None:
        assert coverage_gaps([c for c in run.cells if c.behaviour in BEHAVIOURS], run.mapping) == []

    def test_each_domain_is_counted_exactly(self, run: GridRun) -> None:
        """Per domain (`tlsrpt show`, reported or not): successes, failures per result type, policy
        type, policy string, mx-host, MX host and IP, sending IP (RFC 8460 §4.4); the result types
        as README "TLSRPT" maps what the MTA logs."""
        assert run.first_ingest["unparsed"] == 0, run.commands.outputs
        assert run.first_ingest["sessions"] == sum(
            entry["summary"]["total-successful-session-count"] + entry["summary"]["total-failure-session-count"]
            for cell in run.cells for entry in run.expected(cell))
        for cell in run.cells:
            assert without_reason_codes(run.counted.get(cell.domain, [])) == run.expected(cell), cell
        assert set(run.counted) == {c.domain for c in run.cells if run.expected(c)}

    def test_each_domain_with_a_valid_record_gets_its_exact_report(self, run: GridRun) -> None:
        """The reports built say what was counted, for the domains that ask (RFC 8460 §3)."""
        for cell in run.cells:
            if cell.domain not in run.reports:
                continue
            assert without_reason_codes(run.reports[cell.domain]["policies"]) == run.expected(cell), cell
            report = run.reports[cell.domain]
            assert report["organization-name"] == SUBMITTER and report["contact-info"] == SENDER
            codes = reason_codes(report)
            if cell.behaviour == "handshake-abort":
                assert codes.get("validation-failure") == {"tls-handshake-failure"}, (cell, codes)
            # RFC 8460 §4.3.1: certificate-not-trusted SHOULD say why.
            assert "" not in codes.get("certificate-not-trusted", set()), (cell, codes)
        assert sorted(run.reports) == sorted(c.domain for c in run.reported()), run.commands.outputs

    def test_no_report_for_a_domain_without_a_valid_record(self, run: GridRun) -> None:
        unreported = [c for c in run.cells if not c.ruas() and run.expected(c)]
        assert {c.rua for c in unreported} == {"invalid", "none"}
        assert sorted(run.skipped) == sorted(c.domain for c in unreported)
        built = {report["policies"][0]["policy"]["policy-domain"] for report in run.files().values()}
        assert built == {c.domain for c in run.reported()}

    def test_send_posts_once_to_each_https_rua(self, run: GridRun) -> None:
        """RFC 8460 §5.4: one POST per report and https rua, application/tlsrpt+gzip, gunzipping to
        the built report; a second `send` posts nothing."""
        files = run.files()
        for cell in run.cells:
            posts = run.world.https.posts_to(RUA_HOST, f"{RUA_PATH}/{cell.domain}")
            if cell.https_rua not in cell.ruas() or cell not in run.reported():
                assert posts == [], cell
                continue
            assert len(posts) == len(run.report_ids(cell)) >= 1, cell
            for post in posts:
                assert post.content_type == "application/tlsrpt+gzip"
                report = json.loads(gzip.decompress(post.body))
                assert report == files[report["report-id"]]

    def test_send_mails_each_mailto_rua_a_signed_report(self, run: GridRun) -> None:
        """RFC 8460 §5.3: the message reaches the rua past our own enforcement (the rua domain's MX
        is misnamed), its headers name the domains, the attachment is the built report, and the
        DKIM signature verifies strictly against the s=tlsrpt key in DNS (§7.3)."""
        files = run.files()
        wanted = {(f"mailto:{c.mailto_rcpt()}", rid) for c in run.reported() for rua in c.ruas()
                  if rua.startswith("mailto:") for rid in run.report_ids(c)}
        got = []
        for received in run.report_mail:
            report = attached_report(received)
            [rcpt] = received.rcpt_to
            got.append((f"mailto:{rcpt}", report["report-id"]))
            assert report == files[report["report-id"]]
            domain = report["policies"][0]["policy"]["policy-domain"]
            assert report_headers(received) == (domain, SUBMITTER)
            assert dkim.verify(received.data, tlsrpt="strict"), rcpt
        assert sorted(got) == sorted(wanted)  # each once: a second send and a flush added none

    def test_send_outcomes_and_a_second_send_sends_nothing(self, run: GridRun) -> None:
        wanted = sorted((c.domain, rua) for c in run.reported() for rua in c.ruas() for _ in run.report_ids(c))
        assert sorted((d, r) for o, d, r in run.dry_run if o == "would-send") == wanted
        assert sorted((d, r) for o, d, r in run.first_send if o == "sent") == wanted, run.commands.outputs
        assert sorted((d, r) for o, d, r in run.second_send if o == "already-sent") == wanted
        assert len(run.dry_run) == len(run.first_send) == len(run.second_send) == len(wanted)

    def test_report_deliveries_are_not_counted(self, run: GridRun) -> None:
        """Issue 10: the report mail's own sessions (logged by the MTA: `report_deliveries`) are
        never counted: reading the log again after the sends finds no session."""
        assert run.report_deliveries, "the MTA logged no report delivery"
        assert run.second_ingest["lines"] > 0 and run.second_ingest["sessions"] == 0, run.second_ingest
        assert run.second_ingest["unparsed"] == 0
