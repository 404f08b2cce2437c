"""RFC 8460 §4 report model, §5.1 file name, §5.2 gzip: against the RFC's own example (Appendix B)."""

from __future__ import annotations

import datetime
import gzip
import json
import random
import re

import pytest

from mtasts_policyd.core.tlsrpt_report import (
    PolicyType,
    ReportIdentity,
    ReportPolicy,
    ResultType,
    SessionCount,
    build_report,
    filename,
    report_id,
)

pytestmark = pytest.mark.fast  # pure: no sockets, no processes

# RFC 8460 Appendix B, verbatim but for whitespace.
RFC_EXAMPLE = json.loads("""
{
  "organization-name": "Company-X",
  "date-range": {
    "start-datetime": "2016-04-01T00:00:00Z",
    "end-datetime": "2016-04-01T23:59:59Z"
  },
  "contact-info": "sts-reporting@company-x.example",
  "report-id": "5065427c-23d3-47ca-b6e0-946ea0e8c4be",
  "policies": [{
    "policy": {
      "policy-type": "sts",
      "policy-string": ["version: STSv1","mode: testing",
            "mx: *.mail.company-y.example","max_age: 86400"],
      "policy-domain": "company-y.example",
      "mx-host": ["*.mail.company-y.example"]
    },
    "summary": {
      "total-successful-session-count": 5326,
      "total-failure-session-count": 303
    },
    "failure-details": [{
      "result-type": "certificate-expired",
      "sending-mta-ip": "2001:db8:abcd:0012::1",
      "receiving-mx-hostname": "mx1.mail.company-y.example",
      "failed-session-count": 100
    }, {
      "result-type": "starttls-not-supported",
      "sending-mta-ip": "2001:db8:abcd:0013::1",
      "receiving-mx-hostname": "mx2.mail.company-y.example",
      "receiving-ip": "203.0.113.56",
      "failed-session-count": 200,
      "additional-information": "https://reports.company-x.example/report_info?id=5065427c-23d3#StarttlsNotSupported"
    }, {
      "result-type": "validation-failure",
      "sending-mta-ip": "198.51.100.62",
      "receiving-ip": "203.0.113.58",
      "receiving-mx-hostname": "mx-backup.mail.company-y.example",
      "failed-session-count": 3,
      "failure-reason-code": "X509_V_ERR_PROXY_PATH_LENGTH_EXCEEDED"
    }]
  }]
}
""")

DAY = datetime.date(2016, 4, 1)
IDENTITY = ReportIdentity("Company-X", "sts-reporting@company-x.example", "company-x.example")
STS = ReportPolicy(PolicyType.STS, "company-y.example",
                   ("version: STSv1", "mode: testing", "mx: *.mail.company-y.example", "max_age: 86400"),
                   ("*.mail.company-y.example",))


def example_counts() -> list[SessionCount]:
    """The sessions behind the RFC's example, split over several rows as a store would hold them."""
    return [
        SessionCount(STS, None, "2001:db8:abcd:0012::1", "mx1.mail.company-y.example", "203.0.113.55", "", 5000),
        SessionCount(STS, None, "198.51.100.62", "mx-backup.mail.company-y.example", "203.0.113.58", "", 326),
        SessionCount(STS, ResultType.CERTIFICATE_EXPIRED, "2001:db8:abcd:0012::1", "mx1.mail.company-y.example",
                     "", "", 60),
        SessionCount(STS, ResultType.CERTIFICATE_EXPIRED, "2001:db8:abcd:0012::1", "mx1.mail.company-y.example",
                     "", "", 40),
        SessionCount(STS, ResultType.STARTTLS_NOT_SUPPORTED, "2001:db8:abcd:0013::1", "mx2.mail.company-y.example",
                     "203.0.113.56", "", 200),
        SessionCount(STS, ResultType.VALIDATION_FAILURE, "198.51.100.62", "mx-backup.mail.company-y.example",
                     "203.0.113.58", "X509_V_ERR_PROXY_PATH_LENGTH_EXCEEDED", 3),
    ]


def test_result_types_are_the_iana_registry():
    # RFC 8460 §4.3 and the IANA "STARTTLS Validation Result Types" registry (§6.6): 11 names.
    assert {t.value for t in ResultType} == {
        "starttls-not-supported", "certificate-host-mismatch", "certificate-expired", "tlsa-invalid",
        "dnssec-invalid", "dane-required", "certificate-not-trusted", "sts-policy-invalid",
        "sts-webpki-invalid", "validation-failure", "sts-policy-fetch-error"}
    assert {t.value for t in PolicyType} == {"sts", "tlsa", "no-policy-found"}  # §4.4 policy-type


def test_rfc_example_is_rebuilt_field_for_field():
    # RFC 8460 §4.4 / Appendix B: the same sessions give the example's report, member for member
    # (additional-information is optional and we do not write it; our report-id is our own).
    report = build_report(IDENTITY, DAY, "company-y.example", example_counts())
    expected = json.loads(json.dumps(RFC_EXAMPLE))
    del expected["policies"][0]["failure-details"][1]["additional-information"]
    expected["report-id"] = "20160401.company-y.example@company-x.example"
    assert json.loads(report.json_bytes()) == expected
    assert report.policies[0].failed == 303


def test_members_in_the_rfc_order():
    data = json.loads(build_report(IDENTITY, DAY, "company-y.example", example_counts()).json_bytes())
    assert list(data) == ["organization-name", "date-range", "contact-info", "report-id", "policies"]
    assert list(data["date-range"]) == ["start-datetime", "end-datetime"]
    policy = data["policies"][0]
    assert list(policy) == ["policy", "summary", "failure-details"]
    assert list(policy["policy"]) == ["policy-type", "policy-string", "policy-domain", "mx-host"]
    assert list(policy["summary"]) == ["total-successful-session-count", "total-failure-session-count"]
    assert list(policy["failure-details"][2]) == ["result-type", "sending-mta-ip", "receiving-mx-hostname",
                                                   "receiving-ip", "failed-session-count", "failure-reason-code"]


