"""`tlsrpt ingest` on real files and a real store: exact counts, no line twice, none lost.

The log is the real Postfix 3.7 recording of tests/test_tlsrpt_postfix.py; files are written,
appended to, rotated and truncated on disk as logrotate and syslog do.
"""

from __future__ import annotations

import datetime
import os
from collections import Counter

import pytest

from mtasts_policyd.core.dane import AddressState, DaneInputs, HostState, MxKind, MxState, Tlsa, TlsaState
from mtasts_policyd.core.dane_verdict import DaneBranch, Verdict, decide
from mtasts_policyd.core.policy import parse_policy
from mtasts_policyd.core.tlsrpt_report import PolicyType, ReportPolicy
from mtasts_policyd.ops.tlsrpt_ingest import PostfixIngest, SourceAddresses, policy_from_cache
from mtasts_policyd.store.cache import PolicyCache
from mtasts_policyd.store.entry import Entry
from mtasts_policyd.store.tlsrpt_store import Batch, TlsRptStore, TlsRptStoreError
from tests.test_tlsrpt_postfix import RECORDED

UTC = datetime.UTC
NOW = datetime.datetime(2025, 12, 1, 12, tzinfo=UTC)
DAY = datetime.date(2025, 11, 30)
LINES = RECORDED.read_text().splitlines(keepends=True)


def sts(domain: str, mode: str) -> ReportPolicy:
    return ReportPolicy(PolicyType.STS, domain, ("version: STSv1", f"mode: {mode}", f"mx: *.{domain}",
                                                 "max_age: 86400"), (f"*.{domain}",))


def policies(domain: str, when: float, mx_host: str = "") -> ReportPolicy:
    """As the daemon's cache held them during the recording: x-enforce-*, x-testing-*, x-nopol-*."""
    mode = domain.split("-")[1]
    return sts(domain, mode) if mode in ("enforce", "testing") else ReportPolicy(PolicyType.NO_POLICY_FOUND, domain)


def ingest(store: TlsRptStore, path, batch_lines: int = 2000) -> PostfixIngest:
    reader = PostfixIngest(store, policies, SourceAddresses(("192.0.2.1",)), clock=lambda: NOW, tz=UTC,
                           batch_lines=batch_lines)
    reader.ingest(str(path))
    return reader


def totals(store: TlsRptStore) -> Counter:
    """(domain, result) -> sessions, for the recorded day."""
    found: Counter = Counter()
    for count in store.sessions(DAY):
        found[(count.policy.policy_domain.split(".")[0], count.result.value if count.result else "success")] += \
            count.sessions
    return found


EXPECTED = Counter({
    ("x-enforce-tls", "success"): 1,
    ("x-enforce-wrong-cert", "certificate-host-mismatch"): 1,
    ("x-enforce-untrusted", "certificate-not-trusted"): 1,
    ("x-enforce-expired", "certificate-expired"): 1,
    ("x-enforce-self-signed", "validation-failure"): 1,  # as Postfix >= 3.10 reports it
    ("x-enforce-no-starttls", "starttls-not-supported"): 1,
    ("x-enforce-starttls-refused", "starttls-not-supported"): 1,
    ("x-enforce-handshake-abort", "validation-failure"): 1,
    ("x-enforce-fallback", "certificate-host-mismatch"): 1,
    ("x-enforce-fallback", "success"): 1,
    # testing policy at Postfix's "may": a chain that verified is a success, one that did not is not
    ("x-testing-tls", "success"): 1,
    ("x-testing-wrong-cert", "success"): 1,  # Postfix 3.7 does not check the name at "may" (README)
    ("x-testing-untrusted", "certificate-not-trusted"): 1,
    ("x-testing-expired", "certificate-not-trusted"): 1,
    ("x-testing-self-signed", "certificate-not-trusted"): 1,
    ("x-testing-handshake-abort", "validation-failure"): 2,
    # no policy: opportunistic TLS has nothing to validate against
    ("x-nopol-tls", "success"): 1,
    ("x-nopol-wrong-cert", "success"): 1,
    ("x-nopol-untrusted", "success"): 1,
    ("x-nopol-expired", "success"): 1,
    ("x-nopol-self-signed", "success"): 1,
    ("x-nopol-handshake-abort", "validation-failure"): 2,
})


