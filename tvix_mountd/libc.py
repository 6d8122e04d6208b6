"""The C library, for the calls Python's os module lacks (prctl, mount,
umount2, syncfs, sync_file_range, malloc_trim)."""

from __future__ import annotations

import ctypes
import functools


@functools.cache
def libc() -> ctypes.CDLL:
    """The C library, with errno kept (ctypes.get_errno): the symbols this
    process has loaded, libc's among them (CPython links it). One handle for
    every caller, found without `ctypes.util.find_library`, which runs
    ldconfig in a subprocess on each call (twice in every worker's start)."""
    return ctypes.CDLL(None, use_errno=True)
