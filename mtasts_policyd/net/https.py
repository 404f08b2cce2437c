"""HTTPS: fetching the policy file (RFC 8461 §3.3) with http.client over our own TLS connection.

The policy host is resolved through the same DNS settings as the TXT record, so one resolver
configuration governs everything the daemon learns; the connection then goes to that address
while TLS verifies the certificate for mta-sts.<domain> (SNI and hostname check, §3.3).
"""

from __future__ import annotations

import http.client
import os
import socket
import ssl
import time
import zlib
from dataclasses import dataclass, field

from mtasts_policyd.core.errors import CertificateInvalid, DnsTemporaryFailure, FetchError, MtaStsError
from mtasts_policyd.core.limits import limits
from mtasts_policyd.core.names import policy_host
from mtasts_policyd.net.base import Discovery
from mtasts_policyd.net.trust import TrustStore, trust_store

WELL_KNOWN = "/.well-known/mta-sts.txt"
ADDRESS_FAMILIES = ("A", "AAAA")  # IPv4 first; IPv6 asked only when IPv4 gives no working address


def readable_file(path: str) -> None:
    """A CA bundle that is not there would make every fetch fail, and every policy unusable."""
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise ValueError(f"{path!r} is not a readable file")


@dataclass(frozen=True)
class FetchSettings:
    ca_file: str | None = field(default=None, metadata=limits(check=readable_file))  # None: the machine's trust store (truststore.py)
    connect_timeout: float = field(default=10.0, metadata=limits(min=0.1, max=300))
    # RFC 8461 §3.3 allows a limit; the whole GET must end within it
    timeout: float = field(default=20.0, metadata=limits(min=0.1, max=600))
    max_size: int = field(default=65536, metadata=limits(min=1024, max=10 * 1024 * 1024))  # §3.3: 64 KiB suggested
    port: int = field(default=443, metadata=limits(min=1, max=65535))  # only test rigs change this


class _ConnectFailed(FetchError):
    pass


class _PinnedConnection(http.client.HTTPConnection):
    """HTTP over TLS to `address`, with SNI and the certificate check for `hostname` (RFC 8461 §3.3).

    Why http.client and not requests (which this module used before): requests' session, adapter,
    connection pool and request preparation cost about 0.7 ms of CPU per fetch, more than the TLS
    handshake itself, and every cold domain pays it (bench/README.md, "Cold path"). http.client is
    what urllib3 parses responses with underneath: the HTTP rules (status line, headers, chunked and
    Content-Length framing, truncated bodies) stay in the standard library, and the rules of the
    policy fetch stay here, each in one place: the trust store and TLS 1.2+ (`tls_context`), no
    redirects and no proxies (nothing here follows or reads them), status, media type, size and time
    (`_read_body`).
    """

    default_port = 443  # the Host header names the port only when it is another one (test rigs)

    def __init__(self, hostname: str, address: str, port: int, context: ssl.SSLContext, timeout: float) -> None:
        super().__init__(hostname, port, timeout=timeout)
        self._address = address
        self._context = context

    def connect(self) -> None:
        try:
            raw = socket.create_connection((self._address, self.port), self.timeout)
        except OSError as exc:  # refused, unreachable, connect timeout: the next address may work
            raise _ConnectFailed(f"connect to {self.host} ({self._address}) failed: {_first_line(exc)}") from None
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock = self._context.wrap_socket(raw, server_hostname=self.host)
        except BaseException:
            raw.close()
            raise


