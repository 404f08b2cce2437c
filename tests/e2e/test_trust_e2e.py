"""The world runs on the machine's trust store, as an operator's machine with a private CA would.

The test CA is in the system bundle (world.py bind-mounts system bundle + test CA over
/etc/ssl/certs/ca-certificates.crt, what update-ca-certificates would produce), and nothing else
names it: the daemon has no fetch.ca_file and no trust variable, Postfix uses contrib's
smtp_tls_CAfile, Exim contrib's `system`. Then `query` and `doctor` on that live setup.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml

from mtasts_policyd.net.trust import directory_certificates, file_certificates
from tests.conftest import run_cli
from tests.test_doctor import EXIM_PIECES_OK
from tests.e2e.exim_mta import CONFIG as CONTRIB_EXIM_CONF
from tests.e2e.exim_mta import EXIM
from tests.e2e.postfix_mta import PostfixInstance
from tests.e2e.world import SYSTEM_BUNDLE, World, operator_environment

MACHINE_STORE = "openssl-default cafile=/etc/ssl/certs/ca-certificates.crt capath=/etc/ssl/certs cas={cas}"


def cli(*args: str) -> subprocess.CompletedProcess:
    """The command as the operator runs it (their environment, not the test run's)."""
    return run_cli(*args, env=operator_environment(), timeout=120)


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


def test_doctor_finds_the_live_setup_well(world: World, policyd) -> None:
    """`doctor --postfix --exim` on the world: the daemon on its default ports, contrib's Postfix
    main.cf (in a real instance's configuration directory) and contrib's exim.conf as shipped."""
    postfix = PostfixInstance()
    try:
        result = cli("doctor", "--config", str(policyd.config_path), "--postfix", "--postconf-dir",
                     str(postfix.config_dir), "--exim", "--exim-config", str(CONTRIB_EXIM_CONF),
                     "--exim-binary", EXIM)
    finally:
        postfix.remove()
    lines = result.stdout.splitlines()
    assert result.returncode == 0, result.stdout + result.stderr
    cache = Path(yaml.safe_load(policyd.config_path.read_text())["cache"]["path"])
    assert lines == [
        "ok socketmap: 127.0.0.1:8461 answers",
        "ok exim-listener: 127.0.0.1:8462 answers",
        f"ok trust-store: trust store={MACHINE_STORE.format(cas=machine_cas())}",
        "ok resolver: 127.0.0.1 port 53 answers (. NS: 1 name)",
        f"ok cache: {cache}: {cache.parent} is writable",
        "ok postfix: smtp_tls_policy_maps entry socketmap:inet:127.0.0.1:8461:postfix answers",
        f"ok postfix: smtp_tls_CAfile = {SYSTEM_BUNDLE} ({len(file_certificates(SYSTEM_BUNDLE))} CAs)",
        "ok postfix: smtp_tls_security_level = dane",
        f"ok exim: {CONTRIB_EXIM_CONF}: {EXIM_PIECES_OK}",
        f"ok exim: {EXIM} -C {CONTRIB_EXIM_CONF} -bV accepts it",
        "doctor: 0 problems, 0 warnings",
    ]
