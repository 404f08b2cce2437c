"""RFC 8461 §3.2 policy parsing and §4.1 MX matching (pure), plus all 240 corpus policies."""

from __future__ import annotations

import pytest

from mtasts_policyd.errors import FailureKind, InvalidPolicy
from mtasts_policyd.policy import MAX_AGE_LIMIT, Mode, Policy, mx_matches, parse_policy
from tests.conftest import CORPUS

GOOD = b"version: STSv1\nmode: enforce\nmx: mail.example.com\nmx: *.example.net\nmax_age: 604800\n"


def test_rfc_example():
    policy = parse_policy(GOOD)
    assert policy == Policy(Mode.ENFORCE, ("mail.example.com", "*.example.net"), 604800,
                            ("version: STSv1", "mode: enforce", "mx: mail.example.com", "mx: *.example.net",
                             "max_age: 604800"))
    assert policy.warnings == ()


def test_crlf_and_missing_final_newline():
    # RFC 8461 §3.2 ABNF: sts-policy-term = LF / CRLF; erratum 6253. The last terminator is optional.
    assert parse_policy(GOOD.replace(b"\n", b"\r\n")) == parse_policy(GOOD)
    assert parse_policy(GOOD.rstrip(b"\n")) == parse_policy(GOOD)


def test_first_of_duplicated_keys_wins():
    # RFC 8461 §3.2: entries after the first of a non-repeatable field SHALL be ignored.
    policy = parse_policy(GOOD + b"mode: testing\nmax_age: 1\n")
    assert policy.mode is Mode.ENFORCE and policy.max_age == 604800


def test_unknown_keys_ignored():
    # RFC 8461 §3.2: parsers MUST accept extra key/value pairs.
    assert parse_policy(GOOD + b"extension_1: some value\n").mode is Mode.ENFORCE


def test_mx_required_unless_mode_none():
    # RFC 8461 §3.2: mx is required for enforce and testing, may be absent for none.
    with pytest.raises(InvalidPolicy) as info:
        parse_policy(b"version: STSv1\nmode: enforce\nmax_age: 86400\n")
    assert info.value.kind is FailureKind.INVALID_POLICY
    assert parse_policy(b"version: STSv1\nmode: none\nmax_age: 86400\n").mx == ()


@pytest.mark.parametrize("body", [
    b"mode: enforce\nmx: a.example\nmax_age: 1\n",  # no version
    b"version: STSv2\nmode: enforce\nmx: a.example\nmax_age: 1\n",
    b"version: STSv1\nmode: Enforce\nmx: a.example\nmax_age: 1\n",  # %s: case-sensitive
    b"version: STSv1\nmode: enforce\nmx: a.example\n",  # no max_age
    b"version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 12345678901\n",  # 11 digits
    b"version: STSv1\nmode: enforce\nmx: a.example\nmax_age: -1\n",
    b"Version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 1\n",  # keys are case-sensitive
    b"\xff\xfev\x00",  # not UTF-8 (UTF-16)
])
def test_invalid_policies(body):
    with pytest.raises(InvalidPolicy):
        parse_policy(body)


def test_max_age_bounds():
    # RFC 8461 §3.2: max_age up to 31557600; larger values are capped (our choice), 0 is allowed.
    body = b"version: STSv1\nmode: testing\nmx: a.example\nmax_age: %d\n"
    assert parse_policy(body % 0).max_age == 0
    assert parse_policy(body % MAX_AGE_LIMIT).max_age == MAX_AGE_LIMIT
    capped = parse_policy(body % 9999999999)
    assert capped.max_age == MAX_AGE_LIMIT and "capped" in capped.warnings[0]


def test_mx_patterns_normalised():
    policy = parse_policy(b"version: STSv1\nmode: enforce\nmx: MX1.Example.COM.\nmx: *.MX.example.com\n"
                          b"mx: mx1.example.com\nmx: 192.0.2.1\nmx: *.\nmax_age: 60\n")
    # Lowercase, trailing dot removed, duplicates and IP addresses dropped, with warnings.
    assert policy.mx == ("mx1.example.com", "*.mx.example.com")
    assert len(policy.warnings) == 4


def test_idn_pattern_converted_to_a_label():
    # RFC 8461 §3.2: patterns MUST be A-labels; we convert a U-label rather than drop it.
    assert parse_policy("version: STSv1\nmode: enforce\nmx: mx.bücher.example\nmax_age: 60\n".encode()).mx == (
        "mx.xn--bcher-kva.example",)


