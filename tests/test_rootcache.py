"""The rootcache: its cache logic without gRPC, then the real process on a
unix socket, forked from a thread the way the supervisor starts it.

Every process a test starts is killed by pid when the test ends, however it
ends (the `processes` fixture).
"""

from __future__ import annotations

import ctypes
import hashlib
import multiprocessing
import os
import shutil
import signal
import stat
import tempfile
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing, asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import grpc
import pytest
import trio

from tvix_mountd import procutil
from tvix_mountd.castore.errors import (
    BackendUnavailable,
    IntegrityError,
    StoreError,
    ValidationError,
)
from tvix_mountd.castore.nodes import Node, SymlinkNode, node_to_proto
from tvix_mountd.castore.pathinfo import PathInfo
from tvix_mountd.castore.pathinfos.memory import MemoryPathInfoService
from tvix_mountd.castore.pathinfos.sqlite import SqlitePathInfoService
from tvix_mountd.castore.storepath import StorePath
from tvix_mountd.config import Config, StoreConfig, SupervisorConfig
from tvix_mountd.proto import castore_pb2, rootcache_pb2, rootcache_pb2_grpc
from tvix_mountd.supervisor.rootcache import (
    PARENT_DEATH_SIGNAL,
    RootCache,
    UnknownStoreError,
    rootcache_main,
)
from tvix_mountd.workers.rootcache_client import RootCacheRootNodes, fetch_stats
from tvix_mountd.workers.rootnodes import PathInfoRootNodes, RootNodes

FORK = multiprocessing.get_context("fork")
# Generous for calls meant to succeed (CI machines are shared), short for
# calls meant to give up while the rootcache is down.
TIMEOUT = 10.0
DOWN_TIMEOUT = 0.5
LISTED = 3000
PR_SET_CHILD_SUBREAPER = 36


def basename(n: int, name: str = "pkg") -> bytes:
    return StorePath(hashlib.sha256(b"%d" % n).digest()[:20], f"{name}{n}").basename.encode()


def node(n: int) -> SymlinkNode:
    return SymlinkNode(b"/target/%d" % n)


# The cache logic


class CountingRootNodes(RootNodes):
    """A backend that counts its calls, may take time, and may fail."""

    def __init__(self, nodes: Mapping[bytes, Node], *, delay: float = 0.0) -> None:
        self.nodes = dict(nodes)
        self.delay = delay
        self.fail: StoreError | None = None
        self.calls: Counter[bytes] = Counter()

    async def get_by_basename(self, name: bytes) -> Node | None:
        self.calls[name] += 1
        await trio.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        return self.nodes.get(name)

    async def list(self) -> AsyncIterator[tuple[bytes, Node]]:
        for item in sorted(self.nodes.items()):
            yield item


A, B, C = basename(1), basename(2), basename(3)


def cache_of(backend: RootNodes, *, entries: int = 100, negative_ttl: float = 1.0) -> RootCache:
    return RootCache({"local": backend}, entries=entries, negative_ttl=negative_ttl)


async def test_a_cached_name_is_answered_without_the_backend() -> None:
    backend = CountingRootNodes({A: node(1)})
    cache = cache_of(backend)
    assert await cache.resolve("local", A) == node(1)
    assert await cache.resolve("local", A) == node(1)
    assert cache.cached_node("local", A) == node(1)
    assert backend.calls[A] == 1
    stats = cache.stats()["local"]
    assert (stats.hits, stats.misses, stats.backend_calls, stats.entries) == (2, 1, 1, 1)


async def test_not_found_is_kept_for_the_negative_ttl_only(autojump_clock: trio.abc.Clock) -> None:
    backend = CountingRootNodes({})
    cache = cache_of(backend, negative_ttl=1.0)
    assert await cache.resolve("local", A) is None
    backend.nodes[A] = node(1)  # added to the store after the first lookup
    await trio.sleep(0.9)
    assert await cache.resolve("local", A) is None
    assert cache.cached_node("local", A) is None  # negatives are not positive hits
    assert backend.calls[A] == 1
    await trio.sleep(0.2)
    assert await cache.resolve("local", A) == node(1)
    assert backend.calls[A] == 2
    stats = cache.stats()["local"]
    assert (stats.negative_hits, stats.misses, stats.backend_calls) == (1, 2, 2)


async def test_zero_negative_ttl_asks_every_time() -> None:
    backend = CountingRootNodes({})
    cache = cache_of(backend, negative_ttl=0)
    for _ in range(3):
        assert await cache.resolve("local", A) is None
    assert backend.calls[A] == 3


