"""Configuration checks (README "Configuration"): every key's type and range, at start and on
reload, with one line naming the key; a reload is all or nothing; socket_mode as written."""

from __future__ import annotations

import dataclasses
import os
import signal
import stat
import time

import pytest
import yaml

from mtasts_policyd.core.limits import limits
from mtasts_policyd.runtime.config import (
    Config,
    ConfigError,
    build,
    file_mode,
    load,
    validate,
)
from mtasts_policyd.runtime.daemon import apply_reload
from tests.conftest import Daemon, SocketmapClient, free_port, secure
from tests.conftest import run_cli as run

# (YAML text, the key the one-line message must name, a word of the reason)
BAD = [
    ("workers: 0\n", "workers", "at least 1"),
    ("workers: 1.5\n", "workers", "expected int"),
    ("workers: true\n", "workers", "expected int"),
    ("log_level: verbose\n", "log_level", "one of debug, info, warning, error"),
    ("socketmap: {max_connections: 0}\n", "socketmap.max_connections", "at least 1"),
    ("socketmap: {maps: {}}\n", "socketmap.maps", "must not be empty"),
    ("socketmap: {maps: {'two words': {}}}\n", "socketmap.maps", "without spaces"),
    ("socketmap: {idle_timeout: -1}\n", "socketmap.idle_timeout", "at least 0.1"),
    ("socketmap: {idle_timeout: .inf}\n", "socketmap.idle_timeout", "finite"),
    ("socketmap: {max_request: 10}\n", "socketmap.max_request", "at least 256"),
    ("socketmap: {listen: ['127.0.0.1:70000']}\n", "socketmap.listen", "HOST:PORT"),
    ("socketmap: {listen: ['127.0.0.1:0']}\n", "socketmap.listen", "HOST:PORT"),
    ("socketmap: {socket_mode: '0999'}\n", "socketmap.socket_mode", "octal"),
    ("socketmap: {socket_mode: 01777}\n", "socketmap.socket_mode", "0777"),
    ("socketmap: {socket_mode: 0x1b0}\n", "socketmap.socket_mode", "octal"),
    ("socketmap: {socket_owner: no-such-user-mtasts}\n", "socketmap.socket_owner", "no such user"),
    ("exim: {listen: [nonsense]}\n", "exim.listen", "HOST:PORT"),
    ("exim: {read_timeout: 0}\n", "exim.read_timeout", "at least 0.1"),
    ("exim: {socket_mode: rw}\n", "exim.socket_mode", "octal"),
    ("cache: {path: ''}\n", "cache.path", "must not be empty"),
    ("cache: {memory_entries: 0}\n", "cache.memory_entries", "at least 1"),
    ("cache: {check_interval: 0}\n", "cache.check_interval", "at least 0.1"),
    ("dns: {port: 70000}\n", "dns.port", "at most 65535"),
    ("dns: {timeout: -5}\n", "dns.timeout", "at least 0.1"),
    ("dns: {timeout: .nan}\n", "dns.timeout", "finite"),
    ("dns: {nameservers: [localhost]}\n", "dns.nameservers", "not an IP address"),
    ("fetch: {port: 0}\n", "fetch.port", "at least 1"),
    ("fetch: {timeout: .nan}\n", "fetch.timeout", "finite"),
    ("fetch: {max_size: 0}\n", "fetch.max_size", "at least 1024"),
    ("fetch: {ca_file: /nonexistent/ca.pem}\n", "fetch.ca_file", "not a readable file"),
    ("resolver: {backoff_min: 4000}\n", "resolver.backoff_min", "must not exceed resolver.backoff_max"),
    ("resolver: {refresh_after: 0}\n", "resolver.refresh_after", "at least 60"),
    ("resolver: {negative_ttl_min: -1}\n", "resolver.negative_ttl_min", "at least 1"),
    ("metrics: {listen: '127.0.0.1:99999'}\n", "metrics.listen", "HOST:PORT"),
    ("tlsrpt: {store: ''}\n", "tlsrpt.store", "must not be empty"),
    ("tlsrpt: {sender: postmaster}\n", "tlsrpt.sender", "mail address"),
    ("tlsrpt: {sender: 'a b@example.com'}\n", "tlsrpt.sender", "mail address"),
    ("tlsrpt: {sending_ips: [mail.example.com]}\n", "tlsrpt.sending_ips", "not an IP address"),
    ("tlsrpt: {organization_name: ''}\n", "tlsrpt.organization_name", "must not be empty"),
    ("tlsrpt: {colour: blue}\n", "tlsrpt", "unknown key(s) colour"),
    ("dane: {mode: strict}\n", "dane.mode", "one of auto, require, off"),
    ("dane: {probe: 'example.test'}\n", "dane.probe", "'NAME TYPE'"),
    ("dane: {ttl_min: 7200}\n", "dane.ttl_min", "must not exceed dane.ttl_max"),
]


