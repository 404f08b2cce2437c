"""The world runs on the machine's trust store, as an operator's machine with a private CA would.

The test CA is in the system bundle (world.py bind-mounts system bundle + test CA over
/etc/ssl/certs/ca-certificates.crt, what update-ca-certificates would produce), and nothing else
names it: the daemon has no fetch.ca_file and no trust variable, Postfix uses contrib's
smtp_tls_CAfile, Exim contrib's `system`. Then `query` on that live setup.
"""

from __future__ import annotations

import json
import subprocess
import sys

import yaml

from mtasts_policyd.truststore import directory_certificates, file_certificates
from tests.conftest import ROOT
from tests.e2e.world import SYSTEM_BUNDLE, World, operator_environment

MACHINE_STORE = "openssl-default cafile=/etc/ssl/certs/ca-certificates.crt capath=/etc/ssl/certs cas={cas}"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mtasts_policyd", *args], cwd=ROOT, env=operator_environment(),
                          capture_output=True, text=True, timeout=120)


def machine_cas() -> int:
    return len(file_certificates(SYSTEM_BUNDLE) | directory_certificates("/etc/ssl/certs"))


def test_machine_bundle_holds_the_test_ca(world: World) -> None:
    test_ca = file_certificates(world.ca_file)
    assert len(test_ca) == 1 and test_ca <= file_certificates(SYSTEM_BUNDLE)


def test_daemon_trusts_the_machine_store_and_nothing_else(world: World, policyd) -> None:
    """No fetch.ca_file, no SSL_CERT_FILE: the start-up log names OpenSSL's default store, and the
    enforce scenarios of the other e2e tests could only be fetched through it."""
    config = yaml.safe_load(policyd.config_path.read_text())
    assert "ca_file" not in config["fetch"]
    assert policyd.env is not None and "SSL_CERT_FILE" not in policyd.env
    assert f"trust store={MACHINE_STORE.format(cas=machine_cas())}" in policyd.logs()


def test_query_names_the_trust_store(world: World, policyd) -> None:
    result = cli("query", "--config", str(policyd.config_path), "--json", "enforce-ok.e2e.test")
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout)
    assert row["answer"] == "OK secure match=mx.enforce-ok.e2e.test servername=hostname"
    assert row["trust_store"] == {"kind": "openssl-default", "cafile": SYSTEM_BUNDLE, "capath": "/etc/ssl/certs",
                                  "cas": machine_cas(), "notes": []}

    result = cli("query", "--config", str(policyd.config_path), "enforce-ok.e2e.test")
    assert f"  trust_store: {MACHINE_STORE.format(cas=machine_cas())}" in result.stdout.splitlines()
