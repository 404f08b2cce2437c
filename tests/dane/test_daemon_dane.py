"""A real daemon answering DANE first (issue 9; RFC 8461 §2: DANE takes precedence over MTA-STS) on
the signed world: nsd serves the zones signed at test time, unbound validates, and the same
resolver serves the MTA-STS records (the policies come from the rig's HTTPS server). Each row of
the decision table through both front ends; the cache (memory, disk, restart), the single flight,
the trust probe in `auto` and `require`, `query`, `survey`, `/health` and the metrics."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from mtasts_policyd.core.dane import tlsa_name
from tests.conftest import Daemon, Rig, SocketmapClient, free_port, run_cli
from tests.dane.daemon_world import (
    PKIX_TLSA,
    TLSA,
    answers,
    ask_exim,
    mail_host,
    publish_sts,
    resolver_queries,
    set_mx,
    start,
    sts_answer,
    write_daemon_config,
)
from tests.rig.dnssec import DnssecWorld
from tests.test_metrics import get, scrape, value


@pytest.fixture(scope="module")
def setup(rig: Rig, world: DnssecWorld, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, Path]]:
    """One daemon on the world for the table's rows (each row publishes zones of its own), on the
    defaults but for the resolver, the policy server and a metrics listener."""
    directory = tmp_path_factory.mktemp("dane-daemon")
    config = write_daemon_config(rig, world, directory, directory / "cache.sqlite3",
                                 metrics={"listen": f"127.0.0.1:{free_port()}"})
    daemon = start(config, directory / "daemon.log")
    yield daemon, config
    daemon.stop()


@pytest.fixture
def daemon(setup: tuple[Daemon, Path]) -> Daemon:
    return setup[0]


def metrics_port(config: Path) -> int:
    return int(yaml.safe_load(config.read_text())["metrics"]["listen"].rsplit(":", 1)[1])


# ----- the decision table, one row per case, through socketmap and Exim ---------------------------

Case = Callable[[DnssecWorld, Rig], tuple[str, tuple[str, str] | str]]  # -> (domain, expected replies or TEMP)


def one_mx(world: DnssecWorld, rig: Rig, label: str, *tlsa: str, signed: bool = True,
           sts: bool = True) -> tuple[str, str]:
    """A fresh zone whose domain has one MX host with `tlsa`, and (sts) an MTA-STS enforce policy
    naming it: (domain, host)."""
    zone = world.zone(label=label, signed=signed)
    host = f"mx.{zone.name}"
    mail_host(world, host, *tlsa)
    domain = set_mx(world, zone, host)
    if sts:
        publish_sts(world, rig, domain, host)
    return domain, host


def dane_only(world: DnssecWorld, rig: Rig) -> tuple[str, tuple[str, str] | str]:
    return one_mx(world, rig, "daneonly", TLSA, sts=False)[0], ("OK dane-only", "dane-only")


def dane_and_sts(world: DnssecWorld, rig: Rig) -> tuple[str, tuple[str, str] | str]:
    """RFC 8461 §2: the MTA-STS enforce answer would replace Postfix's DANE level; dane-only wins."""
    return one_mx(world, rig, "danests", TLSA)[0], ("OK dane-only", "dane-only")


def bogus_mx(world: DnssecWorld, rig: Rig) -> tuple[str, tuple[str, str] | str]:
    domain, _ = one_mx(world, rig, "bogusmx", TLSA)
    world.bogus(domain, "MX", f"10 evil.{domain}.")
    return domain, f"{domain}. MX"


def bogus_tlsa(world: DnssecWorld, rig: Rig) -> tuple[str, tuple[str, str] | str]:
    domain, host = one_mx(world, rig, "bogustlsa", TLSA)
    world.bogus(tlsa_name(host), "TLSA", "3 1 1 " + "00" * 32)
    return domain, f"{tlsa_name(host)} TLSA"


def lame_tlsa(world: DnssecWorld, rig: Rig) -> tuple[str, tuple[str, str] | str]:
    """The host is secure; its TLSA records sit in a delegated child whose server answers SERVFAIL."""
    domain, host = one_mx(world, rig, "lametlsa")
    world.lame(f"_tcp.{host}")
    return domain, f"{tlsa_name(host)} TLSA"


def unsigned_with_tlsa(world: DnssecWorld, rig: Rig) -> tuple[str, tuple[str, str] | str]:
    """RFC 7672 §2.2: TLSA records without DNSSEC are not used: the MTA-STS answer stands."""
    domain, host = one_mx(world, rig, "unsigned", TLSA, signed=False)
    return domain, sts_answer(host)