@pytest.fixture
def store(tmp_path):
    with TlsRptStore(str(tmp_path / "tlsrpt.sqlite3")) as opened:
        yield opened


def test_recorded_log_counts_per_domain_policy_and_result(store, tmp_path):
    log = tmp_path / "mail.log"
    log.write_text("".join(LINES))
    ingest(store, log)
    assert totals(store) == EXPECTED
    assert store.local_events(DAY) == {"policy-map-error": 1}
    assert store.unparsed(DAY) == {}
    rows = {c.policy.policy_domain: c for c in store.sessions(DAY) if c.result}
    untrusted = rows["x-testing-untrusted.e2e.test"]
    assert (untrusted.reason_code, untrusted.sending_ip, untrusted.receiving_mx, untrusted.receiving_ip) == (
        "untrusted-tls-connection", "192.0.2.1", "mx.x-testing-untrusted.e2e.test", "127.0.0.32")
    assert rows["x-enforce-handshake-abort.e2e.test"].reason_code == "tls-handshake-failure"
    assert rows["x-enforce-expired.e2e.test"].policy == sts("x-enforce-expired.e2e.test", "enforce")


def test_reading_again_counts_nothing_twice_and_appended_lines_once(store, tmp_path):
    log = tmp_path / "mail.log"
    half = len(LINES) // 2
    log.write_text("".join(LINES[:half]) + LINES[half][:20])  # the last line still being written
    ingest(store, log)
    ingest(store, log)
    with open(log, "a") as handle:
        handle.write(LINES[half][20:] + "".join(LINES[half + 1:]))
    ingest(store, log)
    ingest(store, log)
    assert totals(store) == EXPECTED
    assert store.position(f"postfix:{log}").offset == os.path.getsize(log)


@pytest.mark.parametrize("cut", [10, 40, 41, 42, 60, 77, 88])
def test_restarting_anywhere_loses_and_repeats_nothing(store, tmp_path, cut):
    """The log grows while the reader runs now and then (cron): each run starts where the last one
    stopped, with the sessions it left open (some cuts fall between a session's lines)."""
    log = tmp_path / "mail.log"
    log.write_text("".join(LINES[:cut]))
    ingest(store, log, batch_lines=7)
    with open(log, "a") as handle:
        handle.write("".join(LINES[cut:]))
    ingest(store, log, batch_lines=7)
    assert totals(store) == EXPECTED


class DiesAfter(TlsRptStore):
    """A store whose process "dies" (raises) on the n-th commit, before anything of it is written."""

    def __init__(self, path: str, commits: int) -> None:
        super().__init__(path)
        self.left = commits

    def commit(self, batch: Batch, now: float) -> None:
        if self.left == 0:
            raise TlsRptStoreError("killed")
        self.left -= 1
        super().commit(batch, now)


@pytest.mark.parametrize("commits", [0, 1, 3, 6, 11])  # 12 batches of 8 lines
def test_a_reader_killed_between_batches_resumes_exactly(tmp_path, commits):
    log = tmp_path / "mail.log"
    log.write_text("".join(LINES))
    path = str(tmp_path / "tlsrpt.sqlite3")
    with DiesAfter(path, commits) as dying, pytest.raises(TlsRptStoreError):
        ingest(dying, log, batch_lines=8)
    with TlsRptStore(path) as store:
        ingest(store, log, batch_lines=8)
        assert totals(store) == EXPECTED


def test_rotation_reads_the_rest_of_the_old_file_then_the_new_one(store, tmp_path):
    log = tmp_path / "mail.log"
    half = 50
    log.write_text("".join(LINES[:30]))
    ingest(store, log)
    with open(log, "a") as handle:  # written after the last run, before logrotate
        handle.write("".join(LINES[30:half]))
    os.rename(log, f"{log}.1")
    log.write_text("".join(LINES[half:]))
    ingest(store, log)
    ingest(store, log)
    assert totals(store) == EXPECTED


def next_day() -> str:
    """The recording as Postfix would log it a day later (new lines, new file content)."""
    return "".join(LINES).replace("Nov 30 ", "Dec  1 ")


