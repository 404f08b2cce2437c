"""A private, real Postfix instance for the end-to-end tests.

It is built from contrib/postfix/main.cf (read in as shipped, so the example configuration is what
is tested) plus the settings a throwaway instance needs: its own configuration, queue and data
directories, no chroot, a plain log file written by postlogd, IPv4 only, fast retries and smtp(8)
processes that serve one delivery each (smtp(8) caches TLS policy lookups per process, so a
long-lived process could answer from a stale lookup). The CA settings are contrib's as shipped
(`smtp_tls_CAfile = /etc/ssl/certs/ca-certificates.crt`, which trusts the world's test CA inside
the namespace, see world.py). Mail is submitted with `sendmail -C DIR`;
no smtpd listener runs. Everything stays on loopback: the instance resolves MX hosts through the
world's DNS server (/etc/resolv.conf inside the test namespace) and connects to the SMTP sinks.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.e2e.world import SENDER, ZONE, temp_dir, wait_until

ROOT = Path(__file__).resolve().parents[2]
CONTRIB_MAIN_CF = ROOT / "contrib" / "postfix" / "main.cf"

POSTFIX = "/usr/sbin/postfix"
POSTCONF = "/usr/sbin/postconf"
SENDMAIL = "/usr/sbin/sendmail"
POSTQUEUE = "/usr/sbin/postqueue"
POSTSUPER = "/usr/sbin/postsuper"

# What the instance must end up with from contrib/postfix/main.cf (checked with postconf after the
# files are written, so a change to the contrib file that breaks these tests is reported as such).
EXPECTED_FROM_CONTRIB = {
    "smtp_tls_policy_maps": "socketmap:inet:127.0.0.1:8461:postfix",
    "smtp_tls_security_level": "dane",
    "smtp_dns_support_level": "dnssec",
    "smtp_tls_CAfile": "/etc/ssl/certs/ca-certificates.crt",
}

# master.cf: the services a sending-only Postfix needs, all with chroot off ("n" in column 5).
# By default smtp(8) serves one delivery request per process (max_use=1) and exits when idle for
# 1 s, so every delivery attempt is made by a fresh process with a fresh socketmap connection and
# an empty TLS policy cache. (Measured on Postfix 3.7: a reused smtp(8) process asks the map again
# for every delivery request anyway, see test_postfix_e2e; max_use=1 makes this independent of
# that implementation detail.)
MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command + args
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
{smtp_options}relay     unix  -       -       n       -       -       smtp
{smtp_options}showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

# One delivery outcome line written by smtp(8) (or error(8)/bounce for bounced mail):
#   postfix/smtp[123]: 4Q...: to=<a@b>, relay=mx.b[127.0.0.11]:25, delay=0.1, ..., dsn=4.7.5,
#   status=deferred (Server certificate not verified)
_STATUS_RE = re.compile(
    r"postfix/(?P<service>[\w/-]+)\[\d+\]: (?P<queue_id>\w+): to=<(?P<rcpt>[^>]*)>,"
    r"(?:.*? relay=(?P<relay>[^,]*),)?.*? dsn=(?P<dsn>[\d.]+), status=(?P<status>sent|deferred|bounced) "
    r"\((?P<reason>.*)\)$"
)


@dataclass(frozen=True)
class Status:
    """The last delivery outcome Postfix logged for one recipient."""

    status: str  # sent, deferred, bounced
    reason: str  # the text in parentheses: remote reply or Postfix's own reason
    dsn: str  # e.g. 2.0.0, 4.7.5
    relay: str | None  # e.g. "mx.d[127.0.0.11]:25", "none"
    queue_id: str
    line: str  # the whole log line, for reports


class PostfixInstance:
    """A real Postfix instance in a private directory, controlled with `postfix -c DIR`."""

    def __init__(self, *, myhostname: str = f"sender.{ZONE}",
                 extra_main_cf: dict[str, str] | None = None, smtp_max_use: int | None = 1,
                 extra_master_cf: str = "") -> None:
        """`smtp_max_use`: delivery requests per smtp(8) process (None: Postfix's default, 100);
        `extra_master_cf`: services appended to master.cf (contrib/postfix/tlsrpt-master.cf)."""
        self.directory = temp_dir("mtasts-postfix-")
        self.config_dir = self.directory / "etc"
        self.queue_dir = self.directory / "queue"
        self.data_dir = self.directory / "data"
        self.log_path = self.directory / "maillog"
        self.myhostname = myhostname
        self.extra_main_cf = dict(extra_main_cf or {})
        self.smtp_max_use = smtp_max_use
        self.extra_master_cf = extra_master_cf
        self.started = False
        self._write_config()

    # ----- configuration ---------------------------------------------------

    def instance_settings(self) -> dict[str, str]:
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": self.myhostname,
            "mydomain": ZONE,
            "myorigin": "$mydomain",
            "mydestination": "",
            "relayhost": "",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "smtputf8_enable": "no",
            "biff": "no",
            # A plain log file, written by postlogd (the "postlog" service in master.cf).
            "maillog_file": str(self.log_path),
            "maillog_file_prefixes": str(self.directory),
            # Retry fast: the tests wait for a retry after a policy change or a daemon restart.
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "delay_warning_time": "0",
            "maximal_queue_lifetime": "1h",
            "bounce_queue_lifetime": "1h",
            # No reuse of SMTP connections across deliveries (each attempt is a new session).
            "smtp_connection_cache_on_demand": "no",
            "smtp_connect_timeout": "5s",
            "smtp_helo_timeout": "10s",
            "smtp_tls_loglevel": "1",
        }
        settings.update(self.extra_main_cf)
        return settings

    def _write_config(self) -> None:
        self.config_dir.mkdir(mode=0o755)
        # Root-owned like /var/spool/postfix; `postfix start` (post-install create-missing) makes
        # the subdirectories and the data directory with their owners and modes.
        self.queue_dir.mkdir(mode=0o755)
        settings = self.instance_settings()
        lines = ["# contrib/postfix/main.cf as shipped (lines overridden below are commented out)"]
        for line in CONTRIB_MAIN_CF.read_text().splitlines():
            key = line.split("=", 1)[0].strip() if "=" in line and not line.lstrip().startswith("#") else None
            lines.append(f"#(overridden by the test instance) {line}" if key in settings else line)
        lines.append("")
        lines.append("# ---- test instance settings ----")
        lines += [f"{key} = {value}" for key, value in settings.items()]
        (self.config_dir / "main.cf").write_text("\n".join(lines) + "\n")
        smtp_options = "" if self.smtp_max_use is None else f"  -o max_use={self.smtp_max_use}\n  -o max_idle=1s\n"
        (self.config_dir / "master.cf").write_text(MASTER_CF.format(smtp_options=smtp_options)
                                                   + self.extra_master_cf)
        expected = {k: v for k, v in EXPECTED_FROM_CONTRIB.items() if k not in self.extra_main_cf}
        effective = {key: self.postconf(key) for key in expected}
        if effective != expected:
            raise RuntimeError(f"contrib/postfix/main.cf no longer sets {expected}: {effective}")

    def postconf(self, name: str) -> str:
        """The effective main.cf value of `name`."""
        out = self._run([POSTCONF, "-c", str(self.config_dir), "-h", name])
        return out.stdout.decode().strip()

    def postconf_expanded(self, name: str) -> str:
        """The effective value of `name` with $parameters expanded (`postconf -x`)."""
        out = self._run([POSTCONF, "-c", str(self.config_dir), "-xh", name])
        return out.stdout.decode().strip()

    def service_param(self, service: str, name: str) -> str:
        """The master.cf `-o name=value` of `service` ("smtp/unix")."""
        out = self._run([POSTCONF, "-c", str(self.config_dir), "-Ph", f"{service}/{name}"])
        return out.stdout.decode().strip()

    def service_field(self, service: str, field: str) -> str:
        """A master.cf field of `service` ("smtp/unix"): private, unprivileged, chroot, ..."""
        out = self._run([POSTCONF, "-c", str(self.config_dir), "-Fh", f"{service}/{field}"])
        return out.stdout.decode().strip()

    # ----- lifecycle -------------------------------------------------------

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "MAIL_CONFIG"}
        env["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin"
        return env

    def _run(self, argv: list[str], *, timeout: float = 30, check: bool = True,
             input: bytes | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run(argv, input=input, capture_output=True, timeout=timeout, env=self._env(),
                              stdin=None if input is not None else subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: "
                               f"{proc.stdout.decode(errors='replace')}{proc.stderr.decode(errors='replace')}")
        return proc

    def master_pid(self) -> int | None:
        try:
            return int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def running(self) -> bool:
        """`postfix status` (exit 0 while the master runs)."""
        return self._run([POSTFIX, "-c", str(self.config_dir), "status"], check=False, timeout=15).returncode == 0

    def start(self) -> "PostfixInstance":
        self._run([POSTFIX, "-c", str(self.config_dir), "start"], timeout=60)
        self.started = True
        pid = self.master_pid()
        if pid is None or not self.running():
            raise RuntimeError(f"postfix did not start:\n{self.log()}")
        # The services answer once qmgr and pickup are up; postlogd writes the log file.
        if not wait_until(lambda: "starting the Postfix mail system" in self.log()
                          and (self.queue_dir / "public" / "pickup").exists(), timeout=15, interval=0.05):
            raise RuntimeError(f"postfix did not come up:\n{self.log()}")
        return self

    def stop(self) -> None:
        """`postfix stop` (bounded); the master is killed if it outlives that."""
        if not self.started:
            return
        pid = self.master_pid()
        try:
            self._run([POSTFIX, "-c", str(self.config_dir), "stop"], timeout=20, check=False)
        except subprocess.TimeoutExpired:
            pass
        if pid is not None and not wait_until(lambda: not _alive(pid), timeout=10, interval=0.05):
            os.kill(pid, signal.SIGKILL)
        self.started = False

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    # ----- mail --------------------------------------------------------------

    def send(self, rcpt: str, marker: str, *, sender: str = SENDER, subject: str | None = None) -> None:
        """Submit one message carrying `X-Test-Id: <marker>` with `sendmail -C DIR`."""
        message = (
            f"From: <{sender}>\r\n"
            f"To: <{rcpt}>\r\n"
            f"Subject: {subject or 'mtasts e2e ' + marker}\r\n"
            f"Message-ID: <{marker}@{ZONE}>\r\n"
            f"X-Test-Id: {marker}\r\n"
            "\r\n"
            f"Test message {marker}.\r\n"
        )
        self._run([SENDMAIL, "-C", str(self.config_dir), "-f", sender, "-i", "--", rcpt],
                  input=message.encode(), timeout=30)

    def flush(self) -> None:
        """`postqueue -f`: retry all deferred mail now (and unthrottle dead destinations)."""
        self._run([POSTQUEUE, "-c", str(self.config_dir), "-f"], timeout=30, check=False)

    def queue(self) -> list[dict]:
        """The queue as `postqueue -j` lists it (one JSON object per message)."""
        out = self._run([POSTQUEUE, "-c", str(self.config_dir), "-j"], timeout=30).stdout.decode()
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def queue_text(self) -> str:
        return self._run([POSTQUEUE, "-c", str(self.config_dir), "-p"], timeout=30, check=False).stdout.decode()

    def delete_queued(self, rcpt: str) -> None:
        """Remove every queued message to `rcpt` (postsuper -d)."""
        for entry in self.queue():
            if any(r.get("address") == rcpt for r in entry.get("recipients", [])):
                self._run([POSTSUPER, "-c", str(self.config_dir), "-d", entry["queue_id"]], check=False)

    def settle(self, rcpts: list[str], timeout: float) -> bool:
        """Every message to `rcpts` sent, or deleted at its first deferral (one attempt per failure,
        as far as we are quick enough: count what the log says, `statuses`), the queue empty."""
        deleted: set[str] = set()

        def settled() -> bool:
            done = True
            for rcpt in rcpts:
                status = self.status_of(rcpt)
                if status is None:
                    done = False
                elif status.status == "deferred" and rcpt not in deleted:
                    self.delete_queued(rcpt)
                    deleted.add(rcpt)
            return done and not self.queue()
        return wait_until(settled, timeout=timeout, interval=0.2)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def statuses(self, rcpt: str) -> list[Status]:
        """Every delivery outcome logged for `rcpt`, oldest first."""
        found = []
        for line in self.log().splitlines():
            match = _STATUS_RE.search(line)
            if match and match["rcpt"].lower() == rcpt.lower():
                found.append(Status(match["status"], match["reason"], match["dsn"], match["relay"],
                                    match["queue_id"], line))
        return found

    def status_of(self, rcpt: str) -> Status | None:
        """The last `to=<rcpt>, ... status=(sent|deferred|bounced) (reason)` line, parsed."""
        found = self.statuses(rcpt)
        return found[-1] if found else None

    def log_lines(self, *needles: str) -> list[str]:
        """Log lines containing every one of `needles`."""
        return [line for line in self.log().splitlines() if all(n in line for n in needles)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours is gone for our purposes; the master is not our child anyway.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False
