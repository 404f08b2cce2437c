"""The MTA-STS policy file (RFC 8461 §3.2) and MX matching (§4.1): pure, no I/O.

The parser follows the RFC where the RFC says MUST and is lenient where real files differ from
the ABNF in ways that cannot change their meaning. Every leniency leaves a warning on the policy,
which `query`, `cache show` and `survey` print, so an operator can tell a domain owner what to fix. The full list, with the
corpus files that motivated each choice, is in the README ("What the parser accepts").
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

from mtasts_policyd.core.errors import InvalidPolicy
from mtasts_policyd.core.names import is_ip_literal, to_alabel

MAX_AGE_LIMIT = 31557600  # RFC 8461 §3.2: max_age is at most 31557600 seconds (one year)
_MAX_AGE = re.compile(r"[0-9]{1,10}")  # RFC 8461 §3.2: max_age = 1*10(DIGIT)
_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")  # RFC 8461 §3.2: sts-policy-ext-name
_COMMENT = re.compile(r"[ \t]+#.*$")
_CTL = re.compile(r"[\x00-\x1f\x7f]")  # RFC 5234 CTL; sts-policy-ext-value excludes them
_WSP = " \t"
_BOM = "\ufeff"
_REGISTERED = ("version", "mode", "max_age", "mx")  # RFC 8461 §3.2; every other key is an extension


class Mode(enum.Enum):
    ENFORCE = "enforce"
    TESTING = "testing"
    NONE = "none"


@dataclass(frozen=True)
class Policy:
    """A parsed policy. `lines` are the key/value lines as understood, for TLSRPT policy-string."""

    mode: Mode
    mx: tuple[str, ...]
    max_age: int
    lines: tuple[str, ...] = ()
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @property
    def has_wildcards(self) -> bool:
        return any(pattern.startswith("*.") for pattern in self.mx)

    def matches(self, host: str) -> bool:
        """RFC 8461 §4.1: does the MX host name match at least one mx pattern of this policy?"""
        name = to_alabel(host)
        return name is not None and any(mx_matches(pattern, name) for pattern in self.mx)


def mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 §4.1: "*." matches exactly one left-most label; both sides lowercase A-labels."""
    if pattern.startswith("*."):
        first, dot, rest = host.partition(".")
        return bool(first) and bool(dot) and rest == pattern[2:]
    return host == pattern


class _Warnings:
    """The parser's warnings, in order of first appearance; one kind of line warning is merged
    into one entry ("lines 1-6: leading whitespace ignored"), so a quirk repeated on every line
    reads as one finding."""

    def __init__(self) -> None:
        self._lines: dict[str, list[int]] = {}

    def add(self, message: str) -> None:
        self._lines.setdefault(message, [])

    def line(self, number: int, message: str) -> None:
        self._lines.setdefault(message, []).append(number)

    def result(self) -> tuple[str, ...]:
        return tuple(f"{_line_numbers(numbers)}: {message}" if numbers else message
                     for message, numbers in self._lines.items())


