"""SIGHUP before the daemon's event loop takes over.

SIGHUP's default action ends the process, and between exec and the event loop's own handler lie
the imports (a few hundred milliseconds) and the configuration. `catch_early_hup()` runs first
thing (`__main__`): a SIGHUP from then on is remembered, and the daemon applies it as a reload
once it is ready (`early_hup()`). Python cannot act before its interpreter has started; under
systemd (Type=notify) no reload is sent before READY=1 anyway.
"""

from __future__ import annotations

import os
import signal
from types import FrameType

_pending = False


def _remember(signum: int, frame: FrameType | None) -> None:
    global _pending
    _pending = True


def catch_early_hup() -> None:
    signal.signal(signal.SIGHUP, _remember)


def early_hup() -> bool:
    """Whether a SIGHUP arrived since catch_early_hup(); asking clears it."""
    global _pending
    pending, _pending = _pending, False
    return pending


def restore_hup() -> None:
    """For the commands that do not reload: SIGHUP is a hangup again, and one already received ends us."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    if early_hup():
        os.kill(os.getpid(), signal.SIGHUP)
