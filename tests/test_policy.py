"""RFC 8461 §3.2 policy parsing and §4.1 MX matching (pure), plus all 240 corpus policies."""

from __future__ import annotations

import re

import pytest

from mtasts_policyd.core.errors import FailureKind, InvalidPolicy
from mtasts_policyd.core.policy import (
    MAX_AGE_LIMIT,
    Mode,
    Policy,
    mx_matches,
    parse_policy,
)
from tests.conftest import CORPUS

pytestmark = pytest.mark.fast  # pure: no sockets, no processes

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


# RFC 8461 §3.2: sts-policy-term = LF / CRLF. Characters that str.splitlines() also treats as line
# ends, each of which must stay inside its line: C0 controls, bare CR, NEL, LS, PS.
NOT_LINE_ENDS = ["\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]
CTL = {"\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e"}  # RFC 5234 CTLs; NEL, LS, PS are UTF-8 text


@pytest.mark.parametrize("char", NOT_LINE_ENDS + ["\x00", "\x7f", "\t"], ids=repr)
def test_only_lf_and_crlf_end_a_line(char):
    # The downgrade by parsing: an enforce policy whose extension value carries such a character
    # followed by "mode: none" must not be read as a second (first-wins) mode line.
    body = f"version: STSv1\next: a{char}mode: none\nmode: enforce\nmx: mx.example.com\nmax_age: 86400\n"
    policy = parse_policy(body.encode())
    assert policy.mode is Mode.ENFORCE
    assert policy.lines[1] == "mode: enforce"
    # A control character in an extension value is not in the ABNF: accepted (the value is
    # ignored anyway), but never silently. UTF-8 text such as U+2028 is what the ABNF allows.
    expected = ("line 2: control character in the value of extension 'ext'",) if char in CTL | {"\x00", "\x7f", "\t"} else ()
    assert policy.warnings == expected


@pytest.mark.parametrize("line,char", [
    (line, char) for char in NOT_LINE_ENDS + ["\x00"]
    for line in ("version: STSv1{c}", "mode: enforce{c}", "mode: enforce{c}mode: none", "max_age: 86400{c}",
                 "mx: mx.example.com{c}", "mx: mx.example.com{c}mx: other.example.com")
    if not (char == "\r" and line.endswith("{c}"))  # "\r\n" is CRLF, a valid line end
], ids=repr)
def test_such_a_character_in_a_registered_value_breaks_it(line, char):
    # RFC 8461 §3.2: version, mode, max_age and mx values have exact grammars; a character that
    # ends no line is part of the value, which then does not match: the policy is invalid (an
    # mx pattern is dropped with a warning, and the policy is left without one).
    body = {"version": "version: STSv1", "mode": "mode: enforce", "max_age": "max_age: 86400",
            "mx": "mx: mx.example.com"}
    key = line.partition(":")[0]
    body[key] = line.format(c=char)
    with pytest.raises(InvalidPolicy, match="version|mode|max_age|no valid mx"):
        parse_policy(("\n".join(body.values()) + "\n").encode())


def test_bare_cr_ends_no_line_even_at_the_end():
    # A CRLF file cut after its last CR: "\r" alone is no sts-policy-term, so it stays in the value.
    body = b"version: STSv1\r\nmode: enforce\r\nmx: a.example\r\nmax_age: 86400"
    assert parse_policy(body + b"\r\n").max_age == 86400
    with pytest.raises(InvalidPolicy, match="max_age"):
        parse_policy(body + b"\r")


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
    # RFC 8461 §3.2: patterns MUST be A-labels; we convert a U-label rather than drop it, and say so.
    policy = parse_policy("version: STSv1\nmode: enforce\nmx: *.bücher.example\nmax_age: 60\n".encode())
    assert policy.mx == ("*.xn--bcher-kva.example",)
    assert policy.warnings == ("mx pattern '*.bücher.example' is not in A-label form; "
                               "converted to '*.xn--bcher-kva.example'",)


@pytest.mark.parametrize("pattern", ["*.com", "*.example", "*.xn--p1ai", "*.EXAMPLE."])
def test_wildcard_over_one_label_is_a_valid_pattern(pattern):
    # RFC 8461 §3.2: sts-policy-mx-value = ["*."] Domain, and "com" is a Domain.
    policy = parse_policy(f"version: STSv1\nmode: enforce\nmx: {pattern}\nmax_age: 60\n".encode())
    assert policy.mx == (pattern.lower().rstrip("."),)
    assert "not a host name" not in " ".join(policy.warnings)


def test_wildcard_over_one_label_matches_exactly_one_label():
    # RFC 8461 §4.1: "*." stands for exactly one left-most label.
    policy = parse_policy(b"version: STSv1\nmode: enforce\nmx: *.com\nmax_age: 60\n")
    assert policy.matches("example.com") and policy.matches("EXAMPLE.COM.")
    assert not policy.matches("mx.example.com") and not policy.matches("com")
    assert not policy.matches("example.net")


# RFC 8461 §3.2 allows these: no warning.
NO_WARNING = {
    "trailing whitespace": b"version: STSv1 \nmode: enforce\t\nmx: a.example  \nmax_age: 60\n",
    "tab, no space, many spaces after ':'": b"version:\tSTSv1\nmode:enforce\nmx:    a.example\nmax_age: 60\n",
    "uppercase host names": b"version: STSv1\nmode: enforce\nmx: A.EXAMPLE\nmx: *.MX.Example\nmax_age: 60\n",
    "CRLF, no final line end": b"version: STSv1\r\nmode: enforce\r\nmx: a.example\r\nmax_age: 60",
    "unknown keys (SHALL be ignored)": b"version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 60\nms: x\n",
    "UTF-8 in an extension value": "version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 60\nnote: é\u2028\n".encode(),
}


@pytest.mark.parametrize("body", NO_WARNING.values(), ids=NO_WARNING.keys())
def test_what_the_abnf_allows_needs_no_warning(body):
    policy = parse_policy(body)
    assert policy.mode is Mode.ENFORCE and policy.warnings == ()


GOOD_LINES = ["version: STSv1", "mode: enforce", "mx: a.example", "max_age: 60"]
# Every leniency leaves a warning (README "What the parser accepts"): (body, the warning).
LENIENCIES = {
    "BOM": ("\ufeff" + "\n".join(GOOD_LINES), "byte order mark at start of file ignored"),
    "blank line": ("\n".join(GOOD_LINES[:2] + [""] + GOOD_LINES[2:]), "line 3: blank line ignored"),
    "whitespace-only line": ("\n".join(GOOD_LINES[:2] + [" \t"] + GOOD_LINES[2:]), "line 3: blank line ignored"),
    "empty lines at the end": ("\n".join(GOOD_LINES) + "\n\n\n", "lines 5-6: empty line at the end ignored"),
    "comment line": ("# MTA-STS\n" + "\n".join(GOOD_LINES), "line 1: comment line ignored"),
    "leading whitespace": ("\n".join("  " + line for line in GOOD_LINES), "lines 1-4: leading whitespace ignored"),
    "trailing comment": ("\n".join(GOOD_LINES[:3] + ["max_age: 60  # one minute"]), "line 4: trailing comment ignored"),
    "stray line": ("\n".join(GOOD_LINES + ["---"]), "line 5: not a key: value line; ignored"),
    "empty extension value": ("\n".join(GOOD_LINES + ["ext:"]), "line 5: empty value of extension 'ext'"),
    "control character in an extension value": ("\n".join(GOOD_LINES + ["ext: a\tb\x01"]),
                                                 "line 5: control character in the value of extension 'ext'"),
    "U-label mx": ("\n".join(GOOD_LINES + ["mx: bücher.example"]),
                   "mx pattern 'bücher.example' is not in A-label form; converted to 'xn--bcher-kva.example'"),
    "trailing dot on mx": ("\n".join(GOOD_LINES + ["mx: b.example."]), "mx pattern 'b.example.' has a trailing dot; removed"),
    "mx that is no host name": ("\n".join(GOOD_LINES + ["mx: 192.0.2.1"]), "mx pattern '192.0.2.1' is not a host name; ignored"),
    "mx listed twice": ("\n".join(GOOD_LINES + ["mx: A.example"]), "mx pattern 'a.example' listed twice"),
    "duplicate key": ("\n".join(GOOD_LINES + ["mode: none"]), "line 5: duplicate 'mode' ignored"),
    "max_age above the limit": ("\n".join(GOOD_LINES[:3] + ["max_age: 99999999"]),
                                "max_age 99999999 above the RFC limit; capped at 31557600"),
}


@pytest.mark.parametrize("body,warning", LENIENCIES.values(), ids=LENIENCIES.keys())
def test_every_leniency_leaves_a_warning(body, warning):
    policy = parse_policy(body.encode())
    assert policy.mode is Mode.ENFORCE and policy.mx[0] == "a.example"
    assert policy.warnings == (warning,)


@pytest.mark.parametrize("pattern,host,expected", [
    ("mail.example.com", "mail.example.com", True),
    ("mail.example.com", "MAIL.EXAMPLE.COM.", True),
    ("*.example.com", "mail.example.com", True),
    ("*.example.com", "example.com", False),  # RFC 8461 §4.1: wildcard needs one more label
    ("*.example.com", "foo.bar.example.com", False),  # RFC 8461 §4.1: exactly one label
    ("*.example.com", "mail.example.org", False),
    ("*.com", "example.com", True),  # RFC 8461 §3.2: ["*."] Domain, and "com" is a Domain
    ("*.com", "a.example.com", False),
    ("*.com", "com", False),
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


def test_corpus_warnings_say_what_was_forgiven():
    read = lambda n: parse_policy((CORPUS / "policies" / f"{n}.txt").read_bytes())  # noqa: E731
    assert read("0100").warnings == ("lines 1, 14: not a key: value line; ignored", "line 4: blank line ignored",
                                     "lines 5-13: comment line ignored")  # Jekyll front matter, comments
    assert read("0141").warnings == ("lines 5-6: empty line at the end ignored",)
    assert read("0183").warnings == ("byte order mark at start of file ignored",
                                     "line 11: empty line at the end ignored")
    assert read("0213").warnings == ("lines 1-5: leading whitespace ignored",)
    assert read("0079").warnings == ()  # tab after ":", uppercase names: the ABNF allows both


# An oracle for "no leniency is silent", independent of the parser: RFC 8461 §3.2's ABNF as one
# regular expression (Domain from RFC 5321 §4.1.2; registered keys only with their own values).
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_VCHAR = "\x21-\x7e\u0080-\U0010ffff"
_FIELD = (rf"(?:version:[ \t]*STSv1|mode:[ \t]*(?:enforce|testing|none)|max_age:[ \t]*[0-9]{{1,10}}"
          rf"|mx:[ \t]*(?:\*\.)?{_LABEL}(?:\.{_LABEL})*"
          rf"|(?!(?:version|mode|max_age|mx):)[A-Za-z0-9][A-Za-z0-9_.-]{{0,31}}:[ \t]*[{_VCHAR}](?:[ {_VCHAR}]*[{_VCHAR}])?"
          rf")[ \t]*")
ABNF = re.compile(rf"{_FIELD}(?:\r?\n{_FIELD})*(?:\r?\n)?")
# Warnings about what the ABNF allows but we still point out or refine.
NOT_LENIENCIES = ("duplicate", "listed twice", "is not a host name", "capped")


@pytest.mark.parametrize("path", corpus_files(), ids=lambda p: p.stem)
def test_no_leniency_is_silent(path):
    body = path.read_bytes()
    if path.stem in CORPUS_INVALID:
        return
    policy = parse_policy(body)
    if ABNF.fullmatch(body.decode("utf-8")):
        assert all(any(word in w for word in NOT_LENIENCIES) for w in policy.warnings), policy.warnings
    else:
        assert policy.warnings, "accepted outside the ABNF without a warning"


def test_the_abnf_oracle_itself():
    assert ABNF.fullmatch(GOOD.decode()) and ABNF.fullmatch("version: STSv1\r\nmode: none\r\nmax_age: 0")
    for bad in ("version: STSv1\n\nmode: none\nmax_age: 1", " version: STSv1\nmode: none\nmax_age: 1",
                "version: STSv1\nmode: none\nmax_age: 1\n\n", "# c\nversion: STSv1\nmode: none\nmax_age: 1",
                "version: STSv1\nmode: none\nmax_age: 1\nx:", "version: STSv1\nmode: none\nmax_age: 1\rx: y"):
        assert not ABNF.fullmatch(bad), bad


def test_corpus_counts():
    """The accepted share, so a change of leniency shows up as a changed number here."""
    modes = {"enforce": 0, "testing": 0, "none": 0}
    for path in corpus_files():
        if path.stem not in CORPUS_INVALID:
            modes[parse_policy(path.read_bytes()).mode.value] += 1
    assert sum(modes.values()) == 240 - len(CORPUS_INVALID) == 217
    assert modes == {"enforce": 113, "testing": 93, "none": 11}
