"""Configuration: embedded defaults, optionally overridden by a YAML file and command-line flags.

Every key is a dataclass field with its default right here (or in the settings dataclass of the
module that uses it), and the README documents the same table. Unknown keys, wrong types and
values out of range are errors at start-up and on reload, each naming its key: a typo must not
silently leave a default in force, and a bad value must not surface later as a traceback.
Ranges are declared on the fields (`metadata=limits(...)`, see limits.py) and checked by one
walk over every dataclass, `validate()`.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import types
import typing
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, NewType

import yaml

from mtasts_policyd.answers.postfix import MapOptions
from mtasts_policyd.core.limits import (
    limits as limits,  # re-exported: config fields declare their ranges with it
)
from mtasts_policyd.core.overrides import Override, OverrideError, make_override
from mtasts_policyd.frontends.listeners import parse_address, parse_owner
from mtasts_policyd.net.dns import DnsSettings, ip_addresses
from mtasts_policyd.net.https import FetchSettings
from mtasts_policyd.ops.status_http import parse_metrics_address
from mtasts_policyd.resolution.dane import DaneSettings
from mtasts_policyd.resolution.resolver import ResolverSettings


class ConfigError(ValueError):
    pass


LOG_LEVELS = ("debug", "info", "warning", "error")

# Permission bits as octal digits, normalised to four ("0660"); see file_mode().
FileMode = NewType("FileMode", str)


def listener_addresses(values: tuple[str, ...]) -> None:
    for text in values:
        parse_address(text)


def socket_owner(text: str) -> None:
    parse_owner(text)


def metrics_address(text: str) -> None:
    parse_metrics_address(text)


def map_names(maps: dict[str, MapOptions]) -> None:
    """The request is "NAME KEY", split at the first space: a name with a space never matches."""
    for name in maps:
        if not name or any(c.isspace() for c in name):
            raise ValueError(f"map name {name!r} must be a non-empty word without spaces")


# Socketmap names served without any configuration, one per Postfix generation.
DEFAULT_MAPS = {
    "postfix": MapOptions(),  # Postfix >= 3.4
    "postfix-sts": MapOptions(sts_attributes=True),  # Postfix >= 3.10.5: exact MX patterns, TLSRPT
    "postfix-legacy": MapOptions(servername=False),  # Postfix 2.10 - 3.3
}


@dataclass(frozen=True)
class SocketmapConfig:
    listen: tuple[str, ...] = field(default=("127.0.0.1:8461",), metadata=limits(check=listener_addresses))
    # for unix: listeners, "user" or "user:group"
    socket_owner: str | None = field(default=None, metadata=limits(check=socket_owner))
    socket_mode: FileMode = FileMode("0660")
    idle_timeout: float = field(default=60.0, metadata=limits(min=0.1, max=86400))
    max_connections: int = field(default=1024, metadata=limits(min=1, max=1_000_000))
    max_request: int = field(default=10000, metadata=limits(min=256, max=1_048_576))
    # first to last byte of a request
    frame_timeout: float = field(default=10.0, metadata=limits(min=0.1, max=3600))
    maps: dict[str, MapOptions] = field(default_factory=lambda: dict(DEFAULT_MAPS),
                                        metadata=limits(min=1, check=map_names))


@dataclass(frozen=True)
class EximConfig:
    # [] turns the Exim listener off
    listen: tuple[str, ...] = field(default=("127.0.0.1:8462",), metadata=limits(check=listener_addresses))
    socket_owner: str | None = field(default=None, metadata=limits(check=socket_owner))
    socket_mode: FileMode = FileMode("0660")
    max_request: int = field(default=1024, metadata=limits(min=256, max=65536))
    read_timeout: float = field(default=10.0, metadata=limits(min=0.1, max=3600))
    max_connections: int = field(default=1024, metadata=limits(min=1, max=100_000))


REDIS_SCHEMES = ("redis", "rediss", "unix")


def redis_url(text: str) -> None:
    """redis://[user:password@]host[:port][/db], rediss:// (TLS) or unix:///path (redis-py's forms)."""
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in REDIS_SCHEMES or not (parts.hostname or parts.path):
        raise ValueError(f"expected a URL such as redis://127.0.0.1:6379/0 (or rediss://, unix://), got {text!r}")
    try:
        parts.port
    except ValueError:
        raise ValueError(f"bad port in {text!r}") from None


