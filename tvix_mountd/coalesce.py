"""Coalescing concurrent calls for one key into one call."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

import trio

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class _Call(Generic[V]):
    __slots__ = ("done", "error", "finished", "value")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.finished = False
        self.value: V | None = None
        self.error: Exception | None = None


class Coalescer(Generic[K, V]):
    """`await run(key, fn)`: while a call for `key` is in flight, later callers
    wait for its outcome (value or exception) instead of calling again."""

    def __init__(self) -> None:
        self._inflight: dict[K, _Call[V]] = {}

    def inflight(self) -> int:
        return len(self._inflight)

    async def run(self, key: K, fn: Callable[[], Awaitable[V]]) -> V:
        while (call := self._inflight.get(key)) is not None:
            await call.done.wait()
            if call.error is not None:
                raise call.error
            if call.finished:
                return call.value  # type: ignore[return-value]  # V may include None
            # The caller doing the work was cancelled: take over.
        call = _Call[V]()
        self._inflight[key] = call
        try:
            value = await fn()
        except Exception as e:
            # Only errors are shared; a cancellation belongs to its own caller.
            call.error = e
            raise
        else:
            call.value = value
            call.finished = True
            return value
        finally:
            del self._inflight[key]
            call.done.set()
