"""The trust store for policy hosts (RFC 8461 §3.3: the certificate chains to a trusted root).

The daemon trusts what the machine trusts: fetch.ca_file, else OpenSSL's default verify paths
(SSL_CERT_FILE / SSL_CERT_DIR honoured), else REQUESTS_CA_BUNDLE, and certifi only when the
machine has no CA store. The precedence is tested on temporary bundles with the machine given
explicitly; real fetches from the rig's HTTPS server (test CA) show that the store decided is the
store used, and that nothing else (certifi) is trusted on the side.
"""

from __future__ import annotations

import os
import ssl
import subprocess
from pathlib import Path

import pytest
import requests.certs
import trustme

from mtasts_policyd.core.errors import CertificateInvalid
from mtasts_policyd.net.dns import DnsDiscovery
from mtasts_policyd.net.https import PolicyFetcher, tls_context
from mtasts_policyd.net.trust import (
    directory_certificates,
    file_certificates,
    trust_store,
)
from tests.bodies import ENFORCE_ONE_MX
from tests.e2e.world import TRUST_VARIABLES


def pem(ca: trustme.CA) -> str:
    return ca.cert_pem.bytes().decode()


@pytest.fixture(scope="module")
def cas() -> list[trustme.CA]:
    return [trustme.CA(organization_name=f"truststore test CA {n}") for n in range(4)]


def machine(tmp_path: Path, bundle: str | None = None, hashed: list[str] = ()) -> ssl.DefaultVerifyPaths:
    """OpenSSL's compiled-in paths of a pretend machine: /usr/lib/ssl/cert.pem-style symlink to a
    bundle (None: no bundle at all) and a certs directory with the given certificates, rehashed."""
    store = tmp_path / "machine"
    (store / "certs").mkdir(parents=True)
    if bundle is not None:
        (store / "ca-certificates.crt").write_text(bundle)
        (store / "cert.pem").symlink_to(store / "ca-certificates.crt")
    for n, text in enumerate(hashed):
        (store / "certs" / f"ca{n}.pem").write_text(text)
    if hashed:
        subprocess.run(["openssl", "rehash", str(store / "certs")], check=True, capture_output=True, timeout=30)
    return ssl.DefaultVerifyPaths(None, None, "SSL_CERT_FILE", str(store / "cert.pem"),
                                  "SSL_CERT_DIR", str(store / "certs"))


# ----- the precedence ------------------------------------------------------------------------


def test_machine_store_by_default(tmp_path, cas):
    """No variable set: OpenSSL's compiled-in file and directory, named by what the distribution's
    symlink leads to; certificates found in both count once."""
    paths = machine(tmp_path, pem(cas[0]) + pem(cas[1]), hashed=[pem(cas[1]), pem(cas[2])])

    store = trust_store(None, environ={}, paths=paths)

    assert store.kind == "openssl-default"
    assert store.cafile == str(tmp_path / "machine" / "ca-certificates.crt")
    assert store.capath == str(tmp_path / "machine" / "certs")
    assert store.cas == 3 and store.notes == ()
    assert str(store) == f"openssl-default cafile={store.cafile} capath={store.capath} cas=3"


def test_configured_ca_file_wins_over_everything(tmp_path, cas):
    configured = tmp_path / "configured.pem"
    configured.write_text(pem(cas[3]))
    env_file = tmp_path / "env.pem"
    env_file.write_text(pem(cas[2]))
    environ = {"SSL_CERT_FILE": str(env_file), "REQUESTS_CA_BUNDLE": str(env_file)}

    store = trust_store(str(configured), environ=environ, paths=machine(tmp_path, pem(cas[0])))

    assert (store.kind, store.cafile, store.capath, store.cas) == ("fetch.ca_file", str(configured), None, 1)


