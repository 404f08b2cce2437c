"""Which CA certificates the policy hosts are verified against (RFC 8461 §3.3: the certificate
MUST chain to a root the sender trusts).

The daemon trusts what the machine trusts, so that it agrees with the MTA beside it (Postfix's
`smtp_tls_CAfile = /etc/ssl/certs/ca-certificates.crt`, Exim's `system`) and follows the
operator's CA updates and private CAs. In order:

1. `fetch.ca_file` when configured;
2. OpenSSL's default verify paths, as OpenSSL itself finds them: `SSL_CERT_FILE` and
   `SSL_CERT_DIR` when set, else its compiled-in file and directory (on Debian
   /etc/ssl/certs/ca-certificates.crt and /etc/ssl/certs, kept by update-ca-certificates);
3. `REQUESTS_CA_BUNDLE`, when the machine has no CA store;
4. certifi's bundle, only when there is nothing else.

Deciding is pure apart from reading the candidate files; tls_context (fetch.py) loads exactly
what the decision names, and the start-up log, `query` and `doctor` show it.
"""

from __future__ import annotations

import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import requests.certs

REQUESTS_CA_BUNDLE = "REQUESTS_CA_BUNDLE"

_PEM = re.compile(rb"-----BEGIN (?:TRUSTED )?CERTIFICATE-----(.*?)-----END", re.S)
_HASHED_NAME = re.compile(r"[0-9a-f]{8}\.\d+")  # openssl rehash / c_rehash: HASH.N (CRLs are HASH.rN)
_WHITESPACE = re.compile(rb"\s+")


@dataclass(frozen=True)
class TrustStore:
    """The decision: where the CAs come from, and how many distinct certificates that is."""

    kind: str  # fetch.ca_file, SSL_CERT_FILE, SSL_CERT_DIR, openssl-default, REQUESTS_CA_BUNDLE, certifi
    cafile: str | None
    capath: str | None
    cas: int  # distinct certificates in cafile and capath together
    notes: tuple[str, ...] = ()  # settings that were looked at and not used, and why

    def __str__(self) -> str:
        """`KIND cafile=... capath=... cas=N`: follows `trust store=` in logs, key=value greppable."""
        parts = [self.kind]
        parts += [f"{name}={value}" for name, value in (("cafile", self.cafile), ("capath", self.capath)) if value]
        return " ".join([*parts, f"cas={self.cas}"])

    def fields(self) -> dict[str, Any]:
        return {"kind": self.kind, "cafile": self.cafile, "capath": self.capath, "cas": self.cas,
                "notes": list(self.notes)}


def file_certificates(path: str) -> set[bytes]:
    """The PEM certificates in `path` (their base64 bodies, so equal certificates count once);
    empty when the file cannot be read."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError:
        return set()
    return {_WHITESPACE.sub(b"", body) for body in _PEM.findall(data)}


def directory_certificates(path: str) -> set[bytes]:
    """The certificates OpenSSL can find in a CA directory: only files named by subject hash
    (HASH.N, what `openssl rehash` makes) are ever looked at, so only they count."""
    try:
        names = os.listdir(path)
    except OSError:
        return set()
    found: set[bytes] = set()
    for name in names:
        if _HASHED_NAME.fullmatch(name):
            found |= file_certificates(os.path.join(path, name))
    return found


def trust_store(ca_file: str | None, environ: Mapping[str, str] | None = None,
                paths: ssl.DefaultVerifyPaths | None = None, fallback: str | None = None) -> TrustStore:
    """Decide the trust store (see the module docstring for the order).

    `environ`, `paths` (ssl.get_default_verify_paths()) and `fallback` (certifi's bundle) are the
    machine; tests pass their own.
    """
    if ca_file:
        certificates = file_certificates(ca_file)
        unusable = () if certificates else (f"fetch.ca_file {ca_file} holds no readable PEM certificate",)
        return TrustStore("fetch.ca_file", ca_file, None, len(certificates), unusable)
    environ = os.environ if environ is None else environ
    paths = paths or ssl.get_default_verify_paths()
    notes: list[str] = []
    # As OpenSSL does (X509_get_default_cert_file/_dir): the variable when set, else the compiled-in
    # path. Those are distribution symlinks (Debian: /usr/lib/ssl/cert.pem); name what they lead to.
    file_set, dir_set = paths.openssl_cafile_env in environ, paths.openssl_capath_env in environ
    cafile = environ[paths.openssl_cafile_env] if file_set else os.path.realpath(paths.openssl_cafile)
    capath = environ[paths.openssl_capath_env] if dir_set else os.path.realpath(paths.openssl_capath)
    in_file = file_certificates(cafile)
    in_dir = directory_certificates(capath)
    if file_set and not in_file:
        notes.append(f"{paths.openssl_cafile_env}={cafile} holds no readable PEM certificate")
    if dir_set and not in_dir:
        notes.append(f"{paths.openssl_capath_env}={capath} holds no certificate under a hashed name "
                     f"(run openssl rehash {capath})")
    bundle = environ.get(REQUESTS_CA_BUNDLE)
    if in_file or in_dir:
        if bundle and os.path.realpath(bundle) not in (os.path.realpath(cafile), os.path.realpath(capath)):
            notes.append(f"{REQUESTS_CA_BUNDLE}={bundle} is not used: the machine's CA store comes first "
                         "(set fetch.ca_file to choose a bundle)")
        kind = ("SSL_CERT_FILE" if file_set and in_file else "SSL_CERT_DIR" if dir_set and in_dir
                else "openssl-default")
        return TrustStore(kind, cafile if in_file else None, capath if in_dir else None,
                          len(in_file | in_dir), tuple(notes))
    notes.append(f"the machine has no CA store (no certificate in {cafile} or {capath})")
    if bundle:
        if os.path.isdir(bundle):  # requests accepts a directory too
            certificates = directory_certificates(bundle)
            if certificates:
                return TrustStore(REQUESTS_CA_BUNDLE, None, bundle, len(certificates), tuple(notes))
        else:
            certificates = file_certificates(bundle)
            if certificates:
                return TrustStore(REQUESTS_CA_BUNDLE, bundle, None, len(certificates), tuple(notes))
        notes.append(f"{REQUESTS_CA_BUNDLE}={bundle} holds no readable PEM certificate")
    fallback = fallback or requests.certs.where()  # type: ignore[attr-defined]
    return TrustStore("certifi", fallback, None, len(file_certificates(fallback)), tuple(notes))
