"""The `_mta-sts` TXT record (RFC 8461 §3.1): pure parsing, no I/O.

What we accept, and why (see README "What the parser accepts"):
- whitespace around ";" (the ABNF's `*WSP ";" *WSP`, so also "v=STSv1 ;": erratum 6285);
- a trailing ";" and empty fields ("a;;b"): harmless, nothing depends on them;
- unknown extension fields are ignored (§3.1, "SHALL be ignored"), even malformed ones;
but strictly, because the RFC says MUST: the record must begin with "v=STSv1", hold exactly one
id of 1-32 letters and digits, be US-ASCII, and be the only STSv1 record at that name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import InvalidRecord, NoRecord

_ID = re.compile(r"[A-Za-z0-9]{1,32}")
# RFC 8461 §3.1: "v=STSv1" then *WSP ";" — the prose says records not beginning "v=STSv1;" are
# discarded; we follow the ABNF, which also admits whitespace before the ";".
_STS_PREFIX = re.compile(rb"v=STSv1[ \t]*(;|$)")
_WSP = " \t"


@dataclass(frozen=True)
class StsRecord:
    """A valid STSv1 record: the id is all that the protocol uses (§3.1, change detection)."""

    id: str
    extensions: tuple[tuple[str, str], ...] = ()
    text: str = ""  # the record as published, for `query` and reports


def join_strings(strings: Iterable[bytes]) -> bytes:
    """RFC 8461 §3.1: one RR of several character-strings is their concatenation, no spaces."""
    return b"".join(strings)


def parse_record(text: str) -> StsRecord:
    """Parse one TXT value that begins with v=STSv1; raise InvalidRecord when it is malformed."""
    fields = [f.strip(_WSP) for f in text.split(";")]
    if fields[0] != "v=STSv1":
        raise InvalidRecord(f"record does not begin with v=STSv1: {text[:60]!r}")
    ids: list[str] = []
    extensions: list[tuple[str, str]] = []
    for field in fields[1:]:
        if not field:
            continue
        name, sep, value = field.partition("=")
        if name == "id":
            ids.append(value)
        elif sep:
            extensions.append((name, value))
    if not ids:
        raise InvalidRecord("record has no id")
    if len(ids) > 1:
        raise InvalidRecord("record has more than one id")
    if not _ID.fullmatch(ids[0]):
        # RFC 8461 §3.1: sts-id = "id=" 1*32(ALPHA / DIGIT)
        raise InvalidRecord(f"id is not 1-32 letters and digits: {ids[0][:40]!r}")
    return StsRecord(ids[0], tuple(extensions), text)


def select_record(rrs: Iterable[bytes]) -> StsRecord:
    """Pick the policy record from all TXT RRs at `_mta-sts.<domain>` (each already joined).

    RFC 8461 §3.1: discard records that do not begin with v=STSv1; if not exactly one is left,
    or it is invalid, the domain has no available policy.
    """
    rrs = list(rrs)
    candidates = [rr for rr in rrs if _STS_PREFIX.match(rr)]
    if not candidates:
        if any(rr.startswith(b"v=STSv1") for rr in rrs):
            raise InvalidRecord("v=STSv1 is not followed by ';'")
        raise NoRecord("no TXT record begins with v=STSv1")
    if len(candidates) > 1:
        raise InvalidRecord(f"{len(candidates)} TXT records begin with v=STSv1; exactly one is allowed")
    raw = candidates[0]
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise InvalidRecord("record is not US-ASCII") from None
    return parse_record(text)
