"""Giving memory that malloc holds free back to the system."""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from tvix_mountd.libc import libc


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = libc().malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None
    return trim


_MALLOC_TRIM: Final = _malloc_trim()


def release_free_memory() -> None:
    """glibc's malloc_trim(0): free memory of every arena back to the system,
    pages in the middle of a heap too (about a millisecond for a heap of
    60 MB). For after a burst of short-lived allocations, such as decoding a
    large Directory: freed, they would stay in the process's RSS. Nothing
    where libc has no malloc_trim."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