def _line_numbers(numbers: list[int]) -> str:
    """"line 3", "lines 1-6, 9": runs of consecutive numbers as ranges."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
    return f"line {text}" if len(numbers) == 1 else f"lines {text}"


def _decode(body: bytes, warnings: _Warnings) -> str:
    try:
        text = body.decode("utf-8")  # RFC 8461 §3.2: text/plain, UTF-8 only in extension values
    except UnicodeDecodeError:
        raise InvalidPolicy("policy is not UTF-8 text") from None
    if text.startswith(_BOM):
        warnings.add("byte order mark at start of file ignored")
        text = text[1:]
    return text


def _lines(text: str) -> list[str]:
    """The policy's lines. RFC 8461 §3.2: sts-policy-term = LF / CRLF (erratum 6253), and the last
    one is optional. Nothing else ends a line: str.splitlines() would also split at a bare CR,
    U+0085, U+2028 and more, so that an extension value holding one could smuggle in a second
    "mode:" line, a downgrade by parsing. Such characters stay inside their line."""
    *terminated, last = text.split("\n")
    lines = [line.removesuffix("\r") for line in terminated]  # LF or CRLF
    return lines + [last] if last else lines  # an unterminated last line keeps a bare CR


def mx_pattern(value: str) -> str | None:
    """RFC 8461 §3.2: sts-policy-mx-value = ["*."] Domain, as a lowercase A-label pattern without
    the root dot; None if `value` is not one. "*." covers one label of any valid name, so "*.com"
    is a pattern (§4.1 matches it against exactly one more label). Policies and overrides use it."""
    wildcard = value.startswith("*.")
    name = value[2:] if wildcard else value
    # to_alabel strips Unicode whitespace: check first that nothing but the name is there.
    if not name or not all(ch.isprintable() and not ch.isspace() for ch in name) or is_ip_literal(name):
        return None
    host = to_alabel(name)
    if host is None:
        return None
    return f"*.{host}" if wildcard else host


def _mx_pattern(value: str, warnings: _Warnings) -> str | None:
    """mx_pattern(), with a warning for what it refused or repaired."""
    pattern = mx_pattern(value)
    if pattern is None:
        warnings.add(f"mx pattern {value!r} is not a host name; ignored")
        return None
    name = value.removeprefix("*.")
    if name.endswith("."):
        warnings.add(f"mx pattern {value!r} has a trailing dot; removed")
    if not name.isascii():  # §3.2: "MUST be [...] A-labels"; converting cannot widen the pattern
        warnings.add(f"mx pattern {value!r} is not in A-label form; converted to {pattern!r}")
    return pattern


def parse_policy(body: bytes) -> Policy:
    """Parse a policy body; raise InvalidPolicy when it is not a usable policy.

    RFC 8461 §3.2's ABNF is followed; what it does not allow but cannot change a policy's
    meaning is accepted with a warning (README "What the parser accepts"); what it allows
    (trailing whitespace, tab or no space after ":", uppercase host names) needs none.
    """
    warnings = _Warnings()
    text = _decode(body, warnings)
    fields: dict[str, str] = {}
    mx: list[str] = []
    lines: list[str] = []
    raw_lines = _lines(text)
    last = max((n for n, raw in enumerate(raw_lines, 1) if raw.strip(_WSP)), default=0)
    for number, raw in enumerate(raw_lines, 1):
        line = raw.lstrip(_WSP).rstrip(_WSP)  # trailing WSP: sts-policy-field *WSP
        if not line:
            warnings.line(number, "blank line ignored" if number < last else "empty line at the end ignored")
            continue
        if line.startswith("#"):
            warnings.line(number, "comment line ignored")
            continue
        if raw[0] in _WSP:
            warnings.line(number, "leading whitespace ignored")
        key, colon, value = line.partition(":")
        if not colon or not _KEY.fullmatch(key):
            warnings.line(number, "not a key: value line; ignored")
            continue
        value = value.lstrip(_WSP)  # sts-policy-field-delim = ":" *WSP
        if key in _REGISTERED and _COMMENT.search(value):
            warnings.line(number, "trailing comment ignored")
            value = _COMMENT.sub("", value)
        if key == "mx":  # RFC 8461 §3.2: mx is the only repeatable field
            pattern = _mx_pattern(value, warnings)
            if pattern is None:
                continue
            if pattern in mx:
                warnings.add(f"mx pattern {pattern!r} listed twice")
                continue
            mx.append(pattern)
            lines.append(f"mx: {pattern}")
            continue
        if key in fields:
            # RFC 8461 §3.2: for a duplicated non-repeatable field, entries after the first SHALL be ignored.
            warnings.line(number, f"duplicate {key!r} ignored")
            continue
        fields[key] = value
        if key in _REGISTERED:
            lines.append(f"{key}: {value}")
        elif not value:  # sts-policy-ext-value is at least one character
            warnings.line(number, f"empty value of extension {key!r}")
        elif _CTL.search(value):  # the ABNF excludes CTLs (a tab inside, a bare CR, NUL, ...)
            warnings.line(number, f"control character in the value of extension {key!r}")
    # Keys and the version and mode values are case-sensitive (RFC 8461 §3.2, %s in the ABNF).
    if fields.get("version") != "STSv1":
        raise InvalidPolicy(f"version must be STSv1, not {fields.get('version')!r}")
    try:
        mode = Mode(fields.get("mode"))
    except ValueError:
        raise InvalidPolicy(f"mode must be enforce, testing or none, not {fields.get('mode')!r}") from None
    max_age_text = fields.get("max_age", "")
    if not _MAX_AGE.fullmatch(max_age_text):
        raise InvalidPolicy(f"max_age must be 1 to 10 digits, not {max_age_text!r}")
    max_age = int(max_age_text)
    if max_age > MAX_AGE_LIMIT:
        warnings.add(f"max_age {max_age} above the RFC limit; capped at {MAX_AGE_LIMIT}")
        max_age = MAX_AGE_LIMIT
    if not mx and mode is not Mode.NONE:
        # RFC 8461 §3.2: mx is required unless the mode is none; with no pattern nothing could match.
        raise InvalidPolicy(f"mode {mode.value} with no valid mx pattern")
    return Policy(mode, tuple(mx), max_age, tuple(lines), warnings.result())