async def test_the_positive_cache_is_a_bounded_lru() -> None:
    backend = CountingRootNodes({A: node(1), B: node(2), C: node(3)})
    cache = cache_of(backend, entries=2)
    await cache.resolve("local", A)
    await cache.resolve("local", B)
    await cache.resolve("local", A)  # A is now the most recently used
    await cache.resolve("local", C)  # evicts B
    assert cache.stats()["local"].entries == 2
    assert cache.cached_node("local", B) is None
    assert cache.cached_node("local", A) == node(1)
    await cache.resolve("local", B)
    assert backend.calls == Counter({A: 1, B: 2, C: 1})


async def test_backend_errors_are_shared_but_not_cached(autojump_clock: trio.abc.Clock) -> None:
    backend = CountingRootNodes({A: node(1)}, delay=0.1)
    backend.fail = BackendUnavailable("store down")
    cache = cache_of(backend)
    failures: list[str] = []

    async def resolve() -> None:
        try:
            await cache.resolve("local", A)
        except BackendUnavailable as e:
            failures.append(str(e))

    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(resolve)
    assert failures == ["store down"] * 10
    assert backend.calls[A] == 1
    backend.fail = None
    assert await cache.resolve("local", A) == node(1)
    stats = cache.stats()["local"]
    assert (stats.errors, stats.backend_calls, stats.coalesced) == (1, 2, 9)


async def test_concurrent_misses_reach_the_backend_once(autojump_clock: trio.abc.Clock) -> None:
    backend = CountingRootNodes({A: node(1)}, delay=0.1)
    cache = cache_of(backend)
    results: list[Node | None] = []

    async def resolve() -> None:
        results.append(await cache.resolve("local", A))

    async with trio.open_nursery() as nursery:
        for _ in range(100):
            nursery.start_soon(resolve)
    assert results == [node(1)] * 100
    assert backend.calls[A] == 1
    stats = cache.stats()["local"]
    assert (stats.misses, stats.backend_calls, stats.coalesced, stats.hits) == (100, 1, 99, 0)


async def test_unknown_store() -> None:
    cache = RootCache(
        {"a": CountingRootNodes({}), "b": CountingRootNodes({})}, entries=10, negative_ttl=1
    )
    with pytest.raises(UnknownStoreError, match=r"unknown store 'c' \(stores: a, b\)"):
        await cache.resolve("c", A)
    with pytest.raises(UnknownStoreError):
        cache.cached_node("c", A)
    with pytest.raises(UnknownStoreError):
        cache.list("c")  # before iterating
    assert set(cache.stats()) == {"a", "b"}


async def test_a_listing_streams_and_fills_only_free_room() -> None:
    nodes = {A: node(1), B: node(2), C: node(3)}
    backend = CountingRootNodes(nodes)
    cache = cache_of(backend, entries=2)
    assert [item async for item in cache.list("local")] == sorted(nodes.items())
    assert cache.stats()["local"].entries == 2
    first, second, third = sorted(nodes)
    assert await cache.resolve("local", first) == nodes[first]
    assert await cache.resolve("local", second) == nodes[second]
    assert not backend.calls
    assert await cache.resolve("local", third) == nodes[third]
    assert backend.calls == Counter({third: 1})


async def test_path_info_backend_matches_the_whole_basename() -> None:
    service = MemoryPathInfoService()
    await service.put(path_info(1))
    cache = cache_of(PathInfoRootNodes(service))
    assert await cache.resolve("local", basename(1)) == node(1)
    same_hash = basename(1)[:33] + b"other"
    assert await cache.resolve("local", same_hash) is None
    assert await cache.resolve("local", b"not a store path") is None


# The rootcache process, over its socket


def path_info(n: int) -> PathInfo:
    return PathInfo(StorePath.parse(basename(n)), node(n), nar_size=1, nar_sha256=bytes(32))


@pytest.fixture(scope="module")
def store_db() -> Iterator[str]:
    """An embedded sqlite path-info store holding LISTED store paths."""
    directory = tempfile.mkdtemp(prefix="rootcache-db-")

    async def fill() -> None:
        service = SqlitePathInfoService(f"{directory}/pathinfo.sqlite", timeout=TIMEOUT)
        try:
            for n in range(LISTED):
                await service.put(path_info(n))
        finally:
            await service.aclose()

    trio.run(fill)
    yield f"{directory}/pathinfo.sqlite"
    shutil.rmtree(directory)


