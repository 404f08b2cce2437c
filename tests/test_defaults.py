"""`mtasts-policyd serve` with no configuration at all: the embedded defaults an operator gets.

Run in a namespace of its own (root, `unshare`), so the default ports and the default cache
directory /var/lib/mtasts-policyd (a tmpfs there) belong to this test alone.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from mtasts_policyd.store.sqlite import default_cache_path
from tests.conftest import ROOT

SCRIPT = r"""
set -e
ip link set lo up
mount -t tmpfs tmpfs /var/lib
"$PYTHON" -m mtasts_policyd serve 2>"$LOG" &
daemon=$!
"$PYTHON" - <<'PY'
import socket, time
deadline = time.monotonic() + 15
while True:
    try:
        socketmap = socket.create_connection(("127.0.0.1", 8461), timeout=5)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.05)
socketmap.sendall(b"21:postfix .example.test,")
print("socketmap", socketmap.recv(100).decode())
exim = socket.create_connection(("127.0.0.1", 8462), timeout=5)
exim.sendall(b"[192.0.2.1]\n")
exim.shutdown(socket.SHUT_WR)
print("exim", exim.recv(100).decode().strip())
PY
kill -TERM $daemon
wait $daemon
echo "exit $?"
ls /var/lib/mtasts-policyd
"""


def test_serve_runs_on_embedded_defaults(tmp_path):
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare")
    env = dict(os.environ, PYTHON=sys.executable, LOG=str(tmp_path / "daemon.log"))
    env.pop("XDG_STATE_HOME", None)
    result = subprocess.run(["unshare", "--mount", "--net", "bash", "-c", SCRIPT], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    log = (tmp_path / "daemon.log").read_text()
    assert result.returncode == 0, result.stderr + log
    lines = result.stdout.splitlines()
    assert "socketmap 9:NOTFOUND ," in lines  # parent-domain key: no policy lookup at all
    assert "exim none" in lines
    assert "exit 0" in lines and "cache.sqlite3" in lines
    assert "listening socketmap=127.0.0.1:8461" in log and "listening exim=127.0.0.1:8462" in log
    assert "cache path=/var/lib/mtasts-policyd/cache.sqlite3 persistent=True" in log
    assert "metrics=" not in log  # nothing but the configured listeners is opened


# The embedded defaults against a policy host whose CA the machine trusts the operator's way: the
# world of tests/e2e (DNS on :53 via /etc/resolv.conf, HTTPS on :443, the test CA added to the system
# bundle), built in a namespace of this test's own; the daemon gets no config and no trust variable.
TRUST_SCRIPT = r"""
set -e
ip link set lo up
mount -t tmpfs tmpfs /var/lib
exec "$PYTHON" - <<'PY'
import os, tempfile
from pathlib import Path
from tests.conftest import Daemon, SocketmapClient
from tests.e2e.world import SCENARIOS, operator_environment, start_world

world = start_world(Path(tempfile.mkdtemp(prefix="mtasts-defaults-")))
scenario = next(s for s in SCENARIOS if s.name == "enforce-ok")
world.publish(scenario)
daemon = Daemon(None, 8461, Path(os.environ["LOG"]), env=operator_environment()).start()
client = SocketmapClient(8461)
print("answer", client.ask(scenario.domain))
client.close()
print("exit", daemon.stop())
PY
"""


def test_serve_on_defaults_trusts_the_machine_store(tmp_path):
    """RFC 8461 §3.3: the policy host's certificate must chain to a trusted CA; with no
    configuration the daemon trusts the machine's store (OpenSSL's default verify paths, the
    bundle Postfix's smtp_tls_CAfile names), so a CA the operator added there is trusted."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare")
    env = dict(os.environ, PYTHON=sys.executable, LOG=str(tmp_path / "daemon.log"))
    # --pid --kill-child: everything started in there ends with the test, even on a timeout.
    result = subprocess.run(["unshare", "--pid", "--fork", "--kill-child", "--mount", "--net", "bash", "-c",
                             TRUST_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=90)
    log = (tmp_path / "daemon.log").read_text()
    assert result.returncode == 0, result.stderr + log
    assert "answer OK secure match=mx.enforce-ok.e2e.test servername=hostname" in result.stdout.splitlines(), \
        result.stdout + log
    assert "exit 0" in result.stdout.splitlines()
    assert "trust store=openssl-default cafile=/etc/ssl/certs/ca-certificates.crt capath=/etc/ssl/certs cas=" in log
    assert "trust store note" not in log


def test_default_cache_path_for_other_users(monkeypatch, tmp_path):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert default_cache_path() == str(tmp_path / "mtasts-policyd" / "cache.sqlite3")
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_path() == str(tmp_path / ".local" / "state" / "mtasts-policyd" / "cache.sqlite3")


def test_console_script_installed():
    # `pip install .` gives the command; .ci/run installs the project, so CI has it on PATH.
    path = shutil.which("mtasts-policyd")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("mtasts-policyd is not on PATH after pip install")
        pytest.skip("project not installed")
    result = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and result.stdout.startswith("mtasts-policyd ")
