"""Real Postfix 3.7 delivering real mail through mtasts-policyd, checked on the wire.

A private Postfix instance (tests/e2e/postfix_mta.py; main.cf from contrib/postfix/main.cf) asks
the daemon over socketmap for each destination's TLS policy and delivers to the world's SMTP sinks.
What counts is where each message ends up (which sink received it, over TLS or not, with which
SNI) and what Postfix itself logged; the daemon's answers are only the means.

The world (DNS, HTTPS, sinks) and the daemon are session fixtures shared with the Exim tests, so
every check here is tied to this module's own messages (unique X-Test-Id markers and recipients)
and to this instance's log, never to a sink's global counters.
"""

from __future__ import annotations

import os
import re
import time
import uuid

import pytest
import yaml

from tests.conftest import Daemon, free_port
from tests.e2e.postfix_mta import PostfixInstance, Status
from tests.e2e.world import (
    SCENARIOS,
    Mx,
    Scenario,
    World,
    operator_environment,
    wait_until,
)

BY_NAME = {scenario.name: scenario for scenario in SCENARIOS}
DELIVERY_TIMEOUT = 60  # seconds for one message to reach its sink (retries included)
DEFERRAL_TIMEOUT = 30  # seconds until Postfix logs the first deferral
# Deferral reasons Postfix 3.7 gives when it cannot satisfy "secure": "Server certificate not
# verified" (name mismatch or untrusted issuer; dsn 4.7.5) and "TLS is required, but was not
# offered by host ..." (no STARTTLS; dsn 4.7.4).
TLS_REASON = re.compile(r"TLS|[Cc]ertificate")


def new_marker(label: str) -> str:
    return f"pf-{label}-{uuid.uuid4().hex[:12]}"


def is_enforce(scenario: Scenario) -> bool:
    return scenario.policy is not None and "mode: enforce" in scenario.policy


def enforce_policy(*patterns: str) -> str:
    return "version: STSv1\nmode: enforce\n" + "".join(f"mx: {p}\n" for p in patterns) + "max_age: 86400\n"


@pytest.fixture(scope="module")
def postfix(world: World, policyd, request) -> PostfixInstance:
    instance = PostfixInstance().start()
    failed_before = request.session.testsfailed
    try:
        yield instance
    finally:
        instance.stop()
        if request.session.testsfailed > failed_before or os.environ.get("MTASTS_KEEP_POSTFIX"):
            print(f"\nPostfix instance kept for inspection: {instance.directory} (log: {instance.log_path})")
        else:
            instance.remove()


def flusher(postfix: PostfixInstance, every: float = 1.0):
    """`postqueue -f` at most once per `every` seconds (the retry backoff is 1-2 s anyway)."""
    last = [0.0]

    def flush() -> None:
        if time.monotonic() - last[0] >= every:
            last[0] = time.monotonic()
            postfix.flush()
    return flush


def wait_delivered(world: World, postfix: PostfixInstance, marker: str, timeout: float = DELIVERY_TIMEOUT) -> dict:
    """Poll the sinks until a message carrying `marker` arrived, flushing the queue between polls."""
    wait_until(lambda: world.received(marker), timeout=timeout, interval=0.1, between=flusher(postfix))
    return world.received(marker)


def wait_status(postfix: PostfixInstance, rcpt: str, status: str, timeout: float) -> Status | None:
    """Wait until the last outcome Postfix logged for `rcpt` is `status`; return the last outcome."""
    wait_until(lambda: (s := postfix.status_of(rcpt)) is not None and s.status == status,
               timeout=timeout, interval=0.1)
    return postfix.status_of(rcpt)


def explain(postfix: PostfixInstance, rcpt: str) -> str:
    """The log lines about one recipient's message, for assertion messages."""
    queue_ids = {s.queue_id for s in postfix.statuses(rcpt)}
    lines = [line for line in postfix.log().splitlines() if rcpt in line or any(q in line for q in queue_ids)]
    return "\n".join(lines[-20:]) or postfix.log()[-3000:]