@pytest.mark.parametrize("command", [["serve"], ["query", "example.test"]])
def test_bad_values_stop_start_with_one_line_naming_the_key(tmp_path, command):
    path = tmp_path / "bad.yaml"
    for text, key, reason in BAD:
        path.write_text(text)
        result = run(*command, "--config", str(path))
        message = result.stderr.strip()
        assert result.returncode == 2, (text, result.stderr)
        assert "\n" not in message and "Traceback" not in message, (text, message)
        assert f"config {path}: {key}" in message and reason in message, (text, message)


def test_command_line_values_are_checked_too(tmp_path):
    result = run("serve", "--socketmap", "127.0.0.1:99999", "--cache", str(tmp_path / "c.sqlite3"))
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "socketmap.listen" in result.stderr and "Traceback" not in result.stderr


def test_defaults_and_examples_are_valid(tmp_path):
    validate(Config())
    path = tmp_path / "ok.yaml"
    path.write_text("workers: 1\nsocketmap: {max_connections: 1, idle_timeout: 0.1}\n"
                    "resolver: {txt_ttl_min: 1, txt_ttl_max: 1}\ncache: {check_interval: 0.1}\n")
    config = load(str(path))
    assert config.workers == 1 and type(config.workers) is int and config.resolver.txt_ttl_max == 1
    path.write_text("dane: {mode: off}\n")  # YAML 1.1 reads the unquoted word as false
    assert load(str(path)).dane.mode == "off"


@pytest.mark.parametrize(("written", "mode"), [
    ('"0660"', "0660"), ("0660", "0660"),  # YAML 1.1 reads the unquoted one as the octal number 432
    ("660", "0660"), ('"660"', "0660"), ('"0o660"', "0660"),
    ("0600", "0600"), ("440", "0440"), ("0", "0000"), ("777", "0777"),
])
def test_socket_mode_is_the_octal_digits_as_written(tmp_path, written, mode):
    path = tmp_path / "c.yaml"
    path.write_text(f"socketmap: {{socket_mode: {written}}}\nexim: {{socket_mode: {written}}}\n")
    config = load(str(path))
    assert config.socketmap.socket_mode == mode and config.exim.socket_mode == mode


def test_file_mode_rejects_what_is_not_permission_bits():
    for value in ("0999", "1777", "-0660", "", "0x1b0", True, 1.5, None, "rw-rw----"):
        with pytest.raises(ValueError):
            file_mode(value)


def test_metadata_of_other_helpers_is_read():
    # A plain dict with the same keys as limits() works, as does a field with only some keys.
    @dataclasses.dataclass(frozen=True)
    class Section:
        a: int = dataclasses.field(default=5, metadata={"min": 1})
        b: str = dataclasses.field(default="x", metadata={"choices": ("x", "y")})
        c: float = dataclasses.field(default=1.0, metadata=limits(max=2))

    validate(Section())
    for data, message in [({"a": 0}, "section.a: must be at least 1"), ({"b": "z"}, "section.b: must be one of x, y"),
                          ({"c": 3}, "section.c: must be at most 2")]:
        with pytest.raises(ConfigError, match=message):
            validate(build(Section, data, "section"), "section")


