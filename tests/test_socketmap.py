"""The socketmap front end of a real daemon process (socketmap_table(5) framing, Postfix replies)."""

from __future__ import annotations

import os
import stat
import threading
import time

import pytest

from tests.bodies import NONE, TESTING
from tests.conftest import SocketmapClient, ask_unix, free_port, netstring, secure


@pytest.fixture
def daemon(start_daemon):
    return start_daemon(socketmap={
        "idle_timeout": 2,
        "maps": {
            "postfix": {},
            "strict": {"testing_as_enforce": True},
            "sts": {"sts_attributes": True},
            "old": {"servername": False},
        },
    })


def test_enforce_policy_answer(rig, daemon):
    # The answer Postfix needs: verified TLS, names from the policy, SNI = MX host (RFC 8461 §4, §7.1).
    domain = rig.domain()
    rig.publish(domain)
    client = SocketmapClient(daemon.port)
    assert client.ask(domain) == "OK " + secure(domain)
    assert client.ask(domain, "old") == f"OK secure match=mx1.{domain}:a.mx.{domain}"
    assert client.ask(domain.upper() + ".") == "OK " + secure(domain)
    assert client.ask(f"[{domain}]:25").startswith("OK secure")


def test_sts_attributes_for_postfix_310(rig, daemon):
    domain = rig.domain()
    rig.publish(domain)
    reply = SocketmapClient(daemon.port).ask(domain, "sts")
    assert reply == (
        f"OK secure match=mx1.{domain}:a.mx.{domain} servername=hostname policy_type=sts "
        f"policy_domain={domain} mx_host_pattern=mx1.{domain} mx_host_pattern=*.mx.{domain} "
        "{ policy_string = version: STSv1 } { policy_string = mode: enforce } "
        f"{{ policy_string = mx: mx1.{domain} }} {{ policy_string = mx: *.mx.{domain} }} "
        "{ policy_string = max_age: 86400 }")


def test_testing_none_and_no_policy_are_notfound(rig, daemon):
    # RFC 8461 §5: testing and none do not change delivery; NOTFOUND lets Postfix use its default.
    testing, none, nothing = rig.domain(), rig.domain(), rig.domain()
    rig.publish(testing, TESTING)
    rig.publish(none, NONE)
    client = SocketmapClient(daemon.port)
    assert client.ask(testing) == "NOTFOUND "
    assert client.ask(testing, "strict") == "OK " + secure(testing)
    assert client.ask(none) == "NOTFOUND "
    assert client.ask(none, "strict") == "NOTFOUND "
    assert client.ask(nothing) == "NOTFOUND "


def test_max_age_zero_enforce_policy_is_answered_and_fetched_per_lookup(rig, daemon):
    # RFC 8461 §3.2: max_age 0 is valid. Each lookup applies the policy its own fetch brought
    # (Postfix gets the enforce answer every time); none is answered from the cache.
    domain = rig.domain()
    rig.publish(domain, "version: STSv1\nmode: enforce\nmx: mx1.{d}\nmx: *.mx.{d}\nmax_age: 0\n")
    client = SocketmapClient(daemon.port)
    assert client.ask(domain) == "OK " + secure(domain)
    assert client.ask(domain) == "OK " + secure(domain)
    assert rig.https.count(domain) == 2


def test_keys_that_cannot_have_a_policy(rig, daemon):
    # RFC 8461 §3.4: no parent-domain policies (Postfix asks ".example.com"), no address literals.
    domain = rig.domain()
    rig.publish(domain)
    client = SocketmapClient(daemon.port)
    before = len(rig.dns.queries)
    for key in ("." + domain, "[192.0.2.1]", "192.0.2.1", "", "bad key", "x" * 300):
        assert client.ask(key) == "NOTFOUND "
    assert len(rig.dns.queries) == before


def test_unknown_map_name_is_a_clear_error(daemon):
    reply = SocketmapClient(daemon.port).ask("example.test", "nosuchmap")
    assert reply.startswith("PERM unknown map name 'nosuchmap'")


