"""RFC 8461 §3.1: the _mta-sts TXT record, as pure parsing, and all corpus TXT values."""

from __future__ import annotations

import csv

import pytest

from mtasts_policyd.errors import FailureKind, InvalidRecord, NoRecord
from mtasts_policyd.txt import join_strings, parse_record, select_record
from tests.conftest import CORPUS


def test_minimal_record():
    assert select_record([b"v=STSv1; id=20160831085700Z;"]).id == "20160831085700Z"


def test_split_strings_are_joined_without_spaces():
    # RFC 8461 §3.1: a record of several strings is treated as their concatenation, no spaces added.
    assert select_record([join_strings([b"v=STSv1; id=2016", b"0831085700Z"])]).id == "20160831085700Z"


@pytest.mark.parametrize("text", ["v=STSv1;id=1", "v=STSv1 ; id=1", "v=STSv1;\tid=1 ;", "v=STSv1; id=1;;"])
def test_whitespace_and_delimiters(text):
    # RFC 8461 §3.1: sts-field-delim = *WSP ";" *WSP; a trailing delimiter is allowed.
    assert select_record([text.encode()]).id == "1"


def test_unknown_fields_ignored():
    # RFC 8461 §3.1: unknown fields SHALL be ignored, in any order after the version.
    record = parse_record("v=STSv1; ext_1=a.b; id=abc; preload")
    assert record.id == "abc"
    assert record.extensions == (("ext_1", "a.b"),)


@pytest.mark.parametrize("text,why", [
    ("v=STSv1;", "no id"),
    ("v=STSv1; id=", "not 1-32"),
    ("v=STSv1; id=2025-11-09", "not 1-32"),
    ("v=STSv1; id=" + "a" * 33, "not 1-32"),
    ("v=STSv1; id=1; id=2", "more than one id"),
    ("v=STSv1 id=abc", "not followed by ';'"),
])
def test_invalid_records(text, why):
    # RFC 8461 §3.1: id = 1*32(ALPHA / DIGIT), required; an invalid record means no policy.
    with pytest.raises(InvalidRecord, match=why) as info:
        select_record([text.encode()])
    assert info.value.kind is FailureKind.INVALID_RECORD


def test_records_not_beginning_with_version_are_discarded():
    # RFC 8461 §3.1: discard records that do not begin with "v=STSv1;" (version must be first).
    assert select_record([b"v=spf1 -all", b"v=STSv1; id=7", b"id=abc; v=STSv1"]).id == "7"
    with pytest.raises(NoRecord):
        select_record([b"v=spf1 -all", b"id=abc; v=STSv1"])
    with pytest.raises(NoRecord):
        select_record([])


def test_two_sts_records_mean_no_policy():
    # RFC 8461 §3.1: if the number of resulting records is not one, assume no policy.
    with pytest.raises(InvalidRecord, match="exactly one"):
        select_record([b"v=STSv1; id=1", b"v=STSv1; id=2"])


def test_non_ascii_record_is_invalid():
    # RFC 8461 §3.1: the record is US-ASCII.
    with pytest.raises(InvalidRecord, match="US-ASCII"):
        select_record(["v=STSv1; id=1; x=é".encode()])


# Corpus rows we expect to be rejected, and why. Every other STSv1 row must parse, with the id
# the owner wrote. Values are as found in sources: escapes of the source format are not decoded.
CORPUS_INVALID = {
    "v=STSv1;id=${{ env.GITHUB_RUN_ID }};": "placeholder",
    "v=STSv1; id=<policy-id>": "placeholder",
    "v=STSv1; id=${var.mta_sts_policy_id};": "placeholder",
    "v=STSv1; id=<id>": "placeholder",
    "v=STSv1;": "no id",
    "v=STSv1; id=<policy_id>": "placeholder",
    "v=STSv1; id=<new value>": "placeholder",
    "v=STSv1; id=<some-id>": "placeholder",
    "v=STSv1; id=<datestamp>": "placeholder",
    "v=STSv1; id=": "empty id",
    "v=STSv1; id=2025-11-09": "hyphen in id",
    "v=STSv1;id=${var.mta_sts_id};": "placeholder",
    "v=STSv1;id=": "empty id",
    "v=STSv1; preload;": "no id (HSTS confusion)",
    "v=STSv1; id=$(date -u '+%Y%m%d%H%M')": "placeholder",
    "v=STSv1\\; id=1": "source escape: the backslash is not on the wire",
    "v=STSv1; id={Choose a String Value for each policy Update}Z;": "placeholder",
    "v=STSv1; id=logimail-v1": "hyphen in id",
    "v=STSv1; id=<bump on every change>": "placeholder",
    "v=STSv1 id=021120211155": "missing ';'",
    "v=STSv1 id=abc": "missing ';'",
    "v=STSv1;\\040id=202001281902Z": "tinydns octal escape in source",
}


def corpus_sts_values() -> list[str]:
    with open(CORPUS / "txt-records.tsv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    return [row["value"] for row in rows if "STSv1" in row["value"]]


def test_corpus_has_the_documented_rows():
    values = corpus_sts_values()
    assert len(values) >= 70
    assert set(CORPUS_INVALID) - set(values) <= {"v=STSv1;\\040id=202001281902Z"}


@pytest.mark.parametrize("value", corpus_sts_values())
def test_corpus_txt_value(value):
    if value in CORPUS_INVALID or value.startswith("id="):
        with pytest.raises((InvalidRecord, NoRecord)):
            select_record([value.encode()])
        return
    expected = value.split("id=", 1)[1].split(";")[0].strip()
    assert select_record([value.encode()]).id == expected


def test_tinydns_escape_decoded_is_valid():
    # The corpus keeps tinydns's source text; on the wire \040 is a space, which §3.1 allows.
    assert select_record([b"v=STSv1; id=202001281902Z"]).id == "202001281902Z"
