"""`tlsrpt send` (RFC 8460 §5): the §5.3 mail and its DKIM signature, https POSTs to a real HTTPS
endpoint (the rig's server, test CA), once per rua, retried with back-off for a day, and `--dry-run`.
Postfix and Exim carrying the mail to an MX are tests/e2e/tlsrpt_grid.py's."""

from __future__ import annotations

import base64
import datetime
import email
import email.policy
import gzip
import json
import os
import stat
from email.message import EmailMessage

import dkim
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mtasts_policyd.core.tlsrpt_mail import SIGNED_HEADERS, mailto_address, report_message
from mtasts_policyd.core.tlsrpt_report import (PolicyType, ReportIdentity, ReportPolicy, ResultType, SessionCount,
                                               build_report, filename)
from mtasts_policyd.net.https import tls_context
from mtasts_policyd.net.trust import trust_store
from mtasts_policyd.ops.tlsrpt_send import RETRY_FOR, DkimKey, Sender, backoff, send_report, sign
from mtasts_policyd.store.tlsrpt_store import TlsRptStore
from tests.conftest import run_cli as run
from tests.test_tlsrpt_cli import DAY, ZONE, setup  # noqa: F401  (the fixture)

WHO = ReportIdentity("Reporter Inc", "tlsrpt@reporter.example", "reporter.example")
POLICY = ReportPolicy(PolicyType.STS, "rcpt.example", ("version: STSv1", "mode: enforce", "mx: *.rcpt.example",
                                                      "max_age: 86400"), ("*.rcpt.example",))
REPORT = build_report(WHO, datetime.date(2025, 11, 30), "rcpt.example", [
    SessionCount(POLICY, None, "192.0.2.1", "mx.rcpt.example", "198.51.100.7", "", 10),
    SessionCount(POLICY, ResultType.CERTIFICATE_EXPIRED, "192.0.2.1", "mx.rcpt.example", "198.51.100.7", "", 2)])
NOW = datetime.datetime(2025, 12, 1, 1, 0, tzinfo=datetime.UTC)


def rsa_key() -> tuple[bytes, str]:
    """A private key (PEM) and its DKIM key record with the tlsrpt service type (RFC 8460 §7.3)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, f"v=DKIM1; k=rsa; s=tlsrpt; p={base64.b64encode(public).decode()}"


def parse(message: bytes) -> EmailMessage:
    parsed = email.message_from_bytes(message, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


# ----- the mail (RFC 8460 §5.3) -------------------------------------------------------------------


@pytest.mark.fast
def test_the_mail_has_the_shape_of_rfc8460_5_3():
    raw = report_message(REPORT, "rcpt.example", "reporter.example", "tlsrpt@reporter.example",
                         "tls@rcpt.example", NOW)
    msg = parse(raw)
    # RFC 8460 §5.3: multipart/report with report-type "tlsrpt"; the two TLS-Report-* headers.
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "tlsrpt"
    assert msg["TLS-Report-Domain"] == "rcpt.example"
    assert msg["TLS-Report-Submitter"] == "reporter.example"
    assert msg["Subject"] == ("Report Domain: rcpt.example Submitter: reporter.example "
                              "Report-ID: <20251130.rcpt.example@reporter.example>")
    assert (msg["From"], msg["To"]) == ("tlsrpt@reporter.example", "tls@rcpt.example")
    parts = [part for part in msg.iter_parts() if part.get_content_type() == "application/tlsrpt+gzip"]
    assert len(parts) == 1
    assert parts[0].get_filename() == filename("reporter.example", "rcpt.example", REPORT.day)
    assert json.loads(gzip.decompress(parts[0].get_content())) == REPORT.to_json()
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")  # CRLF throughout, as signed


@pytest.mark.fast
def test_the_mail_asks_not_to_enforce_tls_on_itself():
    """RFC 8460 §3: report mail must not be held back by the TLS failures it reports. RFC 8689
    §5: "TLS-Required: No" asks the sending MTA to relax its TLS policy; Postfix >= 3.10 honours it
    (its TLSRPT_README), so no bypass transport is needed there. The header is signed (§5.3 DKIM)."""
    msg = parse(report_message(REPORT, "rcpt.example", "reporter.example", "tlsrpt@reporter.example",
                               "tls@rcpt.example", NOW))
    assert msg["TLS-Required"] == "No"
    assert "tls-required" in SIGNED_HEADERS


@pytest.mark.fast
def test_mailto_address():
    assert mailto_address("mailto:tls%2Breports@rcpt.example") == "tls+reports@rcpt.example"
    assert mailto_address("MAILTO:a@b.example?subject=x") == "a@b.example"
    with pytest.raises(ValueError):
        mailto_address("mailto:")


@pytest.mark.fast
def test_the_dkim_signature_verifies_as_a_tlsrpt_signature():
    pem, record = rsa_key()
    raw = report_message(REPORT, "rcpt.example", "reporter.example", "tlsrpt@reporter.example",
                         "tls@rcpt.example", NOW)
    signed = sign(raw, DkimKey("reporter.example", "tlsrpt", pem))
    names: list[bytes] = []

    def txt(name: bytes, timeout: int = 5) -> bytes:
        names.append(name)
        return record.encode() if name == b"tlsrpt._domainkey.reporter.example." else b""

    # RFC 8460 §5.3 / dkimpy "strict": valid only with a key whose service type is tlsrpt.
    assert dkim.verify(signed, dnsfunc=txt, tlsrpt="strict")
    assert names == [b"tlsrpt._domainkey.reporter.example."]
    signature = parse(signed)["DKIM-Signature"]
    tags = {t.split("=", 1)[0].strip() for t in signature.replace("\r\n", "").split(";") if "=" in t}
    assert "l" not in tags  # RFC 8460 §5.3 via dkimpy tlsrpt=True: no body length limit
    assert {"tls-report-domain", "tls-report-submitter"} <= set(
        signature.replace("\r\n", "").replace(" ", "").split("h=")[1].split(";")[0].lower().split(":"))
    # A key record without s=tlsrpt does not pass the strict check.
    plain = record.replace(" s=tlsrpt;", "")
    assert not dkim.verify(signed, dnsfunc=lambda name, timeout=5: plain.encode(), tlsrpt="strict")


# ----- https (RFC 8460 §5.4), once per rua, retries -----------------------------------------------


@pytest.fixture
def endpoint(rig, tmp_path):
    """A store, an https rua on the rig's HTTPS server, and how reports leave (trusting the test CA)."""
    path = f"/tlsrpt/{tmp_path.name}"
    rua = f"https://localhost:{rig.https.port}{path}"
    store = TlsRptStore(str(tmp_path / "tlsrpt.sqlite3"))
    sender = Sender("tlsrpt@reporter.example", "reporter.example", ("/bin/false",),
                    https_context=tls_context(trust_store(rig.https.ca_file)), https_timeout=10)
    yield store, rua, path, sender
    store.close()