def test_map_name_not_utf8_is_perm_key_not_utf8_is_notfound(rig, daemon):
    # README: a name the daemon does not serve is a configuration error (PERM, Postfix defers);
    # a key that is not text cannot be a domain name, so it has no policy (RFC 8461 §3.4).
    client = SocketmapClient(daemon.port)
    client.send(netstring(b"post\xfffix example.test"))
    assert client.read_reply() == "PERM map name is not UTF-8 text; this daemon serves old, postfix, strict, sts"
    client.send(netstring(b"\xff"))
    assert client.read_reply().startswith("PERM map name is not UTF-8 text")
    before = len(rig.dns.queries)
    client.send(netstring(b"postfix exa\xffmple.test"))
    assert client.read_reply() == "NOTFOUND "
    assert len(rig.dns.queries) == before
    assert client.ask(".example.test") == "NOTFOUND "  # the connection goes on


@pytest.mark.parametrize("garbage", [b"abc", b"12x:foo,", b"5:postfix,", b"3:abc;", b"99999999999:"])
def test_malformed_frames_close_only_that_connection(rig, daemon, garbage):
    domain = rig.domain()
    rig.publish(domain)
    good = SocketmapClient(daemon.port)
    bad = SocketmapClient(daemon.port, timeout=5)
    bad.send(garbage)
    reply = bad.read_reply()
    assert reply is None or reply.startswith("PERM ")
    assert bad.read_reply() is None  # closed
    assert good.ask(domain).startswith("OK secure")
    assert "protocol error" in daemon.logs()


def test_oversized_request_refused(daemon):
    client = SocketmapClient(daemon.port)
    client.send(b"20000:postfix " + b"a" * 100)
    assert client.read_reply() == "PERM request longer than 10000 bytes"
    assert client.read_reply() is None


def test_pipelined_requests_answered_in_order(rig, daemon):
    # Postfix reuses one connection; replies must keep request order even when a lookup waits.
    slow, fast = rig.domain(), rig.domain()
    rig.publish(slow, delay=0.5)
    rig.publish(fast)
    client = SocketmapClient(daemon.port)
    assert client.ask(fast).startswith("OK")  # cached now
    client.send(netstring(f"postfix {slow}".encode()) + netstring(f"postfix {fast}".encode())
                + netstring(b"postfix .x") + netstring(f"postfix {slow}".encode()))
    replies = [client.read_reply() for _ in range(4)]
    assert replies[0] == replies[3] == "OK " + secure(slow)
    assert replies[1] == "OK " + secure(fast)
    assert replies[2] == "NOTFOUND "


def test_idle_connection_closed(daemon):
    # idle_timeout (2 s here) from the connection's start or its last request: closed then (within
    # the client's 10 s), never before. The lower bounds hold however slow the machine is: the
    # daemon's clock for a connection starts after the client's.
    started = time.monotonic()
    client = SocketmapClient(daemon.port, timeout=10)
    assert client.read_reply() is None  # the daemon closed it after idle_timeout (2 s here)
    assert time.monotonic() - started >= 2 - 0.05
    client.close()
    client = SocketmapClient(daemon.port, timeout=10)
    asked = time.monotonic()
    assert client.ask(".mtasts-policyd-test.invalid") == "NOTFOUND "  # answered at once, no lookup
    assert client.read_reply() is None
    assert time.monotonic() - asked >= 2 - 0.05  # counted from the last request
    client.close()


