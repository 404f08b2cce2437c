"""Listener addresses ("127.0.0.1:8461", "[::1]:8461", "unix:/path") and opening them.

A unix socket path belongs to one daemon at a time: `<path>.lock` is locked (flock) for the
process's lifetime before the socket is bound, so a second daemon on the same path refuses to
start instead of unlinking a live socket. flock rather than a PID file or a connection attempt
alone: the kernel releases it when the holder dies (SIGKILL included), so a stale socket is told
from a live one exactly, and two daemons starting at the same moment cannot both win.
"""

from __future__ import annotations

import asyncio
import fcntl
import grp
import os
import pwd
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Address:
    host: str | None = None
    port: int | None = None
    path: str | None = None  # unix socket

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        return f"[{self.host}]:{self.port}" if self.host and ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str) -> Address:
    """Parse a listener address; ValueError with a message an operator understands."""
    text = text.strip()
    if text.startswith("unix:"):
        path = text[5:]
        if not path.startswith("/"):
            raise ValueError(f"unix socket path must be absolute: {text!r}")
        return Address(path=path)
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = text.rpartition(":")
    if not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"listener must be HOST:PORT, [IPV6]:PORT or unix:/path, not {text!r}")
    return Address(host=host, port=int(port_text))


@dataclass(frozen=True)
class SocketPermissions:
    """Owner and mode of a unix socket, so that a chrooted Postfix or Exim user can connect."""

    owner: str | None = None  # "user" or "user:group"
    mode: int = 0o660


def parse_owner(text: str) -> tuple[int, int]:
    """"user", "user:group" or ":group" -> (uid, gid), -1 for "leave as is"; ValueError if unknown."""
    user, _, group = text.partition(":")
    if not user and not group:
        raise ValueError(f"expected \"user\" or \"user:group\", not {text!r}")
    try:
        uid = pwd.getpwnam(user).pw_uid if user else -1
    except KeyError:
        raise ValueError(f"no such user {user!r}") from None
    try:
        gid = grp.getgrnam(group).gr_gid if group else -1
    except KeyError:
        raise ValueError(f"no such group {group!r}") from None
    return uid, gid


class ListenerInUse(OSError):
    """The unix socket path is served by another live process."""


_claimed: dict[str, int] = {}  # unix socket path -> lock file descriptor, held until the process exits


def _accepts(path: str) -> bool:
    """Whether something accepts connections on the unix socket at `path` now."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2.0)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return False  # a socket file nobody listens on: stale
        except OSError:
            return True  # no answer in time, or not allowed to ask: do not take it
    return True


def claim_socket_path(path: str) -> None:
    """Make `path` ours: lock `<path>.lock`, then remove a stale socket left by a dead process.

    The lock file stays (removing it would let a third process lock a new file while the second
    still holds the old one). Something else still accepting on the path (another program, or a
    daemon of a version without the lock) is refused too.
    """
    if path in _claimed:
        return
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ListenerInUse(f"unix:{path} is in use by another mtasts-policyd (it holds {path}.lock)") from None
    try:
        if os.path.lexists(path):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise OSError(f"{path} exists and is not a socket")
            if _accepts(path):
                raise ListenerInUse(f"unix:{path} is in use by another process (it accepts connections)")
            os.unlink(path)  # a stale socket from a previous run
    except OSError:
        os.close(fd)
        raise
    _claimed[path] = fd


async def open_listener(factory: Callable[[], asyncio.Protocol], address: Address,
                        permissions: SocketPermissions = SocketPermissions()) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    if address.path is None:
        assert address.port is not None  # parse_address gives a port to every non-unix address
        return await loop.create_server(factory, address.host, address.port, reuse_address=True)
    path = address.path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    claim_socket_path(path)
    server = await loop.create_unix_server(factory, path)
    os.chmod(path, permissions.mode)
    if permissions.owner:
        try:
            uid, gid = parse_owner(permissions.owner)
        except ValueError as exc:
            server.close()
            raise OSError(f"socket_owner: {exc}") from None
        os.chown(path, uid, gid)
    return server


class Evictable(Protocol):
    def eviction_rank(self) -> tuple[int, float] | None:
        """None while the connection has a request being answered (never evicted); otherwise a
        sort key, lowest evicted first: (0, since) for a request still arriving, (1, since) idle."""

    def evict(self) -> None:
        """Close the connection to make room (it was chosen by the rank above)."""


class ConnectionSlots:
    """A cap on one listener's open connections that makes room instead of refusing.

    At the cap a newcomer is not turned away, or a few slow or idle clients could lock out every
    new lookup: the connection that ranks lowest (a request still trickling in, then the one idle
    longest) is closed instead. Postfix reconnects transparently on EOF; Exim opens a connection
    per request anyway. Only when every connection has a request being answered is the newcomer
    refused. Event loop thread only.
    """

    def __init__(self) -> None:
        self.open: dict[Evictable, None] = {}  # insertion-ordered; a set with stable iteration
        self.evicted = 0
        self.refused = 0

    def __len__(self) -> int:
        return len(self.open)

    def admit(self, connection: Evictable, limit: int) -> bool:
        """Take `connection` in, evicting others while at `limit`; False: refuse it (close it)."""
        while len(self.open) >= limit:
            ranked = ((rank, i, c) for i, c in enumerate(self.open) if (rank := c.eviction_rank()) is not None)
            victim = min(ranked, default=None)
            if victim is None:
                self.refused += 1
                return False
            del self.open[victim[2]]
            self.evicted += 1
            victim[2].evict()
        self.open[connection] = None
        return True

    def release(self, connection: Evictable) -> None:
        self.open.pop(connection, None)