def process_exit_waiter(pid: int) -> Callable[[], Awaitable[None]]:
    """`await waiter()` returns once `pid` (not necessarily our child) exits.
    Take it while the process runs: a pidfd names that process, never a
    later one with a reused pid."""
    pidfd = os.pidfd_open(pid)

    async def wait() -> None:
        try:
            await trio.lowlevel.wait_readable(pidfd)
        finally:
            os.close(pidfd)

    return wait


def reap_exited(pid: int) -> int:
    """The exit code of `pid`, a child that has exited already."""
    reaped, status = os.waitpid(pid, os.WNOHANG)
    assert reaped == pid, f"{pid} has not exited"
    return os.waitstatus_to_exitcode(status)


def start_from_thread(process: BaseProcess) -> None:
    """Fork from a helper thread that ends at once (DESIGN's recipe for
    forking from trio): the forking thread's end must not stop the child."""
    starter = threading.Thread(target=process.start)
    starter.start()
    starter.join()


@dataclass
class Processes:
    """Everything a test started; killed by pid when the test ends."""

    started: list[BaseProcess] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)

    def kill_all(self) -> None:
        for process in self.started:
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, signal.SIGKILL)
            process.join(5)
        for pid in self.pids:
            if not procutil.main_thread_exited(pid):
                os.kill(pid, signal.SIGKILL)
            with suppress(ChildProcessError):  # reap it if it was adopted by us
                os.waitpid(pid, 0)


@pytest.fixture
def processes() -> Iterator[Processes]:
    tracked = Processes()
    try:
        yield tracked
    finally:
        tracked.kill_all()


@dataclass
class RootCacheHandle:
    config: Config
    socket_path: str
    processes: Processes

    def start(self) -> BaseProcess:
        process = FORK.Process(
            target=rootcache_main, args=(self.config.model_dump_json(), self.socket_path)
        )
        self.processes.started.append(process)
        start_from_thread(process)
        return process

    @asynccontextmanager
    async def client(self, call_timeout: float = TIMEOUT) -> AsyncIterator[RootCacheRootNodes]:
        nodes = RootCacheRootNodes(self.socket_path, "local", timeout=call_timeout)
        try:
            yield nodes
        finally:
            await nodes.aclose()


@pytest.fixture
def socket_dir() -> Iterator[str]:
    # Short: a unix socket path must fit in 108 bytes; pytest's tmp_path may not.
    directory = tempfile.mkdtemp(prefix="rc-")
    try:
        yield directory
    finally:
        shutil.rmtree(directory)


@pytest.fixture
def rootcache(store_db: str, socket_dir: str, processes: Processes) -> RootCacheHandle:
    config = Config(
        supervisor=SupervisorConfig(state_dir=socket_dir),
        stores={
            "local": StoreConfig(
                blob_service_addr="memory://",
                directory_service_addr="memory://",
                path_info_service_addr=f"sqlite://{store_db}",
                backend_timeout=TIMEOUT,
            )
        },
    )
    return RootCacheHandle(config, f"{socket_dir}/rootcache.sock", processes)


