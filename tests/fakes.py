"""In-memory fakes behind the network seams (mtasts_policyd/net/base.py), for the fast tier.

The rules above the network (resolution, warm, survey) are tested with these in milliseconds,
beside the real-server tests (tests/rig), which stay the proof that dnspython and requests are
driven right. The fakes keep the seams' contract: answers carry their TTL and go through the
same record parsing as the real ones (base.sts_answer, base.tlsrpt_answer); failures are the
taxonomy's exceptions. Their API follows the rig's (`set`, `remove`, `fault`, `count`;
`set_policy(..., status=, cert=)`), so a fast test reads like its real-server sibling.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field

import dns.rrset

from mtasts_policyd.core.errors import CertificateInvalid, DnsTemporaryFailure, FetchError, MtaStsError, NoRecord
from mtasts_policyd.net.dnssec import Denial, DnssecAnswer, DnssecDenial, DnssecResult
from mtasts_policyd.net.base import StsAnswer, TlsRptAnswer, sts_answer, tlsrpt_answer
from mtasts_policyd.net.trust import TrustStore
from mtasts_policyd.store.entry import Entry
from mtasts_policyd.store.shared import SharedUnavailable, decode, encode
from tests.conftest import ENFORCE

FAULTS = ("servfail", "timeout")
CERTS = ("valid", "untrusted", "expired", "wrong-name")


def _key(name: str) -> str:
    return name.lower().rstrip(".")


class _Faults:
    """`fault(name, "servfail" | "timeout")`: every query for the name fails so (None: no more)."""

    _faults: dict[str, str]
    _lock: threading.Lock

    def fault(self, name: str, kind: str | None) -> None:
        if kind is not None and kind not in FAULTS:
            raise ValueError(f"unknown fault {kind!r}; expected one of {FAULTS}")
        with self._lock:
            if kind is None:
                self._faults.pop(_key(name), None)
            else:
                self._faults[_key(name)] = kind


class FakeDiscovery(_Faults):
    """DNS in memory: records per (name, type) with one TTL per RRset; a name with no records at
    all is NXDOMAIN, a name without the asked type NODATA (both NoRecord with `negative_ttl`, RFC
    2308); `fault(name, "servfail" | "timeout")` makes every query for it a DnsTemporaryFailure.
    Every query is counted. Thread-safe (warm and survey ask from worker threads)."""

    def __init__(self, negative_ttl: int = 60) -> None:
        self.negative_ttl = negative_ttl
        self._data: dict[str, dict[str, tuple[list[str | list[str]], int]]] = {}
        self._faults: dict[str, str] = {}
        self.queries: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    # ----- zone data (as tests/rig DnsServer) -----

    def set(self, name: str, rdtype: str, *values: str | list[str], ttl: int = 300) -> None:
        """Replace the records of `rdtype` at `name`; a TXT value given as a list is one RR of
        several strings. MX values are "PREFERENCE HOST", A/AAAA values addresses."""
        with self._lock:
            types = self._data.setdefault(_key(name), {})
            if values:
                types[rdtype] = (list(values), ttl)
            else:
                types.pop(rdtype, None)

    def remove(self, name: str, rdtype: str | None = None) -> None:
        """Remove one type at `name`, or the whole name (it then becomes NXDOMAIN)."""
        with self._lock:
            types = self._data.get(_key(name), {})
            if rdtype is None:
                types.clear()
            else:
                types.pop(rdtype, None)

    def count(self, name: str, rdtype: str | None = None) -> int:
        key = _key(name)
        with self._lock:
            return sum(1 for n, t in self.queries if n == key and rdtype in (None, t))

    # ----- the Discovery seam -----

    def _query(self, name: str, rdtype: str) -> tuple[list[str | list[str]], int]:
        key = _key(name)
        with self._lock:
            self.queries.append((key, rdtype))
            fault = self._faults.get(key)
            types = self._data.get(key)
            found = types.get(rdtype) if types else None
        if fault == "servfail":
            raise DnsTemporaryFailure(f"{key}. {rdtype}: no server answered (SERVFAIL)")
        if fault == "timeout":
            raise DnsTemporaryFailure(f"{key}. {rdtype}: timed out")
        if not types:
            raise NoRecord(f"{key}. does not exist (NXDOMAIN)", ttl=self.negative_ttl)
        if found is None:
            raise NoRecord(f"{key}. has no {rdtype} record", ttl=self.negative_ttl)
        return found

    def _txt(self, name: str) -> tuple[list[bytes], int]:
        values, ttl = self._query(name, "TXT")
        return [("".join(v) if isinstance(v, list) else v).encode() for v in values], ttl

    def sts_record(self, domain: str) -> StsAnswer:
        return sts_answer(*self._txt(f"_mta-sts.{domain}"))

    async def sts_record_async(self, domain: str) -> StsAnswer:
        return self.sts_record(domain)

    def tlsrpt_record(self, domain: str) -> TlsRptAnswer:
        return tlsrpt_answer(*self._txt(f"_smtp._tls.{domain}"))

    def mx_hosts(self, domain: str) -> tuple[list[str], int]:
        values, ttl = self._query(domain, "MX")
        pairs = sorted((int(p), h) for p, h in (str(v).split() for v in values))
        return [host if host == "." else host.lower().rstrip(".") for _, host in pairs], ttl

    async def mx_hosts_async(self, domain: str) -> tuple[list[str], int]:
        return self.mx_hosts(domain)

    async def addresses_async(self, host: str, families: tuple[str, ...] = ("A", "AAAA")) -> list[str]:
        return self.addresses(host, families)

    def addresses(self, host: str, families: tuple[str, ...] = ("A", "AAAA")) -> list[str]:
        found: list[str] = []
        failure: Exception | None = None
        for rdtype in families:
            try:
                found += [str(v) for v in self._query(host, rdtype)[0]]
            except (NoRecord, DnsTemporaryFailure) as exc:
                failure = failure if isinstance(failure, DnsTemporaryFailure) else exc
        if found:
            return found
        assert failure is not None
        raise failure


@dataclass
class _Served:
    body: bytes
    status: int = 200
    cert: str = "valid"


@dataclass
class FakeFetcher:
    """Policy hosts in memory: a body per domain, or a failure (`status` other than 200 or a
    `cert` other than "valid", as tests/rig PolicyServer), a domain without a policy host
    (`unresolvable`). Each fetch is counted. Only FetchError and CertificateInvalid are raised:
    an invalid body is the parser's business, as with the real fetcher."""

    trust: TrustStore = TrustStore("fake", None, None, 0)
    _served: dict[str, _Served] = field(default_factory=dict)
    _unresolvable: set[str] = field(default_factory=set)
    requests: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def set_policy(self, domain: str, body: str | bytes, *, status: int = 200, cert: str = "valid") -> None:
        if cert not in CERTS:
            raise ValueError(f"unknown cert kind {cert!r}; expected one of {CERTS}")
        with self._lock:
            self._served[_key(domain)] = _Served(body.encode() if isinstance(body, str) else body, status, cert)
            self._unresolvable.discard(_key(domain))

    def remove(self, domain: str, *, unresolvable: bool = False) -> None:
        """No policy at mta-sts.<domain> (HTTP 404), or (`unresolvable`) no such host at all."""
        with self._lock:
            self._served.pop(_key(domain), None)
            if unresolvable:
                self._unresolvable.add(_key(domain))

    def count(self, domain: str) -> int:
        with self._lock:
            return self.requests.count(_key(domain))

    def fetch(self, domain: str, ipv4: list[str] | MtaStsError | None = None) -> bytes:
        """`ipv4` is not looked at: the fake's hosts resolve as `remove(unresolvable=...)` says."""
        host = f"mta-sts.{domain}"
        with self._lock:
            if _key(domain) in self._unresolvable:
                raise FetchError(f"policy host {host} does not resolve: {host}. does not exist (NXDOMAIN)")
            self.requests.append(_key(domain))
            served = self._served.get(_key(domain), _Served(b"", 404))
        if served.cert != "valid":
            raise CertificateInvalid(f"certificate of {host}: {served.cert}")
        if served.status != 200:
            raise FetchError(f"GET {host} answered HTTP {served.status}")
        return served.body


