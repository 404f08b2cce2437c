"""RFC 8460 §3: the _smtp._tls TLSRPT record, as pure parsing, and all corpus TLSRPT values."""

from __future__ import annotations

import csv

import pytest

from mtasts_policyd.core.errors import FailureKind, InvalidRecord, NoRecord
from mtasts_policyd.core.sts_record import join_strings
from mtasts_policyd.core.tlsrpt_record import parse_tlsrpt
from tests.conftest import CORPUS

pytestmark = pytest.mark.fast  # pure: no sockets, no processes


def test_minimal_record():
    record = parse_tlsrpt([b"v=TLSRPTv1; rua=mailto:tls@example.com"])
    assert record.rua == ("mailto:tls@example.com",)
    assert record.text == "v=TLSRPTv1; rua=mailto:tls@example.com"
    assert record.schemes == ("mailto",)


def test_https_and_several_uris():
    # RFC 8460 §3: a comma-separated list, *WSP "," *WSP; mailto and https both supported.
    record = parse_tlsrpt([b"v=TLSRPTv1;rua=mailto:a@example.com , https://r.example.net/tls?x=1,mailto:b@example.org"])
    assert record.rua == ("mailto:a@example.com", "https://r.example.net/tls?x=1", "mailto:b@example.org")
    assert record.schemes == ("mailto", "https", "mailto")


@pytest.mark.parametrize("text", [
    "v=TLSRPTv1;rua=mailto:a@example.com",
    "v=TLSRPTv1 ; rua=mailto:a@example.com ;",
    "v=TLSRPTv1;\trua=mailto:a@example.com;;",
])
def test_whitespace_and_delimiters(text):
    # RFC 8460 §3: field-delim = *WSP ";" *WSP; a trailing delimiter is allowed.
    assert parse_tlsrpt([text.encode()]).rua == ("mailto:a@example.com",)


def test_split_strings_are_joined_without_spaces():
    # RFC 8460 §3: several strings of one RR are concatenated without adding spaces.
    joined = join_strings([b"v=TLSRPTv1; rua=mailto:tls@exa", b"mple.com"])
    assert parse_tlsrpt([joined]).rua == ("mailto:tls@example.com",)


def test_unknown_fields_ignored():
    # RFC 8460 §3: unknown fields SHALL be ignored; "RUA" is unknown (%s"rua=" is case-sensitive).
    record = parse_tlsrpt([b"v=TLSRPTv1; ext.1=x; rua=mailto:a@example.com; RUA=mailto:b@example.com; junk"])
    assert record.rua == ("mailto:a@example.com",)
    assert record.extensions == (("ext.1", "x"), ("RUA", "mailto:b@example.com"))


def test_repeated_rua_fields_are_all_used():
    # RFC 8460 §3: tlsrpt-field = tlsrpt-rua / tlsrpt-extension, repeated as 1*(field-delim tlsrpt-field):
    # two rua fields are valid ABNF. A reporter may deliver to each destination: all URIs, in order.
    record = parse_tlsrpt([b"v=TLSRPTv1; rua=mailto:a@example.com; x=1; rua=https://r.example.net/,"
                           b"mailto:b@example.org; rua=mailto:a@example.com"])
    assert record.rua == ("mailto:a@example.com", "https://r.example.net/", "mailto:b@example.org")
    assert record.schemes == ("mailto", "https", "mailto")
    assert record.extensions == (("x", "1"),)


def test_scheme_is_case_insensitive_and_kept_as_written():
    # RFC 3986 §3.1: schemes compare case-insensitively.
    record = parse_tlsrpt([b"v=TLSRPTv1; rua=MAILTO:a@example.com,HTTPS://r.example.net/"])
    assert record.rua == ("MAILTO:a@example.com", "HTTPS://r.example.net/")
    assert record.schemes == ("mailto", "https")


def test_percent_encoded_characters_are_fine():
    # RFC 8460 §3: "," "!" ";" inside a URI MUST be percent-encoded; encoded they are accepted.
    assert parse_tlsrpt([b"v=TLSRPTv1; rua=mailto:a%21b@example.com"]).rua == ("mailto:a%21b@example.com",)