async def test_socket_is_owner_only_even_with_a_permissive_umask(
    rootcache: RootCacheHandle,
) -> None:
    old = os.umask(0)  # inherited by the fork
    try:
        rootcache.start()
    finally:
        os.umask(old)
    async with rootcache.client() as client:
        assert await client.get_by_basename(basename(1)) == node(1)
    st = os.stat(rootcache.socket_path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600


async def test_resolve_found_not_found_and_other_names(rootcache: RootCacheHandle) -> None:
    rootcache.start()
    async with rootcache.client() as client:
        assert await client.get_by_basename(basename(7)) == node(7)
        assert await client.get_by_basename(basename(LISTED + 1)) is None
        assert await client.get_by_basename(basename(7)[:33] + b"other-name") is None
        assert await client.get_by_basename(b"not-a-store-path") is None
    wrong_store = RootCacheRootNodes(rootcache.socket_path, "elsewhere", timeout=TIMEOUT)
    try:
        with pytest.raises(StoreError, match="unknown store 'elsewhere'"):
            await wrong_store.get_by_basename(basename(7))
    finally:
        await wrong_store.aclose()


async def test_list_is_complete(rootcache: RootCacheHandle) -> None:
    rootcache.start()
    async with rootcache.client() as client:
        # A listing abandoned early ends its server side without harm.
        async with aclosing(client.list()) as partial:
            async for _ in partial:
                break
        listed = [item async for item in client.list()]
    assert len(listed) == LISTED
    assert dict(listed) == {basename(n): node(n) for n in range(LISTED)}


async def test_concurrent_lookups_over_the_socket_reach_the_backend_once(
    rootcache: RootCacheHandle,
) -> None:
    rootcache.start()
    results: list[Node | None] = []
    async with rootcache.client() as client:
        await client.get_by_basename(basename(1))  # wait until it serves

        async def resolve() -> None:
            results.append(await client.get_by_basename(basename(2)))

        async with trio.open_nursery() as nursery:
            for _ in range(100):
                nursery.start_soon(resolve)
    assert results == [node(2)] * 100
    stats = (await fetch_stats(rootcache.socket_path, timeout=TIMEOUT))["local"]
    assert stats["backend_calls"] == 2  # basename(1), then basename(2) once
    assert stats["hits"] + stats["misses"] == 101
    assert stats["misses"] - stats["coalesced"] == 2
    assert stats["entries"] == 2


async def test_lookup_latency(rootcache: RootCacheHandle) -> None:
    rootcache.start()
    async with rootcache.client() as client:
        name = basename(3)
        assert await client.get_by_basename(name) == node(3)
        times = []
        answers = set()
        for _ in range(1000):
            started = time.perf_counter()
            answers.add(await client.get_by_basename(name))
            times.append(time.perf_counter() - started)
    times.sort()
    p50, p99 = times[len(times) // 2], times[len(times) * 99 // 100]
    print(f"\nrootcache Resolve of a cached name: p50 {p50 * 1e3:.3f} ms, p99 {p99 * 1e3:.3f} ms")
    assert answers == {node(3)}
    stats = (await fetch_stats(rootcache.socket_path, timeout=TIMEOUT))["local"]
    assert (stats["hits"], stats["backend_calls"]) == (1000, 1)


async def test_sigkill_then_restart_serves_again_within_2s(rootcache: RootCacheHandle) -> None:
    first = rootcache.start()
    async with rootcache.client(call_timeout=DOWN_TIMEOUT) as client:
        # The first lookup may wait for the process to listen.
        with trio.fail_after(TIMEOUT):
            while True:
                try:
                    assert await client.get_by_basename(basename(1)) == node(1)
                    break
                except BackendUnavailable:
                    pass
        assert first.pid is not None
        os.kill(first.pid, signal.SIGKILL)
        await trio.to_thread.run_sync(first.join, TIMEOUT)
        assert first.exitcode == -signal.SIGKILL
        assert await trio.Path(rootcache.socket_path).exists()  # stale, left behind

        started = time.monotonic()
        with pytest.raises(BackendUnavailable):
            await client.get_by_basename(basename(2))
        assert time.monotonic() - started >= DOWN_TIMEOUT * 0.9  # it waited first

        rootcache.start()
        restarted = time.monotonic()
        found = None
        while found is None and time.monotonic() - restarted < 2.0:
            # Each attempt waits (up to DOWN_TIMEOUT) for the socket to listen.
            with suppress(BackendUnavailable):
                found = await client.get_by_basename(basename(2))
        recovered = time.monotonic() - restarted
    print(f"\nrootcache restart: serving again {recovered * 1e3:.0f} ms after the new start")
    assert found == node(2)
    assert recovered < 2.0


async def test_sigterm_exits_0_and_removes_the_socket(rootcache: RootCacheHandle) -> None:
    process = rootcache.start()
    async with rootcache.client() as client:
        assert await client.get_by_basename(basename(1)) == node(1)
    assert process.pid is not None
    os.kill(process.pid, signal.SIGTERM)
    await trio.to_thread.run_sync(process.join, TIMEOUT)
    assert process.exitcode == 0
    assert not await trio.Path(rootcache.socket_path).exists()


async def test_the_parent_death_signal_with_the_parent_alive_is_ignored(
    rootcache: RootCacheHandle,
) -> None:
    # The kernel also sends it when the thread that forked the rootcache
    # ends, while the parent lives on.
    process = rootcache.start()
    assert process.pid is not None
    async with rootcache.client() as client:
        assert await client.get_by_basename(basename(1)) == node(1)
        os.kill(process.pid, PARENT_DEATH_SIGNAL)
        # Misses go through the trio loop that handles the signal.
        for n in range(2, 5):
            assert await client.get_by_basename(basename(n)) == node(n)
    assert process.is_alive()
    assert (await fetch_stats(rootcache.socket_path, timeout=TIMEOUT))["local"]["misses"] == 4


async def test_a_second_rootcache_does_not_take_over_a_live_socket(
    rootcache: RootCacheHandle,
) -> None:
    first = rootcache.start()
    async with rootcache.client() as client:
        assert await client.get_by_basename(basename(1)) == node(1)
        second = rootcache.start()
        await trio.to_thread.run_sync(second.join, TIMEOUT)
        assert second.exitcode not in (0, None)
        assert await client.get_by_basename(basename(2)) == node(2)
    assert first.is_alive()


@contextmanager
def adopting_orphans() -> Iterator[None]:
    """Make this process the reaper of orphaned descendants, so a test can
    wait for (and see the exit status of) a grandchild whose parent died."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def _intermediate(config_json: str, socket_path: str, channel: Connection) -> None:
    """A stand-in supervisor. Its helper thread starts the rootcache and lives
    on until the test says the rootcache serves, then ends (as trio's idle
    worker threads do); then this process waits to be killed."""
    rootcache = FORK.Process(target=rootcache_main, args=(config_json, socket_path))

    def start_and_linger() -> None:
        rootcache.start()
        channel.send(rootcache.pid)
        channel.recv()

    starter = threading.Thread(target=start_and_linger)
    starter.start()
    starter.join()
    # join() returns before the kernel is done with the thread; the
    # parent-death signal goes out when it is.
    deadline = time.monotonic() + TIMEOUT
    while os.path.exists(f"/proc/self/task/{starter.native_id}"):
        if time.monotonic() > deadline:
            raise TimeoutError("the starter thread does not end")
        time.sleep(0.01)
    channel.send("thread ended")
    threading.Event().wait()


async def test_the_rootcache_outlives_its_forking_thread_and_dies_with_its_parent(
    rootcache: RootCacheHandle, processes: Processes
) -> None:
    ours, theirs = FORK.Pipe()
    intermediate = FORK.Process(
        target=_intermediate,
        args=(rootcache.config.model_dump_json(), rootcache.socket_path, theirs),
    )
    processes.started.append(intermediate)
    with adopting_orphans():
        start_from_thread(intermediate)
        await _outlive_thread_then_die_with_parent(rootcache, processes, intermediate, ours)


async def _outlive_thread_then_die_with_parent(
    rootcache: RootCacheHandle, processes: Processes, intermediate: BaseProcess, ours: Connection
) -> None:
    async def receive() -> object:
        assert await trio.to_thread.run_sync(ours.poll, TIMEOUT)
        return ours.recv()

    pid = await receive()
    assert isinstance(pid, int)
    processes.pids.append(pid)
    exited = process_exit_waiter(pid)
    async with rootcache.client() as client:
        assert await client.get_by_basename(basename(1)) == node(1)
        ours.send("serving")
        assert await receive() == "thread ended"
        # Misses go through the trio loop that handled the signal.
        for n in range(2, 5):
            assert await client.get_by_basename(basename(n)) == node(n)
    assert not procutil.main_thread_exited(pid)

    assert intermediate.pid is not None
    os.kill(intermediate.pid, signal.SIGKILL)
    with trio.fail_after(TIMEOUT):
        await exited()
    # Orphaned, it was reparented to us (the subreaper), not to init.
    assert reap_exited(pid) == 0  # it stopped cleanly
    assert not await trio.Path(rootcache.socket_path).exists()


# The client against a lying server


class _LyingServicer(rootcache_pb2_grpc.RootCacheServicer):
    """Resolve answers with a node of another name, or an invalid one."""

    def Resolve(
        self, request: rootcache_pb2.ResolveRequest, context: Any
    ) -> rootcache_pb2.ResolveResponse:
        if request.basename == basename(1):
            # A valid node, named after another store path.
            return rootcache_pb2.ResolveResponse(node=node_to_proto(basename(2), node(2)))
        bad = castore_pb2.Node(symlink=castore_pb2.SymlinkNode(name=b"a/b", target=b"/x"))
        return rootcache_pb2.ResolveResponse(node=bad)

    def List(self, request: rootcache_pb2.ListRequest, context: Any) -> Iterator[Any]:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not needed")
        return iter(())

    def Stats(self, request: rootcache_pb2.StatsRequest, context: Any) -> Any:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not needed")


async def test_the_client_checks_answers(socket_dir: str) -> None:
    socket_path = f"{socket_dir}/lying.sock"
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    rootcache_pb2_grpc.add_RootCacheServicer_to_server(_LyingServicer(), server)
    server.add_insecure_port(f"unix://{socket_path}")
    server.start()
    client = RootCacheRootNodes(socket_path, "local", timeout=TIMEOUT)
    try:
        with pytest.raises(IntegrityError, match="named"):
            await client.get_by_basename(basename(1))
        with pytest.raises(ValidationError, match="slash"):
            await client.get_by_basename(basename(3))
    finally:
        await client.aclose()
        server.stop(None)