def tls_context(store: TrustStore) -> ssl.SSLContext:
    """Verify chain and name (RFC 8461 §3.3) with OpenSSL's own RFC 6125 check; TLS 1.2+ (§7.2).

    The CAs are exactly those of `store`; OSError naming the store if it cannot be loaded.
    """
    if not (store.cafile or store.capath):
        raise OSError(f"trust store {store} names no CA file or directory")
    try:
        context = ssl.create_default_context(cafile=store.cafile, capath=store.capath)
    except OSError as exc:  # ssl.SSLError included
        raise OSError(f"trust store {store} cannot be loaded: {exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _certificate_error(exc: BaseException) -> str | None:
    """The verification message if `exc` wraps a certificate failure (urllib3 nests it in args)."""
    pending: list[object] = [exc]
    for _ in range(10):
        if not pending:
            break
        seen = pending.pop()
        if isinstance(seen, ssl.SSLCertVerificationError):
            return seen.verify_message or str(seen)
        if isinstance(seen, ssl.CertificateError):  # RFC 8461 §3.3: wrong name
            return str(seen)
        if isinstance(seen, BaseException):
            pending.extend([seen.__cause__, seen.__context__, *seen.args])
    return None


class PolicyFetcher:
    """The `Fetcher` seam (base.py) over http.client: one RFC 8461 §3.3 GET per call.

    Why a class of its own rather than `requests.get`: the policy host must be reached at the
    address our own DNS settings give (`discovery.addresses`, so one resolver configuration
    governs everything the daemon learns) while TLS checks the certificate for mta-sts.<domain>,
    against one trust store decided once (trust.py). What it guarantees: TLS 1.2 or later with a
    verified chain and name, no redirects, no proxies, status 200 and text/plain only, at most
    `max_size` bytes within `timeout`; every failure is a FetchError, or CertificateInvalid when
    the certificate is at fault. Thread-safe: each fetch has its own session.
    """

    def __init__(self, discovery: Discovery, settings: FetchSettings = FetchSettings()) -> None:
        self._discovery = discovery
        self._settings = settings
        self.trust = trust_store(settings.ca_file)  # decided once: the start-up log and query show it
        self._context = tls_context(self.trust)

    def fetch(self, domain: str, ipv4: list[str] | MtaStsError | None = None) -> bytes:
        """The raw policy body of `domain`, or a FetchError / CertificateInvalid.

        RFC 8461 §3.3 names a host, mta-sts.<domain>: its IPv4 addresses are tried first, and its
        IPv6 addresses are asked for only when IPv4 gave none that accepts a connection (no A
        record, a failed A lookup, or every address refusing). The same addresses in the same
        order as asking for both at once, one DNS query fewer for nearly every fetch.
        `ipv4`: the A lookup already made by the caller (the daemon makes it on its event loop).
        """
        host = policy_host(domain)
        unresolved: MtaStsError | None = None
        refused: FetchError | None = None
        for family in ADDRESS_FAMILIES:
            try:
                if family == "A" and ipv4 is not None:
                    if isinstance(ipv4, MtaStsError):
                        raise ipv4
                    addresses = ipv4
                else:
                    addresses = self._discovery.addresses(host, (family,))
            except MtaStsError as exc:  # "could not ask" outweighs "has no such record"
                unresolved = unresolved if isinstance(unresolved, DnsTemporaryFailure) else exc
                continue
            for address in addresses:
                try:
                    return self._get(host, address)
                except _ConnectFailed as exc:  # the next address may work; anything else is the answer
                    refused = exc
        if refused is not None:
            raise refused
        assert unresolved is not None
        raise FetchError(f"policy host {host} does not resolve: {unresolved.detail}")

    def _get(self, host: str, address: str) -> bytes:
        s = self._settings
        deadline = time.monotonic() + s.timeout  # RFC 8461 §3.3: the whole GET, not each read
        connection = _PinnedConnection(host, address, s.port, self._context, s.connect_timeout)
        try:
            try:
                connection.connect()
                _until(connection, deadline)
                connection.request("GET", WELL_KNOWN, headers={"Accept": "text/plain", "Accept-Encoding": ENCODINGS})
                response = connection.getresponse()
            except _ConnectFailed:
                raise
            except ssl.SSLError as exc:  # SSLCertVerificationError included
                reason = _certificate_error(exc)
                if reason is not None:
                    raise CertificateInvalid(f"certificate of {host}: {reason}") from None
                raise FetchError(f"TLS with {host} failed: {_first_line(exc)}") from None
            except TimeoutError:
                raise FetchError(f"GET {host} took longer than the fetch timeout") from None
            except (OSError, http.client.HTTPException) as exc:
                raise FetchError(f"GET {host}: {_first_line(exc)}") from None
            return _read_body(response, connection, host, deadline, s.max_size)
        finally:
            connection.close()


ENCODINGS = "gzip, deflate"  # what the response may be compressed with (undone before the size check)


def _until(connection: http.client.HTTPConnection, deadline: float) -> None:
    """Let the next socket operation wait no longer than what is left of the fetch timeout."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError()
    if connection.sock is not None:
        connection.sock.settimeout(left)


def _decoder(encoding: str, host: str) -> zlib._Decompress | None:
    """A zlib decompressor for the response's Content-Encoding, or None for an identity body."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return None
    if encoding in ("gzip", "x-gzip"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    if encoding == "deflate":  # zlib-wrapped, as RFC 9110 §8.4.1.2 says; raw deflate is not accepted
        return zlib.decompressobj()
    raise FetchError(f"GET {host} answered Content-Encoding {encoding!r}, which is not gzip or deflate")


def _read_body(response: http.client.HTTPResponse, connection: http.client.HTTPConnection, host: str,
               deadline: float, max_size: int) -> bytes:
    if response.status != 200:  # RFC 8461 §3.3: only 200 counts, 3xx (never followed) included
        raise FetchError(f"GET {host} answered HTTP {response.status}")
    # RFC 8461 §3.2: the media type SHOULD be text/plain; parameters are ignored.
    media_type = (response.getheader("Content-Type") or "").split(";")[0].strip().lower()
    if media_type != "text/plain":
        raise FetchError(f"GET {host} answered Content-Type {media_type or 'none'!r}, not text/plain")
    decoder = _decoder(response.getheader("Content-Encoding") or "", host)
    body = bytearray()
    try:
        while True:
            _until(connection, deadline)
            raw = response.read1(4096)  # one socket read at most: a trickle cannot outlast the deadline
            if not raw:
                if response.length:  # http.client undoes chunked framing; this is a short Content-Length body
                    raise FetchError(f"policy from {host} ended {response.length} bytes short of its Content-Length")
                break
            # RFC 8461 §3.3: the limit is on the policy, i.e. the decoded body: inflate no more than that
            body += decoder.decompress(raw, max_size + 1 - len(body)) if decoder is not None else raw
            if len(body) > max_size:
                raise FetchError(f"policy from {host} is larger than {max_size} bytes")
        if decoder is not None:
            body += decoder.flush()
            if not decoder.eof:
                raise FetchError(f"policy from {host} is a truncated {response.getheader('Content-Encoding')} stream")
            if len(body) > max_size:
                raise FetchError(f"policy from {host} is larger than {max_size} bytes")
    except FetchError:
        raise
    except TimeoutError:
        raise FetchError(f"GET {host} took longer than the fetch timeout") from None
    except (OSError, http.client.HTTPException, zlib.error) as exc:  # IncompleteRead, resets, bad gzip
        raise FetchError(f"reading policy from {host} failed: {_first_line(exc)}") from None
    return bytes(body)


def _first_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]
