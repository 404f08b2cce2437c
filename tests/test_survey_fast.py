"""Survey rows (README "Survey") on in-memory DNS and policy hosts: the fast tier beside
test_survey.py, which runs the real command against the real servers."""

from __future__ import annotations

import pytest

from mtasts_policyd.core.errors import FailureKind
from mtasts_policyd.ops.survey import Surveyor, SurveySummary, markdown_cells

pytestmark = pytest.mark.fast

MISMATCH = "version: STSv1\nmode: enforce\nmx: mx1.{d}\nmax_age: 86400\n"  # forgets a.mx.{d}
NONE = "version: STSv1\nmode: none\nmax_age: 86400\n"
D = "example.test"


@pytest.fixture
def surveyor(fake_net) -> Surveyor:
    return Surveyor(fake_net.dns, fetcher=fake_net.https)


def test_enforce_policy_with_matching_mx_and_tlsrpt(fake_net, surveyor):
    fake_net.publish(D, id="e1")
    fake_net.dns.set(f"_smtp._tls.{D}", "TXT", [f"v=TLSRPTv1; rua=mailto:tls@{D}", ",https://r.example/x"])
    row = surveyor.survey(D)
    assert (row.outcome, row.txt_status, row.policy_status, row.txt_record, row.policy_id) == (
        "enforce", "valid", "ok", "v=STSv1; id=e1", "e1")
    assert row.mx_hosts == (f"mx1.{D}", f"a.mx.{D}") and row.mx_match is True
    assert row.tlsrpt is not None and row.tlsrpt.rua == (f"mailto:tls@{D}", "https://r.example/x")


def test_mx_host_outside_the_patterns(fake_net, surveyor):
    # RFC 8461 §4.1: a sender delivers only to MX hosts matching a pattern.
    fake_net.publish(D, MISMATCH)
    row = surveyor.survey(D)
    assert row.mx_match is False and row.mx_unmatched == (f"a.mx.{D}",)
    assert markdown_cells(row)[6] == f"no: a.mx.{D}"


def test_no_mx_is_the_domain_itself_and_null_mx_is_shown(fake_net, surveyor):
    # RFC 5321 §5.1 and RFC 7505: the same rule as resolution (net/lookup.mail_hosts).
    fake_net.publish(D, "version: STSv1\nmode: testing\nmx: *.test\nmax_age: 86400\n")
    fake_net.dns.remove(D, "MX")
    fake_net.dns.set(D, "A", "192.0.2.1")
    assert surveyor.survey(D).mx_hosts == (D,) and surveyor.survey(D).mx_match is True
    fake_net.dns.set(D, "MX", "0 .")
    row = surveyor.survey(D)
    assert row.mx_hosts == () and markdown_cells(row)[6] == "null MX (RFC 7505)"


@pytest.mark.parametrize("setup, field, kind", [
    (lambda net: None, "txt_failure", FailureKind.NO_RECORD),
    (lambda net: net.dns.set(f"_mta-sts.{D}", "TXT", "v=STSv1; id=2025-11-09"), "txt_failure",
     FailureKind.INVALID_RECORD),
    (lambda net: (net.publish(D), net.dns.fault(f"_mta-sts.{D}", "timeout")), "txt_failure",
     FailureKind.DNS_TEMPORARY),
    (lambda net: net.publish(D, status=404), "policy_failure", FailureKind.FETCH_ERROR),
    (lambda net: (net.publish(D), net.https.remove(D, unresolvable=True)), "policy_failure",
     FailureKind.FETCH_ERROR),
    (lambda net: net.publish(D, cert="untrusted"), "policy_failure", FailureKind.CERTIFICATE_INVALID),
    (lambda net: net.publish(D, "version: STSv1\nmode: enforced\n"), "policy_failure", FailureKind.INVALID_POLICY),
])
def test_each_failure_lands_in_its_column(fake_net, surveyor, setup, field, kind):
    # RFC 8461 §3.1 then §3.3: no valid TXT record, no fetch; a fetch failure keeps the record shown.
    setup(fake_net)
    row = surveyor.survey(D)
    assert getattr(row, field).kind is kind and row.outcome == kind.value and row.policy is None
    assert row.mx_hosts is None
    if field == "txt_failure":
        assert row.txt_record is None and fake_net.https.count(D) == 0
    else:
        assert row.txt_record == "v=STSv1; id=1" and row.policy_id == "1"


def test_mode_none_checks_no_mx_and_tlsrpt_states_are_counted(fake_net, surveyor):
    fake_net.publish(D, NONE)
    fake_net.publish("broken.test")
    fake_net.dns.set("_smtp._tls.broken.test", "TXT", "v=TLSRPTv1;rua=mailto:")
    rows = [surveyor.survey(D), surveyor.survey("broken.test"), surveyor.survey("nothing.test")]
    assert rows[0].outcome == "none" and rows[0].mx_hosts is None and fake_net.dns.count(D, "MX") == 0
    assert rows[1].tlsrpt_failure.kind is FailureKind.INVALID_RECORD
    summary = SurveySummary.of(rows)
    assert summary.total == 3 and summary.outcomes["none"] == summary.outcomes["enforce"] == 1
    assert summary.outcomes["no-record"] == 1 and summary.mx_mismatch == 0
    assert summary.tlsrpt == {"valid": 0, "no-record": 2, "invalid-record": 1, "dns-temporary": 0}


def test_through_the_resolver_a_kept_policy_shows_with_its_failure(fake_net, make_fake_resolver, clock):
    # --update-cache: the daemon's view. RFC 8461 §5.1: a failed refresh keeps the cached policy;
    # the row shows both, and leaves out the TXT text only the cached policy knows.
    fake_net.publish(D, ttl=60)
    resolver = make_fake_resolver()
    surveyor = Surveyor(fake_net.dns, resolver=resolver)
    first = surveyor.survey(D)
    assert first.outcome == "enforce" and first.txt_record == "v=STSv1; id=1" and first.mx_match is True
    fake_net.publish(D, id="2", ttl=60, cert="expired")
    clock.advance(61)
    kept = surveyor.survey(D)
    assert kept.outcome == "enforce" and kept.policy_failure.kind is FailureKind.CERTIFICATE_INVALID
    assert kept.txt_record is None and kept.policy_id is None
    assert markdown_cells(kept)[2].endswith("(cached policy kept)")
    assert resolver.cache.get(D).policy_id == "1"