def test_a_truncated_file_is_read_from_its_start(store, tmp_path):
    log = tmp_path / "mail.log"
    log.write_text("".join(LINES))
    ingest(store, log)
    with open(log, "r+") as handle:  # copytruncate: same inode, emptied, written again
        handle.truncate(0)
    ingest(store, log)
    with open(log, "a") as handle:
        handle.write(next_day())
    ingest(store, log)
    assert totals(store) == EXPECTED
    assert sum(c.sessions for c in store.sessions(DAY + datetime.timedelta(days=1))) == sum(EXPECTED.values())


def test_a_replaced_file_without_our_rotated_copy_is_read_from_its_start(store, tmp_path):
    log = tmp_path / "mail.log"
    log.write_text("".join(LINES))
    ingest(store, log)
    (tmp_path / "new").write_text(next_day())
    os.replace(tmp_path / "new", log)  # a new inode, and no mail.log.1 holding the file we read
    ingest(store, log)
    assert totals(store) == EXPECTED
    assert sum(c.sessions for c in store.sessions(DAY + datetime.timedelta(days=1))) == sum(EXPECTED.values())


def test_unparsed_lines_are_counted_by_day(store, tmp_path):
    log = tmp_path / "mail.log"
    log.write_text("Nov 30 10:00:00 mail postfix/smtp[99]: a line Postfix 3.7 never wrote\n"
                   "not a syslog line at all\n\n")
    ingest(store, log)
    assert store.unparsed(DAY) == {f"postfix:{log}": (1, "postfix/smtp[99]: a line Postfix 3.7 never wrote")}
    assert store.unparsed(NOW.date()) == {f"postfix:{log}": (1, "not a syslog line at all")}


def test_policy_in_force_from_the_daemons_cache(tmp_path):
    cache = PolicyCache(str(tmp_path / "cache.sqlite3"))
    fetched = NOW.timestamp() - 3600

    def policy_entry(domain: str, mode: str, at: float = fetched) -> Entry:
        body = f"version: STSv1\nmode: {mode}\nmx: mx.{domain}\nmx: *.mail.{domain}\nmax_age: 86400\n".encode()
        return Entry(domain, txt_record="v=STSv1; id=1", policy_id="1", policy_body=body,
                     policy=parse_policy(body), fetched_at=at)

    for entry in (policy_entry("enforce.example", "enforce"), policy_entry("testing.example", "testing"),
                  policy_entry("none.example", "none"), Entry("nothing.example", negative_until=NOW.timestamp()),
                  policy_entry("later.example", "enforce", NOW.timestamp() + 60)):
        assert cache.put(entry) is not None
    lookup = policy_from_cache(cache)
    when = NOW.timestamp()
    assert lookup("enforce.example", when) == ReportPolicy(
        PolicyType.STS, "enforce.example", ("version: STSv1", "mode: enforce", "mx: mx.enforce.example",
                                            "mx: *.mail.enforce.example", "max_age: 86400"),
        ("mx.enforce.example", "*.mail.enforce.example"))
    assert lookup("testing.example", when).policy_type is PolicyType.STS
    assert lookup("enforce.example", fetched + 86400 + 1).policy_type is PolicyType.NO_POLICY_FOUND  # expired then
    assert lookup("later.example", when).policy_type is PolicyType.STS  # fetched after the session
    for domain in ("none.example", "nothing.example", "unknown.example"):
        assert lookup(domain, when) == ReportPolicy(PolicyType.NO_POLICY_FOUND, domain)
    cache.close()


def dane_branch(domain: str, hosts: dict[str, tuple[Tlsa, ...] | None], at: float) -> DaneBranch:
    """A DANE half as the resolver caches it: secure MX RRset; a host with records has a secure TLSA
    RRset (None: an insecure one). The verdict comes from core/dane_verdict.decide itself."""
    inputs = DaneInputs(domain, MxState(MxKind.RECORDS, True, tuple(hosts), 3600), tuple(
        HostState(host, AddressState(True, ("198.51.100.25",), host, 3600),
                  TlsaState(f"_25._tcp.{host}", records is not None, records or (), 3600))
        for host, records in hosts.items()))
    return DaneBranch(decide(inputs), inputs, at)