@pytest.fixture(scope="module")
def scenario_mail(postfix: PostfixInstance) -> dict[str, tuple[str, str]]:
    """One message per scenario, all submitted at once: name -> (recipient, marker)."""
    sent = {}
    for scenario in SCENARIOS:
        marker = new_marker(scenario.name)
        rcpt = f"{marker}@{scenario.domain}"
        postfix.send(rcpt, marker)
        sent[scenario.name] = (rcpt, marker)
    return sent


def test_instance_runs_contrib_settings_with_fresh_lookups(postfix: PostfixInstance) -> None:
    """The instance runs the shipped contrib/postfix/main.cf settings, and smtp(8) processes serve
    one delivery each, so no delivery is decided by a policy another delivery looked up."""
    assert postfix.running()
    assert postfix.postconf("mail_version").startswith("3.7")
    assert postfix.postconf("smtp_tls_policy_maps") == "socketmap:inet:127.0.0.1:8461:postfix"
    assert postfix.postconf("smtp_tls_security_level") == "dane"
    assert postfix.postconf("smtp_dns_support_level") == "dnssec"
    assert postfix.postconf("smtp_tls_CAfile") == "/etc/ssl/certs/ca-certificates.crt"  # as shipped
    assert postfix.service_param("smtp/unix", "max_use") == "1"
    assert all(postfix.service_field(f"{name}/unix", "chroot") == "n" for name in ("smtp", "qmgr", "cleanup"))


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_scenario_delivery(world: World, postfix: PostfixInstance, scenario_mail, scenario: Scenario) -> None:
    rcpt, marker = scenario_mail[scenario.name]
    if scenario.delivered_to is not None:
        host = f"{scenario.delivered_to}.{scenario.domain}"
        received = wait_delivered(world, postfix, marker)
        assert set(received) == {host}, f"{scenario.name}: received by {set(received)}\n{explain(postfix, rcpt)}"
        (message,) = received[host]
        assert message.rcpt_to == [rcpt]
        status = wait_status(postfix, rcpt, "sent", timeout=10)
        assert status is not None and status.status == "sent", explain(postfix, rcpt)
        assert status.relay is not None and status.relay.startswith(f"{host}["), status.line
        if scenario.tls_required:
            assert message.tls, f"{scenario.name}: delivered without TLS"
            assert message.sni == host, f"{scenario.name}: SNI {message.sni!r}, expected the MX host name"
            # "secure": Postfix verified the chain and a match= name before it sent the mail.
            assert postfix.log_lines("Verified TLS connection established to", f"{host}["), explain(postfix, rcpt)
    else:
        status = wait_status(postfix, rcpt, "deferred", timeout=DEFERRAL_TIMEOUT)
        assert status is not None and status.status == "deferred", explain(postfix, rcpt)
        assert status.dsn.startswith("4.7."), status.line
        assert TLS_REASON.search(status.reason), f"deferred for a non-TLS reason: {status.line}"
        assert world.received(marker) == {}, f"{scenario.name}: delivered despite enforce"
    if is_enforce(scenario):
        # Under enforce nothing reaches an MX outside the policy, with a bad certificate or without
        # STARTTLS (rogue.enforce-outside and a.b.mx.wildcard have valid certificates of their own).
        allowed = {f"{scenario.delivered_to}.{scenario.domain}"} if scenario.delivered_to else set()
        for mx in scenario.mx:
            host = f"{mx.label}.{scenario.domain}"
            if host not in allowed:
                assert not [m for m in world.sinks[host].messages if marker.encode() in m.data], host


@pytest.mark.parametrize("name, refused", [("enforce-outside", "rogue"), ("wildcard", "a.b.mx")])
def test_preferred_mx_outside_policy_is_tried_and_refused(world: World, postfix: PostfixInstance, scenario_mail,
                                                          name: str, refused: str) -> None:
    """The preferred MX outside the policy was really contacted and refused on the certificate name
    check, then Postfix moved on to the next MX in the same delivery attempt. (Postfix 3.7 checks the
    certificate against match=, not the MX host name against the policy: it does connect to rogue.)"""
    scenario = BY_NAME[name]
    rcpt, marker = scenario_mail[name]
    host = f"{refused}.{scenario.domain}"
    wait_delivered(world, postfix, marker)
    status = wait_status(postfix, rcpt, "sent", timeout=10)
    assert status is not None and status.status == "sent"
    assert postfix.log_lines("server certificate verification failed for", f"{host}[", "hostname mismatch"), \
        explain(postfix, rcpt)
    # The refusal is logged under the queue id of the message that then went to the allowed MX.
    assert postfix.log_lines(f"{status.queue_id}: Server certificate not verified"), explain(postfix, rcpt)
    assert host not in world.received(marker)


