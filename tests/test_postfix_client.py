"""A real Postfix client: `postmap -q KEY socketmap:inet:127.0.0.1:PORT:NAME` against the daemon.

postmap exits 0 and prints the value when found, exits 1 silently when not found, and reports a
lookup error on stderr (which in smtp(8) would defer the mail).
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.bodies import TESTING_ONE_MX
from tests.conftest import secure

POSTMAP = shutil.which("postmap") or ("/usr/sbin/postmap" if os.path.exists("/usr/sbin/postmap") else None)

if POSTMAP is None:
    if os.environ.get("CI"):
        raise RuntimeError("postmap is missing: .ci/run must install postfix")
    pytest.skip("postmap (Debian package postfix) is not installed", allow_module_level=True)


@pytest.fixture
def postmap(tmp_path):
    config_dir = tmp_path / "postfix"
    config_dir.mkdir()
    (config_dir / "main.cf").write_text("compatibility_level = 3.6\n")

    def run(key: str, port: int, name: str = "postfix") -> subprocess.CompletedProcess:
        return subprocess.run([POSTMAP, "-c", str(config_dir), "-q", key, f"socketmap:inet:127.0.0.1:{port}:{name}"],
                              capture_output=True, text=True, timeout=60)
    return run


@pytest.fixture
def daemon(start_daemon):
    return start_daemon(socketmap={"maps": {"postfix": {}, "strict": {"testing_as_enforce": True},
                                            "sts": {"sts_attributes": True}}})


def test_postmap_gets_enforce_policy(rig, daemon, postmap):
    domain = rig.domain()
    rig.publish(domain)
    result = postmap(domain, daemon.port)
    assert result.returncode == 0, result.stderr
    assert result.stdout == secure(domain) + "\n"


def test_postmap_not_found_for_testing_and_no_policy(rig, daemon, postmap):
    testing, nothing = rig.domain(), rig.domain()
    rig.publish(testing, TESTING_ONE_MX)
    for key in (testing, nothing, "." + testing, "[192.0.2.1]"):
        result = postmap(key, daemon.port)
        assert (result.returncode, result.stdout, result.stderr) == (1, "", ""), key
    assert postmap(testing, daemon.port, "strict").stdout == f"secure match=mx1.{testing} servername=hostname\n"


def test_postmap_reads_sts_attributes(rig, daemon, postmap):
    domain = rig.domain()
    rig.publish(domain)
    result = postmap(domain, daemon.port, "sts")
    assert result.returncode == 0, result.stderr
    assert f"policy_type=sts policy_domain={domain} mx_host_pattern=mx1.{domain}" in result.stdout
    assert "{ policy_string = mode: enforce }" in result.stdout


def test_postmap_sees_unknown_map_as_lookup_error(daemon, postmap):
    # A misconfigured map name must be loud: Postfix reports a lookup error (and defers mail).
    result = postmap("example.test", daemon.port, "typo")
    assert result.returncode != 0
    assert "unknown map name" in result.stderr


def test_postmap_mixed_case_and_trailing_dot(rig, daemon, postmap):
    domain = rig.domain()
    rig.publish(domain)
    assert postmap(domain.upper() + ".", daemon.port).stdout.startswith("secure match=")