@dataclass(frozen=True)
class RedisConfig:
    """cache.redis: the fleet's shared cache (README "Fleet (Redis)")."""

    url: str = field(default="", metadata=limits(min=1, check=redis_url))  # required
    # reads and invalidations from here (a replica); None: `url`
    read_url: str | None = field(default=None, metadata=limits(check=redis_url))
    read_only: bool = False  # never write (a node on a replica)
    prefix: str = field(default="mtasts:v1:", metadata=limits(min=1, max=100))
    # seconds for connecting and for each reply; then Redis is skipped for a while (circuit breaker)
    timeout: float = field(default=0.2, metadata=limits(min=0.01, max=10))
    # entries are signed with HMAC-SHA256 and unsigned ones ignored; at least 16 characters
    hmac_key: str | None = field(default=None, metadata=limits(min=16, max=1024))
    hmac_key_file: str | None = field(default=None, metadata=limits(min=1))
    # rediss://: the CA bundle that verifies the Redis servers' certificates; None: the system's store
    ca_file: str | None = field(default=None, metadata=limits(min=1))

    def key(self) -> bytes | None:
        """The HMAC key: `hmac_key`, or the first line of `hmac_key_file` (ValueError: unreadable, short)."""
        if self.hmac_key is not None:
            return self.hmac_key.encode()
        if self.hmac_key_file is None:
            return None
        try:
            with open(self.hmac_key_file, encoding="utf-8") as handle:
                text = handle.readline().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cache.redis.hmac_key_file: cannot read {self.hmac_key_file}: {exc}") from None
        if len(text) < 16:
            raise ValueError(f"cache.redis.hmac_key_file: {self.hmac_key_file} holds no key of 16 characters or more")
        return text.encode()


@dataclass(frozen=True)
class CacheConfig:
    # None: /var/lib/mtasts-policyd/cache.sqlite3 (root) or the XDG state dir
    path: str | None = field(default=None, metadata=limits(min=1))
    memory_entries: int = field(default=100_000, metadata=limits(min=1, max=10_000_000))
    # seconds between checks of the file and retries of the entries the disk refused (README "Cache health")
    check_interval: float = field(default=30.0, metadata=limits(min=0.1, max=3600))
    # Pruning (cache.PruneSettings): rows that no longer serve are deleted, so the file stays bounded.
    prune_after: float = field(default=30 * 86400, metadata=limits(min=3600))
    negative_grace: float = field(default=86400, metadata=limits(min=0))
    max_negative_entries: int = field(default=100_000, metadata=limits(min=100))
    prune_interval: float = field(default=600, metadata=limits(min=1, max=86400))
    # None: no fleet; a node alone with its own cache
    redis: RedisConfig | None = None


@dataclass(frozen=True)
class MetricsConfig:
    # None: no metrics listener; "127.0.0.1:9461", a bare port means loopback
    listen: str | None = field(default=None, metadata=limits(check=metrics_address))
    max_connections: int = field(default=64, metadata=limits(min=1, max=10_000))


def mail_address(text: str) -> None:
    """local@domain: the From and envelope sender of TLSRPT reports (RFC 8460 §5.3)."""
    local, at, domain = text.rpartition("@")
    if not (local and at and "." in domain) or any(c.isspace() or c in "<>" for c in text):
        raise ValueError(f"expected a mail address such as tlsrpt-noreply@mail.example.com, got {text!r}")


@dataclass(frozen=True)
class TlsRptDkimConfig:
    """tlsrpt.dkim: - the DKIM key report mail is signed with (RFC 8460 §5.3, README "TLSRPT")."""

    domain: str = field(default="", metadata=limits(min=1))  # d=
    selector: str = field(default="", metadata=limits(min=1))  # s=; its TXT record should say s=tlsrpt
    key_file: str = field(default="", metadata=limits(min=1))  # PEM private key (RSA or Ed25519)


