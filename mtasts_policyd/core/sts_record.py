"""The `_mta-sts` TXT record (RFC 8461 §3.1): pure parsing, no I/O.

RFC 8461 §3.1 is all MUSTs, so this parser follows its ABNF exactly and has no leniency:

    sts-text-record = sts-version 1*(sts-field-delim sts-field) [sts-field-delim]
    sts-field       = sts-id / sts-extension
    sts-field-delim = *WSP ";" *WSP
    sts-version     = %s"v=STSv1"
    sts-id          = %s"id=" 1*32(ALPHA / DIGIT)
    sts-extension   = sts-ext-name "=" sts-ext-value
    sts-ext-name    = (ALPHA / DIGIT) *31(ALPHA / DIGIT / "_" / "-" / ".")
    sts-ext-value   = 1*(%x21-3A / %x3C / %x3E-7E)

- Selection: records that do not begin with "v=STSv1" then `*WSP ";"` are discarded *before*
  counting, so a stray "v=STSv1" (no ";") beside a valid record does not hide it. The prose says
  "v=STSv1;"; the ABNF's delimiter also admits whitespace before the ";" ("v=STSv1 ;"), which we
  accept: erratum 6285 (reported, not verified) points out that conflict and proposes the
  narrower `";" *WSP`; we keep the published ABNF, the wider of the two.
- Exactly one record must remain; it must match the ABNF. Anything else (whitespace not part
  of a delimiter, ";;", a field without "=", an empty or malformed extension name or value,
  no id) means the domain has no policy: `InvalidRecord`, whose detail names the broken rule
  so that `survey` and `query` can tell the owner what to fix.
- A field given twice (two "id=" included) is valid syntax: the first occurrence wins, as
  RFC 8461 §3.2 rules for the policy file.
- Unknown extension fields are ignored (§3.1, "SHALL be ignored") once they match the ABNF.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from mtasts_policyd.core.errors import InvalidRecord, NoRecord

VERSION = "v=STSv1"  # RFC 8461 §3.1: %s"v=STSv1", case-sensitive (RFC 7405)
_ID = re.compile(r"[A-Za-z0-9]{1,32}")  # sts-id value
_EXT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,31}")  # sts-ext-name
_EXT_VALUE = re.compile(r"[\x21-\x3a\x3c\x3e-\x7e]+")  # sts-ext-value: visible ASCII but "=" ";"
_CANDIDATE = re.compile(rb"v=STSv1[ \t]*;")  # what selection keeps (see the module docstring)
_DELIM = re.compile(r"[ \t]*;[ \t]*")  # sts-field-delim
_FIELD = re.compile(r"[^ \t;]*")  # no field can hold WSP or ";": a field ends at either


@dataclass(frozen=True)
class StsRecord:
    """A valid STSv1 record: the id is all that the protocol uses (§3.1, change detection)."""

    id: str
    extensions: tuple[tuple[str, str], ...] = ()
    text: str = ""  # the record as published, for `query` and reports


def join_strings(strings: Iterable[bytes]) -> bytes:
    """RFC 8461 §3.1: one RR of several character-strings is their concatenation, no spaces."""
    return b"".join(strings)


def valid_id(text: str) -> bool:
    """RFC 8461 §3.1: sts-id's value is 1 to 32 letters and digits."""
    return _ID.fullmatch(text) is not None


def _fields(text: str) -> list[str]:
    """The fields after the version, split on sts-field-delim; InvalidRecord names what breaks it."""
    fields: list[str] = []
    pos = len(VERSION)
    while pos < len(text):
        delim = _DELIM.match(text, pos)
        if delim is None:  # only after a field: the version is followed by a delimiter (selection)
            rest = text[pos:]
            if not rest.strip(" \t"):
                raise InvalidRecord(f"whitespace at the end of the record after {fields[-1]!r} "
                                    f"(RFC 8461 §3.1: whitespace only around ';')")
            raise InvalidRecord(f"{fields[-1]!r} is followed by {rest[:40]!r}, not by ';' "
                                f"(RFC 8461 §3.1: fields are separated by ';')")
        pos = delim.end()
        if pos == len(text):
            break  # the optional final delimiter: [sts-field-delim]
        field = _FIELD.match(text, pos)
        assert field is not None  # `*` matches the empty string
        if not field.group():
            raise InvalidRecord(f"empty field (';;') after {(fields[-1] if fields else VERSION)!r} "
                                f"(RFC 8461 §3.1: one ';' between two fields)")
        fields.append(field.group())
        pos = field.end()
    return fields


def parse_sts_record(text: str) -> StsRecord:
    """Parse one TXT value that begins with v=STSv1; raise InvalidRecord unless it matches the ABNF."""
    if not text.startswith(VERSION) or not _DELIM.match(text, len(VERSION)):
        raise InvalidRecord(f"record does not begin with 'v=STSv1;': {text[:60]!r}")
    record_id: str | None = None
    extensions: dict[str, str] = {}
    for field in _fields(text):
        name, equals, value = field.partition("=")
        if not equals:
            raise InvalidRecord(f"field {field[:40]!r} is not name=value (RFC 8461 §3.1)")
        if name == "id":  # %s"id=": case-sensitive
            if record_id is None:
                if not valid_id(value):
                    raise InvalidRecord(f"id is not 1-32 letters and digits: {value[:40]!r} (RFC 8461 §3.1)")
                record_id = value
                continue
            # A second "id=" is ignored (first occurrence wins) but must still be a valid field.
        if not _EXT_NAME.fullmatch(name):
            raise InvalidRecord(f"field name {name[:40]!r} is not 1-32 letters, digits, '_', '-' or '.' "
                                f"beginning with a letter or digit (RFC 8461 §3.1: sts-ext-name)")
        if not value:
            raise InvalidRecord(f"field {name!r} has an empty value (RFC 8461 §3.1: sts-ext-value)")
        if not _EXT_VALUE.fullmatch(value):
            raise InvalidRecord(f"value of field {name!r} holds '=' or a character that is not visible "
                                f"ASCII: {value[:40]!r} (RFC 8461 §3.1: sts-ext-value)")
        if name != "id":
            extensions.setdefault(name, value)
    if record_id is None:
        raise InvalidRecord("record has no id (RFC 8461 §3.1: id is required)")
    return StsRecord(record_id, tuple(extensions.items()), text)


def select_record(rrs: Iterable[bytes]) -> StsRecord:
    """Pick the policy record from all TXT RRs at `_mta-sts.<domain>` (each already joined).

    RFC 8461 §3.1: discard records that do not begin with v=STSv1; if not exactly one is left,
    or it is invalid, the domain has no available policy.
    """
    rrs = list(rrs)
    candidates = [rr for rr in rrs if _CANDIDATE.match(rr)]
    if not candidates:
        discarded = next((rr for rr in rrs if rr.startswith(VERSION.encode())), None)
        if discarded is not None:
            # Discarded, so formally "no record"; but the owner meant one: say what is wrong with it.
            raise InvalidRecord(f"record {discarded[:60].decode('ascii', 'replace')!r} does not begin with "
                                f"'v=STSv1;' (RFC 8461 §3.1: 'v=STSv1' must be followed by ';')")
        raise NoRecord("no TXT record begins with v=STSv1")
    if len(candidates) > 1:
        raise InvalidRecord(f"{len(candidates)} TXT records begin with v=STSv1; exactly one is allowed")
    try:
        text = candidates[0].decode("ascii")
    except UnicodeDecodeError:
        raise InvalidRecord("record is not US-ASCII (RFC 8461 §3.1)") from None
    return parse_sts_record(text)