def test_policy_id_change_followed_within_ttl(world: World, postfix: PostfixInstance, policyd) -> None:
    """RFC 8461 §3.1/§5.1: a new policy id is noticed once the TXT TTL passes, and the new policy
    applies to the mail already waiting in the queue."""
    name = "pf-idchange"
    mx = (Mx("new", "tls"),)
    old = Scenario(name, enforce_policy("old.{d}"), mx, None, tls_required=True)
    world.publish(old, policy_id="1", ttl=2)
    marker = new_marker(name)
    rcpt = f"{marker}@{old.domain}"
    host = f"new.{old.domain}"
    postfix.send(rcpt, marker)
    status = wait_status(postfix, rcpt, "deferred", timeout=DEFERRAL_TIMEOUT)
    assert status is not None and status.status == "deferred", explain(postfix, rcpt)
    assert status.reason == "Server certificate not verified", status.line
    assert world.received(marker) == {}

    new = Scenario(name, enforce_policy("new.{d}"), mx, "new", tls_required=True)
    world.publish(new, policy_id="2", ttl=2)
    published = time.time()
    received = wait_delivered(world, postfix, marker, timeout=30)
    assert set(received) == {host}, explain(postfix, rcpt)
    (message,) = received[host]
    assert message.tls and message.sni == host
    # Followed within the TTL (2 s) plus one background refresh and one retry, not at max_age.
    assert published <= message.at < published + 15
    assert postfix.status_of(rcpt).status == "sent"
    assert f"refresh domain={old.domain} outcome=changed from id=1" in policyd.logs()


def test_daemon_down_defers_everything_then_recovers(world: World, postfix: PostfixInstance, policyd) -> None:
    """While the socketmap is unreachable Postfix defers mail to every destination, with a policy
    or not (4.7.5 "client TLS configuration problem"); once the daemon is back the queue drains."""
    targets = [BY_NAME["enforce-ok"], BY_NAME["nopolicy"]]
    sent: list[tuple[Scenario, str, str]] = []
    policyd.stop()
    try:
        for scenario in targets:
            marker = new_marker(f"down-{scenario.name}")
            rcpt = f"{marker}@{scenario.domain}"
            postfix.send(rcpt, marker)
            sent.append((scenario, rcpt, marker))
        for scenario, rcpt, marker in sent:
            status = wait_status(postfix, rcpt, "deferred", timeout=DEFERRAL_TIMEOUT)
            assert status is not None and status.status == "deferred", explain(postfix, rcpt)
            assert status.dsn == "4.7.5", status.line
            assert status.reason == "client TLS configuration problem", status.line
            assert status.relay == "none", status.line  # decided before any connection to the MX
            assert postfix.log_lines("socketmap:inet:127.0.0.1:8461:postfix lookup error for",
                                     f'"{scenario.domain}"'), explain(postfix, rcpt)
            assert world.received(marker) == {}, f"{scenario.name}: delivered while the daemon was down"
    finally:
        if policyd.process is None or policyd.process.poll() is not None:
            policyd.start()
    for scenario, rcpt, marker in sent:
        host = f"{scenario.delivered_to}.{scenario.domain}"
        received = wait_delivered(world, postfix, marker)
        assert set(received) == {host}, explain(postfix, rcpt)
        (message,) = received[host]
        if scenario.tls_required:
            assert message.tls and message.sni == host
        status = wait_status(postfix, rcpt, "sent", timeout=10)
        assert status is not None and status.status == "sent", explain(postfix, rcpt)