@dataclass(frozen=True)
class TlsRptConfig:
    """tlsrpt: - RFC 8460 reports from the MTA's log (README "TLSRPT")."""

    # None: tlsrpt.sqlite3 beside the cache file
    store: str | None = field(default=None, metadata=limits(min=1))
    # None: the domain of `sender`
    organization_name: str | None = field(default=None, metadata=limits(min=1, max=256))
    # None: `sender`
    contact_info: str | None = field(default=None, metadata=limits(min=1, max=256))
    # None: tlsrpt-noreply@ this host's fully qualified name
    sender: str | None = field(default=None, metadata=limits(check=mail_address))
    # empty: per receiving IP, the source address the routing table picks
    sending_ips: tuple[str, ...] = field(default=(), metadata=limits(check=ip_addresses))
    # None: report mail is not DKIM-signed
    dkim: TlsRptDkimConfig | None = None
    # the command report mail is handed to, split like a shell would; `-i -f SENDER RCPT` is appended
    sendmail: str = field(default="/usr/sbin/sendmail", metadata=limits(min=1))
    # seconds for one https: delivery (connect, send, answer)
    https_timeout: float = field(default=30.0, metadata=limits(min=1, max=600))


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
    dane: DaneSettings = DaneSettings()  # DANE takes precedence (README "DANE")
    overrides: dict[str, OverrideConfig] = field(default_factory=dict)
    metrics: MetricsConfig = MetricsConfig()
    tlsrpt: TlsRptConfig = TlsRptConfig()
    # threads for DNS/HTTPS work (concurrent resolutions)
    workers: int = field(default=32, metadata=limits(min=1, max=1024))
    log_level: str = field(default="info", metadata=limits(choices=LOG_LEVELS))
    # SIGTERM to exit, always; below systemd's TimeoutStopSec (45 s in contrib/systemd).
    drain_timeout: float = field(default=20.0, metadata=limits(min=1, max=3600))


class WrittenInt(int):
    """An integer from YAML that remembers how it was written: YAML 1.1 reads `0660` as 432."""

    text: str

    def __new__(cls, value: int, text: str) -> WrittenInt:
        number = super().__new__(cls, value)
        number.text = text
        return number


class _Loader(yaml.SafeLoader):
    """yaml.safe_load, except that integers are WrittenInt (for file_mode)."""


def _construct_int(loader: _Loader, node: yaml.ScalarNode) -> WrittenInt:
    return WrittenInt(loader.construct_yaml_int(node), node.value)


_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def file_mode(value: Any) -> FileMode:
    """Permission bits read like chmod's operand: the digits as written are octal, quoted or not.

    `"0660"`, `0660` (which YAML 1.1 itself reads as the octal number 432), `660` and `"0o660"`
    all mean rw-rw----. Digits 8 or 9, signs, other bases and modes above 0777 are errors.
    """
    if isinstance(value, WrittenInt):
        text = value.text
    elif isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        text = str(value)
    else:
        raise ValueError(f"expected octal permission bits such as \"0660\", got {value!r}")
    digits = text.strip().lower().removeprefix("0o")
    if not digits or any(c not in "01234567" for c in digits) or int(digits, 8) > 0o777:
        raise ValueError(f"expected octal permission bits from 0000 to 0777 such as \"0660\", got {text!r}")
    return FileMode(f"{int(digits, 8):04o}")