def test_same_counts_same_bytes_in_any_order():
    # The issue: building twice gives the same report-id and content; gzip without a time stamp.
    counts = example_counts()
    first = build_report(IDENTITY, DAY, "company-y.example", counts)
    random.Random(7).shuffle(counts)
    second = build_report(IDENTITY, DAY, "company-y.example", counts)
    assert first == second
    assert first.json_bytes() == second.json_bytes()
    assert first.gzip_bytes() == second.gzip_bytes()
    packed = first.gzip_bytes()
    assert packed[:2] == b"\x1f\x8b" and packed[4:8] == b"\0\0\0\0"  # RFC 1952 MTIME = 0
    assert gzip.decompress(packed) == first.json_bytes()


def test_no_policy_found_has_no_policy_string_and_no_failure_details():
    # RFC 8460 §4.4: policy-string and mx-host describe a policy; none was found. A policy with
    # only successes has no failure-details.
    policy = ReportPolicy(PolicyType.NO_POLICY_FOUND, "example.net")
    report = build_report(IDENTITY, DAY, "example.net",
                          [SessionCount(policy, None, "192.0.2.1", "mx.example.net", "192.0.2.25", "", 4)])
    assert json.loads(report.json_bytes())["policies"] == [{
        "policy": {"policy-type": "no-policy-found", "policy-domain": "example.net"},
        "summary": {"total-successful-session-count": 4, "total-failure-session-count": 0}}]


def test_other_domains_and_empty_rows_are_left_out():
    other = ReportPolicy(PolicyType.NO_POLICY_FOUND, "other.example")
    rows = example_counts() + [SessionCount(other, None, "192.0.2.1", "mx.other.example", "", "", 9),
                               SessionCount(STS, ResultType.DANE_REQUIRED, "192.0.2.1", "mx", "", "", 0)]
    report = build_report(IDENTITY, DAY, "company-y.example", rows)
    assert [p.policy for p in report.policies] == [STS]
    assert {d.result_type for d in report.policies[0].failure_details} == {
        ResultType.CERTIFICATE_EXPIRED, ResultType.STARTTLS_NOT_SUPPORTED, ResultType.VALIDATION_FAILURE}


def test_two_policies_in_one_day_are_two_entries():
    # The policy changed during the day: each session is counted under the policy it met (§4.4).
    newer = ReportPolicy(PolicyType.STS, "company-y.example", ("version: STSv1", "mode: enforce",
                         "mx: *.mail.company-y.example", "max_age: 86400"), ("*.mail.company-y.example",))
    rows = [SessionCount(newer, None, "192.0.2.1", "mx1.mail.company-y.example", "", "", 2)] + example_counts()
    report = build_report(IDENTITY, DAY, "company-y.example", rows)
    assert [(p.policy.policy_string[1], p.successful, p.failed) for p in report.policies] == [
        ("mode: enforce", 2, 0), ("mode: testing", 5326, 303)]


def test_date_range_is_the_utc_day():
    report = build_report(IDENTITY, datetime.date(2024, 12, 31), "company-y.example", example_counts())
    assert json.loads(report.json_bytes())["date-range"] == {
        "start-datetime": "2024-12-31T00:00:00Z", "end-datetime": "2024-12-31T23:59:59Z"}


def test_report_id_is_deterministic_and_per_reporter_domain_and_day():
    assert report_id(DAY, "company-y.example", "company-x.example") == "20160401.company-y.example@company-x.example"
    ids = {report_id(day, domain, submitter) for day in (DAY, DAY + datetime.timedelta(days=1))
           for domain in ("a.example", "b.example") for submitter in ("x.example", "y.example")}
    assert len(ids) == 8
    with pytest.raises(ValueError):
        report_id(DAY, "bad!domain", "x.example")


# RFC 8460 §5.1 filename ABNF (extension "json" / "json.gz"; unique-id 1*(ALPHA / DIGIT)).
FILENAME = re.compile(r"(?P<sender>[^!]+)!(?P<domain>[^!]+)!(?P<begin>\d+)!(?P<end>\d+)(?:!(?P<uid>[A-Za-z0-9]+))?"
                      r"\.(?P<ext>json|json\.gz)")


def test_filename_per_rfc_8460_section_5_1():
    # The RFC's example shape: mail.sndr.example.com!example.net!1470013207!1470186007!001.json.gz
    assert FILENAME.fullmatch("mail.sndr.example.com!example.net!1470013207!1470186007!001.json.gz")
    name = filename("mail.sndr.example.com", "example.net", DAY)
    assert name == "mail.sndr.example.com!example.net!1459468800!1459555199.json.gz"
    match = FILENAME.fullmatch(name)
    assert match and match["uid"] is None and match["ext"] == "json.gz"
    start = datetime.datetime.fromtimestamp(int(match["begin"]), datetime.UTC)
    assert start.isoformat() == "2016-04-01T00:00:00+00:00"
    assert int(match["end"]) - int(match["begin"]) == 86399  # the date-range's end-datetime
    assert filename("Mail.Sndr.Example.com", "example.net", DAY, "001", compressed=False) == \
        "mail.sndr.example.com!example.net!1459468800!1459555199!001.json"
    with pytest.raises(ValueError, match="letters and digits"):
        filename("a.example", "b.example", DAY, "0-1")
    with pytest.raises(ValueError, match="not a domain"):
        filename("a.example", "b!example", DAY)
