"""The daemon's own policy failures in the TLSRPT report (RFC 8460 §4.3.2.2, §4.3.4).

Fast tier: the resolver on in-memory DNS and policy hosts (tests/fakes.py) with the recorder the
daemon installs (ops/tlsrpt_policy.py) on a real counts store file; `build_day` writes the report
the operator would send. The daemon itself, with `tlsrpt build`, in the last test.
"""

from __future__ import annotations

import datetime
import gzip
import json
import time
from contextlib import closing

import pytest

from mtasts_policyd.core.tlsrpt_report import ReportIdentity
from mtasts_policyd.ops.tlsrpt_build import build_day
from mtasts_policyd.ops.tlsrpt_policy import PolicyFailureRecorder
from mtasts_policyd.resolution.resolver import Outcome
from mtasts_policyd.store.tlsrpt_store import TlsRptStore
from tests.conftest import SocketmapClient, free_port, run_cli
from tests.test_metrics import scrape, value

D = "example.test"
WHO = ReportIdentity("Reporter Inc", "tlsrpt@reporter.example", "reporter.example")


@pytest.fixture
def store(tmp_path):
    with TlsRptStore(str(tmp_path / "tlsrpt.sqlite3")) as opened:
        yield opened


def failing_resolver(make_fake_resolver, store):
    resolver = make_fake_resolver(backoff_min=300, dns_backoff_min=30)
    resolver.policy_failures = PolicyFailureRecorder(store)
    return resolver


def retry(resolver, clock, times):
    """Resolve, then again after each back-off window ends (the daemon's retries)."""
    for _ in range(times):
        assert resolver.resolve(D).outcome is Outcome.FAILED
        clock.advance(3601)  # past backoff_max: the next lookup asks again


def report(store, fake_net, tmp_path, clock):
    fake_net.dns.set(f"_smtp._tls.{D}", "TXT", "v=TLSRPTv1; rua=mailto:tlsrpt@example.test")
    day = datetime.datetime.fromtimestamp(clock(), datetime.UTC).date()
    [built] = build_day(store, day, WHO, fake_net.dns, str(tmp_path / "reports"))
    assert built.outcome == "built", built
    with open(built.path, "rb") as handle:
        return json.loads(gzip.decompress(handle.read()))


@pytest.mark.fast
@pytest.mark.parametrize("publish, result, reason", [
    ({"status": 500}, "sts-policy-fetch-error", "fetch-error"),
    ({"cert": "expired"}, "sts-webpki-invalid", "certificate-invalid"),
    ({"body": "version: STSv1\nmode: sometimes\n"}, "sts-policy-invalid", "invalid-policy"),
])
def test_failure_after_the_backoff_window_is_reported(fake_net, make_fake_resolver, clock, store, tmp_path,
                                                      publish, result, reason):
    # RFC 8460 §4.3.2.2 result types for the policy the daemon could not get; §4.3.4: the first
    # (possibly transient) failure is not reported, the failed retry after the back-off is.
    fake_net.publish(D, **publish)
    resolver = failing_resolver(make_fake_resolver, store)
    retry(resolver, clock, 1)
    assert store.sessions(datetime.datetime.fromtimestamp(clock(), datetime.UTC).date()) == []
    retry(resolver, clock, 2)
    data = report(store, fake_net, tmp_path, clock)
    [policy] = data["policies"]
    assert policy["policy"] == {"policy-type": "sts", "policy-domain": D}
    assert policy["summary"] == {"total-successful-session-count": 0, "total-failure-session-count": 2}
    assert policy["failure-details"] == [{"result-type": result, "failed-session-count": 2,
                                          "failure-reason-code": reason}]


@pytest.mark.fast
def test_recovery_on_the_first_retry_is_not_reported(fake_net, make_fake_resolver, clock, store):
    fake_net.publish(D, status=500)
    resolver = failing_resolver(make_fake_resolver, store)
    retry(resolver, clock, 1)
    fake_net.publish(D)
    assert resolver.resolve(D).outcome is Outcome.FETCHED
    assert store.sessions(datetime.datetime.fromtimestamp(clock(), datetime.UTC).date()) == []


@pytest.mark.fast
def test_failure_under_a_cached_policy_names_it(fake_net, make_fake_resolver, clock, store, tmp_path):
    # RFC 8461 §5.1: the cached policy stays in force; the report names it as the policy.
    fake_net.publish(D)
    resolver = failing_resolver(make_fake_resolver, store)
    assert resolver.resolve(D, refetch=True).outcome is Outcome.FETCHED
    fake_net.https.remove(D, unresolvable=True)
    for _ in range(2):
        assert resolver.resolve(D, refetch=True).outcome is Outcome.FAILED
    data = report(store, fake_net, tmp_path, clock)
    [policy] = data["policies"]
    assert policy["policy"]["policy-type"] == "sts" and "mode: enforce" in policy["policy"]["policy-string"]
    assert policy["failure-details"][0]["result-type"] == "sts-policy-fetch-error"


def test_daemon_policy_fetch_failure_is_in_the_built_report(rig, start_daemon, tmp_path):
    # The issue: a policy-fetch failure of the daemon appears as sts-policy-fetch-error. A real
    # daemon, a policy host answering HTTP 500, `tlsrpt.store` set, back-off of one second.
    domain = rig.domain("fetchfail")
    rig.publish(domain, status=500)
    rig.dns.set(f"_smtp._tls.{domain}", "TXT", "v=TLSRPTv1; rua=mailto:tlsrpt@example.test")
    store_path = tmp_path / "counts.sqlite3"
    metrics_port = free_port()
    daemon = start_daemon(tlsrpt={"store": str(store_path), "sender": "tlsrpt@reporter.example"},
                          resolver={"backoff_min": 1, "backoff_max": 1},
                          metrics={"listen": f"127.0.0.1:{metrics_port}"})
    day = datetime.datetime.now(datetime.UTC).date()
    with closing(SocketmapClient(daemon.port)) as client, TlsRptStore(str(store_path)) as store:
        deadline = time.monotonic() + 30
        while not store.sessions(day, domain):
            assert time.monotonic() < deadline, daemon.logs()
            client.ask(domain)
            time.sleep(0.3)
    # README "Metrics": the daemon exports the counts store it records into.
    assert value(scrape(metrics_port), "mtasts_tlsrpt_sessions_total", result="sts-policy-fetch-error") >= 1
    assert value(scrape(metrics_port), "mtasts_tlsrpt_reports_built") == 0
    daemon.stop()
    assert "tlsrpt record domain=" + domain in daemon.logs()
    out = tmp_path / "reports"
    built = run_cli("tlsrpt", "build", "--config", str(daemon.config_path), "--day", day.isoformat(),
                    "--output", str(out))
    assert built.returncode == 0, built.stderr
    [path] = out.glob(f"*!{domain}!*.json.gz")
    [policy] = json.loads(gzip.decompress(path.read_bytes()))["policies"]
    assert policy["policy"] == {"policy-type": "sts", "policy-domain": domain}
    [detail] = policy["failure-details"]
    assert detail["result-type"] == "sts-policy-fetch-error" and detail["failure-reason-code"] == "fetch-error"
    assert f"build: {day}: 1 built" in built.stdout
    with TlsRptStore(str(store_path)) as store:
        assert store.totals().reports_built == 1