def test_ssl_cert_file_replaces_the_compiled_in_file(tmp_path, cas):
    """As in OpenSSL: SSL_CERT_FILE replaces the default file; the default directory stays."""
    env_file = tmp_path / "env.pem"
    env_file.write_text(pem(cas[3]))
    paths = machine(tmp_path, pem(cas[0]), hashed=[pem(cas[1])])

    store = trust_store(None, environ={"SSL_CERT_FILE": str(env_file)}, paths=paths)

    assert (store.kind, store.cafile, store.capath, store.cas) == \
        ("SSL_CERT_FILE", str(env_file), str(tmp_path / "machine" / "certs"), 2)


def test_ssl_cert_dir_with_a_rehashed_directory(tmp_path, cas):
    """SSL_CERT_DIR replaces the default directory; OpenSSL finds certificates there only under
    their subject hash, so a directory that was not rehashed holds nothing for it (and says so)."""
    rehashed = tmp_path / "rehashed"
    rehashed.mkdir()
    (rehashed / "private-ca.pem").write_text(pem(cas[3]))
    subprocess.run(["openssl", "rehash", str(rehashed)], check=True, capture_output=True, timeout=30)
    paths = machine(tmp_path, pem(cas[0]))

    store = trust_store(None, environ={"SSL_CERT_DIR": str(rehashed)}, paths=paths)
    assert (store.kind, store.capath, store.cas) == ("SSL_CERT_DIR", str(rehashed), 2)

    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "private-ca.pem").write_text(pem(cas[3]))
    store = trust_store(None, environ={"SSL_CERT_DIR": str(plain)}, paths=paths)
    assert (store.kind, store.capath, store.cas) == ("openssl-default", None, 1)
    assert store.notes == (f"SSL_CERT_DIR={plain} holds no certificate under a hashed name "
                           f"(run openssl rehash {plain})",)


def test_requests_ca_bundle_only_without_a_machine_store(tmp_path, cas):
    """The issue's order: the machine's store first; REQUESTS_CA_BUNDLE is used on a machine
    without one, and otherwise noted as unused (never silently ignored)."""
    bundle = tmp_path / "requests.pem"
    bundle.write_text(pem(cas[3]) + pem(cas[2]))

    bare = trust_store(None, environ={"REQUESTS_CA_BUNDLE": str(bundle)}, paths=machine(tmp_path / "bare"))
    assert (bare.kind, bare.cafile, bare.capath, bare.cas) == ("REQUESTS_CA_BUNDLE", str(bundle), None, 2)

    equipped = trust_store(None, environ={"REQUESTS_CA_BUNDLE": str(bundle)},
                           paths=machine(tmp_path / "equipped", pem(cas[0])))
    assert equipped.kind == "openssl-default" and equipped.cas == 1
    assert equipped.notes == (f"REQUESTS_CA_BUNDLE={bundle} is not used: the machine's CA store comes first "
                              "(set fetch.ca_file to choose a bundle)",)

    # Naming the machine's own bundle (as many shells do) is no news.
    paths = machine(tmp_path / "same", pem(cas[0]))
    same = trust_store(None, environ={"REQUESTS_CA_BUNDLE": paths.openssl_cafile}, paths=paths)
    assert same.kind == "openssl-default" and same.notes == ()


def test_certifi_only_on_a_machine_without_any_store(tmp_path):
    paths = machine(tmp_path)  # no bundle, an empty certs directory

    store = trust_store(None, environ={}, paths=paths)

    assert (store.kind, store.cafile, store.capath) == ("certifi", requests.certs.where(), None)
    assert store.cas == len(file_certificates(requests.certs.where())) > 100
    assert store.notes == (f"the machine has no CA store (no certificate in {tmp_path}/machine/cert.pem "
                           f"or {tmp_path}/machine/certs)",)


def test_this_machine_without_variables_uses_its_system_bundle():
    """Debian (what .ci/run sets up): the compiled-in paths lead to ca-certificates' bundle, the
    file Postfix's smtp_tls_CAfile names in contrib/postfix/main.cf."""
    if not os.path.isfile("/etc/ssl/certs/ca-certificates.crt"):
        pytest.skip("no Debian CA bundle on this machine")
    store = trust_store(None, environ={})
    assert store.kind == "openssl-default"
    assert (store.cafile, store.capath) == ("/etc/ssl/certs/ca-certificates.crt", "/etc/ssl/certs")
    assert store.cas == len(file_certificates(store.cafile) | directory_certificates(store.capath)) > 0