@pytest.mark.parametrize("pattern,host,expected", [
    ("mail.example.com", "mail.example.com", True),
    ("mail.example.com", "MAIL.EXAMPLE.COM.", True),
    ("*.example.com", "mail.example.com", True),
    ("*.example.com", "example.com", False),  # RFC 8461 §4.1: wildcard needs one more label
    ("*.example.com", "foo.bar.example.com", False),  # RFC 8461 §4.1: exactly one label
    ("*.example.com", "mail.example.org", False),
    ("mail.example.com", "mail2.example.com", False),
])
def test_mx_matching(pattern, host, expected):
    policy = Policy(Mode.ENFORCE, (pattern,), 60)
    assert policy.matches(host) is expected


def test_mx_matches_wants_normalised_names():
    assert mx_matches("*.example.com", "a.example.com")
    assert not mx_matches("*.example.com", ".example.com")


# --- the corpus: 240 real files. Which we reject, and why (README "What the parser accepts"). ---

CORPUS_INVALID = {
    "0002": "version",  # prose, not a policy
    "0056": "no valid mx",  # mx: . (null-MX style), mode testing
    "0123": "mode", "0191": "mode", "0196": "mode", "0197": "mode", "0198": "mode",  # unfilled template
    "0137": "mode", "0188": "mode", "0193": "mode", "0233": "mode",  # mode: enforced
    "0212": "mode", "0234": "mode",  # mode: test
    "0181": "mode", "0187": "mode",  # mode: [testing]
    "0206": "mode",  # mode: [mode:testing]
    "0166": "max_age",  # max_age: enforce
    "0176": "version",  # empty file
    "0186": "UTF-8",  # UTF-16LE
    "0199": "version", "0200": "version",  # missing version (0200 has "eversion:")
    "0204": "no valid mx",  # mx: .
    "0236": "max_age",  # two policies pasted: "max_age: 86400version: STSv1", first max_age wins
}


def corpus_files():
    return sorted((CORPUS / "policies").glob("[0-9]*.txt"))


def test_corpus_is_present():
    assert len(corpus_files()) == 240


@pytest.mark.parametrize("path", corpus_files(), ids=lambda p: p.stem)
def test_corpus_policy(path):
    body = path.read_bytes()
    if path.stem in CORPUS_INVALID:
        with pytest.raises(InvalidPolicy, match=CORPUS_INVALID[path.stem]):
            parse_policy(body)
        return
    policy = parse_policy(body)
    assert policy.mode.value in body.decode("utf-8-sig")
    assert 0 <= policy.max_age <= MAX_AGE_LIMIT
    assert policy.mode is Mode.NONE or policy.mx
    for pattern in policy.mx:
        assert pattern == pattern.lower() and not pattern.endswith(".") and " " not in pattern


def test_corpus_quirks_accepted_with_warnings():
    read = lambda n: parse_policy((CORPUS / "policies" / f"{n}.txt").read_bytes())  # noqa: E731
    assert read("0182").mode and any("byte order mark" in w for w in read("0182").warnings)  # UTF-8 BOM
    assert read("0213").max_age == 300 and any("leading whitespace" in w for w in read("0213").warnings)
    assert read("0079").mx[0] == "aspmx.l.google.com"  # tab after colon, uppercase
    assert read("0175").mode is Mode.TESTING  # "mode:testing", indented
    assert read("0005").mx.count("mail.tutanota.de") == 1  # duplicate mx collapsed
    assert all(not p.endswith(".") for p in read("0177").mx)  # trailing dots removed
    assert read("0180").max_age == 604800  # "604800    # 4. Depending..." comment removed
    assert read("0192").mode  # stray "npm" line ignored
    for n in ("0069", "0074", "0217", "0218"):
        assert read(n).mode is Mode.NONE and read(n).mx == ()


def test_corpus_counts():
    """The accepted share, so a change of leniency shows up as a changed number here."""
    modes = {"enforce": 0, "testing": 0, "none": 0}
    for path in corpus_files():
        if path.stem not in CORPUS_INVALID:
            modes[parse_policy(path.read_bytes()).mode.value] += 1
    assert sum(modes.values()) == 240 - len(CORPUS_INVALID) == 217
    assert modes == {"enforce": 113, "testing": 93, "none": 11}
