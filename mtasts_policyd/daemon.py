"""Wiring: build the resolver from a Config, and run the daemon's event loop with its listeners."""

from __future__ import annotations

import asyncio
import logging
import resource
import signal
from collections.abc import Callable

from .cache import PolicyCache, PruneSettings, default_cache_path
from .config import Config, ConfigError, override_table
from .discovery import Discovery
from .exim import EximFrontEnd, EximProtocol, EximSettings
from .fetch import PolicyFetcher
from .listeners import SocketPermissions, open_listener, parse_address
from .metrics import MetricsServer, parse_metrics_address
from .resolution import PolicyResolver
from .service import PolicyService
from .socketmap import SocketmapFrontEnd, SocketmapProtocol, SocketmapSettings
from .workers import in_thread

log = logging.getLogger("mtasts_policyd")


def build_resolver(config: Config) -> PolicyResolver:
    discovery = Discovery(config.dns)
    cache = PolicyCache(config.cache.path or default_cache_path(), config.cache.memory_entries)
    return PolicyResolver(cache, discovery, PolicyFetcher(discovery, config.fetch), config.resolver,
                          overrides=override_table(config))


def socketmap_settings(config: Config) -> SocketmapSettings:
    c = config.socketmap
    return SocketmapSettings(maps=c.maps, max_request=c.max_request, idle_timeout=c.idle_timeout,
                             max_connections=c.max_connections, frame_timeout=c.frame_timeout)


def exim_settings(config: Config) -> EximSettings:
    c = config.exim
    return EximSettings(max_request=c.max_request, read_timeout=c.read_timeout, max_connections=c.max_connections)


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
    budget = (config.socketmap.max_connections * len(config.socketmap.listen)
              + config.exim.max_connections * len(config.exim.listen)
              + config.metrics.max_connections + config.resolver.max_pending + 2 * config.workers + 64)
    if soft != resource.RLIM_INFINITY and budget > soft:
        log.warning("open files limit %d is below what the configured bounds may use (%d: connections, "
                    "resolver.max_pending, workers); raise LimitNOFILE or lower them", soft, budget)


def apply_reload(config: Config, new: Config, resolver: PolicyResolver, front: SocketmapFrontEnd,
                 exim: EximFrontEnd, *, metrics: MetricsServer | None = None,
                 service: PolicyService | None = None) -> None:
    """SIGHUP: take what can change without closing a connection; say what needs a restart."""
    resolver.overrides = override_table(new)
    resolver.settings = new.resolver
    front.settings = socketmap_settings(new)
    exim.settings = exim_settings(new)
    if metrics is not None:
        metrics.max_connections = new.metrics.max_connections
    if service is not None:
        service.prune_settings, service.prune_interval = prune_settings(new), new.cache.prune_interval
    logging.getLogger().setLevel(new.log_level.upper())
    fixed = [name for name in ("dns", "fetch", "workers") if getattr(config, name) != getattr(new, name)]
    fixed += [f"cache.{name}" for name in ("path", "memory_entries")
              if getattr(config.cache, name) != getattr(new.cache, name)]
    fixed += [f"{name}.listen" for name in ("socketmap", "exim", "metrics")
              if getattr(config, name).listen != getattr(new, name).listen]
    log.info("reloaded configuration: overrides=%d maps=%s%s", len(resolver.overrides),
             ",".join(sorted(front.settings.maps)),
             f"; changes to {', '.join(fixed)} take effect after a restart" if fixed else "")


async def run(config: Config, reload: Callable[[], Config] | None = None) -> None:
    """Serve until SIGTERM/SIGINT; then stop accepting, finish lookups in flight, and exit.

    SIGHUP re-reads the configuration through `reload` and applies it to the running daemon.
    """
    raise_open_files_limit(config)
    resolver = build_resolver(config)
    service = PolicyService(resolver, workers=config.workers)
    service.prune_settings, service.prune_interval = prune_settings(config), config.cache.prune_interval
    front = SocketmapFrontEnd(service, socketmap_settings(config))
    exim = EximFrontEnd(service, exim_settings(config))
    servers = []
    for kind, listen, owner, mode, factory in (
            ("socketmap", config.socketmap.listen, config.socketmap.socket_owner, config.socketmap.socket_mode,
             lambda: SocketmapProtocol(front)),
            ("exim", config.exim.listen, config.exim.socket_owner, config.exim.socket_mode,
             lambda: EximProtocol(exim))):
        for text in listen:
            address = parse_address(text)
            servers.append(await open_listener(factory, address, SocketPermissions(owner, int(mode, 8))))
            log.info("listening %s=%s", kind, address)
    metrics = MetricsServer(resolver.cache, connections=lambda: front.connections,
                            max_connections=config.metrics.max_connections,
                            listeners={"socketmap": front.slots, "exim": exim.slots}, pending=lambda: service.pending)
    metrics_listener = None
    if config.metrics.listen:  # opt-in: no HTTP listener unless configured
        address = parse_metrics_address(config.metrics.listen)
        metrics_listener = await open_listener(metrics.protocol, address)
        log.info("listening metrics=%s", address)
    log.info("socketmap names: %s", ", ".join(sorted(front.settings.maps)))
    log.info("cache path=%s persistent=%s", resolver.cache.path, resolver.cache.persistent)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def on_hup() -> None:
        nonlocal config
        if reload is None:
            return
        try:
            new = reload()
        except (ConfigError, ValueError) as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
            return
        apply_reload(config, new, resolver, front, exim, metrics=metrics, service=service)
        config = new

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    flusher = asyncio.create_task(service.run_flusher())
    pruner = asyncio.create_task(service.run_pruner())
    deadline: float | None = None
    try:
        await stop.wait()
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
        pruner.cancel()
        service.close()
        await close_cache(resolver.cache, deadline)
        log.info("stopped")


async def close_cache(cache: PolicyCache, deadline: float | None) -> None:
    """Close the cache under its lock, so no worker thread left in DNS or HTTPS can touch the file
    afterwards, and exit without waiting for those threads (workers.py). Within the drain deadline:
    a close stuck behind another process's write lock is left to SQLite's crash safety (WAL)."""
    closing = in_thread(cache.close)
    try:
        timeout = None if deadline is None else max(deadline - asyncio.get_running_loop().time(), 0.5)
        await asyncio.wait_for(asyncio.shield(closing), timeout)
    except asyncio.TimeoutError:
        log.warning("stopping: the cache did not close within the drain timeout; exiting anyway")
