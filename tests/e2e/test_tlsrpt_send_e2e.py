"""`tlsrpt send` in the world: the https rua on the world's HTTPS server (port 443, a name the world's
DNS resolves, the machine's trust store), the mailto rua through a real Postfix with the contrib
tlsrpt transport (contrib/postfix/tlsrpt-main.cf, tlsrpt-master.cf) to an MX sink, DKIM-verified
against the s=tlsrpt key the world's DNS publishes.

The mailto rua's domain publishes an enforce MTA-STS policy and its only MX presents a certificate
for another name: ordinary mail to it is deferred by our own policy, report mail must arrive
anyway (RFC 8460 §5.3).
"""

from __future__ import annotations

import datetime
import email
import email.policy
import gzip
import json
import uuid

import dkim
import pytest
import yaml

from mtasts_policyd.core.tlsrpt_report import PolicyType, ReportPolicy, SessionCount
from mtasts_policyd.store.tlsrpt_store import Batch, Position, TlsRptStore
from tests.conftest import run_cli
from tests.e2e.exim_mta import EXIM, EximInstance
from tests.e2e.postfix_mta import ROOT, PostfixInstance
from tests.e2e.world import Mx, Scenario, World, temp_dir, wait_until
from tests.test_tlsrpt_send import rsa_key

CONTRIB_SENDER = "tlsrpt-noreply@mail.example.com"  # the placeholder in contrib/postfix/tlsrpt-main.cf
SENDER = "tlsrpt-noreply@sender.e2e.test"
REPORTED = "reported.e2e.test"
RUA_HOST, RUA_PATH = "rua.e2e.test", "/v1/tlsrpt"
TIMEOUT = 60


def contrib_postfix() -> tuple[dict[str, str], str]:
    """tlsrpt-main.cf's settings (with our sender) and tlsrpt-master.cf, as an operator adds them."""
    main: dict[str, str] = {}
    for line in (ROOT / "contrib" / "postfix" / "tlsrpt-main.cf").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, value = line.partition("=")
            main[name.strip()] = value.strip().replace(CONTRIB_SENDER, SENDER)
    assert main, "contrib/postfix/tlsrpt-main.cf sets nothing"
    return main, (ROOT / "contrib" / "postfix" / "tlsrpt-master.cf").read_text()


@pytest.fixture(scope="module")
def postfix(world: World, policyd):
    main, master = contrib_postfix()
    instance = PostfixInstance(extra_main_cf=main, extra_master_cf=master).start()
    yield instance
    instance.stop()
    instance.remove()


BROKEN = Scenario("rua-broken", "version: STSv1\nmode: enforce\nmx: *.{d}\nmax_age: 86400\n",
                  (Mx("mx", "wrong-cert"),), None)


@pytest.fixture(scope="module")
def dkim_key(world: World, tmp_path_factory):
    """The rua domain with its misnamed MX, the https endpoint, and the DKIM key (its record in DNS)."""
    world.publish(BROKEN)
    world.dns.set(RUA_HOST, "A", "127.0.0.1")
    world.https.set_rua(RUA_HOST, RUA_PATH, 200)
    pem, record = rsa_key()
    # RFC 8460 §7.3: the key's service type is tlsrpt; long TXT data as several strings.
    world.dns.set("tlsrpt._domainkey.sender.e2e.test", "TXT", [record[i:i + 200] for i in range(0, len(record), 200)])
    path = tmp_path_factory.mktemp("dkim") / "dkim.pem"
    path.write_bytes(pem)
    return path


def reported_day(world: World, directory, reported: str, rua: str, key_file, sendmail: str):
    """A store with yesterday's sessions for `reported`, its _smtp._tls record naming `rua`, and
    the configuration of `tlsrpt send` (the world's DNS, the machine's trust store)."""
    world.dns.set(f"_smtp._tls.{reported}", "TXT", f"v=TLSRPTv1; rua={rua}")
    day = datetime.datetime.now(datetime.UTC).date() - datetime.timedelta(days=1)
    store_path = directory / "counts.sqlite3"
    with TlsRptStore(str(store_path)) as store:
        policy = ReportPolicy(PolicyType.NO_POLICY_FOUND, reported)
        batch = Batch(Position("test", "0:0", "-", 0))
        batch.sessions.append((day, SessionCount(policy, None, "127.0.0.1", f"mx.{reported}", "127.0.0.9", "", 7)))
        store.commit(batch, 0.0)
    config = directory / "tlsrpt.yaml"
    config.write_text(yaml.safe_dump({
        "dns": {"nameservers": ["127.0.0.1"], "timeout": 3},
        "cache": {"path": str(world.directory / "policyd" / "cache.sqlite3")},
        "tlsrpt": {"store": str(store_path), "sender": SENDER, "sendmail": sendmail,
                   "dkim": {"domain": "sender.e2e.test", "selector": "tlsrpt", "key_file": str(key_file)}},
    }))
    return ("tlsrpt", "send", "--config", str(config), "--day", day.isoformat(), "--output",
            str(directory / "reports")), f"{day:%Y%m%d}.{reported}@sender.e2e.test"


def arrived(world: World, report_id: str) -> list:
    return [m for m in world.sinks[f"mx.{BROKEN.domain}"].messages if report_id.encode() in m.data]


