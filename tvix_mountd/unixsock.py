"""Unix socket paths our servers listen on: taking one over, giving it back."""

from __future__ import annotations

import contextlib
import os
import socket
import stat


class SocketPathError(OSError):
    """The path cannot be listened on (busy, or not a socket)."""


def clear_stale_socket(path: str) -> None:
    """Remove a socket left by a process that died; refuse a live one or a non-socket.

    The probe connects: a dead server's socket file refuses the connection.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketPathError(f"{path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            pass  # nobody listens: stale
        else:
            raise SocketPathError(f"another process is listening on {path}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def inode_of(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def remove_if_ours(path: str, inode: int | None) -> None:
    """Unlink `path` only if it is still the socket we bound (`inode`): a
    successor may already listen on the same path."""
    if inode is not None and inode_of(path) == inode:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