class FakeDnssec(_Faults):
    """A validating resolver in memory (the net/dnssec.DnssecQuestions seam), for DANE's fast tests.

    Records per (name, type) with one TTL per RRset, values in presentation format; a name with no
    records at all is NXDOMAIN, one without the asked type NODATA (negative TTL `negative_ttl`).
    Every answer comes with AD (secure) unless the name is at or below a zone made `insecure()`,
    or the resolver is not `validating` (then nothing has AD, the root's NS included: the probe
    fails). `fault(name, "servfail" | "timeout")` fails every question for the name (what a
    validating resolver answers for bogus data and lame servers). Every question is counted.
    """

    def __init__(self, negative_ttl: int = 60, validating: bool = True) -> None:
        self.negative_ttl = negative_ttl
        self.validating = validating
        self._data: dict[tuple[str, str], tuple[list[str], int]] = {("", "NS"): (["a.root.test."], 3600)}
        self._insecure: set[str] = set()
        self._faults: dict[str, str] = {}
        self.queries: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def set(self, name: str, rdtype: str, *values: str, ttl: int = 300) -> None:
        """Replace the RRset (no values: remove it)."""
        with self._lock:
            if values:
                self._data[(_key(name), rdtype)] = (list(values), ttl)
            else:
                self._data.pop((_key(name), rdtype), None)

    def insecure(self, zone: str) -> None:
        """Names at or below `zone` are answered without AD (a zone delegated without DS)."""
        self._insecure.add(_key(zone))

    def count(self, name: str | None = None, rdtype: str | None = None) -> int:
        with self._lock:
            return sum(1 for n, t in self.queries if (name is None or n == _key(name)) and rdtype in (None, t))

    async def query(self, name: str, rdtype: str) -> DnssecResult:
        key = _key(name)
        absolute = f"{key}." if key else "."
        with self._lock:
            self.queries.append((key, rdtype))
            fault = self._faults.get(key)
            found = self._data.get((key, rdtype))
            exists = any(n == key for n, _ in self._data)
        if fault == "servfail":
            raise DnsTemporaryFailure(f"{absolute} {rdtype}: 127.0.0.1@53 answered SERVFAIL (DNSSEC Bogus)")
        if fault == "timeout":
            raise DnsTemporaryFailure(f"{absolute} {rdtype}: timed out")
        secure = self.validating and not any(key == zone or key.endswith(f".{zone}") for zone in self._insecure)
        if found is None:
            kind = Denial.NODATA if exists else Denial.NXDOMAIN
            return DnssecDenial(absolute, rdtype, kind, self.negative_ttl, secure)
        values, ttl = found
        rrset = dns.rrset.from_text_list(absolute, ttl, "IN", rdtype, values)
        return DnssecAnswer(absolute, rdtype, rrset, absolute, ttl, secure)


