"""Operator overrides (config `overrides:`), reloading them with SIGHUP, and their visibility."""

from __future__ import annotations

import json
import signal
import time

import pytest
import yaml

from mtasts_policyd.core.overrides import OverrideError, make_override
from mtasts_policyd.core.policy import Mode
from mtasts_policyd.resolution.resolver import CacheState
from mtasts_policyd.runtime.config import ConfigError, load
from tests.conftest import SocketmapClient, run_cli, secure, write_config


def test_override_validation():
    assert make_override("Example.COM", "ignore", reason="broken").domain == "example.com"
    enforce = make_override("example.com", "enforce", ("MX1.example.com.", "*.example.net"), "pinned")
    assert enforce.policy.mode is Mode.ENFORCE and enforce.policy.mx == ("mx1.example.com", "*.example.net")
    for args in [("example.com", "ignore", (), ""), ("example.com", "enforce", (), "no mx"),
                 ("example.com", "block", (), "x"), ("bad domain", "ignore", (), "x")]:
        with pytest.raises(OverrideError):
            make_override(*args)
    with pytest.raises(OverrideError, match="expires"):
        make_override("example.com", "ignore", reason="x", expires="next week")


def test_override_mx_patterns_follow_the_policy_rule():
    # RFC 8461 §3.2: ["*."] Domain, so "*.com" is a pattern; §4.1: it matches exactly one label.
    override = make_override("example.com", "enforce", ("*.COM.", "mx.example.net"), "pinned")
    assert override.policy.mx == ("*.com", "mx.example.net")
    assert override.policy.matches("example.com") and not override.policy.matches("a.example.com")
    for bad in ("*.", "192.0.2.1", "mx.example.com mx2.example.com", "mx.example.com\u2028"):
        with pytest.raises(OverrideError, match="not a host name pattern"):
            make_override("example.com", "enforce", (bad,), "pinned")


def test_config_errors_name_the_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("overrides:\n  example.com: {action: enforce, reason: x}\n")
    with pytest.raises(ConfigError, match="enforce needs at least one mx"):
        load(str(path))
    path.write_text("overrides:\n  example.com: {action: ignore, reason: x, expires: 2026-12-31}\n")
    assert load(str(path)).overrides["example.com"].expires == "2026-12-31"


def test_resolver_applies_override_until_it_expires(rig, make_resolver, clock):
    domain = rig.domain()
    rig.publish(domain)
    resolver = make_resolver()
    resolver.overrides = {domain: make_override(domain, "ignore", reason="provider broke its policy",
                                                expires="2027-01-15T00:00:00+00:00")}
    clock.now = 1_800_000_000 - 10**7  # well before the expiry
    decision, due = resolver.cached(domain)
    assert decision.state is CacheState.OVERRIDE and decision.policy is None and not due
    assert decision.reason == "override-ignore"
    assert resolver.resolve(domain).decision.policy is None
    assert rig.https.count(domain) == 0 and rig.dns.count(f"_mta-sts.{domain}", "TXT") == 0
    clock.now = 1_800_000_000  # 2027-01-15 has passed: the published policy is back
    assert resolver.cached(domain) == (None, False)
    assert resolver.resolve(domain).decision.mode is Mode.ENFORCE


def test_sighup_reloads_overrides_without_dropping_connections(rig, start_daemon, tmp_path):
    forced, ignored = rig.domain(), rig.domain()
    rig.publish(ignored)
    daemon = start_daemon()
    client = SocketmapClient(daemon.port)
    assert client.ask(forced) == "NOTFOUND "
    assert client.ask(ignored) == "OK " + secure(ignored)
    data = yaml.safe_load(daemon.config_path.read_text())
    data["overrides"] = {
        forced: {"action": "enforce", "mx": [f"mx.{forced}"], "reason": "ticket 42"},
        ignored: {"action": "ignore", "reason": "broken certificate on their MX, ticket 43"},
    }
    daemon.config_path.write_text(yaml.safe_dump(data))
    daemon.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "reloaded configuration: overrides=2" not in daemon.logs() and time.monotonic() < deadline:
        time.sleep(0.05)
    # The same connection, still open, now gets the overridden answers.
    assert client.ask(forced) == f"OK secure match=mx.{forced} servername=hostname"
    assert client.ask(ignored) == "NOTFOUND "
    assert f"answer=NOTFOUND domain={ignored} cache=override reason=override-ignore" in daemon.logs()
    assert "override_reason='broken certificate on their MX, ticket 43'" in daemon.logs()


def test_sighup_with_broken_config_keeps_running_configuration(rig, start_daemon):
    domain = rig.domain()
    rig.publish(domain)
    daemon = start_daemon()
    daemon.config_path.write_text(daemon.config_path.read_text() + "\nnonsense_key: 1\n")
    daemon.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "reload failed" not in daemon.logs() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "reload failed, keeping the running configuration" in daemon.logs()
    assert SocketmapClient(daemon.port).ask(domain) == "OK " + secure(domain)


def test_query_shows_override(rig, tmp_path):
    domain = rig.domain()
    overrides = {domain: {"action": "ignore", "reason": "testing the override", "expires": "2099-01-01"}}
    result = run_cli("query", "--config", write_config(rig, tmp_path, overrides=overrides), "--json", domain)
    row = json.loads(result.stdout)
    assert row["cache"] == "override" and row["override"]["reason"] == "testing the override"
    assert row["override"]["expires_at"].startswith("2099-01-01")
