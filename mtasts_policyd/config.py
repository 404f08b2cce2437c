"""Configuration: embedded defaults, optionally overridden by a YAML file and command-line flags.

Every key is a dataclass field with its default right here, and the README documents the same
table. Unknown keys and wrong types are errors at start-up: a typo must not silently leave a
default in force.
"""

from __future__ import annotations

import dataclasses
import datetime
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from .discovery import DnsSettings
from .fetch import FetchSettings
from .metrics import parse_metrics_address
from .overrides import Override, OverrideError, make_override
from .postfix import MapOptions
from .resolution import ResolverSettings


class ConfigError(ValueError):
    pass


# Socketmap names served without any configuration, one per Postfix generation.
DEFAULT_MAPS = {
    "postfix": MapOptions(),  # Postfix >= 3.4
    "postfix-sts": MapOptions(sts_attributes=True),  # Postfix >= 3.10.5: exact MX patterns, TLSRPT
    "postfix-legacy": MapOptions(servername=False),  # Postfix 2.10 - 3.3
}


@dataclass(frozen=True)
class SocketmapConfig:
    listen: tuple[str, ...] = ("127.0.0.1:8461",)
    socket_owner: str | None = None  # for unix: listeners, "user" or "user:group"
    socket_mode: str = "0660"
    idle_timeout: float = 60.0
    max_connections: int = 1024
    max_request: int = 10000
    frame_timeout: float = field(default=10.0, metadata={"min": 0.1, "max": 3600})  # first to last byte of a request
    maps: dict[str, MapOptions] = field(default_factory=lambda: dict(DEFAULT_MAPS))


@dataclass(frozen=True)
class EximConfig:
    listen: tuple[str, ...] = ("127.0.0.1:8462",)  # [] turns the Exim listener off
    socket_owner: str | None = None
    socket_mode: str = "0660"
    max_request: int = 1024
    read_timeout: float = 10.0
    max_connections: int = field(default=1024, metadata={"min": 1, "max": 100_000})


@dataclass(frozen=True)
class CacheConfig:
    path: str | None = None  # None: /var/lib/mtasts-policyd/cache.sqlite3 (root) or the XDG state dir
    memory_entries: int = 100_000
    # Pruning (cache.PruneSettings): rows that no longer serve are deleted, so the file stays bounded.
    prune_after: float = field(default=30 * 86400, metadata={"min": 3600})
    negative_grace: float = field(default=86400, metadata={"min": 0})
    max_negative_entries: int = field(default=100_000, metadata={"min": 100})
    prune_interval: float = field(default=600, metadata={"min": 1, "max": 86400})


@dataclass(frozen=True)
class MetricsConfig:
    listen: str | None = None  # None: no metrics listener; "127.0.0.1:9461", a bare port means loopback
    max_connections: int = field(default=64, metadata={"min": 1, "max": 10_000})

    def __post_init__(self) -> None:
        if self.listen is not None:
            try:
                parse_metrics_address(self.listen)
            except ValueError as exc:
                raise ConfigError(f"metrics.listen: {exc}") from None


@dataclass(frozen=True)
class OverrideConfig:
    """overrides: {DOMAIN: {...}} - see README "Overrides"."""

    action: str  # ignore | enforce
    reason: str = ""
    mx: tuple[str, ...] = ()  # for enforce
    mode: str = "enforce"  # for enforce: enforce or testing
    expires: str | None = None  # ISO date or date-time (UTC unless it says otherwise)


@dataclass(frozen=True)
class Config:
    socketmap: SocketmapConfig = SocketmapConfig()
    exim: EximConfig = EximConfig()
    cache: CacheConfig = CacheConfig()
    dns: DnsSettings = DnsSettings()
    fetch: FetchSettings = FetchSettings()
    resolver: ResolverSettings = ResolverSettings()
    overrides: dict[str, OverrideConfig] = field(default_factory=dict)
    metrics: MetricsConfig = MetricsConfig()
    workers: int = 32  # threads for DNS/HTTPS work (concurrent resolutions)
    log_level: str = "info"
    # SIGTERM to exit, always; below systemd's TimeoutStopSec (45 s in contrib/systemd).
    drain_timeout: float = field(default=20.0, metadata={"min": 1, "max": 3600})


def _convert(kind: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if dataclasses.is_dataclass(kind):
        return build(kind, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _convert(next(a for a in args if a is not type(None)), value, where)
    if origin is tuple:
        items = value if isinstance(value, list) else [value]
        return tuple(_convert(args[0], item, f"{where}[]") for item in items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping")
        return {str(k): _convert(args[1], v if v is not None else {}, f"{where}.{k}") for k, v in value.items()}
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is str and isinstance(value, (datetime.date, datetime.datetime)):
        return value.isoformat()  # YAML reads 2026-12-31 as a date
    if kind is str and isinstance(value, (str, int)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{where}: expected {getattr(kind, '__name__', kind)}, got {value!r}")


def build(cls: Any, data: Any, where: str = "config") -> Any:
    """Build dataclass `cls` from a mapping, keeping defaults for keys that are absent."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
    return cls(**{k: _convert(hints[k], v, f"{where}.{k}") for k, v in data.items()})


def load(path: str | None) -> Config:
    if path is None:
        return Config()
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {exc}") from None
    config = build(Config, data)
    override_table(config)  # validate now: a broken override must stop start-up, not a lookup
    return config


def override_table(config: Config) -> dict[str, Override]:
    table: dict[str, Override] = {}
    for domain, item in config.overrides.items():
        try:
            override = make_override(domain, item.action, item.mx, item.reason, item.expires, item.mode)
        except OverrideError as exc:
            raise ConfigError(str(exc)) from None
        table[override.domain] = override
    return table
