"""systemd readiness notifications (sd_notify(3)) without a dependency.

A datagram of newline-separated VAR=VALUE assignments to the unix socket named by $NOTIFY_SOCKET
(a path, or "@name" for the abstract namespace). Without the variable (not run by systemd with
Type=notify) nothing is sent. A failure is logged and ignored: readiness is a courtesy to the
service manager, never a reason to stop serving.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("mtasts_policyd.sdnotify")


def notify(*assignments: str) -> bool:
    """Send e.g. notify("READY=1"); True if a service manager was told."""
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return False
    if target.startswith("@"):
        address = "\0" + target[1:]  # abstract namespace
    elif target.startswith("/"):
        address = target
    else:
        log.warning("sd_notify: NOTIFY_SOCKET=%r is not a unix socket path; not notifying", target)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(assignments).encode())
    except OSError as exc:
        log.warning("sd_notify %s to %s failed: %s", " ".join(assignments), target, exc)
        return False
    return True


def ready() -> bool:
    return notify("READY=1")


def reloading() -> bool:
    """RELOADING=1 with the CLOCK_MONOTONIC time, which Type=notify-reload (systemd >= 253) requires
    and older versions ignore; READY=1 must follow when the reload is done."""
    return notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")


def stopping() -> bool:
    return notify("STOPPING=1")