def verified_report_mail(received, reported: str, rcpt: str) -> None:
    """RFC 8460 §5.3 headers, and the signature against the s=tlsrpt key in the world's DNS
    (dkimpy's own lookup, strict: the key must be for tlsrpt)."""
    assert received.mail_from == SENDER and received.rcpt_to == [rcpt]
    message = email.message_from_bytes(received.data, policy=email.policy.default)
    assert message["TLS-Report-Domain"] == reported and message["TLS-Report-Submitter"] == "sender.e2e.test"
    assert message.get_content_type() == "multipart/report" and message.get_param("report-type") == "tlsrpt"
    assert dkim.verify(received.data, tlsrpt="strict")


def outcomes(stdout: str) -> list[str]:
    """The first word of each per-rua line of `tlsrpt send`."""
    return [line.split()[0] for line in stdout.splitlines() if " rua=" in line]


def test_report_mail_and_post_arrive_once_past_our_own_enforcement(world: World, postfix, dkim_key,
                                                                   tmp_path):
    rcpt = f"tlsrpt@{BROKEN.domain}"
    args, report_id = reported_day(world, tmp_path, REPORTED, f"mailto:{rcpt},https://{RUA_HOST}{RUA_PATH}",
                                   dkim_key, f"/usr/sbin/sendmail -C {postfix.config_dir}")
    # Ordinary mail to the rua domain is held back by our own policy (enforce, misnamed MX).
    marker = uuid.uuid4().hex
    postfix.send(f"someone@{BROKEN.domain}", marker)
    assert wait_until(lambda: postfix.status_of(f"someone@{BROKEN.domain}") is not None, timeout=TIMEOUT)
    assert postfix.status_of(f"someone@{BROKEN.domain}").status == "deferred"
    assert world.received(marker) == {}
    postfix.delete_queued(f"someone@{BROKEN.domain}")

    dry = run_cli(*args, "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert outcomes(dry.stdout) == ["would-send", "would-send"] and world.https.posts_to(RUA_HOST, RUA_PATH) == []

    result = run_cli(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert outcomes(result.stdout) == ["sent", "sent"], result.stdout

    # https (RFC 8460 §5.4): the POST with its media type; the body gunzips to the report.
    [post] = world.https.posts_to(RUA_HOST, RUA_PATH)
    assert post.content_type == "application/tlsrpt+gzip"
    report = json.loads(gzip.decompress(post.body))
    assert report["report-id"] == report_id
    assert report["policies"][0]["summary"] == {"total-successful-session-count": 7, "total-failure-session-count": 0}

    # mailto (RFC 8460 §5.3): through Postfix's tlsrpt transport to the misnamed MX.
    assert wait_until(lambda: arrived(world, report_id), timeout=TIMEOUT), postfix.log()[-3000:]
    [received] = arrived(world, report_id)
    verified_report_mail(received, REPORTED, rcpt)
    # The contrib transport carried it (its status line may follow the sink's acceptance a little).
    assert wait_until(lambda: postfix.log_lines("postfix/tlsrpt/smtp[", f"to=<{rcpt}>", "status=sent"),
                      timeout=10), postfix.log()[-3000:]

    # Never twice to one rua.
    again = run_cli(*args)
    assert again.returncode == 0 and outcomes(again.stdout) == ["already-sent", "already-sent"], again.stdout
    assert len(world.https.posts_to(RUA_HOST, RUA_PATH)) == 1
    postfix.flush()
    assert not wait_until(lambda: len(arrived(world, report_id)) > 1, timeout=3)


def test_exim_routes_report_mail_past_our_own_enforcement(world: World, policyd, dkim_key, tmp_path):
    """contrib/exim/exim.conf with TLSRPT_SENDER: the tlsrpt_reports router takes report mail."""
    exim = EximInstance(temp_dir("exim-tlsrpt-"), "127.0.0.1:8462")
    exim.macros.append(f"-DTLSRPT_SENDER={SENDER}")
    rcpt = f"tlsrpt-exim@{BROKEN.domain}"
    sendmail = " ".join([EXIM, "-C", str(exim.config), *exim.macros, "-odi"])
    args, report_id = reported_day(world, tmp_path, f"exim-{REPORTED}", f"mailto:{rcpt}", dkim_key, sendmail)
    result = run_cli(*args)
    assert result.returncode == 0 and outcomes(result.stdout) == ["sent"], result.stdout + result.stderr
    assert wait_until(lambda: arrived(world, report_id), timeout=TIMEOUT), exim.log()[-3000:]
    [received] = arrived(world, report_id)
    verified_report_mail(received, f"exim-{REPORTED}", rcpt)
    status = exim.status_of(rcpt)
    assert status is not None and status.outcome == "delivered" and " R=tlsrpt_reports T=tlsrpt_smtp " in status.line
    # Ordinary mail to the rua domain, by the same Exim: deferred by the MTA-STS router. (Not
    # first: its failure would leave a retry record that holds the report back too.)
    exim.send(f"someone@{BROKEN.domain}", uuid.uuid4().hex)
    status = exim.status_of(f"someone@{BROKEN.domain}")
    assert status is not None and status.outcome == "deferred" and " R=mtasts_enforce " in status.line, exim.log()
