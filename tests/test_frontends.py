"""The front-end seam (frontends/base.py): what the daemon knows of a front end, without sockets.

The front ends' protocols are tested against a real daemon in test_socketmap.py and
test_exim_protocol.py; here, the description the daemon registers and what it counts.
"""

from __future__ import annotations

import dataclasses

import pytest

from mtasts_policyd.frontends.base import FrontEndCounters, NoCounts, RunningFrontEnd
from mtasts_policyd.frontends.exim import EximFrontEnd, EximSettings
from mtasts_policyd.frontends.socketmap import SocketmapFrontEnd, SocketmapSettings
from mtasts_policyd.ops.metrics import FrontEndMetrics, Metrics
from mtasts_policyd.runtime.config import Config, EximConfig, SocketmapConfig
from mtasts_policyd.runtime.daemon import FRONT_ENDS


class Service:
    """No lookups happen here: building a front end only keeps its service."""


def test_registered_front_ends_have_their_configuration_sections():
    assert [(f.name, f.section) for f in FRONT_ENDS] == [("socketmap", "socketmap"), ("exim", "exim")]
    config = Config()
    for front_end in FRONT_ENDS:
        section = front_end.section_of(config)
        assert section.listen and section.socket_mode == "0660" and section.max_connections >= 1


def test_start_builds_from_the_section_and_hands_in_the_counters():
    registry = Metrics(f.name for f in FRONT_ENDS)
    config = Config(socketmap=SocketmapConfig(idle_timeout=7.0), exim=EximConfig(read_timeout=3.0))
    built = {f.name: f.start(Service(), config, registry.frontend(f.name)) for f in FRONT_ENDS}  # type: ignore[arg-type]
    assert isinstance(built["socketmap"], SocketmapFrontEnd) and isinstance(built["exim"], EximFrontEnd)
    assert built["socketmap"].settings == SocketmapSettings.from_section(config.socketmap)
    assert built["socketmap"].settings.idle_timeout == 7.0 and built["exim"].settings.read_timeout == 3.0
    assert built["socketmap"].counters is registry.frontends["socketmap"]  # type: ignore[attr-defined]
    assert built["exim"].counters is registry.frontends["exim"]  # type: ignore[attr-defined]
    assert built["socketmap"].summary() == "maps=postfix,postfix-legacy,postfix-sts"
    assert built["exim"].summary() == ""


def test_reload_checks_first_and_applies_later():
    front_end = FRONT_ENDS[0]
    running: RunningFrontEnd[SocketmapSettings] = front_end.start(Service(), Config(), NoCounts())  # type: ignore[arg-type]
    before = running.settings
    apply = front_end.reload(running, Config(socketmap=SocketmapConfig(frame_timeout=5.0)))
    assert running.settings is before  # nothing changes until the whole reload was checked
    apply()
    assert running.settings.frame_timeout == 5.0

    class Broken:
        socketmap = object()  # a section without the keys: the check fails, nothing is applied

    with pytest.raises(AttributeError):
        front_end.reload(running, Broken())
    assert running.settings.frame_timeout == 5.0


def test_metrics_labels_come_from_the_registered_names():
    registry = Metrics(f.name for f in FRONT_ENDS)
    text = registry.render()
    for front_end in FRONT_ENDS:  # every series of a registered front end is there from the start
        assert f'mtasts_protocol_errors_total{{frontend="{front_end.name}"}} 0\n' in text
        assert f'mtasts_lookup_seconds_count{{frontend="{front_end.name}"}} 0\n' in text
    # A new front end is a new label value, nothing else.
    registry.frontend("dane").protocol_error()
    assert 'mtasts_protocol_errors_total{frontend="dane"} 1\n' in registry.render()


def test_front_end_metrics_are_front_end_counters():
    counters: FrontEndCounters = FrontEndMetrics("exim")
    counters.answered("error", None, 0.5)
    counters.protocol_error()
    assert isinstance(counters, FrontEndMetrics)
    assert counters.lookups == {("error", "none"): 1} and counters.protocol_errors == 1


def test_settings_defaults_match_the_configuration_defaults():
    # The front ends' own defaults (used when built without a configuration) are the documented ones.
    socketmap = dataclasses.asdict(SocketmapSettings.from_section(SocketmapConfig()))
    assert {k: v for k, v in socketmap.items() if k != "maps"} == \
        {k: v for k, v in dataclasses.asdict(SocketmapSettings()).items() if k != "maps"}
    assert EximSettings.from_section(EximConfig()) == EximSettings()
