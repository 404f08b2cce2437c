"""A real Exim (Debian's exim4-daemon-light binary, unpacked by .ci/install-debian.sh) run on
contrib/exim/exim.conf with its own spool and log, delivering in the foreground. MX certificates
are verified against `system` (contrib's TLS_CA default), the machine's store, which trusts the
world's test CA inside the namespace (world.py)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import ROOT
from tests.e2e.world import SENDER

EXIM = "/opt/exim4/usr/sbin/exim4"
CONFIG = ROOT / "contrib" / "exim" / "exim.conf"


@dataclass(frozen=True)
class Status:
    outcome: str  # delivered, deferred, bounced
    line: str


class EximInstance:
    def __init__(self, directory: Path, daemon: str, *, fail_open: bool = False) -> None:
        self.directory = directory
        self.spool = directory / "spool"
        self.logs = directory / "log"
        for path in (self.spool, self.logs):
            path.mkdir(parents=True, exist_ok=True)
            shutil.chown(path, "Debian-exim", "Debian-exim")
        os.chmod(directory, 0o755)
        # Exim re-executes itself as Debian-exim to deliver and then reads the file again: use a
        # verbatim copy where that user can read it (the checkout may sit in a private directory).
        self.config = directory / "exim.conf"
        shutil.copyfile(CONFIG, self.config)
        os.chmod(self.config, 0o644)
        self.macros = [f"-DMTASTS_EXIM={daemon}", f"-DSPOOL_DIRECTORY={self.spool}",
                       f"-DLOG_FILE_PATH={self.logs}/%slog", f"-DEXIM_PATH={EXIM}"]
        if fail_open:
            self.macros.append("-DMTASTS_FAIL_OPEN=yes")

    def exim(self, *args: str, input: bytes | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([EXIM, "-C", str(self.config), *self.macros, *args], input=input,
                              capture_output=True, timeout=timeout)

    def expand(self, text: str) -> str:
        result = self.exim("-be", text)
        return result.stdout.decode(errors="replace").rstrip("\n")

    def send(self, rcpt: str, marker: str) -> subprocess.CompletedProcess:
        """Submit and deliver at once (-odi): returns when the first delivery attempt is over."""
        message = (f"From: {SENDER}\nTo: {rcpt}\nSubject: {marker}\nX-Test-Id: {marker}\n\n"
                   f"mtasts-policyd end-to-end test {marker}\n").encode()
        return self.exim("-odi", "-f", SENDER, rcpt, input=message)

    def flush(self) -> None:
        self.exim("-qff")  # force a delivery attempt of everything queued, retry times ignored

    def log(self) -> str:
        path = self.logs / "mainlog"
        return path.read_text(errors="replace") if path.exists() else ""

    def status_of(self, rcpt: str) -> Status | None:
        """The last delivery outcome logged for `rcpt`: => delivered, == deferred, ** bounced."""
        outcome = None
        for line in self.log().splitlines():
            match = re.search(r" (=>|==|\*\*) (\S+)", line)
            if match and match.group(2).lower() == rcpt.lower():
                kind = {"=>": "delivered", "==": "deferred", "**": "bounced"}[match.group(1)]
                outcome = Status(kind, line)
        return outcome

    def queue(self) -> str:
        return self.exim("-bp").stdout.decode(errors="replace")
