"""TLSRPT end to end with a real Postfix 3.7: issue 10's grid (tests/e2e/tlsrpt_grid.py).

Domains rpt-<mode>-<behaviour>.e2e.test publish an enforce or testing policy or none, their only MX
an SMTP sink with that TLS behaviour, and a TLSRPT record with an https rua, a mailto rua, both, an
invalid one or none; rpt-enforce-fallback has two MX (the first misnamed). Contrib's Postfix (with
contrib's tlsrpt transport for report mail) delivers a message to each; a deferred message is
deleted at its first deferral, and the sessions expected per MX host are the attempts Postfix
logged. What Postfix logs is the fact (tests/test_tlsrpt_postfix.py holds a recording); MAPPING is
README "TLSRPT"'s table for it. The policy of each domain comes from the daemon's cache, which
Postfix's own map lookups filled.
"""

from __future__ import annotations

import uuid

import pytest

from mtasts_policyd.ops.tlsrpt_ingest import PostfixIngest, SourceAddresses, policy_from_cache
from mtasts_policyd.store.cache import PolicyCache
from mtasts_policyd.store.tlsrpt_store import TlsRptStore
from tests.conftest import free_port
from tests.e2e.postfix_mta import ROOT, PostfixInstance
from tests.e2e.tlsrpt_grid import (
    NO_SESSION,
    SENDER,
    Cell,
    Commands,
    GridRun,
    GridTests,
    cells,
    days,
    publish,
    report_and_send,
    rua_domain,
    write_config,
)
from tests.e2e.world import Mx, World, temp_dir, wait_until

PREFIX = "rpt"
# Postfix 3.7 at smtp_tls_loglevel = 1, per mode and behaviour: the result type of each session
# (None: success; NO_SESSION: a plaintext delivery where TLS was not required, not counted).
# testing and no policy run at level "may" (the daemon answers NOTFOUND): no name is checked and no
# reason logged, so a misnamed MX is a success and an expired certificate is "not trusted".
ENFORCE = {"tls": None, "wrong-cert": "certificate-host-mismatch", "untrusted": "certificate-not-trusted",
           "expired": "certificate-expired", "self-signed": "validation-failure",  # as Postfix >= 3.10
           "no-starttls": "starttls-not-supported", "starttls-refused": "starttls-not-supported",
           "handshake-abort": "validation-failure"}
TESTING = {"tls": None, "wrong-cert": None, "untrusted": "certificate-not-trusted",
           "expired": "certificate-not-trusted", "self-signed": "certificate-not-trusted", "no-starttls": NO_SESSION,
           "starttls-refused": NO_SESSION, "handshake-abort": "validation-failure"}
NO_POLICY = {**{b: None for b in ENFORCE}, "no-starttls": NO_SESSION, "starttls-refused": NO_SESSION,
             "handshake-abort": "validation-failure"}
MAPPING = {"enforce": ENFORCE, "testing": TESTING, "nopol": NO_POLICY}
# MX 1 misnamed, MX 2 valid: two sessions in one delivery, the mail delivered by the second.
FALLBACK = Cell(PREFIX, "enforce", "fallback", "https", mx=(Mx("mx1", "wrong-cert", 10), Mx("mx2", "tls", 20)))
CONTRIB_SENDER = "tlsrpt-noreply@mail.example.com"  # the placeholder in contrib/postfix/tlsrpt-main.cf
TIMEOUT = 60


def contrib_postfix() -> tuple[dict[str, str], str]:
    """tlsrpt-main.cf's settings (with our sender) and tlsrpt-master.cf, as an operator adds them."""
    main: dict[str, str] = {}
    for line in (ROOT / "contrib" / "postfix" / "tlsrpt-main.cf").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, value = line.partition("=")
            main[name.strip()] = value.strip().replace(CONTRIB_SENDER, SENDER)
    assert main, "contrib/postfix/tlsrpt-main.cf sets nothing"
    return main, (ROOT / "contrib" / "postfix" / "tlsrpt-master.cf").read_text()


