"""The `_smtp._tls` TLSRPT record (RFC 8460 §3): pure parsing, no I/O.

The survey reports whether a domain asks for TLS reports, and a future reporter needs the
addresses, so this module turns the TXT answer into the report URIs or a failure of the shared
taxonomy (errors.py): `NoRecord` when no record begins with "v=TLSRPTv1", `InvalidRecord` when
one does but no reporter could use it. Nothing new was needed in errors.py: RFC 8460 §3 has the
same shape as RFC 8461 §3.1 (discard other records, exactly one must remain).

What we accept, and why:
- whitespace around ";" and ",", a trailing ";", empty fields: the ABNF's
  `field-delim = *WSP ";" *WSP` and `*WSP "," *WSP` between URIs;
- unknown fields, even malformed ones, are ignored (§3: "unknown fields SHALL be ignored");
- "v=TLSRPTv1" with nothing after it is taken as a TLSRPT record that lacks `rua` (invalid),
  not as no record at all, so the survey can say what is wrong with it (txt.py does the same).
- several `rua=` fields: the ABNF (`1*(field-delim tlsrpt-field)`, tlsrpt-field = tlsrpt-rua /
  tlsrpt-extension) allows them and §3 says the record "supports the ability to declare more
  than one rua" and that a reporter "MAY attempt to deliver to each". So the URIs of every rua
  field count, in record order (a URI listed twice counts once): a reporter sends to each of
  them, and taking only the first field would silently drop destinations the owner asked for.
What we reject, because no reporter could deliver to it:
- no `rua=` at all;
- a URI that is empty, not RFC 3986 characters (unfilled templates such as `<your_domain>` or
  `${var}`), holds a raw "!" (§3: "," "!" ";" MUST be percent-encoded; DMARC's "!10m" size
  suffix does not exist in TLSRPT), has another scheme than mailto/https (§3), or has no
  address (`mailto:`) or no host (`https://`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from mtasts_policyd.core.errors import InvalidRecord, NoRecord

VERSION = "v=TLSRPTv1"  # RFC 8460 §3: %s"v=TLSRPTv1", case-sensitive (RFC 7405)
# RFC 8460 §3: records not beginning with "v=TLSRPTv1;" are discarded; like txt.py we follow the
# ABNF's field-delim (*WSP ";" *WSP) and also take a bare "v=TLSRPTv1" as a (broken) candidate.
_PREFIX = re.compile(rb"v=TLSRPTv1[ \t]*(;|$)")
_WSP = " \t"
# RFC 3986 §2: unreserved, reserved and pct-encoded characters, minus "!" "," ";" which RFC 8460 §3
# requires percent-encoded inside a tlsrpt-uri ("," and ";" cannot reach here: they delimit).
_URI_TEXT = re.compile(r"(?:[A-Za-z0-9\-._~:/?#\[\]@$&'()*+=]|%[0-9A-Fa-f]{2})+")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*")  # RFC 3986 §3.1
SCHEMES = ("mailto", "https")  # RFC 8460 §3: "Two URI schemes are supported"


@dataclass(frozen=True)
class TlsRptRecord:
    """A usable TLSRPT record: where aggregate reports go (RFC 8460 §3, `rua`), in record order."""

    rua: tuple[str, ...]
    extensions: tuple[tuple[str, str], ...] = ()  # unknown fields, kept for display only
    text: str = ""  # the record as published

    @property
    def schemes(self) -> tuple[str, ...]:
        """Lowercase scheme of each rua URI (RFC 3986 §3.1: schemes compare case-insensitively)."""
        return tuple(uri.partition(":")[0].lower() for uri in self.rua)


def parse_tlsrpt(records: Iterable[bytes]) -> TlsRptRecord:
    """Pick and parse the TLSRPT record from all TXT RRs at `_smtp._tls.<domain>`.

    Each RR's strings must already be joined without spaces (RFC 8460 §3, as for MTA-STS).
    RFC 8460 §3: discard records not beginning with the version; if not exactly one is left the
    domain does not implement TLSRPT. We raise NoRecord when none is left and InvalidRecord when
    several are, or the one left is unusable, so the survey can tell "absent" from "broken".
    """
    records = list(records)
    candidates = [rr for rr in records if _PREFIX.match(rr)]
    if not candidates:
        if any(rr.startswith(VERSION.encode()) for rr in records):
            raise InvalidRecord(f"{VERSION} is not followed by ';'")
        raise NoRecord(f"no TXT record begins with {VERSION}")
    if len(candidates) > 1:
        raise InvalidRecord(f"{len(candidates)} TXT records begin with {VERSION}; exactly one is allowed")
    try:
        text = candidates[0].decode("ascii")  # RFC 8460 §3: URIs and ext values are ASCII only
    except UnicodeDecodeError:
        raise InvalidRecord("record is not US-ASCII") from None
    return parse_tlsrpt_record(text)


def parse_tlsrpt_record(text: str) -> TlsRptRecord:
    """Parse one record that begins with v=TLSRPTv1; raise InvalidRecord when it is unusable."""
    fields = [f.strip(_WSP) for f in text.split(";")]
    if fields[0] != VERSION:  # RFC 8460 §3: "v" MUST be the first field
        raise InvalidRecord(f"record does not begin with {VERSION}: {text[:60]!r}")
    ruas: list[str] = []
    extensions: list[tuple[str, str]] = []
    for field in fields[1:]:
        if not field:
            continue
        name, sep, value = field.partition("=")
        if not sep:
            continue  # not a key=value field; unknown fields are ignored (RFC 8460 §3)
        if name == "rua":  # %s"rua=": case-sensitive, so "RUA=" is an unknown field
            ruas.append(value)
        else:
            extensions.append((name, value))
    if not ruas:
        raise InvalidRecord("record has no rua= field (RFC 8460 §3: rua is required)")
    # RFC 8460 §3: every rua field is a destination list; all of them, in order (module docstring).
    uris = dict.fromkeys(uri for value in ruas for uri in split_rua(value))
    return TlsRptRecord(tuple(uris), tuple(extensions), text)


def split_rua(value: str) -> tuple[str, ...]:
    """RFC 8460 §3: tlsrpt-rua = "rua=" tlsrpt-uri *(*WSP "," *WSP tlsrpt-uri)."""
    uris = tuple(uri.strip(_WSP) for uri in value.split(","))
    if uris == ("",):
        raise InvalidRecord("rua= is empty")
    for uri in uris:
        check_uri(uri)
    return uris


def check_uri(uri: str) -> None:
    """Raise InvalidRecord unless `uri` is a mailto: or https: URI a reporter could deliver to."""
    if not uri:
        raise InvalidRecord("rua= has an empty URI (stray comma?)")
    if "!" in uri:
        raise InvalidRecord(f"rua URI {uri!r} holds a raw '!' (RFC 8460 §3: must be percent-encoded; "
                            f"there is no DMARC-style size limit)")
    if not _URI_TEXT.fullmatch(uri):
        raise InvalidRecord(f"rua URI {uri!r} has characters no URI may hold (RFC 3986 §2): "
                            f"an unfilled placeholder?")
    scheme, colon, rest = uri.partition(":")
    if not colon or not _SCHEME.fullmatch(scheme):
        raise InvalidRecord(f"rua value {uri!r} is not a URI (no scheme)")
    scheme = scheme.lower()
    if scheme not in SCHEMES:
        raise InvalidRecord(f"rua URI {uri!r}: scheme {scheme!r} is not mailto or https (RFC 8460 §3)")
    if scheme == "mailto":
        _check_mailto(uri, rest)
    else:
        _check_https(uri, rest)


def _check_mailto(uri: str, rest: str) -> None:
    """RFC 6068 §2: mailto:addr-spec[?hfields]; §5.3 of RFC 8460 mails the report to it."""
    address = rest.partition("?")[0]
    local, at, domain = address.rpartition("@")
    if not (local and at and domain):
        raise InvalidRecord(f"rua URI {uri!r} has no mail address")


def _check_https(uri: str, rest: str) -> None:
    """RFC 3986 §3.2 / RFC 9110 §4.2.2: an https URI needs an authority with a host to POST to
    (RFC 8460 §5.4)."""
    if not rest.startswith("//"):
        raise InvalidRecord(f"rua URI {uri!r} has no host")
    authority = re.split(r"[/?#]", rest[2:], maxsplit=1)[0]
    host = authority.rpartition("@")[2]
    if not host.startswith("["):
        host = host.partition(":")[0]
    if not host:
        raise InvalidRecord(f"rua URI {uri!r} has no host")