@dataclass
class FakeNet:
    """Both fakes, and `publish` as tests/rig's Rig.publish: TXT record, MX hosts (mx1.d and
    a.mx.d), the policy host and its policy."""

    dns: FakeDiscovery = field(default_factory=FakeDiscovery)
    https: FakeFetcher = field(default_factory=FakeFetcher)

    def publish(self, domain: str, body: str = ENFORCE, *, id: str = "1", ttl: int = 300, status: int = 200,
                cert: str = "valid") -> None:
        self.dns.set(f"_mta-sts.{domain}", "TXT", f"v=STSv1; id={id}", ttl=ttl)
        self.dns.set(domain, "MX", f"10 mx1.{domain}.", f"20 a.mx.{domain}.", ttl=ttl)
        self.https.set_policy(domain, body.format(d=domain), status=status, cert=cert)


class FakeShared:
    """The fleet's shared level in memory (store/shared.SharedLevel), for the fast rule tests:
    documents written with the real codec (store/shared.encode/decode, HMAC included), writes
    refused as Redis's script refuses them (entry.supersedes), locks without expiry unless
    `expire_lock` is called, `down` makes every call SharedUnavailable. Thread-safe."""

    def __init__(self, hmac_key: bytes | None = None, read_only: bool = False) -> None:
        self.hmac_key = hmac_key
        self.read_only = read_only
        self.down = False
        self.docs: dict[str, bytes] = {}
        self.locks: set[str] = set()
        self.writes = 0
        self._lock = threading.Lock()

    def _check(self) -> None:
        if self.down:
            raise SharedUnavailable("fake shared level down")

    def get(self, domain: str, now: float) -> Entry | None:
        self._check()
        raw = self.docs.get(domain)
        return None if raw is None else decode(raw, domain, now, self.hmac_key)

    def put(self, entry: Entry, due_at: float) -> bool:
        self._check()
        assert not self.read_only, "a read-only level must never be asked to write"
        with self._lock:
            self.locks.discard(entry.domain)
            raw = self.docs.get(entry.domain)
            if raw is not None:
                stored = json.loads(raw)["record"].get("fetched_at") or 0.0
                if stored > (entry.fetched_at or 0.0):
                    return False
            self.docs[entry.domain] = encode(entry, self.hmac_key)
            self.writes += 1
            return True

    def delete(self, domain: str) -> bool:
        self._check()
        return self.docs.pop(domain, None) is not None

    def claim(self, domain: str, ttl: float) -> bool:
        self._check()
        with self._lock:
            if domain in self.locks:
                return False
            self.locks.add(domain)
            return True

    def release(self, domain: str) -> None:
        self._check()
        self.locks.discard(domain)

    def expire_lock(self, domain: str) -> None:
        self.locks.discard(domain)

    def locked(self, domain: str) -> bool:
        self._check()
        return domain in self.locks

    def due(self, until: float, limit: int) -> list[str]:
        return sorted(self.docs)[:limit]

    def domains(self) -> list[str]:
        return sorted(self.docs)

    def status(self) -> dict[str, object]:
        return {"state": "down" if self.down else "read-only" if self.read_only else "up", "errors": 0}

    def close(self) -> None:
        pass
