"""Wiring: build the resolver from a Config, and run the daemon's event loop with its listeners."""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

from mtasts_policyd.frontends import exim, socketmap
from mtasts_policyd.frontends.base import FrontEnd, ListenerSection, RunningFrontEnd
from mtasts_policyd.frontends.listeners import (
    SocketPermissions,
    open_listener,
    parse_address,
)
from mtasts_policyd.net.dns import DnsDiscovery
from mtasts_policyd.net.dnssec import DnssecResolver, resolver_addresses
from mtasts_policyd.net.https import PolicyFetcher
from mtasts_policyd.ops.metrics import Metrics
from mtasts_policyd.ops.status_http import MetricsServer, parse_metrics_address
from mtasts_policyd.ops.tlsrpt_policy import PolicyFailureRecorder
from mtasts_policyd.resolution.dane import DaneCounters, DaneGate, Notes, not_on_loopback
from mtasts_policyd.resolution.fleet import Fleet
from mtasts_policyd.resolution.resolver import PolicyResolver, ResolutionCounters
from mtasts_policyd.resolution.service import PolicyService
from mtasts_policyd.resolution.workers import in_thread
from mtasts_policyd.runtime import sdnotify
from mtasts_policyd.runtime.config import Config, override_table
from mtasts_policyd.runtime.signals import early_hup
from mtasts_policyd.store.base import PruneSettings
from mtasts_policyd.store.cache import PolicyCache
from mtasts_policyd.store.entry import merge
from mtasts_policyd.store.redis import RedisLevel
from mtasts_policyd.store.sqlite import default_cache_path
from mtasts_policyd.store.tlsrpt_store import TlsRptStore, TlsRptStoreError, default_store_path

log = logging.getLogger("mtasts_policyd")

# The front ends the daemon serves (frontends/base.py): each opens the listeners of its
# configuration section, and its name labels its metrics. A new front end is one line here.
FRONT_ENDS: tuple[FrontEnd[Any], ...] = (socketmap.FRONT_END, exim.FRONT_END)

# A front end as it runs: its description, and the object its connections share.
Served = Sequence[tuple[FrontEnd[Any], RunningFrontEnd[Any]]]


class CacheMissing(Exception):
    """The cache file does not exist and this command does not create one."""


def cache_path(config: Config) -> str:
    return config.cache.path or default_cache_path()


def tlsrpt_store_path(config: Config) -> str:
    """`tlsrpt.store`, else `tlsrpt.sqlite3` beside the cache (README "TLSRPT")."""
    return config.tlsrpt.store or default_store_path(cache_path(config))


def open_tlsrpt_recorder(config: Config) -> PolicyFailureRecorder | None:
    """The daemon records its own policy failures (ops/tlsrpt_policy.py) when `tlsrpt.store` is set,
    or when the store exists at its default path (`tlsrpt ingest` made it): a daemon whose operator
    does not use TLSRPT makes no file. A store that cannot be opened is logged; serving goes on."""
    path = tlsrpt_store_path(config)
    if config.tlsrpt.store is None and not os.path.exists(path):
        return None
    try:
        recorder = PolicyFailureRecorder(TlsRptStore(path))
    except TlsRptStoreError as exc:
        log.error("tlsrpt store not used, policy failures are not recorded: %s", exc)
        return None
    log.info("tlsrpt store=%s records policy failures", path)
    return recorder


def require_cache(config: Config) -> str:
    """The cache file's path; CacheMissing if it does not exist.

    Only `serve` and `cache import` create the cache. Any other command that found no file would
    make an empty one where the daemon does not look (a typo in --cache, a wrong --config), work
    on it, and report success: silently, forever, from cron.
    """
    path = cache_path(config)
    if not os.path.exists(path):
        raise CacheMissing(f"no cache file at {path} (wrong --cache or --config? `serve` creates it)")
    return path


