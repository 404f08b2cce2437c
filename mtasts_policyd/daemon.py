"""Wiring: build the resolver from a Config, and run the daemon's event loop with its listeners."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable

from . import sdnotify
from .cache import PolicyCache, default_cache_path
from .config import Config, override_table
from .discovery import Discovery
from .exim import EximFrontEnd, EximProtocol, EximSettings
from .fetch import PolicyFetcher
from .listeners import SocketPermissions, open_listener, parse_address
from .metrics import MetricsServer, parse_metrics_address
from .resolution import PolicyResolver, merge
from .service import PolicyService
from .signals import early_hup
from .socketmap import SocketmapFrontEnd, SocketmapProtocol, SocketmapSettings

log = logging.getLogger("mtasts_policyd")


class CacheMissing(Exception):
    """The cache file does not exist and this command does not create one."""


def cache_path(config: Config) -> str:
    return config.cache.path or default_cache_path()


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


def build_resolver(config: Config, *, memory_only: bool = False) -> PolicyResolver:
    """The resolver on the configured cache file, or (memory_only) on an empty cache in memory."""
    discovery = Discovery(config.dns)
    cache = PolicyCache(None if memory_only else cache_path(config), config.cache.memory_entries)
    return PolicyResolver(cache, discovery, PolicyFetcher(discovery, config.fetch), config.resolver,
                          overrides=override_table(config))


def socketmap_settings(config: Config) -> SocketmapSettings:
    c = config.socketmap
    return SocketmapSettings(maps=c.maps, max_request=c.max_request, idle_timeout=c.idle_timeout,
                             max_connections=c.max_connections)


def apply_reload(config: Config, new: Config, resolver: PolicyResolver, front: SocketmapFrontEnd,
                 exim: EximFrontEnd) -> None:
    """SIGHUP: take what can change without closing a connection; say what needs a restart.

    All or nothing: everything is built first (ValueError leaves the daemon untouched), then
    assigned, which cannot fail.
    """
    overrides = override_table(new)
    settings = socketmap_settings(new)
    exim_settings = EximSettings(new.exim.max_request, new.exim.read_timeout)
    level = logging.getLevelName(new.log_level.upper())
    if not isinstance(level, int):
        raise ValueError(f"log_level: unknown level {new.log_level!r}")
    resolver.overrides = overrides
    resolver.settings = new.resolver
    front.settings = settings
    exim.settings = exim_settings
    logging.getLogger().setLevel(level)
    fixed = [name for name in ("cache", "dns", "fetch", "workers") if getattr(config, name) != getattr(new, name)]
    fixed += [f"{name}.listen" for name in ("socketmap", "exim", "metrics")
              if getattr(config, name).listen != getattr(new, name).listen]
    log.info("reloaded configuration: overrides=%d maps=%s%s", len(resolver.overrides),
             ",".join(sorted(front.settings.maps)),
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
    resolver = build_resolver(config)
    service = PolicyService(resolver, workers=config.workers)
    front = SocketmapFrontEnd(service, socketmap_settings(config))
    exim = EximFrontEnd(service, EximSettings(config.exim.max_request, config.exim.read_timeout))
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
    metrics = MetricsServer(resolver.cache, connections=lambda: front.connections)
    metrics_listener = None
    if config.metrics.listen:  # opt-in: no HTTP listener unless configured
        address = parse_metrics_address(config.metrics.listen)
        metrics_listener = await open_listener(metrics.protocol, address)
        log.info("listening metrics=%s", address)
    log.info("socketmap names: %s", ", ".join(sorted(front.settings.maps)))
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
                apply_reload(config, new, resolver, front, exim)
                config = new
            except ValueError as exc:  # ConfigError included: nothing was applied
                log.error("reload failed, keeping the running configuration: %s", exc)
            sdnotify.ready()

    flusher = asyncio.create_task(service.run_flusher())
    keeper = asyncio.create_task(keep_cache(resolver.cache, config.cache.check_interval))
    reloader = asyncio.create_task(reloads())
    sdnotify.ready()  # listeners accept, the cache is open (or known to be memory-only)
    try:
        await stop.wait()
        sdnotify.stopping()
        log.info("stopping: draining lookups in flight")
        metrics.stopping = True  # /health says 503 while the lookups in flight finish
        for server in servers:
            server.close()
        await service.drain()
    finally:
        if metrics_listener is not None:
            metrics_listener.close()
        flusher.cancel()
        keeper.cancel()
        reloader.cancel()
        service.close()
        if resolver.cache.unsaved:
            resolver.cache.maintain(merge)  # a last try to write what the disk refused
        resolver.cache.close()
        log.info("stopped")
