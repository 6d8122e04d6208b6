"""Coalescer: one backend call per key while it is in flight."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from tvix_mountd.coalesce import Coalescer


async def test_concurrent_callers_share_one_call() -> None:
    coalescer: Coalescer[str, int] = Coalescer()
    calls = 0

    async def work() -> int:
        nonlocal calls
        calls += 1
        await trio.sleep(0.01)
        return 42

    results: list[int] = []

    async def call() -> None:
        results.append(await coalescer.run("k", work))

    async with trio.open_nursery() as nursery:
        for _ in range(100):
            nursery.start_soon(call)
    assert results == [42] * 100
    assert calls == 1
    assert coalescer.inflight() == 0


async def test_errors_are_shared_and_not_remembered() -> None:
    coalescer: Coalescer[str, int] = Coalescer()
    calls = 0

    async def fail() -> int:
        nonlocal calls
        calls += 1
        await trio.sleep(0.01)
        raise ValueError("backend down")

    errors: list[str] = []

    async def call() -> None:
        try:
            await coalescer.run("k", fail)
        except ValueError as e:
            errors.append(str(e))

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(call)
    assert errors == ["backend down"] * 5
    assert calls == 1
    with pytest.raises(ValueError):
        await coalescer.run("k", fail)
    assert calls == 2


async def test_a_waiter_takes_over_when_the_caller_is_cancelled() -> None:
    coalescer: Coalescer[str, str] = Coalescer()
    started = trio.Event()
    leader_scope = trio.CancelScope()

    async def slow() -> str:
        started.set()
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def fast() -> str:
        return "done"

    async def leader() -> None:
        with leader_scope:
            await coalescer.run("k", slow)

    result: list[str] = []

    async def waiter() -> None:
        result.append(await coalescer.run("k", fast))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(leader)
        await started.wait()
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert result == []  # waiting on the leader's call
        leader_scope.cancel()
    assert result == ["done"]
