"""Calling blocking backends (sqlite, files, grpcio) from trio with a deadline.

One home for the rule that a backend call that makes no progress for
`timeout` seconds fails: the trio side stops waiting (the thread is abandoned
and finishes on its own), and the caller gets BackendUnavailable. A call that
shows no result until it ends has a plain deadline (`run_blocking`); one
that reports progress, such as a download, has `ProgressDeadline`.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Awaitable, Callable, Iterator
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
    """A deadline on waiting for a thread that pushes it back whenever it
    makes progress: a download that keeps arriving never hits it, one that
    stalls for `timeout` seconds does.

    The thread calls `progressed()` after each piece of work (a network read,
    say); at most four times per `timeout` that costs a hop into trio, which
    moves the deadline of the wait going on now (`watching`) to `timeout`
    from then.
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

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """The waits of the block under the deadline: cancelled, and
        BackendUnavailable, once no progress came for `timeout` seconds."""
        with trio.CancelScope(deadline=trio.current_time() + self._timeout) as scope:
            self._scope = scope
            try:
                yield
            finally:
                self._scope = None
        if scope.cancelled_caught:
            raise BackendUnavailable(f"{self._what}: no progress for {self._timeout:g} s")


async def past_caller_deadline(fn: Callable[[], Awaitable[T]]) -> T:
    """`await fn()` to its end, even if the caller's deadline passes meanwhile.

    For calls that bound themselves by progress (a download under a
    ProgressDeadline): a caller's deadline on the total time would fail one
    that is still arriving. A cancellation before that deadline (a shutdown)
    still cancels `fn`; one after it waits for `fn`, which ends by itself once
    it stalls.
    """
    deadline = trio.current_effective_deadline()
    if deadline == math.inf:
        return await fn()
    results: list[T] = []
    errors: list[Exception] = []

    async def cancel_before_deadline(work: trio.CancelScope) -> None:
        try:
            await trio.sleep_forever()
        finally:
            # Woken by the caller's cancellation (or by `fn` finishing): only
            # one that is not the deadline passing reaches `fn`.
            if trio.current_time() < deadline:
                work.cancel()

    try:
        async with trio.open_nursery() as nursery:
            with trio.CancelScope(shield=True) as work:
                nursery.start_soon(cancel_before_deadline, work)
                try:
                    results.append(await fn())
                except Exception as e:
                    errors.append(e)
                nursery.cancel_scope.cancel()
    except BaseException:
        # The nursery re-raises the caller's cancellation once `fn` is done;
        # what `fn` returned or raised is the answer all the same (a pending
        # cancellation strikes again at the caller's next checkpoint).
        if not results and not errors:
            raise
    if errors:
        raise errors[0]
    return results[0]