def test_records_not_beginning_with_version_are_discarded():
    # RFC 8460 §3: records that do not begin with "v=TLSRPTv1;" are discarded.
    assert parse_tlsrpt([b"v=spf1 -all", b"v=TLSRPTv1; rua=mailto:a@example.com",
                         b"rua=mailto:b@example.com; v=TLSRPTv1"]).rua == ("mailto:a@example.com",)
    with pytest.raises(NoRecord) as info:
        parse_tlsrpt([b"v=spf1 -all", b"v=TLSRPTV1; rua=mailto:a@example.com"])  # case-sensitive
    assert info.value.kind is FailureKind.NO_RECORD
    with pytest.raises(NoRecord):
        parse_tlsrpt([])


def test_two_records_mean_no_tlsrpt():
    # RFC 8460 §3: if the number of resulting records is not one, assume no TLSRPT.
    with pytest.raises(InvalidRecord, match="exactly one"):
        parse_tlsrpt([b"v=TLSRPTv1; rua=mailto:a@example.com", b"v=TLSRPTv1; rua=mailto:b@example.com"])


@pytest.mark.parametrize("text,why", [
    ("v=TLSRPTv1;", "no rua"),
    ("v=TLSRPTv1", "no rua"),
    ("v=TLSRPTv1; rua=", "empty"),
    ("v=TLSRPTv1; rua=mailto:a@example.com; rua=", "empty"),  # every rua field must be usable
    ("v=TLSRPTv1; rua=mailto:a@example.com; rua=http://r.example.net/", "not mailto or https"),
    ("v=TLSRPTv1; rua=mailto:a@example.com,", "empty URI"),
    ("v=TLSRPTv1; rua=mailto:", "no mail address"),
    ("v=TLSRPTv1; rua=mailto:example.com", "no mail address"),
    ("v=TLSRPTv1; rua=https://", "no host"),
    ("v=TLSRPTv1; rua=https:/report", "no host"),
    ("v=TLSRPTv1; rua=http://r.example.net/", "not mailto or https"),
    ("v=TLSRPTv1; rua=tls@example.com", "not a URI"),
    ("v=TLSRPTv1; rua=mailto:a@example.com!10m", "raw '!'"),
    ("v=TLSRPTv1; rua=mailto:tls@<your_domain>", "placeholder"),
    ("v=TLSRPTv1; rua=mailto:a b@example.com", "placeholder"),
    ("v=TLSRPTv1 rua=mailto:a@example.com", "not followed by ';'"),
])
def test_invalid_records(text, why):
    with pytest.raises(InvalidRecord, match=why) as info:
        parse_tlsrpt([text.encode()])
    assert info.value.kind is FailureKind.INVALID_RECORD


def test_non_ascii_record_is_invalid():
    with pytest.raises(InvalidRecord, match="US-ASCII"):
        parse_tlsrpt(["v=TLSRPTv1; rua=mailto:tls@exämple.com".encode()])


# Corpus rows we expect to be rejected, and why (decided here, RFC 8460 §3). Every other
# TLSRPTv1 row must parse with the URIs the owner wrote. Syntactically valid addresses at
# placeholder-looking domains (e.g. "yourdomain.com") are accepted: nothing in the record says
# they are not real, and a reporter would mail them.
CORPUS_INVALID = {
    "v=TLSRPTv1; rua=mailto:tls-rua@mailcheck.<your_domain.tld>": "placeholder: '<' '>' are no URI characters",
    "v=TLSRPTv1; rua=mailto:tls-rua@<your_domain.tld>": "placeholder: '<' '>' are no URI characters",
    "v=TLSRPTv1; rua=mailto:tlsrpt@${split(": "template expression: '{' is no URI character",
    "v=TLSRPTv1;": "no rua (required)",
    "v=TLSRPTv1;rua=mailto:": "empty mailto: no address to report to",
    "v=TLSRPTv1": "no rua (and no ';')",
}


def corpus_tlsrpt_values() -> list[str]:
    with open(CORPUS / "txt-records.tsv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    return [row["value"] for row in rows if "TLSRPTv1" in row["value"]]


def test_corpus_has_the_documented_rows():
    values = corpus_tlsrpt_values()
    assert len(values) == 23  # README of the corpus: 23 v=TLSRPTv1 values
    assert set(CORPUS_INVALID) <= set(values)
    assert len(values) - len(CORPUS_INVALID) == 17


@pytest.mark.parametrize("value", corpus_tlsrpt_values())
def test_corpus_tlsrpt_value(value):
    if value in CORPUS_INVALID:
        with pytest.raises(InvalidRecord):
            parse_tlsrpt([value.encode()])
        return
    expected = value.split("rua=", 1)[1].rstrip("; ")
    record = parse_tlsrpt([value.encode()])
    assert record.rua == (expected,)
    assert record.schemes == ("mailto",)