def posts(rig, path: str) -> list:
    return rig.https.posts_to("localhost", path)


def test_https_posts_the_gzip_once(rig, endpoint):
    store, rua, path, sender = endpoint
    rig.https.set_rua("localhost", path, 200)
    sent = send_report(store, REPORT, "rcpt.example", (rua,), sender, NOW)
    assert [s.outcome for s in sent] == ["sent"]
    [post] = posts(rig, path)
    assert post.content_type == "application/tlsrpt+gzip"  # RFC 8460 §5.4
    assert json.loads(gzip.decompress(post.body)) == REPORT.to_json()
    # Never the same report twice to one rua: a later run (even a day later) sends nothing.
    again = send_report(store, REPORT, "rcpt.example", (rua,), sender, NOW + datetime.timedelta(days=1))
    assert [s.outcome for s in again] == ["already-sent"]
    assert len(posts(rig, path)) == 1
    delivery = store.delivery(REPORT.report_id, rua)
    assert delivery is not None and (delivery.state, delivery.attempts) == ("sent", 1)


def test_a_failing_endpoint_is_retried_after_a_back_off_not_lost(rig, endpoint):
    store, rua, path, sender = endpoint
    rig.https.set_rua("localhost", path, 503, 200)
    first = send_report(store, REPORT, "rcpt.example", (rua,), sender, NOW)
    assert [(s.outcome, s.detail) for s in first] == [("failed", "HTTP 503 Service Unavailable")]
    early = send_report(store, REPORT, "rcpt.example", (rua,), sender, NOW + datetime.timedelta(seconds=60))
    assert [s.outcome for s in early] == ["waiting"]
    assert len(posts(rig, path)) == 1
    later = NOW + datetime.timedelta(seconds=backoff(1))
    assert [s.outcome for s in send_report(store, REPORT, "rcpt.example", (rua,), sender, later)] == ["sent"]
    assert len(posts(rig, path)) == 2
    delivery = store.delivery(REPORT.report_id, rua)
    assert delivery is not None and (delivery.state, delivery.attempts) == ("sent", 2)


def test_retries_end_after_a_day(rig, endpoint):
    store, rua, path, sender = endpoint
    rig.https.set_rua("localhost", path, 500)
    when, outcomes = NOW, []
    for _ in range(30):
        [result] = send_report(store, REPORT, "rcpt.example", (rua,), sender, when)
        outcomes.append(result.outcome)
        if result.outcome == "given-up":
            break
        when += datetime.timedelta(seconds=backoff(len(posts(rig, path))))
    assert outcomes[-1] == "given-up" and set(outcomes[:-1]) == {"failed"}
    assert when - NOW < datetime.timedelta(seconds=RETRY_FOR)
    attempts = len(posts(rig, path))
    assert attempts == len(outcomes)
    after = send_report(store, REPORT, "rcpt.example", (rua,), sender, when + datetime.timedelta(days=1))
    assert [s.outcome for s in after] == ["given-up"] and len(posts(rig, path)) == attempts