def build_resolver(config: Config, *, memory_only: bool = False,
                   counters: ResolutionCounters | None = None) -> PolicyResolver:
    """The resolver on the configured cache file, or (memory_only) on an empty cache in memory;
    `counters`: where it counts fetches and outcomes (the daemon's metrics; None counts nothing)."""
    discovery = DnsDiscovery(config.dns)
    cache = PolicyCache(None if memory_only else cache_path(config), config.cache.memory_entries)
    return PolicyResolver(cache, discovery, PolicyFetcher(discovery, config.fetch), config.resolver,
                          overrides=override_table(config), counters=counters)


def attach_fleet(config: Config, resolver: PolicyResolver, *, listen: bool = False) -> Fleet | None:
    """The fleet's shared level (`cache.redis`, README "Fleet (Redis)") for the resolver, or None
    without one; `listen`: merge other nodes' writes as they come (the daemon). Nothing is asked
    here: a Redis that is down is found out, and skipped, at the first resolution."""
    settings = config.cache.redis
    if settings is None:
        return None
    level = open_level(config)
    assert level is not None
    # The lock outlives one fetch a little: a holder that died frees the domain after it.
    fleet = Fleet(level, resolver, lock_ttl=config.fetch.timeout + 1.0, node=level.node)
    resolver.fleet = fleet
    if listen:
        level.listen(fleet.invalidated)
    log.info("redis url=%s read_url=%s read_only=%s prefix=%s node=%s", redacted(settings.url),
             redacted(settings.read_url or settings.url), settings.read_only, settings.prefix, level.node)
    return fleet


def open_level(config: Config) -> RedisLevel | None:
    """The shared level of `cache.redis` (nothing is asked yet), or None without one."""
    settings = config.cache.redis
    if settings is None:
        return None
    return RedisLevel(settings.url, read_url=settings.read_url, read_only=settings.read_only,
                      prefix=settings.prefix, timeout=settings.timeout, hmac_key=settings.key(),
                      ca_file=settings.ca_file)


def redacted(url: str) -> str:
    """The URL without its password, for the logs."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not at:
        return url
    user = userinfo.partition(":")[0]
    return f"{scheme}{sep}{user}:***@{host}" if ":" in userinfo else url


def build_dane(config: Config, counters: DaneCounters | None = None, notes: Notes | None = None) -> DaneGate:
    """DANE for the daemon and `query` (README "DANE"): the `dane` settings, questions to the
    resolver of the `dns` section, which must validate DNSSEC; `notes`: the cache, which keeps
    the trust probe's last word across restarts."""
    identity = f"{','.join(resolver_addresses(config.dns))}@{config.dns.port}"
    return DaneGate(config.dane, DnssecResolver(config.dns), counters, notes, identity)


async def start_dane(gate: DaneGate, config: Config) -> None:
    """Before the first lookup: say when the resolver is not on this machine (its AD bit crosses a
    network), and know DANE's state from the first answer on: the probe's last word from before a
    recent restart, else the probe asked now."""
    if gate.mode == "off":
        return
    addresses = resolver_addresses(config.dns)
    for address in not_on_loopback(addresses):
        log.warning("dane resolver=%s is not on loopback: the AD bit it sets could be forged on the way; run a "
                    "validating resolver on this machine and point dns.nameservers (or resolv.conf) at it", address)
    if not addresses:
        log.warning("dane resolver: none configured (dns.nameservers empty, nothing in /etc/resolv.conf)")
    if not gate.restore(time.time()):
        await gate.probe_now()


def listener_section(config: Config, front_end: FrontEnd[Any]) -> ListenerSection:
    section: ListenerSection = front_end.section_of(config)
    return section


def prune_settings(config: Config) -> PruneSettings:
    """What the daemon and `warm` prune from the cache (README "Cache size")."""
    c = config.cache
    return PruneSettings(prune_after=c.prune_after, negative_grace=c.negative_grace,
                         max_negative_entries=c.max_negative_entries)


