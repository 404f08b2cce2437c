"""What every test server shares: loopback only, and a lifetime after which it stops itself."""

from __future__ import annotations

import ipaddress
import threading
from typing import Any


def require_loopback(host: str) -> None:
    """Refuse non-loopback addresses so a test can never talk to the outside world."""
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"test servers may only bind loopback addresses, not {host!r}")


class BoundedServer:
    """Start/stop bookkeeping: subclasses bind in `_serve()` and release in `_shutdown()`."""

    def __init__(self, host: str, port: int, lifetime: float) -> None:
        require_loopback(host)
        self.host = host
        self.port = port
        self.lifetime = lifetime
        self._stopping = threading.Event()
        self._timer: threading.Timer | None = None

    def _serve(self) -> None:
        raise NotImplementedError

    def _shutdown(self) -> None:
        raise NotImplementedError

    def start(self) -> Any:
        self._serve()
        # Watchdog: a forgotten server must not outlive the test session.
        self._timer = threading.Timer(self.lifetime, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        """Idempotent and callable from any thread (the watchdog's included)."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self._timer is not None:
            self._timer.cancel()
        self._shutdown()

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
