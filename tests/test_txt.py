"""RFC 8461 §3.1: the _mta-sts TXT record, as pure parsing, and all corpus TXT values."""

from __future__ import annotations

import csv
import re

import pytest

from mtasts_policyd.core.errors import FailureKind, InvalidRecord, NoRecord
from mtasts_policyd.core.sts_record import join_strings, parse_sts_record, select_record
from tests.conftest import CORPUS

pytestmark = pytest.mark.fast  # pure: no sockets, no processes


def test_minimal_record():
    assert select_record([b"v=STSv1; id=20160831085700Z;"]).id == "20160831085700Z"


def test_split_strings_are_joined_without_spaces():
    # RFC 8461 §3.1: a record of several strings is treated as their concatenation, no spaces added.
    assert select_record([join_strings([b"v=STSv1; id=2016", b"0831085700Z"])]).id == "20160831085700Z"


@pytest.mark.parametrize("text", ["v=STSv1;id=1", "v=STSv1 ; id=1", "v=STSv1;\tid=1 ;", "v=STSv1; id=1; ",
                                  "v=STSv1\t;id=1\t;\t"])
def test_whitespace_and_delimiters(text):
    # RFC 8461 §3.1: sts-field-delim = *WSP ";" *WSP; one delimiter may end the record.
    assert select_record([text.encode()]).id == "1"


def test_unknown_fields_ignored():
    # RFC 8461 §3.1: unknown fields SHALL be ignored, in any order after the version.
    record = parse_sts_record("v=STSv1; ext_1=a.b; id=abc; X.y-z=1:2/<>")
    assert record.id == "abc"
    assert record.extensions == (("ext_1", "a.b"), ("X.y-z", "1:2/<>"))


def test_duplicate_fields_first_occurrence_wins():
    # A field given twice is valid syntax; as in RFC 8461 §3.2, the first occurrence wins, no error.
    assert select_record([b"v=STSv1; id=1; id=2"]).id == "1"
    record = parse_sts_record("v=STSv1; x=a; id=3; x=b; id=4")
    assert (record.id, record.extensions) == ("3", (("x", "a"),))
    # The later field is ignored, but it must still be a valid field.
    with pytest.raises(InvalidRecord, match="empty value"):
        select_record([b"v=STSv1; id=1; id="])


@pytest.mark.parametrize("text,why", [
    ("v=STSv1;", "no id"),
    ("v=STSv1; ", "no id"),
    ("v=STSv1; x=1", "no id"),
    ("v=STSv1; id=", "not 1-32"),
    ("v=STSv1; id=2025-11-09", "not 1-32"),
    ("v=STSv1; id=" + "a" * 33, "not 1-32"),
    ("v=STSv1; id=1 ", "whitespace at the end"),  # trailing whitespace that is no delimiter
    ("v=STSv1; id=1\t", "whitespace at the end"),
    ("v=STSv1; id=1 x=2", "followed by ' x=2', not by ';'"),
    ("v=STSv1; id=1;;", "empty field"),
    ("v=STSv1;; id=1", "empty field"),
    ("v=STSv1; id=1; ; x=2", "empty field"),
    ("v=STSv1; id=1; preload", "not name=value"),
    ("v=STSv1; id=1; =x", "field name ''"),
    ("v=STSv1; id=1; _x=1", "sts-ext-name"),
    ("v=STSv1; id=1; " + "x" * 33 + "=1", "sts-ext-name"),
    ("v=STSv1; id=1; x@y=1", "sts-ext-name"),
    ("v=STSv1; id=1; x=", "empty value"),
    ("v=STSv1; id=1; x=a=b", "sts-ext-value"),
    ("v=STSv1; id=1; x=a\x7f", "sts-ext-value"),
    ("v=STSv1; id=1; x=a\x00", "sts-ext-value"),
    ("v=STSv1 id=abc", "must be followed by ';'"),
    ("v=STSv1", "must be followed by ';'"),
])
def test_invalid_records(text, why):
    # RFC 8461 §3.1: a record that does not match the ABNF means no policy; the detail says which
    # rule it breaks (survey and query show it).
    with pytest.raises(InvalidRecord, match=why) as info:
        select_record([text.encode()])
    assert info.value.kind is FailureKind.INVALID_RECORD


def test_records_not_beginning_with_version_are_discarded():
    # RFC 8461 §3.1: discard records that do not begin with "v=STSv1;" (version must be first).
    assert select_record([b"v=spf1 -all", b"v=STSv1; id=7", b"id=abc; v=STSv1"]).id == "7"
    with pytest.raises(NoRecord):
        select_record([b"v=spf1 -all", b"id=abc; v=STSv1", b"V=STSv1; id=1"])  # %s: case-sensitive
    with pytest.raises(NoRecord):
        select_record([])