@pytest.fixture(scope="module")
def grid(world: World, policyd):
    """The grid delivered, reported and sent; then ordinary mail to the rua domain; and one message
    by a Postfix whose policy map is unreachable."""
    directory = temp_dir("mtasts-tlsrpt-grid-")
    domains = cells(PREFIX) + [FALLBACK]
    key_file = publish(world, domains, PREFIX, directory)
    main, master = contrib_postfix()
    postfix = PostfixInstance(extra_main_cf=main, extra_master_cf=master).start()
    no_map = PostfixInstance(extra_main_cf={"smtp_tls_policy_maps": f"socketmap:inet:127.0.0.1:{free_port()}:postfix"})
    no_map.start()
    try:
        rcpts = {cell.domain: f"u{uuid.uuid4().hex[:8]}@{cell.domain}" for cell in domains}
        for rcpt in rcpts.values():
            postfix.send(rcpt, uuid.uuid4().hex)
        no_map.send(f"m@{FALLBACK.domain}", uuid.uuid4().hex)
        assert postfix.settle(list(rcpts.values()), TIMEOUT), postfix.log()[-4000:]
        assert wait_until(lambda: no_map.status_of(f"m@{FALLBACK.domain}") is not None, timeout=TIMEOUT)
        attempts = {}
        for cell in domains:
            statuses = postfix.statuses(rcpts[cell.domain])
            for mx in cell.scenario.mx:
                attempts[cell.scenario.host(mx)] = len(statuses)
        assert [s.status for s in postfix.statuses(rcpts[FALLBACK.domain])] == ["sent"]
        config = write_config(world, directory, key_file, f"/usr/sbin/sendmail -C {postfix.config_dir}")
        run = GridRun(world, domains, MAPPING, attempts, Commands(config, directory / "reports"))

        def delivered(count: int) -> list[str]:
            def lines() -> list[str]:
                return postfix.log_lines("postfix/tlsrpt/smtp[", f"@{rua_domain(PREFIX)}>", "status=sent")
            wait_until(lambda: len(lines()) >= count, timeout=TIMEOUT)
            return lines()
        report_and_send(run, "--postfix-log", postfix.log_path, delivered, postfix.flush)
        ordinary = f"someone@{rua_domain(PREFIX)}"
        postfix.send(ordinary, uuid.uuid4().hex)
        assert wait_until(lambda: postfix.status_of(ordinary) is not None, timeout=TIMEOUT)
        yield run, postfix, no_map, ordinary
    finally:
        postfix.stop()
        no_map.stop()
    postfix.remove()
    no_map.remove()


class TestPostfixGrid(GridTests):
    @pytest.fixture
    def run(self, grid) -> GridRun:
        return grid[0]


def test_ordinary_mail_to_the_rua_domain_is_deferred_by_our_policy(world: World, grid):
    """The mailto ruas' domain enforces a policy its MX fails: ordinary mail waits, the report mail
    went out through contrib's tlsrpt transport (RFC 8460 §5.3)."""
    run, postfix, _, ordinary = grid
    status = postfix.status_of(ordinary)
    assert status is not None and status.status == "deferred" and status.dsn == "4.7.5", status
    assert all("postfix/tlsrpt/smtp[" in line for line in run.report_deliveries)
    postfix.delete_queued(ordinary)


def test_our_unreachable_map_is_a_local_event_not_a_report(world: World, grid, tmp_path):
    _, _, no_map, _ = grid
    store = TlsRptStore(str(tmp_path / "tlsrpt.sqlite3"))
    cache = PolicyCache(str(world.directory / "policyd" / "cache.sqlite3"))
    try:
        PostfixIngest(store, policy_from_cache(cache), SourceAddresses()).ingest(str(no_map.log_path))
    finally:
        cache.close()
    assert [store.sessions(day) for day in days()] == [[], []]
    assert sum(store.local_events(day).get("policy-map-error", 0) for day in days()) >= 1
    assert [store.unparsed(day) for day in days()] == [{}, {}]
