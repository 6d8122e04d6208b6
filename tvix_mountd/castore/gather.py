"""Many calls to a backend at once, their answers gathered by key."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

import trio

K = TypeVar("K")
V = TypeVar("V")


async def gather_found(keys: Iterable[K], fetch: Callable[[K], Awaitable[V | None]]) -> dict[K, V]:
    """`fetch(key)` for each distinct key, all at once (one round trip's wait
    for the lot); the answers that are not None, by key. The first exception
    is raised once every call is done."""
    found: dict[K, V] = {}
    errors: list[Exception] = []

    async def one(key: K) -> None:
        try:
            value = await fetch(key)
        except Exception as e:
            errors.append(e)
            return
        if value is not None:
            found[key] = value

    async with trio.open_nursery() as nursery:
        for key in dict.fromkeys(keys):
            nursery.start_soon(one, key)
    if errors:
        raise errors[0]
    return found