def test_redirects_are_not_followed(rig, endpoint):
    store, rua, path, sender = endpoint
    rig.https.set_rua("localhost", path, 302)
    [result] = send_report(store, REPORT, "rcpt.example", (rua,), sender, NOW)
    assert (result.outcome, result.detail) == ("failed", "HTTP 302 Found")
    assert rig.https.posts_to("localhost", "/elsewhere") == []


def test_an_untrusted_certificate_is_a_failure(rig, endpoint, tmp_path):
    store, rua, path, sender = endpoint
    rig.https.set_rua("localhost", path, 200)
    other = tmp_path / "other-ca.pem"
    rig.https.untrusted_ca.cert_pem.write_to_path(str(other))
    distrusting = Sender(sender.address, sender.submitter, https_context=tls_context(trust_store(str(other))))
    [result] = send_report(store, REPORT, "rcpt.example", (rua,), distrusting, NOW)
    assert result.outcome == "failed" and "CERTIFICATE_VERIFY_FAILED" in result.detail
    assert posts(rig, path) == []


def test_an_unusable_https_uri_is_a_failure_not_a_crash(endpoint):
    store, _, _, sender = endpoint
    [result] = send_report(store, REPORT, "rcpt.example", ("https://localhost:notaport/x",), sender, NOW)
    assert result.outcome == "failed" and "not a usable https URI" in result.detail


def test_dry_run_sends_and_records_nothing(rig, endpoint):
    store, rua, path, sender = endpoint
    rig.https.set_rua("localhost", path, 200)
    assert [s.outcome for s in send_report(store, REPORT, "rcpt.example", (rua,), sender, NOW,
                                           dry_run=True)] == ["would-send"]
    assert posts(rig, path) == [] and store.delivery(REPORT.report_id, rua) is None


# ----- the command ---------------------------------------------------------------------------------


def capture_sendmail(tmp_path) -> tuple[str, str]:
    """An executable standing where sendmail would: stores its arguments and the message."""
    out = tmp_path / "sent"
    out.mkdir()
    script = tmp_path / "sendmail"
    script.write_text(f'#!/bin/sh\nn=$(ls {out} | wc -l)\necho "$@" > {out}/$n.args\ncat > {out}/$n.eml\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script), str(out)


def test_send_command_delivers_to_every_rua_once_and_dry_run_sends_nothing(rig, setup, tmp_path):
    config, log = setup
    pem, record = rsa_key()
    key_file = tmp_path / "dkim.pem"
    key_file.write_bytes(pem)
    sendmail, sent_dir = capture_sendmail(tmp_path)
    domain = f"x-enforce-expired.{ZONE}"
    path = f"/tlsrpt/{tmp_path.name}"
    rig.https.set_rua("localhost", path, 200)
    rig.dns.set(f"_smtp._tls.{domain}", "TXT",
                f"v=TLSRPTv1; rua=mailto:tls@{domain},https://localhost:{rig.https.port}{path}")
    data = yaml.safe_load(open(config))
    data["tlsrpt"].update({"sendmail": f"{sendmail} -oi", "dkim": {"domain": "reporter.example",
                                                                   "selector": "tlsrpt", "key_file": str(key_file)}})
    with open(config, "w") as handle:
        yaml.safe_dump(data, handle)
    assert run("tlsrpt", "ingest", "--config", config, "--postfix-log", log).returncode == 0
    with TlsRptStore(str(tmp_path / "tlsrpt.sqlite3")) as store:
        others = [d for d in store.domains(DAY) if d != domain]
    for other in others:  # records other tests left in the shared DNS server: only ours asks here
        rig.dns.remove(f"_smtp._tls.{other}", "TXT")
    output = tmp_path / "out"
    args = ("tlsrpt", "send", "--config", config, "--day", DAY.isoformat(), "--output", str(output))

    dry = run(*args, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"would-send domain={domain} report_id={DAY:%Y%m%d}.{domain}@reporter.example rua=mailto:tls@{domain}" \
        in dry.stdout
    assert os.listdir(sent_dir) == [] and posts(rig, path) == [] and not output.exists()

    real = run(*args)
    assert real.returncode == 0, real.stderr
    assert f"sent domain={domain}" in real.stdout and "failed 0" in real.stdout
    assert len(posts(rig, path)) == 1
    assert open(os.path.join(sent_dir, "0.args")).read().split() == [
        "-oi", "-i", "-f", "tlsrpt@reporter.example", f"tls@{domain}"]
    message = open(os.path.join(sent_dir, "0.eml"), "rb").read()
    assert parse(message)["TLS-Report-Domain"] == domain
    assert dkim.verify(message, dnsfunc=lambda name, timeout=5: record.encode(), tlsrpt="strict")

    again = run(*args)
    assert again.returncode == 0 and f"already-sent domain={domain}" in again.stdout
    assert len(os.listdir(sent_dir)) == 2 and len(posts(rig, path)) == 1