def test_apply_reload_changes_nothing_when_any_part_is_bad(rig, make_resolver):
    # All or nothing even for a Config built without validate(): the log level is checked
    # before the overrides (or anything else) are replaced.
    from mtasts_policyd.frontends import exim as exim_module
    from mtasts_policyd.frontends import socketmap
    from mtasts_policyd.frontends.exim import EximFrontEnd
    from mtasts_policyd.frontends.socketmap import SocketmapFrontEnd
    from mtasts_policyd.resolution.service import PolicyService

    resolver = make_resolver()
    old = {"keep.test": object()}
    resolver.overrides = old  # type: ignore[assignment]
    service = PolicyService(resolver, workers=1)
    front, exim = SocketmapFrontEnd(service), EximFrontEnd(service)
    settings = front.settings
    new = Config(overrides={}, log_level="verbose", workers=2)
    with pytest.raises(ValueError, match="log_level"):
        apply_reload(Config(), new, resolver, [(socketmap.FRONT_END, front), (exim_module.FRONT_END, exim)])
    assert resolver.overrides is old and front.settings is settings
    service.close()


def _wait_for(daemon: Daemon, text: str) -> None:
    deadline = time.monotonic() + 15
    while text not in daemon.logs():
        assert time.monotonic() < deadline, daemon.logs()
        time.sleep(0.05)


def test_reload_with_a_bad_log_level_keeps_the_old_overrides(rig, start_daemon):
    ignored = rig.domain()
    rig.publish(ignored)
    daemon = start_daemon(overrides={ignored: {"action": "ignore", "reason": "ticket 7"}})
    client = SocketmapClient(daemon.port)
    assert client.ask(ignored) == "NOTFOUND "
    data = yaml.safe_load(daemon.config_path.read_text())
    good = dict(data)
    data["overrides"] = {}
    data["log_level"] = "verbose"
    daemon.config_path.write_text(yaml.safe_dump(data))
    daemon.process.send_signal(signal.SIGHUP)
    _wait_for(daemon, "reload failed")
    assert "reload failed, keeping the running configuration: config" in daemon.logs()
    assert "log_level: must be one of debug, info, warning, error, got 'verbose'" in daemon.logs()
    assert client.ask(ignored) == "NOTFOUND "  # the override is still in force
    assert f"answer=NOTFOUND domain={ignored} cache=override" in daemon.logs()  # and info still logs
    good["overrides"] = {}
    daemon.config_path.write_text(yaml.safe_dump(good))
    daemon.process.send_signal(signal.SIGHUP)
    _wait_for(daemon, "reloaded configuration: overrides=0")
    assert client.ask(ignored) == "OK " + secure(ignored)
    assert daemon.logs().count("reload failed") == 1


def test_reload_with_workers_zero_is_refused_and_a_start_says_why(rig, start_daemon):
    domain = rig.domain()
    rig.publish(domain)
    daemon = start_daemon()
    good = daemon.config_path.read_text()
    data = yaml.safe_load(good)
    data["workers"] = 0
    daemon.config_path.write_text(yaml.safe_dump(data))
    daemon.process.send_signal(signal.SIGHUP)
    _wait_for(daemon, "reload failed")
    assert "workers: must be at least 1, got 0" in daemon.logs()
    assert SocketmapClient(daemon.port).ask(domain) == "OK " + secure(domain)
    assert daemon.stop() == 0
    result = run("serve", "--config", str(daemon.config_path))  # the next start with that file
    assert result.returncode == 2 and "workers: must be at least 1, got 0" in result.stderr
    assert "Traceback" not in result.stderr
    daemon.config_path.write_text(good)
    restarted = start_daemon()
    assert SocketmapClient(restarted.port).ask(domain) == "OK " + secure(domain)


def test_unquoted_socket_modes_give_those_modes(rig, tmp_path):
    # `socket_mode: 0640` unquoted is 0640 (not 0o432 nor 0o1200); `600` is 0600 as for chmod.
    socketmap, exim, port = tmp_path / "s.sock", tmp_path / "e.sock", free_port()
    data = rig.config(tmp_path / "cache.sqlite3")
    text = yaml.safe_dump(data) + (f"socketmap:\n  listen: ['unix:{socketmap}', '127.0.0.1:{port}']\n"
                                   f"  socket_mode: 0640\nexim:\n  listen: ['unix:{exim}']\n  socket_mode: 600\n")
    path = tmp_path / "modes.yaml"
    path.write_text(text)
    daemon = Daemon(path, port, tmp_path / "modes.log").start()
    try:
        assert stat.S_IMODE(os.stat(socketmap).st_mode) == 0o640
        assert stat.S_IMODE(os.stat(exim).st_mode) == 0o600
    finally:
        assert daemon.stop() == 0