def test_reused_smtp_process_asks_the_map_for_each_delivery(world: World, policyd) -> None:
    """Postfix's behaviour, recorded: smtp(8) keeps looked-up TLS policies in a per-process cache,
    but on Postfix 3.7 that cache does not outlive one delivery request: a reused smtp(8) process
    asks the map again for the next message to the same domain. So a changed answer (a new policy
    id, the daemon going down) applies from the next delivery even with Postfix's default max_use;
    the main instance's max_use=1 does not depend on this."""
    reuse = PostfixInstance(smtp_max_use=None).start()
    try:
        assert reuse.service_param("smtp/unix", "max_use") == ""  # Postfix's default (100)
        scenario = Scenario("pf-reuse", enforce_policy("mx.{d}"), (Mx("mx", "tls"),), "mx", tls_required=True)
        world.publish(scenario)
        host = f"mx.{scenario.domain}"
        pids = []
        for _ in range(2):
            marker = new_marker("reuse")
            rcpt = f"{marker}@{scenario.domain}"
            reuse.send(rcpt, marker)
            assert set(wait_delivered(world, reuse, marker, timeout=30)) == {host}, explain(reuse, rcpt)
            status = wait_status(reuse, rcpt, "sent", timeout=10)
            assert status is not None and status.status == "sent"
            pids.append(re.search(r"postfix/smtp\[(\d+)\]", status.line).group(1))
        assert pids[0] == pids[1], "precondition: one smtp(8) process made both deliveries"
        assert policyd.logs().count(f"answer=OK domain={scenario.domain} ") == 2
    finally:
        reuse.stop()
        reuse.remove()


def test_postfix_37_reads_dot_pattern_at_any_depth(world: World, policyd, tmp_path) -> None:
    """Postfix's behaviour, recorded: Postfix 3.7 reads match=.mx.d as ANY depth below mx.d, so with
    the plain "*.mx.d" -> ".mx.d" translation it delivers to a.b.mx.d, which RFC 8461 §4.1 forbids
    ("*." covers exactly one label). This is why the daemon answers "*." patterns with the matching
    MX hosts (MapOptions.exact_wildcards, on by default; the `wildcard` scenario above shows that).
    A second daemon with exact_wildcards off and a second Postfix instance show the loose reading."""
    port = free_port()
    config = {
        "socketmap": {"listen": [f"127.0.0.1:{port}"], "maps": {"postfix": {"exact_wildcards": False}}},
        "exim": {"listen": []},
        "dns": {"nameservers": ["127.0.0.1"], "timeout": 3},
        "fetch": {"timeout": 5},
        "cache": {"path": str(tmp_path / "cache.sqlite3")},
    }
    (tmp_path / "loose.yaml").write_text(yaml.safe_dump(config))
    daemon = Daemon(tmp_path / "loose.yaml", port, tmp_path / "loose.log", env=operator_environment()).start()
    loose = PostfixInstance(extra_main_cf={
        "smtp_tls_policy_maps": f"socketmap:inet:127.0.0.1:{port}:postfix"})
    try:
        if not loose.postconf("mail_version").startswith("3.7"):
            pytest.skip("recorded for Postfix 3.7")
        loose.start()
        scenario = Scenario("pf-loose", enforce_policy("*.mx.{d}"),
                            (Mx("a.b.mx", "tls", 10), Mx("a.mx", "tls", 20)), "a.mx", tls_required=True)
        world.publish(scenario)
        marker = new_marker("loose")
        rcpt = f"{marker}@{scenario.domain}"
        loose.send(rcpt, marker)
        received = wait_delivered(world, loose, marker, timeout=30)
        deep = f"a.b.mx.{scenario.domain}"
        assert set(received) == {deep}, explain(loose, rcpt)
        assert loose.log_lines("Verified TLS connection established to", f"{deep}[")
        assert f"answer=OK domain={scenario.domain}" in daemon.logs()
    finally:
        loose.stop()
        daemon.stop()
        loose.remove()


def test_enforce_failures_never_delivered(world: World, postfix: PostfixInstance, scenario_mail) -> None:
    """After all the retries of this module (daemon restart included), the enforce failures are
    still deferred in the queue and no sink ever got them."""
    queued = {r["address"] for entry in postfix.queue() for r in entry["recipients"]}
    for scenario in SCENARIOS:
        if scenario.delivered_to is None:
            rcpt, marker = scenario_mail[scenario.name]
            assert world.received(marker) == {}, scenario.name
            assert postfix.status_of(rcpt).status == "deferred", explain(postfix, rcpt)
            assert rcpt in queued, scenario.name