@pytest.mark.parametrize("stray", [b"v=STSv1", b"v=STSv1 id=abc", b"v=STSv10; id=1", b"v=STSv1\\; id=1"])
def test_stray_sts_lookalike_is_discarded_before_counting(stray):
    # RFC 8461 §3.1: discarding comes before counting, so a broken lookalike cannot hide (or
    # disable) the one valid record beside it.
    assert select_record([stray, b"v=STSv1; id=7"]).id == "7"
    assert select_record([b"v=STSv1; id=7", stray]).id == "7"


def test_two_sts_records_mean_no_policy():
    # RFC 8461 §3.1: if the number of resulting records is not one, assume no policy.
    with pytest.raises(InvalidRecord, match="exactly one"):
        select_record([b"v=STSv1; id=1", b"v=STSv1; id=2"])


def test_non_ascii_record_is_invalid():
    # RFC 8461 §3.1: the record is US-ASCII.
    with pytest.raises(InvalidRecord, match="US-ASCII"):
        select_record(["v=STSv1; id=1; x=é".encode()])


# Corpus rows (tests/corpus/txt-records.tsv) we expect to be rejected: the value, then the rule the
# detail must name. Every other STSv1 row must parse, with the id the owner wrote. Values are as
# found in sources: escapes of the source format are not decoded (the tinydns row is stored decoded,
# "v=STSv1; id=202001281902Z", and is valid; its raw "\040" form is tested below).
# The strict ABNF of issue 7 changed no verdict: the rows rejected before are rejected now, with the
# rule named; no row that parsed before is rejected now (no corpus value has trailing whitespace,
# ";;", or a malformed extension).
CORPUS_INVALID = {
    "v=STSv1;id=${{ env.GITHUB_RUN_ID }};": "followed by",  # unfilled placeholder, with spaces
    "v=STSv1; id=<policy-id>": "not 1-32",  # placeholder
    "v=STSv1; id=${var.mta_sts_policy_id};": "not 1-32",  # placeholder
    "v=STSv1; id=<id>": "not 1-32",  # placeholder
    "v=STSv1;": "no id",  # a parser's negative fixture
    "v=STSv1; id=<policy_id>": "not 1-32",  # placeholder
    "v=STSv1; id=<new value>": "followed by",  # placeholder with a space
    "v=STSv1; id=<some-id>": "not 1-32",  # placeholder
    "v=STSv1; id=<datestamp>": "not 1-32",  # placeholder
    "v=STSv1; id=": "not 1-32",  # empty id
    "v=STSv1; id=2025-11-09": "not 1-32",  # hyphen in id
    "v=STSv1;id=${var.mta_sts_id};": "not 1-32",  # placeholder
    "v=STSv1;id=": "not 1-32",  # empty id
    "v=STSv1; preload;": "not name=value",  # HSTS confusion: no id, and "preload" is no field
    "v=STSv1; id=$(date -u '+%Y%m%d%H%M')": "followed by",  # shell substitution left in
    "v=STSv1\\; id=1": "must be followed by ';'",  # source escape: the backslash is not on the wire
    "v=STSv1; id={Choose a String Value for each policy Update}Z;": "followed by",  # placeholder
    "v=STSv1; id=logimail-v1": "not 1-32",  # hyphen in id
    "v=STSv1; id=<bump on every change>": "followed by",  # placeholder
    "v=STSv1 id=021120211155": "must be followed by ';'",  # missing ";"
    "v=STSv1 id=abc": "must be followed by ';'",  # missing ";"
    "id=abc; v=STSv1": "no TXT record begins with v=STSv1",  # version not first: discarded
}


def corpus_sts_values() -> list[str]:
    with open(CORPUS / "txt-records.tsv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    return [row["value"] for row in rows if "STSv1" in row["value"]]


def test_corpus_has_the_documented_rows():
    values = corpus_sts_values()
    assert len(values) == 73  # corpus README: 73 v=STSv1 values (and 23 TLSRPT: test_tlsrpt.py)
    assert set(CORPUS_INVALID) <= set(values)
    assert len(values) - len(CORPUS_INVALID) == 51  # README "What the parser accepts"


@pytest.mark.parametrize("value", corpus_sts_values())
def test_corpus_txt_value(value):
    if value in CORPUS_INVALID:
        with pytest.raises((InvalidRecord, NoRecord), match=re.escape(CORPUS_INVALID[value])):
            select_record([value.encode()])
        return
    expected = value.split("id=", 1)[1].split(";")[0].strip()
    assert select_record([value.encode()]).id == expected


def test_tinydns_escape():
    # The corpus stores the openstreetmap row decoded: on the wire tinydns's \040 is a space, which
    # §3.1 allows after ";". The undecoded source text would be a malformed field name.
    assert select_record([b"v=STSv1; id=202001281902Z"]).id == "202001281902Z"
    with pytest.raises(InvalidRecord, match="sts-ext-name"):
        select_record([b"v=STSv1;\\040id=202001281902Z"])
