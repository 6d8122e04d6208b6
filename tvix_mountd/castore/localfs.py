"""Directories of the embedded store's files (blob roots, sqlite files), and
making what was written to them durable."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from typing import Any, Final

from tvix_mountd.libc import libc


def make_dirs(path: str, mode: int) -> None:
    """Create directory `path` and its missing parents, every one with `mode`
    (os.makedirs gives only the last one the mode asked for). Another process
    creating one of them at the same time is fine. Not durable by itself: a
    store's `sync` covers new directories too."""
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    for directory in reversed(missing):
        try:
            os.mkdir(directory, mode)
        except FileExistsError:
            if not os.path.isdir(directory):
                raise


def _libc_function(name: str, argtypes: list[type[ctypes._SimpleCData[int]]]) -> Any:
    # Python's os module has neither syncfs (Linux 2.6.39, glibc 2.14) nor
    # sync_file_range (Linux 2.6.17, glibc 2.6); libc has both.
    try:
        function = getattr(libc(), name)
    except (OSError, AttributeError):
        return None
    function.argtypes = argtypes
    function.restype = ctypes.c_int
    return function


_SYNCFS: Final[Callable[[int], int] | None] = _libc_function("syncfs", [ctypes.c_int])
_SYNC_FILE_RANGE: Final[Callable[[int, int, int, int], int] | None] = _libc_function(
    "sync_file_range", [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
)
_SYNC_FILE_RANGE_WRITE: Final = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing `length` bytes of file `fd` from `offset` to the disk, and
    return without waiting (sync_file_range(2) with SYNC_FILE_RANGE_WRITE).

    Not a durability step (that is `sync_filesystem`); it lets the disk work
    while a large file is still being written, so that the one sync at the
    end has less left to do. Best effort: nothing happens where it is not
    available, and an error is left for the sync to report.
    """
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def sync_filesystem(path: str) -> None:
    """Make everything written to the file system holding `path` durable:
    file contents, new names and renames, by any process.

    One syncfs(2) instead of an fsync per file and per directory: the writes
    it covers reach the disk in one batch. Since Linux 5.8 it also reports a
    writeback error of any file on it since it was opened here (OSError).
    Without syncfs (not Linux, or no such libc function), sync(2), which
    covers every file system and reports nothing, is the fallback.
    """
    if _SYNCFS is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _SYNCFS(fd) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"syncfs: {os.strerror(errno)}", path)
    finally:
        os.close(fd)