def test_tlsa_policy_when_the_cache_holds_a_dane_verdict(tmp_path):
    # RFC 8460 §4.4: a session made under DANE is reported with policy-type "tlsa", the usable TLSA
    # records as policy-string (presentation form) and the MX host as mx-host; the MTA-STS policy
    # of the same domain, or no-policy-found, only where DANE did not apply to that host.
    cache = PolicyCache(str(tmp_path / "cache.sqlite3"))
    when = NOW.timestamp()
    ee = Tlsa(3, 1, 1, bytes(range(32)))
    ta = Tlsa(2, 0, 1, bytes(32))
    unusable = Tlsa(0, 0, 1, bytes(32))  # PKIX-TA: unusable for SMTP (RFC 7672 §3.1.3)
    body = b"version: STSv1\nmode: enforce\nmx: *.both.example\nmax_age: 86400\n"
    only = dane_branch("only.example", {"mx1.only.example": (ee, unusable), "mx2.only.example": (ta,)}, when - 60)
    mixed = dane_branch("mixed.example", {"mx1.mixed.example": (ee,), "mx2.mixed.example": None}, when - 60)
    both = dane_branch("both.example", {"mx.both.example": (ee,)}, when - 60)
    stale = dane_branch("stale.example", {"mx.stale.example": (ee,)}, when - 7200)
    assert (only.verdict, mixed.verdict, both.verdict) == (Verdict.DANE_ONLY, Verdict.DANE, Verdict.DANE_ONLY)
    assert stale.expires_at <= when  # its decision's TTL ran out before the session
    for entry in (Entry("only.example", negative_until=when, dane=only),
                  Entry("mixed.example", negative_until=when, dane=mixed),
                  Entry("both.example", txt_record="v=STSv1; id=1", policy_id="1", policy_body=body,
                        policy=parse_policy(body), fetched_at=when - 60, dane=both),
                  Entry("stale.example", negative_until=when, dane=stale)):
        assert cache.put(entry) is not None
    lookup = policy_from_cache(cache)
    assert lookup("only.example", when, "mx1.only.example") == ReportPolicy(
        PolicyType.TLSA, "only.example", (f"3 1 1 {bytes(range(32)).hex()}",), ("mx1.only.example",))
    assert lookup("only.example", when, "MX2.only.example.") == ReportPolicy(
        PolicyType.TLSA, "only.example", (f"2 0 1 {'00' * 32}",), ("mx2.only.example",))
    assert lookup("mixed.example", when, "mx1.mixed.example").policy_type is PolicyType.TLSA
    # verdict "dane", host without a secure TLSA RRset: opportunistic TLS, as without DANE
    assert lookup("mixed.example", when, "mx2.mixed.example") == ReportPolicy(PolicyType.NO_POLICY_FOUND,
                                                                             "mixed.example")
    # RFC 8461 §2: DANE comes first where both are published
    assert lookup("both.example", when, "mx.both.example").policy_type is PolicyType.TLSA
    # a decision made after the session stands in for the one before it (the cache keeps the last),
    # as a later MTA-STS fetch does; once its TTL has run out, the MTA-STS policy is the one in force
    assert lookup("both.example", when - 7200, "mx.both.example").policy_type is PolicyType.TLSA
    assert lookup("both.example", both.expires_at, "mx.both.example").policy_type is PolicyType.STS
    assert lookup("stale.example", when, "mx.stale.example").policy_type is PolicyType.NO_POLICY_FOUND
    assert lookup("only.example", when, "").policy_type is PolicyType.NO_POLICY_FOUND  # host unknown
    cache.close()


def test_sending_ip_configured_or_from_the_routing_table():
    configured = SourceAddresses(("192.0.2.1", "2001:db8::1"))
    assert configured("198.51.100.25") == "192.0.2.1" and configured("2001:db8:2::25") == "2001:db8::1"
    assert SourceAddresses()("127.0.0.25") == "127.0.0.1"  # the kernel's choice for loopback; no packet sent
    assert SourceAddresses()("not an address") == ""
