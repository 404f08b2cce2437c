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
from tests.e2e.postfix_mta import ROOT, PostfixInstance
from tests.e2e.world import Mx, Scenario, World, wait_until
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


@pytest.fixture(scope="module")
def reported_day(world: World, tmp_path_factory):
    """A store with a day of sessions for REPORTED, its _smtp._tls record with both ruas, the rua
    domain with a broken MX, the https endpoint, and the DKIM key in DNS."""
    directory = tmp_path_factory.mktemp("tlsrpt-send")
    broken = Scenario("rua-broken", "version: STSv1\nmode: enforce\nmx: *.{d}\nmax_age: 86400\n",
                      (Mx("mx", "wrong-cert"),), None)
    world.publish(broken)
    world.dns.set(f"_smtp._tls.{REPORTED}", "TXT",
                  f"v=TLSRPTv1; rua=mailto:tlsrpt@{broken.domain},https://{RUA_HOST}{RUA_PATH}")
    world.dns.set(RUA_HOST, "A", "127.0.0.1")
    world.https.set_rua(RUA_HOST, RUA_PATH, 200)
    pem, record = rsa_key()
    # RFC 8460 §7.3: the key's service type is tlsrpt; long TXT data as several strings.
    world.dns.set("tlsrpt._domainkey.sender.e2e.test", "TXT", [record[i:i + 200] for i in range(0, len(record), 200)])
    (directory / "dkim.pem").write_bytes(pem)
    day = datetime.datetime.now(datetime.UTC).date() - datetime.timedelta(days=1)
    store_path = directory / "counts.sqlite3"
    with TlsRptStore(str(store_path)) as store:
        policy = ReportPolicy(PolicyType.NO_POLICY_FOUND, REPORTED)
        batch = Batch(Position("test", "0:0", "-", 0))
        batch.sessions.append((day, SessionCount(policy, None, "127.0.0.1", f"mx.{REPORTED}", "127.0.0.9", "", 7)))
        store.commit(batch, 0.0)
    config = directory / "tlsrpt.yaml"
    config.write_text(yaml.safe_dump({
        "dns": {"nameservers": ["127.0.0.1"], "timeout": 3},
        "cache": {"path": str(world.directory / "policyd" / "cache.sqlite3")},
        "tlsrpt": {"store": str(store_path), "sender": SENDER,
                   "dkim": {"domain": "sender.e2e.test", "selector": "tlsrpt", "key_file": str(directory / "dkim.pem")}},
    }))
    return broken, day, config, directory


def outcomes(stdout: str) -> list[str]:
    """The first word of each per-rua line of `tlsrpt send`."""
    return [line.split()[0] for line in stdout.splitlines() if " rua=" in line]


def test_report_mail_and_post_arrive_once_past_our_own_enforcement(world: World, postfix, reported_day):
    broken, day, config, directory = reported_day
    mx = world.sinks[f"mx.{broken.domain}"]
    # Ordinary mail to the rua domain is held back by our own policy (enforce, misnamed MX).
    marker = uuid.uuid4().hex
    postfix.send(f"someone@{broken.domain}", marker)
    assert wait_until(lambda: postfix.status_of(f"someone@{broken.domain}") is not None, timeout=TIMEOUT)
    assert postfix.status_of(f"someone@{broken.domain}").status == "deferred"
    assert world.received(marker) == {}
    postfix.delete_queued(f"someone@{broken.domain}")

    args = ("tlsrpt", "send", "--config", str(config), "--day", day.isoformat(), "--output",
            str(directory / "reports"))
    settings = yaml.safe_load(config.read_text())
    settings["tlsrpt"]["sendmail"] = f"/usr/sbin/sendmail -C {postfix.config_dir}"
    config.write_text(yaml.safe_dump(settings))

    dry = run_cli(*args, "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert outcomes(dry.stdout) == ["would-send", "would-send"] and world.https.posts_to(RUA_HOST, RUA_PATH) == []

    result = run_cli(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert outcomes(result.stdout) == ["sent", "sent"], result.stdout
    report_id = f"{day:%Y%m%d}.{REPORTED}@sender.e2e.test"

    # https (RFC 8460 §5.4): the POST with its media type; the body gunzips to the report.
    [post] = world.https.posts_to(RUA_HOST, RUA_PATH)
    assert post.content_type == "application/tlsrpt+gzip"
    report = json.loads(gzip.decompress(post.body))
    assert report["report-id"] == report_id
    assert report["policies"][0]["summary"] == {"total-successful-session-count": 7, "total-failure-session-count": 0}

    # mailto (RFC 8460 §5.3): through Postfix's tlsrpt transport to the misnamed MX.
    def arrived() -> list:
        return [m for m in mx.messages if report_id.encode() in m.data]
    assert wait_until(arrived, timeout=TIMEOUT), postfix.log()[-3000:]
    [received] = arrived()
    assert received.mail_from == SENDER and received.rcpt_to == [f"tlsrpt@{broken.domain}"]
    # The contrib transport carried it (its status line may follow the sink's acceptance a little).
    assert wait_until(lambda: postfix.log_lines("postfix/tlsrpt/smtp[", f"to=<tlsrpt@{broken.domain}>", "status=sent"),
                      timeout=10), postfix.log()[-3000:]
    message = email.message_from_bytes(received.data, policy=email.policy.default)
    assert message["TLS-Report-Domain"] == REPORTED and message["TLS-Report-Submitter"] == "sender.e2e.test"
    assert message.get_content_type() == "multipart/report" and message.get_param("report-type") == "tlsrpt"
    # The signature verifies against the s=tlsrpt key in the world's DNS (dkimpy's own lookup).
    assert dkim.verify(received.data, tlsrpt="strict")

    # Never twice to one rua.
    again = run_cli(*args)
    assert again.returncode == 0 and outcomes(again.stdout) == ["already-sent", "already-sent"], again.stdout
    assert len(world.https.posts_to(RUA_HOST, RUA_PATH)) == 1
    postfix.flush()
    assert not wait_until(lambda: len(arrived()) > 1, timeout=3)