def signed_no_tlsa(world: DnssecWorld, rig: Rig) -> tuple[str, tuple[str, str] | str]:
    """Authenticated denial of TLSA: no DANE, the MTA-STS answer unchanged."""
    domain, host = one_mx(world, rig, "notlsa")
    return domain, sts_answer(host)


def insecure_mx_to_tlsa_host(world: DnssecWorld, rig: Rig) -> tuple[str, tuple[str, str] | str]:
    """RFC 7672 §2.2.1: DANE protects the host, but an insecure MX RRset cannot require it: dane."""
    unsigned, provider = world.zone(signed=False, label="insecuremx"), world.zone(label="provider")
    mail_host(world, f"mx.{provider.name}", TLSA)
    domain = set_mx(world, unsigned, f"mx.{provider.name}")
    publish_sts(world, rig, domain, f"mx.{provider.name}")
    return domain, ("OK dane", "dane")


def two_mx_one_tlsa(world: DnssecWorld, rig: Rig) -> tuple[str, tuple[str, str] | str]:
    zone = world.zone(label="twomx")
    mail_host(world, f"mx1.{zone.name}", TLSA)
    mail_host(world, f"mx2.{zone.name}")
    domain = set_mx(world, zone, f"mx1.{zone.name}", f"mx2.{zone.name}")
    publish_sts(world, rig, domain, f"mx1.{zone.name}", f"mx2.{zone.name}")
    return domain, ("OK dane", "dane")


def only_unusable_tlsa(world: DnssecWorld, rig: Rig) -> tuple[str, tuple[str, str] | str]:
    """RFC 7672 §3.1.3: PKIX usages are unusable, yet TLS is required: dane, not MTA-STS."""
    return one_mx(world, rig, "unusable", PKIX_TLSA)[0], ("OK dane", "dane")


CASES = [dane_only, dane_and_sts, bogus_mx, bogus_tlsa, lame_tlsa, unsigned_with_tlsa, signed_no_tlsa,
         insecure_mx_to_tlsa_host, two_mx_one_tlsa, only_unusable_tlsa]


@pytest.mark.parametrize("case", CASES, ids=[case.__name__ for case in CASES])
def test_decision_table_through_both_front_ends(world: DnssecWorld, rig: Rig, daemon: Daemon, case: Case) -> None:
    domain, expected = case(world, rig)
    world.publish()
    socketmap, exim = answers(daemon, domain)
    if isinstance(expected, str):
        # A lookup the decision needs failed (SERVFAIL: bogus or lame): defer, never MTA-STS.
        assert socketmap is not None and socketmap.startswith("TEMP DNSSEC lookup failed: ") and expected in socketmap
        assert exim.startswith("temp DNSSEC lookup failed: ") and expected in exim
    else:
        assert (socketmap, exim) == expected
    assert answers(daemon, domain) == (socketmap, exim)  # the same again (cached; a TEMP only for its hold)


def test_exim_mx_verb_stays_mta_sts(world: DnssecWorld, rig: Rig, daemon: Daemon) -> None:
    """The contract: `mx DOMAIN HOST` is MTA-STS's MX check, whatever DANE says of the domain."""
    domain, _ = dane_and_sts(world, rig)
    world.publish()
    assert daemon.exim_port is not None
    assert ask_exim(daemon.exim_port, f"policy {domain}") == "dane-only"
    assert ask_exim(daemon.exim_port, f"mx {domain} mx.{domain}") == "match"
    assert ask_exim(daemon.exim_port, f"mx {domain} other.{domain}") == "nomatch"


# ----- the cache, the single flight ------------------------------------------------------------


