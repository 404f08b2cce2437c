"""The MTA-STS policy file (RFC 8461 §3.2) and MX matching (§4.1): pure, no I/O.

The parser follows the RFC where the RFC says MUST and is lenient where real files differ from
the ABNF in ways that cannot change their meaning. Every leniency leaves a warning on the policy,
which `query` prints, so an operator can tell a domain owner what to fix. The full list, with the
corpus files that motivated each choice, is in the README ("What the parser accepts").
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

from .errors import InvalidPolicy
from .names import is_ip_literal, to_alabel

MAX_AGE_LIMIT = 31557600  # RFC 8461 §3.2: max_age is at most 31557600 seconds (one year)
_MAX_AGE = re.compile(r"[0-9]{1,10}")  # RFC 8461 §3.2: max_age = 1*10(DIGIT)
_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")  # RFC 8461 §3.2: sts-policy-ext-name
_COMMENT = re.compile(r"[ \t]+#.*$")
_BOM = "\ufeff"


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


def _decode(body: bytes, warnings: list[str]) -> str:
    try:
        text = body.decode("utf-8")  # RFC 8461 §3.2: text/plain, UTF-8 only in extension values
    except UnicodeDecodeError:
        raise InvalidPolicy("policy is not UTF-8 text") from None
    if text.startswith(_BOM):
        warnings.append("byte order mark at start of file ignored")
        text = text[1:]
    return text


def _mx_pattern(value: str, warnings: list[str]) -> str | None:
    wildcard = value.startswith("*.")
    host = to_alabel(value[2:] if wildcard else value)
    if host is None or is_ip_literal(value) or (wildcard and "." not in host):
        warnings.append(f"mx pattern {value!r} is not a host name; ignored")
        return None
    if value.endswith("."):
        warnings.append(f"mx pattern {value!r} has a trailing dot; removed")
    return f"*.{host}" if wildcard else host


def parse_policy(body: bytes) -> Policy:
    """Parse a policy body; raise InvalidPolicy when it is not a usable policy."""
    warnings: list[str] = []
    text = _decode(body, warnings)
    fields: dict[str, str] = {}
    mx: list[str] = []
    lines: list[str] = []
    # RFC 8461 §3.2 prose says CRLF, the ABNF says LF or CRLF (erratum 6253): accept both.
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip(" \t")
        if not line or line.startswith("#"):
            continue
        if line != raw.rstrip(" \t"):
            warnings.append(f"line {number}: leading whitespace ignored")
        key, colon, value = line.partition(":")
        if not colon or not _KEY.fullmatch(key):
            warnings.append(f"line {number}: not a key: value line; ignored")
            continue
        value = value.strip(" \t")
        if _COMMENT.search(value):
            warnings.append(f"line {number}: trailing comment ignored")
            value = _COMMENT.sub("", value)
        if key == "mx":  # RFC 8461 §3.2: mx is the only repeatable field
            pattern = _mx_pattern(value, warnings)
            if pattern is None:
                continue
            if pattern in mx:
                warnings.append(f"mx pattern {pattern!r} listed twice")
                continue
            mx.append(pattern)
            lines.append(f"mx: {pattern}")
        elif key in fields:
            # RFC 8461 §3.2: for a duplicated non-repeatable field, entries after the first SHALL be ignored.
            warnings.append(f"line {number}: duplicate {key!r} ignored")
        else:
            fields[key] = value
            if key in ("version", "mode", "max_age"):
                lines.append(f"{key}: {value}")
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
        warnings.append(f"max_age {max_age} above the RFC limit; capped at {MAX_AGE_LIMIT}")
        max_age = MAX_AGE_LIMIT
    if not mx and mode is not Mode.NONE:
        # RFC 8461 §3.2: mx is required unless the mode is none; with no pattern nothing could match.
        raise InvalidPolicy(f"mode {mode.value} with no valid mx pattern")
    return Policy(mode, tuple(mx), max_age, tuple(lines), tuple(warnings))
