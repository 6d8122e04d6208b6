"""Calling blocking backends (sqlite, files, grpcio) from trio with a deadline.

One home for the rule that a backend call that makes no progress for
`timeout` seconds fails: the trio side stops waiting (the thread is abandoned
and finishes on its own), and the caller gets BackendUnavailable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import trio

from tvix_mountd.castore.errors import BackendUnavailable

T = TypeVar("T")

DEFAULT_TIMEOUT = 10.0

# Enough threads for many concurrent FUSE requests to wait on a slow backend
# at once without starving each other; one limiter per trio run.
_LIMITER: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar("blocking_limiter")


def _limiter() -> trio.CapacityLimiter:
    try:
        return _LIMITER.get()
    except LookupError:
        limiter = trio.CapacityLimiter(64)
        _LIMITER.set(limiter)
        return limiter


# The deadline is a parameter (not the caller's cancel scope) because it is the
# store's configured backend_timeout, applied to every call the same way.
async def run_blocking(
    fn: Callable[..., T],
    *args: object,
    timeout: float,  # noqa: ASYNC109
    what: str,
) -> T:
    """Run `fn(*args)` in a worker thread; BackendUnavailable after `timeout` s."""
    try:
        with trio.fail_after(timeout):
            return await trio.to_thread.run_sync(
                fn, *args, abandon_on_cancel=True, limiter=_limiter()
            )
    except trio.TooSlowError:
        raise BackendUnavailable(f"{what}: no answer within {timeout:g} s") from None