def test_concurrent_lookups_share_one_fetch(rig, daemon):
    # One DNS query and one HTTPS fetch, however many connections ask for the same new domain.
    domain = rig.domain()
    rig.publish(domain, delay=1.0)
    replies: list[str | None] = []

    def ask() -> None:
        replies.append(SocketmapClient(daemon.port).ask(domain))

    threads = [threading.Thread(target=ask) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert replies == ["OK " + secure(domain)] * 20
    assert rig.https.count(domain) == 1
    assert rig.dns.count(f"_mta-sts.{domain}", "TXT") == 1


def test_cached_answer_does_not_wait_for_the_network(rig, start_daemon):
    # A usable cached policy is answered at once while the refresh runs in the background:
    # here DNS never answers, and the lookup is still answered before the DNS timeout could end.
    daemon = start_daemon(resolver={"txt_ttl_min": 1}, dns={"timeout": 8})
    domain = rig.domain()
    rig.publish(domain, ttl=1)
    client = SocketmapClient(daemon.port, timeout=4)
    assert client.ask(domain).startswith("OK secure")
    time.sleep(1.2)  # the TXT TTL has passed: the next lookup triggers a refresh
    rig.dns.fault(f"_mta-sts.{domain}", "timeout")
    try:
        assert client.ask(domain).startswith("OK secure")
        assert client.ask(domain).startswith("OK secure")
    finally:
        rig.dns.fault(f"_mta-sts.{domain}", None)


def decision_lines(daemon, domain: str) -> list[str]:
    return [line for line in daemon.logs().splitlines() if "socketmap map=postfix" in line and f"domain={domain} " in line]


def ask_twice_each(rig, daemon) -> tuple[str, str]:
    """A policy domain and a no-policy domain, each a miss then a hit; and a parent-domain key."""
    domain, nothing = rig.domain(), rig.domain()
    rig.publish(domain)
    client = SocketmapClient(daemon.port)
    for key in (domain, domain, nothing, nothing, "." + domain):
        client.ask(key)
    client.ask(domain, "nosuchmap")
    time.sleep(0.2)
    return domain, nothing


def test_default_log_level_logs_misses_not_cached_answers(rig, daemon):
    # At the default level (info) an operator sees every lookup that asked the network, and no
    # line per cached answer: that line would cost more than the lookup (README "Logs").
    domain, nothing = ask_twice_each(rig, daemon)
    assert [line.split("socketmap ", 1)[1] for line in decision_lines(daemon, domain)] == [
        f"map=postfix answer=OK domain={domain} cache=miss reason=policy-enforce"]
    assert len(decision_lines(daemon, nothing)) == 1
    assert f"answer=NOTFOUND domain={nothing} cache=miss reason=no-record failure=no-record" in daemon.logs()
    assert f"refresh domain={domain} outcome=fetched" in daemon.logs()
    assert "reason=not-a-policy-domain" not in daemon.logs()
    assert "WARNING mtasts_policyd.socketmap: socketmap map='nosuchmap' answer=PERM" in daemon.logs()


def test_debug_level_logs_one_line_per_decision(rig, start_daemon):
    daemon = start_daemon(log_level="debug")
    domain, nothing = ask_twice_each(rig, daemon)
    lines = decision_lines(daemon, domain)
    assert len(lines) == 2
    assert f"answer=OK domain={domain} cache=miss reason=policy-enforce" in lines[0]
    assert f"DEBUG mtasts_policyd.socketmap: socketmap map=postfix answer=OK domain={domain} cache=hit " \
           "reason=policy-enforce" in lines[1]
    assert f"answer=NOTFOUND domain={nothing} cache=negative reason=no-record" in daemon.logs()
    assert f"answer=NOTFOUND key='.{domain}' reason=not-a-policy-domain" in daemon.logs()


def test_unix_socket_listener(rig, start_daemon, tmp_path):
    # A chrooted Postfix reaches the daemon through a unix socket with the mode the operator set.
    path = tmp_path / "run" / "policyd.sock"
    port = free_port()
    start_daemon(port=port, socketmap={"listen": [f"unix:{path}", f"127.0.0.1:{port}"], "socket_mode": "0600"})
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    domain = rig.domain()
    rig.publish(domain)
    assert ask_unix(path, domain).startswith("OK secure match=")
