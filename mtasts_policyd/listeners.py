"""Listener addresses ("127.0.0.1:8461", "[::1]:8461", "unix:/path") and opening them."""

from __future__ import annotations

import asyncio
import grp
import os
import pwd
import stat
from collections.abc import Callable
from dataclasses import dataclass


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


async def open_listener(factory: Callable[[], asyncio.Protocol], address: Address,
                        permissions: SocketPermissions = SocketPermissions()) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    if address.path is None:
        assert address.port is not None  # parse_address gives a port to every non-unix address
        return await loop.create_server(factory, address.host, address.port, reuse_address=True)
    path = address.path
    if os.path.exists(path):
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            raise OSError(f"{path} exists and is not a socket")
        os.unlink(path)  # a stale socket from a previous run
    os.makedirs(os.path.dirname(path), exist_ok=True)
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