def test_twenty_concurrent_cold_lookups_make_one_set_of_queries(world: DnssecWorld, rig: Rig,
                                                                 daemon: Daemon) -> None:
    """Issue 9: the DANE and MTA-STS work of a cold domain share one flight. Counted at unbound:
    MX, A, AAAA, TLSA for the one MX host, and the _mta-sts TXT query (no MTA-STS: nothing more)."""
    domain, _ = dane_only(world, rig)
    world.publish()
    clients = [SocketmapClient(daemon.port) for _ in range(20)]
    barrier = threading.Barrier(len(clients))
    replies: list[str | None] = [None] * len(clients)

    def ask(n: int) -> None:
        barrier.wait(timeout=10)
        replies[n] = clients[n].ask(domain)

    before = resolver_queries(world)
    threads = [threading.Thread(target=ask, args=(n,)) for n in range(len(clients))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    for client in clients:
        client.close()
    assert replies == ["OK dane-only"] * 20
    assert resolver_queries(world) - before == 5  # MX, A, AAAA, TLSA, _mta-sts TXT: once


def test_tlsa_added_while_an_mta_sts_answer_is_cached_is_seen_within_its_ttl(
        rig: Rig, world: DnssecWorld, tmp_path: Path) -> None:
    """The DANE branch lives for the minimum TTL of its records (clamped by dane.ttl_min), not as
    long as the MTA-STS policy: a domain that starts publishing TLSA is answered dane-only once the
    branch's TTL has passed (the first lookup after it starts the refresh in the background)."""
    zone = world.zone(label="tlsalater")
    host = f"mx.{zone.name}"
    mail_host(world, host, ttl=2)
    domain = set_mx(world, zone, host, ttl=2)
    publish_sts(world, rig, domain, host)  # TXT TTL 300 s: the MTA-STS half stays cached throughout
    world.publish()
    config = write_daemon_config(rig, world, tmp_path, tmp_path / "cache.sqlite3", dane={"ttl_min": 1})
    daemon = start(config, tmp_path / "daemon.log")
    try:
        assert answers(daemon, domain) == sts_answer(host)
        world.set(tlsa_name(host), "TLSA", TLSA, ttl=2)
        world.publish()
        deadline = time.monotonic() + 30
        seen = answers(daemon, domain)
        while seen != ("OK dane-only", "dane-only") and time.monotonic() < deadline:
            time.sleep(0.5)
            seen = answers(daemon, domain)
        assert seen == ("OK dane-only", "dane-only")
        assert f"dane domain={domain} verdict=dane-only" in daemon.logs()
        assert daemon.logs().count(f"refresh domain={domain}") == 1  # the MTA-STS half was not asked again
    finally:
        daemon.stop()


def test_restart_with_the_dane_branch_cached_answers_with_no_network(rig: Rig, tmp_path: Path) -> None:
    """The DANE branch is on disk beside the MTA-STS half, and the probe's last word too: a daemon
    restarted with its whole DNS world stopped answers the DANE verdict from the cache."""
    with DnssecWorld(lifetime=300) as private:
        zone = private.zone(label="restart")
        host = f"mx.{zone.name}"
        mail_host(private, host, TLSA)
        domain = set_mx(private, zone, host)
        publish_sts(private, rig, domain, host)
        plain = private.zone(label="restartsts")
        mail_host(private, f"mx.{plain.name}")
        sts_domain = set_mx(private, plain, f"mx.{plain.name}")
        publish_sts(private, rig, sts_domain, f"mx.{plain.name}")
        private.publish()
        config = write_daemon_config(rig, private, tmp_path, tmp_path / "cache.sqlite3")
        first = start(config, tmp_path / "first.log")
        expected = [answers(first, domain), answers(first, sts_domain)]
        assert expected == [("OK dane-only", "dane-only"), sts_answer(f"mx.{plain.name}")]
        assert first.stop() == 0
    assert not private.running  # no resolver, no authoritative server: no network at all
    fetches = len(rig.https.requests)
    second = start(config, tmp_path / "second.log")
    try:
        assert [answers(second, domain), answers(second, sts_domain)] == expected
        assert len(rig.https.requests) == fetches
        log = second.logs()
        assert "dane domain=" not in log and "refresh domain=" not in log  # nothing asked
        assert "state=validating" in log and "before this start" in log  # the probe's word, taken over
    finally:
        second.stop()


# ----- the trust probe -------------------------------------------------------------------------------


def insecure_probe(world: DnssecWorld) -> str:
    """A probe the world answers without AD (an unsigned zone): the resolver seems not to validate."""
    zone = world.zone(label="noad", signed=False)
    world.publish()
    return f"{zone.name} SOA"


def test_probe_failing_in_auto_answers_mta_sts_and_reports_degraded(rig: Rig, world: DnssecWorld,
                                                                     tmp_path: Path) -> None:
    domain, _ = dane_and_sts(world, rig)
    world.publish()
    metrics = free_port()
    config = write_daemon_config(rig, world, tmp_path, tmp_path / "cache.sqlite3",
                                 dane={"probe": insecure_probe(world), "probe_interval": 1},
                                 metrics={"listen": f"127.0.0.1:{metrics}"})
    daemon = start(config, tmp_path / "daemon.log")
    try:
        assert answers(daemon, domain) == sts_answer(f"mx.{domain}")  # MTA-STS alone, as without DANE
        status, _, body = get(metrics, "/health")
        health = json.loads(body)
        assert status == 200 and health["status"] == "ok"  # the daemon serves; DANE is what is degraded
        assert health["dane"]["mode"] == "auto" and health["dane"]["state"] == "degraded"
        assert "without AD" in health["dane"]["detail"]
        samples = scrape(metrics)
        assert value(samples, "mtasts_dane_validating", mode="auto") == 0
        time.sleep(2.5)  # more probes, the same state: still one warning
        assert value(scrape(metrics), "mtasts_dane_probes_total", result="not-validating") >= 2
        assert daemon.logs().count("state=degraded") == 1
        row = json.loads(run_cli("query", "--config", str(config), "--json", domain).stdout)
        assert row["dane"]["state"] == "degraded" and row["dane"]["applied"] is None
        assert row["answer"] == sts_answer(f"mx.{domain}")[0]
    finally:
        daemon.stop()


def test_mode_off_is_pure_mta_sts(rig: Rig, world: DnssecWorld, tmp_path: Path) -> None:
    domain, _ = dane_and_sts(world, rig)
    world.publish()
    metrics = free_port()
    config = write_daemon_config(rig, world, tmp_path, tmp_path / "cache.sqlite3", dane={"mode": "off"},
                                 metrics={"listen": f"127.0.0.1:{metrics}"})
    daemon = start(config, tmp_path / "daemon.log")
    try:
        assert answers(daemon, domain) == sts_answer(f"mx.{domain}")
        assert json.loads(get(metrics, "/health")[2])["dane"] == {"mode": "off", "state": "off"}
        assert ("mtasts_dane_validating", frozenset({("mode", "off")})) not in scrape(metrics)
        assert "dane " not in daemon.logs()  # no probe, no DANE lookup
    finally:
        daemon.stop()


def test_probe_failing_in_require_defers_unknown_domains_and_keeps_known_ones(rig: Rig, world: DnssecWorld,
                                                                               tmp_path: Path) -> None:
    probe_zone = world.zone(label="probe")
    world.set(probe_zone.domain, "TXT", "validating")
    known, _ = dane_and_sts(world, rig)
    unknown, _ = dane_and_sts(world, rig)
    world.publish()
    config = write_daemon_config(rig, world, tmp_path, tmp_path / "cache.sqlite3",
                                 dane={"mode": "require", "probe": f"{probe_zone.name} TXT", "probe_interval": 1})
    daemon = start(config, tmp_path / "daemon.log")
    try:
        assert answers(daemon, known) == ("OK dane-only", "dane-only")
        world.set_signed(probe_zone, False)  # the probe comes back without AD from now on
        world.publish()
        deadline = time.monotonic() + 20
        while "state=degraded" not in daemon.logs() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "state=degraded" in daemon.logs()
        assert answers(daemon, known) == ("OK dane-only", "dane-only")  # known while it validated
        socketmap, exim = answers(daemon, unknown)
        assert socketmap == ("TEMP DANE required but the resolver does not validate DNSSEC "
                             f"({probe_zone.name} TXT: answer without AD: the resolver does not validate DNSSEC)")
        assert exim == "temp" + socketmap[4:]
        world.set_signed(probe_zone, True)
        world.publish()
        deadline = time.monotonic() + 20
        while "state=validating" not in daemon.logs().split("state=degraded")[-1] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert answers(daemon, unknown) == ("OK dane-only", "dane-only")
        assert daemon.logs().count("state=degraded") == 1
    finally:
        daemon.stop()


# ----- what operators see ------------------------------------------------------------------------------


def test_query_shows_the_dane_branch_per_mx_host(world: DnssecWorld, rig: Rig,
                                                 setup: tuple[Daemon, Path]) -> None:
    daemon, config = setup
    domain, _ = two_mx_one_tlsa(world, rig)
    world.publish()
    assert answers(daemon, domain)[0] == "OK dane"
    row = json.loads(run_cli("query", "--config", str(config), "--json", domain).stdout)
    assert row["answer"] == "OK dane" and row["cache"] == "hit"  # the daemon's cache: nothing asked
    dane = row["dane"]
    assert (dane["mode"], dane["state"], dane["applied"], dane["verdict"]) == ("auto", "validating", "dane", "dane")
    assert dane["mx"]["secure"] is True and dane["mx"]["hosts"] == [f"mx1.{domain}", f"mx2.{domain}"]
    first, second = dane["hosts"]
    assert first["address"] == {"secure": True, "addresses": ["127.0.0.40", "::1"], "ttl": 300}
    assert first["tlsa"]["status"] == "secure" and first["tlsa"]["ttl"] == 300
    assert first["tlsa"]["records"] == [{"record": TLSA, "usable": True, "unusable_reason": None}]
    assert second["tlsa"]["status"] == "secure-none" and second["tlsa"]["records"] == []
    text = run_cli("query", "--config", str(config), domain).stdout
    assert f"  dane_host: mx1.{domain} address secure 127.0.0.40 ::1 ttl 300s; tlsa secure ttl 300s" in text
    assert f"  dane_tlsa: mx1.{domain} {TLSA} usable" in text
    assert "  dane: dane (mode auto, resolver validating)" in text
    shown = json.loads(run_cli("cache", "show", domain, "--config", str(config), "--json").stdout)
    assert shown["dane"]["verdict"] == "dane" and shown["dane"]["hosts"] == dane["hosts"]
    shown_text = run_cli("cache", "show", domain, "--config", str(config)).stdout
    assert f"  dane_tlsa: mx1.{domain} {TLSA} usable" in shown_text


def test_survey_shows_dane_beside_mta_sts(world: DnssecWorld, rig: Rig, setup: tuple[Daemon, Path],
                                          tmp_path: Path) -> None:
    _, config = setup
    domains = [dane_and_sts(world, rig)[0], signed_no_tlsa(world, rig)[0], bogus_tlsa(world, rig)[0]]
    world.publish()
    listing = tmp_path / "domains.txt"
    listing.write_text("\n".join(domains) + "\n")
    report = json.loads(run_cli("survey", "--config", str(config), "--format", "json", str(listing)).stdout)
    rows = {row["domain"]: row for row in report["domains"]}
    assert [rows[d]["dane"] for d in domains] == ["dane-only", "none", "temp"]
    assert rows[domains[0]]["mode"] == "enforce" and rows[domains[0]]["dane_mx_secure"] is True
    assert report["summary"]["dane"] == {"dane-only": 1, "dane": 0, "none": 1, "temp": 1}
    markdown = run_cli("survey", "--config", str(config), str(listing)).stdout
    header = markdown.splitlines()[0]
    assert header.endswith("| TLSRPT | MX secure | TLSA | DANE |")
    assert f"| yes | mx.{domains[0]}: secure, 1 of 1 usable | dane-only |" in markdown
    csv_text = run_cli("survey", "--config", str(config), "--format", "csv", str(listing)).stdout
    assert csv_text.splitlines()[0].endswith(",dane,dane_reason,dane_mx_secure,dane_tlsa")


def test_health_and_metrics_count_dane(world: DnssecWorld, rig: Rig, setup: tuple[Daemon, Path]) -> None:
    daemon, config = setup
    port = metrics_port(config)
    before = scrape(port)
    domain, _ = dane_only(world, rig)
    temp, _ = bogus_mx(world, rig)
    world.publish()
    answers(daemon, domain)
    answers(daemon, temp)
    after = scrape(port)
    assert value(after, "mtasts_dane_validating", mode="auto") == 1
    assert value(after, "mtasts_dane_lookups_total", verdict="dane-only") - \
        value(before, "mtasts_dane_lookups_total", verdict="dane-only") == 1
    assert value(after, "mtasts_dane_lookups_total", verdict="temp") > value(before, "mtasts_dane_lookups_total",
                                                                              verdict="temp")
    for frontend in ("socketmap", "exim"):
        assert value(after, "mtasts_dane_answers_total", frontend=frontend, verdict="dane-only") - \
            value(before, "mtasts_dane_answers_total", frontend=frontend, verdict="dane-only") == 1
    assert value(after, "mtasts_lookups_total", frontend="socketmap", answer="TEMP", cache="miss") >= 1
    assert value(after, "mtasts_lookups_total", frontend="exim", answer="temp", cache="hit") >= 1
    health = json.loads(get(port, "/health")[2])
    assert health["dane"]["state"] == "validating" and health["dane"]["probe"] == ". NS"
