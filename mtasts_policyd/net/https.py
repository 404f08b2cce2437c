"""HTTPS: fetching the policy file (RFC 8461 §3.3) with requests.

The policy host is resolved through the same DNS settings as the TXT record, so one resolver
configuration governs everything the daemon learns; the connection then goes to that address
while TLS verifies the certificate for mta-sts.<domain> (SNI and hostname check, §3.3).
"""

from __future__ import annotations

import os
import ssl
import time
from dataclasses import dataclass, field
from typing import Any

import requests
import requests.adapters

from mtasts_policyd.core.errors import CertificateInvalid, FetchError, MtaStsError
from mtasts_policyd.core.limits import limits
from mtasts_policyd.net.base import Discovery
from mtasts_policyd.net.trust import TrustStore, trust_store

WELL_KNOWN = "/.well-known/mta-sts.txt"


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


class _PinnedAdapter(requests.adapters.HTTPAdapter):
    """Connects to the URL's address, but sends SNI and checks the certificate for `hostname`.

    The TLS context is the fetcher's, built once: loading a CA bundle per fetch costs more CPU
    than the whole rest of a fetch. It is the only source of trust: requests would otherwise
    load its own bundle (certifi) into it on every connection.
    """

    def __init__(self, hostname: str, context: ssl.SSLContext) -> None:
        self._hostname = hostname
        self._context = context
        super().__init__(max_retries=0)

    def build_connection_pool_key_attributes(self, request: Any, verify: Any, cert: Any = None) -> Any:
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(request, verify, cert)
        pool_kwargs["server_hostname"] = self._hostname  # type: ignore[typeddict-unknown-key]
        pool_kwargs["ssl_context"] = self._context
        pool_kwargs.pop("ca_certs", None)
        pool_kwargs.pop("ca_cert_dir", None)
        return host_params, pool_kwargs

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        """Require verification, but leave the CAs to the context (requests sets certifi here)."""
        conn.cert_reqs = "CERT_REQUIRED"
        conn.ca_certs = None
        conn.ca_cert_dir = None


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
    """The `Fetcher` seam (base.py) over requests: one RFC 8461 §3.3 GET per call.

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

    def fetch(self, domain: str) -> bytes:
        """The raw policy body of `domain`, or a FetchError / CertificateInvalid."""
        host = f"mta-sts.{domain}"
        try:
            addresses = self._discovery.addresses(host)
        except MtaStsError as exc:
            raise FetchError(f"policy host {host} does not resolve: {exc.detail}") from None
        last: FetchError | None = None
        for address in addresses:
            try:
                return self._get(host, address)
            except _ConnectFailed as exc:  # the next address may work; anything else is the answer
                last = exc
        assert last is not None
        raise last

    def _get(self, host: str, address: str) -> bytes:
        s = self._settings
        netloc = f"[{address}]" if ":" in address else address
        url = f"https://{netloc}:{s.port}{WELL_KNOWN}"
        deadline = time.monotonic() + s.timeout
        with requests.Session() as session:
            session.trust_env = False  # no proxies, no netrc: RFC 8461 §3.3 is a plain GET
            session.mount("https://", _PinnedAdapter(host, self._context))
            try:
                response = session.get(
                    url,
                    headers={"Host": host if s.port == 443 else f"{host}:{s.port}", "Accept": "text/plain"},
                    verify=True,  # against the fetcher's context (cert_verify above)
                    allow_redirects=False,  # RFC 8461 §3.3: redirects MUST NOT be followed
                    stream=True,
                    timeout=(s.connect_timeout, s.timeout),
                )
            except requests.exceptions.SSLError as exc:
                reason = _certificate_error(exc)
                if reason is not None:
                    raise CertificateInvalid(f"certificate of {host}: {reason}") from None
                raise FetchError(f"TLS with {host} failed: {_first_line(exc)}") from None
            except requests.exceptions.ConnectionError as exc:
                raise _ConnectFailed(f"connect to {host} ({address}) failed: {_first_line(exc)}") from None
            except requests.exceptions.RequestException as exc:
                raise FetchError(f"GET {host}: {_first_line(exc)}") from None
            with response:
                return _read_body(response, host, deadline, s.max_size)


def _read_body(response: requests.Response, host: str, deadline: float, max_size: int) -> bytes:
    if response.status_code != 200:  # RFC 8461 §3.3: only 200 counts, 3xx included
        raise FetchError(f"GET {host} answered HTTP {response.status_code}")
    # RFC 8461 §3.2: the media type SHOULD be text/plain; parameters are ignored.
    media_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if media_type != "text/plain":
        raise FetchError(f"GET {host} answered Content-Type {media_type or 'none'!r}, not text/plain")
    body = bytearray()
    try:
        for chunk in response.raw.stream(4096, decode_content=True):
            body += chunk
            if len(body) > max_size:
                raise FetchError(f"policy from {host} is larger than {max_size} bytes")
            if time.monotonic() > deadline:
                raise FetchError(f"GET {host} took longer than the fetch timeout")
    except FetchError:
        raise
    except Exception as exc:  # urllib3 read errors, timeouts, protocol errors
        raise FetchError(f"reading policy from {host} failed: {_first_line(exc)}") from None
    return bytes(body)


def _first_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]