def test_context_holds_exactly_the_stores_certificates(tmp_path, cas):
    bundle = tmp_path / "bundle.pem"
    bundle.write_text(pem(cas[0]) + pem(cas[1]))
    store = trust_store(str(bundle))
    assert tls_context(store).cert_store_stats()["x509_ca"] == store.cas == 2


def test_unloadable_store_is_named(tmp_path):
    missing = str(tmp_path / "missing.pem")
    store = trust_store(missing)
    assert store.cas == 0 and store.notes == (f"fetch.ca_file {missing} holds no readable PEM certificate",)
    with pytest.raises(OSError, match=f"trust store fetch.ca_file cafile={missing} cas=0 cannot be loaded"):
        tls_context(store)


# ----- real fetches: the store decided is the store used --------------------------------------


@pytest.fixture
def bare_environment(monkeypatch):
    """The environment of an operator's shell: none of the trust variables set."""
    for name in TRUST_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def fetcher_without_ca_file(rig) -> PolicyFetcher:
    return PolicyFetcher(DnsDiscovery(rig.dns_settings()), rig.fetch_settings(ca_file=None))


def test_test_ca_trusted_through_ssl_cert_file_alone(rig, bare_environment):
    """No fetch.ca_file: the test CA is trusted because SSL_CERT_FILE names it, and nothing but
    the store is loaded into the context, before or after the fetch (requests would add certifi)."""
    bare_environment.setenv("SSL_CERT_FILE", rig.https.ca_file)
    domain = rig.domain()
    rig.publish(domain, ENFORCE_ONE_MX)
    fetcher = fetcher_without_ca_file(rig)
    assert (fetcher.trust.kind, fetcher.trust.cafile) == ("SSL_CERT_FILE", rig.https.ca_file)
    before = fetcher._context.cert_store_stats()

    assert fetcher.fetch(domain) == ENFORCE_ONE_MX.format(d=domain).encode()

    assert fetcher._context.cert_store_stats() == before
    assert before["x509_ca"] == 1  # the test CA; the default directory is searched by hash, lazily


def test_test_ca_trusted_through_a_rehashed_ssl_cert_dir(rig, bare_environment, tmp_path):
    directory = tmp_path / "cas"
    directory.mkdir()
    (directory / "test-ca.pem").write_bytes(Path(rig.https.ca_file).read_bytes())
    subprocess.run(["openssl", "rehash", str(directory)], check=True, capture_output=True, timeout=30)
    bare_environment.setenv("SSL_CERT_DIR", str(directory))
    domain = rig.domain()
    rig.publish(domain, ENFORCE_ONE_MX)
    fetcher = fetcher_without_ca_file(rig)
    assert fetcher.trust.kind == "SSL_CERT_DIR"

    assert fetcher.fetch(domain) == ENFORCE_ONE_MX.format(d=domain).encode()


def test_machine_store_and_certifi_do_not_trust_the_test_ca(rig, bare_environment, tmp_path):
    """The control for the tests above and the end-to-end world: neither this machine's own store
    nor certifi's bundle (what a machine without a store falls back to) knows the test CA."""
    domain = rig.domain()
    rig.publish(domain, ENFORCE_ONE_MX)
    fetcher = fetcher_without_ca_file(rig)
    assert fetcher.trust.kind == "openssl-default"
    with pytest.raises(CertificateInvalid):
        fetcher.fetch(domain)

    bare_environment.setenv("SSL_CERT_FILE", str(tmp_path / "none.pem"))
    bare_environment.setenv("SSL_CERT_DIR", str(tmp_path))
    fetcher = fetcher_without_ca_file(rig)
    assert fetcher.trust.kind == "certifi"
    with pytest.raises(CertificateInvalid) as caught:
        fetcher.fetch(domain)
    assert "unable to get local issuer certificate" in caught.value.detail
    assert rig.https.count(domain) == 0