def raise_open_files_limit(config: Config) -> None:
    """Every connection, DNS query in flight and HTTPS fetch is a file descriptor; the soft limit
    (often 1024) is raised to the hard one, and a budget of the configured bounds that does not
    fit is logged, so that accept() failing with EMFILE is foreseen rather than met."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    sections = [listener_section(config, front_end) for front_end in FRONT_ENDS]
    budget = (sum(section.max_connections * len(section.listen) for section in sections)
              + config.metrics.max_connections + config.resolver.max_pending + 2 * config.workers + 64)
    if soft != resource.RLIM_INFINITY and budget > soft:
        log.warning("open files limit %d is below what the configured bounds may use (%d: connections, "
                    "resolver.max_pending, workers); raise LimitNOFILE or lower them", soft, budget)


def apply_reload(config: Config, new: Config, resolver: PolicyResolver, served: Served, *,
                 metrics: MetricsServer | None = None, service: PolicyService | None = None) -> None:
    """SIGHUP: take what can change without closing a connection; say what needs a restart.

    All or nothing: everything is built first (ValueError leaves the daemon untouched), then
    assigned, which cannot fail.
    """
    overrides = override_table(new)
    front_ends = [front_end.reload(running, new) for front_end, running in served]
    pruning = prune_settings(new)
    level = logging.getLevelName(new.log_level.upper())
    if not isinstance(level, int):
        raise ValueError(f"log_level: unknown level {new.log_level!r}")
    resolver.overrides = overrides
    resolver.settings = new.resolver
    if resolver.dane is not None:
        resolver.dane.reload(new.dane)
    for apply in front_ends:
        apply()
    if metrics is not None:
        metrics.max_connections = new.metrics.max_connections
    if service is not None:
        service.prune_settings, service.prune_interval = pruning, new.cache.prune_interval
    logging.getLogger().setLevel(level)
    fixed = [name for name in ("dns", "fetch", "workers") if getattr(config, name) != getattr(new, name)]
    fixed += [f"cache.{name}" for name in ("path", "memory_entries", "redis")
              if getattr(config.cache, name) != getattr(new.cache, name)]
    fixed += [f"{name}.listen" for name in (*(front_end.section for front_end, _ in served), "metrics")
              if getattr(config, name).listen != getattr(new, name).listen]
    summaries = "".join(f" {summary}" for _, running in served if (summary := running.summary()))
    log.info("reloaded configuration: overrides=%d%s%s", len(resolver.overrides), summaries,
             f"; changes to {', '.join(fixed)} take effect after a restart" if fixed else "")


async def keep_cache(cache: PolicyCache, interval: float) -> None:
    """Check the cache file and write what the disk refused, off the event loop (README "Cache
    health"); the first check at once, so a file that is unusable from the start is seen."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            await loop.run_in_executor(None, cache.maintain, merge)
        except Exception as exc:  # the keeper must outlive any surprise
            log.error("cache check failed: %r", exc)
        await asyncio.sleep(interval)


async def run(config: Config, reload: Callable[[], Config] | None = None) -> None:
    """Serve until SIGTERM/SIGINT; then stop accepting, finish lookups in flight, and exit.

    SIGHUP re-reads the configuration through `reload` and applies it to the running daemon.
    The signal handlers come first: a SIGHUP while the listeners open is applied once the daemon
    is ready (sd_notify READY=1), never its default action (the end of the process).
    """
    stop = asyncio.Event()
    hup = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, hup.set)
    if early_hup():  # arrived before the event loop (signals.catch_early_hup)
        hup.set()
    raise_open_files_limit(config)
    registry = Metrics(front_end.name for front_end in FRONT_ENDS)  # counters handed to what counts
    resolver = build_resolver(config, counters=registry)
    fleet = attach_fleet(config, resolver, listen=True)
    resolver.dane = dane = build_dane(config, registry, resolver.cache)
    resolver.policy_failures = recorder = open_tlsrpt_recorder(config)
    await start_dane(dane, config)
    service = PolicyService(resolver, workers=config.workers)
    service.prune_settings, service.prune_interval = prune_settings(config), config.cache.prune_interval
    served = [(front_end, front_end.start(service, config, registry.frontend(front_end.name)))
              for front_end in FRONT_ENDS]
    servers = []
    for front_end, running in served:
        section = listener_section(config, front_end)
        permissions = SocketPermissions(section.socket_owner, int(section.socket_mode, 8))
        for text in section.listen:
            address = parse_address(text)
            servers.append(await open_listener(running.protocol, address, permissions))
            log.info("listening %s=%s", front_end.name, address)
    metrics = MetricsServer(resolver.cache, registry, max_connections=config.metrics.max_connections,
                            listeners={front_end.name: running.slots for front_end, running in served},
                            pending=lambda: service.pending, dropped=lambda: service.dropped, dane=dane.status,
                            tlsrpt=recorder.store if recorder is not None else None,
                            fleet=fleet.status if fleet is not None else None)
    metrics_listener = None
    if config.metrics.listen:  # opt-in: no HTTP listener unless configured
        address = parse_metrics_address(config.metrics.listen)
        metrics_listener = await open_listener(metrics.protocol, address)
        log.info("listening metrics=%s", address)
    for front_end, running in served:
        if summary := running.summary():
            log.info("%s %s", front_end.name, summary)
    log.info("cache path=%s persistent=%s", resolver.cache.path, resolver.cache.persistent)
    log.info("trust store=%s", resolver.trust)
    for note in resolver.trust.notes:
        log.warning("trust store note: %s", note)

    async def reloads() -> None:
        nonlocal config
        while True:
            await hup.wait()
            hup.clear()
            sdnotify.reloading()
            try:
                new = reload() if reload is not None else config
                apply_reload(config, new, resolver, served, metrics=metrics, service=service)
                config = new
            except ValueError as exc:  # ConfigError included: nothing was applied
                log.error("reload failed, keeping the running configuration: %s", exc)
            sdnotify.ready()

    flusher = asyncio.create_task(service.run_flusher())
    keeper = asyncio.create_task(keep_cache(resolver.cache, config.cache.check_interval))
    reloader = asyncio.create_task(reloads())
    pruner = asyncio.create_task(service.run_pruner())
    prober = asyncio.create_task(dane.run_prober())
    sdnotify.ready()  # listeners accept, the cache is open (or known to be memory-only)
    deadline: float | None = None
    try:
        await stop.wait()
        sdnotify.stopping()
        deadline = loop.time() + config.drain_timeout
        log.info("stopping: draining lookups in flight for up to %gs", config.drain_timeout)
        metrics.stopping = True  # /health says 503 while the lookups in flight finish
        for server in servers:
            server.close()
        await service.drain(deadline)
    finally:
        if metrics_listener is not None:
            metrics_listener.close()
        flusher.cancel()
        keeper.cancel()
        reloader.cancel()
        pruner.cancel()
        prober.cancel()
        service.close()
        await close_cache(resolver.cache, deadline)
        if fleet is not None:
            fleet.level.close()
        if recorder is not None:
            recorder.store.close()
        log.info("stopped")


async def close_cache(cache: PolicyCache, deadline: float | None) -> None:
    """Close the cache under its lock, so no worker thread left in DNS or HTTPS can touch the file
    afterwards, and exit without waiting for those threads (workers.py). Within the drain deadline:
    a close stuck behind another process's write lock is left to SQLite's crash safety (WAL)."""
    def last_write_and_close() -> None:
        if cache.unsaved:
            cache.maintain(merge)  # a last try to write what the disk refused
        cache.close()

    closing = in_thread(last_write_and_close)
    try:
        timeout = None if deadline is None else max(deadline - asyncio.get_running_loop().time(), 0.5)
        await asyncio.wait_for(asyncio.shield(closing), timeout)
    except asyncio.TimeoutError:
        log.warning("stopping: the cache did not close within the drain timeout; exiting anyway")