def _convert(kind: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if dataclasses.is_dataclass(kind):
        return build(kind, value, where)
    if kind is FileMode:
        try:
            return file_mode(value)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
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
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return int(value)  # a plain int, not the WrittenInt
    if kind is str and isinstance(value, (datetime.date, datetime.datetime)):
        return value.isoformat()  # YAML reads 2026-12-31 as a date
    if kind is str and isinstance(value, (str, int)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{where}: expected {getattr(kind, '__name__', kind)}, got {value!r}")


def _key(where: str, name: object) -> str:
    return f"{where}.{name}" if where else str(name)


def build(cls: Any, data: Any, where: str = "") -> Any:
    """Build dataclass `cls` from a mapping, keeping defaults for keys that are absent."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
    return cls(**{k: _convert(hints[k], _word(v, fields[k].metadata), _key(where, k)) for k, v in data.items()})


def _word(value: Any, meta: typing.Mapping[str, Any]) -> Any:
    """YAML 1.1 reads an unquoted `off` (`no`, `false`) or `on` as a boolean: for a key whose
    choices include the word (`dane.mode: off`), that is the word the operator wrote."""
    choices = meta.get("choices")
    if isinstance(value, bool) and choices is not None:
        word = "on" if value else "off"
        if word in choices:
            return word
    return value


def _measure(value: Any) -> tuple[float, str] | None:
    """What "min"/"max" bound: a number itself, or the length of a string, sequence or mapping."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value, ""
    if isinstance(value, str):
        return len(value), " characters"
    if isinstance(value, (tuple, list, dict)):
        return len(value), " entries"
    return None


def _check(value: Any, meta: typing.Mapping[str, Any], key: str) -> None:
    """One field against its metadata (limits.py): finite, min, max, choices, check."""
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: must be a finite number, got {value}")
    low, high = meta.get("min"), meta.get("max")
    measured = _measure(value) if low is not None or high is not None else None
    if measured is not None:
        size, unit = measured
        shown = f"{size}{unit}" if unit else repr(value)
        if low is not None and size < low:
            raise ConfigError(f"{key}: must not be empty" if unit and low == 1 and size == 0
                              else f"{key}: must be at least {low}{unit}, got {shown}")
        if high is not None and size > high:
            raise ConfigError(f"{key}: must be at most {high}{unit}, got {shown}")
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}: must be one of {', '.join(map(str, choices))}, got {value!r}")
    check = meta.get("check")
    if check is not None:
        try:
            check(value)
        except ValueError as exc:
            raise ConfigError(f"{key}: {exc}") from None


def _check_pairs(obj: Any, where: str) -> None:
    """Every X_min field with an X_max sibling must not exceed it."""
    names = {f.name for f in dataclasses.fields(obj)}
    for name in names:
        if name.endswith("_min") and f"{name[:-4]}_max" in names:
            low, high = getattr(obj, name), getattr(obj, f"{name[:-4]}_max")
            if low is not None and high is not None and low > high:
                raise ConfigError(f"{_key(where, name)} ({low}) must not exceed {_key(where, name[:-4] + '_max')} "
                                  f"({high})")


def validate(obj: Any, where: str = "") -> None:
    """Check every field of dataclass `obj`, and of the dataclasses inside it (nested settings,
    mapping values such as socketmap.maps.NAME), against the ranges declared on the fields."""
    for f in dataclasses.fields(obj):
        key = _key(where, f.name)
        value = getattr(obj, f.name)
        _check(value, f.metadata, key)
        _validate_inside(value, key)
    _check_pairs(obj, where)


def _validate_inside(value: Any, key: str) -> None:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        validate(value, key)
    elif isinstance(value, dict):
        for name, item in value.items():
            _validate_inside(item, f"{key}.{name}")
    elif isinstance(value, tuple):
        for item in value:
            _validate_inside(item, f"{key}[]")


def checked(config: Config) -> Config:
    """`config` if every key is in range and every override is sound; ConfigError naming the key."""
    validate(config)
    override_table(config)  # a broken override must stop start-up (or a reload), not a lookup
    redis = config.cache.redis
    if redis is not None:
        if redis.hmac_key is not None and redis.hmac_key_file is not None:
            raise ConfigError("cache.redis: hmac_key and hmac_key_file exclude each other")
        try:
            redis.key()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    return config


def load(path: str | None) -> Config:
    if path is None:
        return Config()
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.load(handle, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {exc}") from None
    try:
        return checked(build(Config, data))
    except ConfigError as exc:
        raise ConfigError(f"config {path}: {exc}") from None


def override_table(config: Config) -> dict[str, Override]:
    table: dict[str, Override] = {}
    for domain, item in config.overrides.items():
        try:
            override = make_override(domain, item.action, item.mx, item.reason, item.expires, item.mode)
        except OverrideError as exc:
            raise ConfigError(str(exc)) from None
        table[override.domain] = override
    return table
