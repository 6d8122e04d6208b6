"""Calling blocking backends (sqlite, files, grpcio) from trio with a deadline.

One home for the rule that a backend call that makes no progress for
`timeout` seconds fails: the trio side stops waiting (the thread is abandoned
and finishes on its own), and the caller gets BackendUnavailable. A call that
shows no result until it ends has a plain deadline (`run_blocking`); one
that reports progress, such as a download, has `ProgressDeadline`.
"""

from __future__ import annotations

import contextlib
import time
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


class ProgressDeadline:
    """A deadline for blocking calls that their worker thread pushes back
    whenever it makes progress: a download that keeps arriving never hits it,
    one that stalls for `timeout` seconds does.

    The thread calls `progressed()` after each piece of work (a network read,
    say); at most four times per `timeout` that costs a hop into trio, which
    moves the deadline of the call running now to `timeout` from then.
    """

    def __init__(self, timeout: float, what: str) -> None:
        self._timeout = timeout
        self._what = what
        self._token = trio.lowlevel.current_trio_token()
        self._scope: trio.CancelScope | None = None
        self._next_push = 0.0

    def progressed(self) -> None:
        """Called in the worker thread (never in trio's) when work got done."""
        now = time.monotonic()
        if now < self._next_push:
            return
        self._next_push = now + self._timeout / 4
        # RunFinishedError: trio is gone; nobody waits for this thread any more.
        with contextlib.suppress(trio.RunFinishedError):
            trio.from_thread.run_sync(self._push, trio_token=self._token)

    def _push(self) -> None:
        if self._scope is not None:
            self._scope.deadline = trio.current_time() + self._timeout

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """`fn(*args)` in a worker thread; BackendUnavailable once it made no
        progress for `timeout` seconds (the thread is abandoned then)."""
        with trio.CancelScope(deadline=trio.current_time() + self._timeout) as scope:
            self._scope = scope
            try:
                return await trio.to_thread.run_sync(
                    fn, *args, abandon_on_cancel=True, limiter=_limiter()
                )
            finally:
                self._scope = None
        raise BackendUnavailable(f"{self._what}: no progress for {self._timeout:g} s")
