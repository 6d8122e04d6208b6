"""Coalescing concurrent calls for one key into one call."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

import outcome
import trio

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class _Call(Generic[V]):
    __slots__ = ("done", "result")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: outcome.Outcome[V] | None = None


class Coalescer(Generic[K, V]):
    """`await run(key, fn)`: while a call for `key` is in flight, later callers
    wait for its outcome (value or exception) instead of calling again."""

    def __init__(self) -> None:
        self._inflight: dict[K, _Call[V]] = {}

    async def run(self, key: K, fn: Callable[[], Awaitable[V]]) -> V:
        while (call := self._inflight.get(key)) is not None:
            await call.done.wait()
            if call.result is not None:
                return call.result.unwrap()
            # The caller doing the work was cancelled: take over.
        call = _Call[V]()
        self._inflight[key] = call
        try:
            value = await fn()
        except Exception as e:
            # Only errors are shared; a cancellation belongs to its own caller.
            call.result = outcome.Error(e)
            raise
        else:
            call.result = outcome.Value(value)
            return value
        finally:
            del self._inflight[key]
            call.done.set()
