"""TLSRPT end to end with a real Exim 4.96: issue 10's grid (tests/e2e/tlsrpt_grid.py).

Domains xrpt-<mode>-<behaviour>.e2e.test publish an enforce or testing policy or none, their only
MX an SMTP sink with that TLS behaviour, and a TLSRPT record with an https rua, a mailto rua, both,
an invalid one or none. Contrib's Exim (with TLSRPT_SENDER: the tlsrpt_reports router for report
mail) tries each message once (-odi); deferred ones stay queued and are not retried here. What Exim
logs is the fact; the mapping is tests/test_tlsrpt_exim.py's (README "TLSRPT"), which reads a
recording of this run: RECORD_EXIM_LOG=PATH saves the grid's log (before the reports are sent).
"""

from __future__ import annotations

import os
import shutil
import uuid

import pytest

from tests.e2e.exim_mta import EXIM, EximInstance
from tests.e2e.tlsrpt_grid import SENDER, Commands, GridRun, GridTests, cells, publish, report_and_send, rua_domain, \
    write_config
from tests.e2e.world import World, temp_dir
from tests.test_tlsrpt_exim import EXPECTED

PREFIX = "xrpt"


@pytest.fixture(scope="module")
def grid(world: World, policyd):
    """The grid delivered, reported and sent; then ordinary mail to the rua domain."""
    directory = temp_dir("mtasts-tlsrpt-grid-")
    domains = cells(PREFIX)
    key_file = publish(world, domains, PREFIX, directory)
    exim = EximInstance(temp_dir("exim-tlsrpt-"), "127.0.0.1:8462")
    exim.macros.append(f"-DTLSRPT_SENDER={SENDER}")
    rcpts = {cell.domain: f"u{uuid.uuid4().hex[:8]}@{cell.domain}" for cell in domains}
    for rcpt in rcpts.values():
        exim.send(rcpt, uuid.uuid4().hex)
    assert all(exim.status_of(rcpt) is not None for rcpt in rcpts.values()), exim.log()
    log = exim.logs / "mainlog"
    if os.environ.get("RECORD_EXIM_LOG"):
        shutil.copyfile(log, os.environ["RECORD_EXIM_LOG"])
    attempts = {cell.scenario.host(mx): 1 for cell in domains for mx in cell.scenario.mx}  # -odi: once
    sendmail = " ".join([EXIM, "-C", str(exim.config), *exim.macros, "-odi"])
    run = GridRun(world, domains, EXPECTED, attempts,
                  Commands(write_config(world, directory, key_file, sendmail), directory / "reports"))

    def delivered(count: int) -> list[str]:
        # -odi: the delivery is over (and logged) when sendmail returns.
        return [line for line in exim.log().splitlines()
                if " => " in line and f"@{rua_domain(PREFIX)} " in line and " R=tlsrpt_reports " in line]
    # No flush: the grid's deferred messages would be tried again; a second copy of a report would
    # have been delivered at once (-odi) anyway.
    report_and_send(run, "--exim-log", log, delivered, lambda: None)
    # Ordinary mail to the rua domain, by the same Exim, last: its failure leaves a retry record for
    # the host that would hold report mail back too.
    ordinary = f"someone@{rua_domain(PREFIX)}"
    exim.send(ordinary, uuid.uuid4().hex)
    return run, exim, ordinary


class TestEximGrid(GridTests):
    @pytest.fixture
    def run(self, grid) -> GridRun:
        return grid[0]


def test_ordinary_mail_to_the_rua_domain_is_deferred_by_our_policy(grid):
    """The report mail went out by the tlsrpt_reports router (RFC 8460 §5.3); ordinary mail to the
    same domain is deferred by the MTA-STS router."""
    run, exim, ordinary = grid
    assert all(" R=tlsrpt_reports T=tlsrpt_smtp " in line for line in run.report_deliveries)
    status = exim.status_of(ordinary)
    assert status is not None and status.outcome == "deferred" and " R=mtasts_enforce " in status.line, exim.log()


def test_contrib_log_selector_gives_the_fields_the_reader_needs(grid):
    # contrib/exim/exim.conf: +tls_certificate_verified (CV=) and +tls_peerdn (DN=) on deliveries.
    _, exim, _ = grid
    line = next(l for l in exim.log().splitlines() if " => " in l and f"@{PREFIX}-enforce-tls." in l)
    assert " CV=yes " in line and " DN=" in line
