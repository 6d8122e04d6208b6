"""The rootcache: one process that resolves store path basenames to root nodes
for every worker, over gRPC on a unix socket (tvix.mountd.v1.RootCache).

Store paths never change, so positive answers are kept (a bounded LRU per
store) for as long as the process lives, and they outlive worker restarts.
"Not found" is kept only `negative_ttl` seconds, so a path added later shows
up soon. Concurrent misses for one name become one backend call.

Two halves:

- `RootCache`: the cache itself, plain trio code, testable without gRPC.
- the gRPC server: grpcio's sync server (its own thread pool). A name that
  is cached is answered right in the gRPC thread: the hop into trio would
  cost about as much as the rest of the call, and lookups of cached names
  are the hot path. Everything else (misses, negative answers, listings)
  hops into the trio loop of the process's main thread with
  `trio.from_thread`, where backends and coalescing live. A lock, held only
  for dict operations, keeps the two sides consistent.

`rootcache_main` is the entry point of the process the supervisor forks.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import multiprocessing
import os
import signal
import threading
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Final, NoReturn, TypeVar

import grpc
import trio

from tvix_mountd import procutil
from tvix_mountd.castore import pathinfos
from tvix_mountd.castore.addr import is_nix_cache
from tvix_mountd.castore.errors import BackendUnavailable, StoreError
from tvix_mountd.castore.nodes import Node, node_to_proto
from tvix_mountd.castore.pathinfos import PathInfoService
from tvix_mountd.castore.store import Store
from tvix_mountd.coalesce import Coalescer
from tvix_mountd.config import Config
from tvix_mountd.grpc_server import serve_unix
from tvix_mountd.proto import rootcache_pb2, rootcache_pb2_grpc
from tvix_mountd.workers.rootnodes import PathInfoRootNodes, RootNodes

log = logging.getLogger(__name__)

T = TypeVar("T")

# Threads serving RPCs. Each one only waits for the trio loop, so they are
# cheap; enough that many workers' lookups (and a slow listing or two) do not
# queue behind each other.
RPC_THREADS: Final = 32
# Entries one trio hop hands to a List stream: few hops for a big listing,
# little held at a time.
LIST_BATCH: Final = 256
# The parent-death signal. The kernel sends it when the *thread* that forked
# us ends, and a parent that forks from a helper thread lives on after that
# thread; so on this signal we check getppid() before leaving, which a
# SIGTERM (a real stop request) must never need. Its default action is to be
# ignored, so one arriving before trio listens cannot kill us either; a
# parent that died then is caught by the getppid() checks around it.
PARENT_DEATH_SIGNAL: Final = signal.SIGURG
# A Resolve that accepts `pending` is answered so at the latest after this
# many seconds (or half the client's deadline), while the resolution goes on.
PENDING_AFTER: Final = 5.0


class UnknownStoreError(LookupError):
    """A request named a store the rootcache does not serve."""


@dataclass
class StoreStats:
    """Counters of one store; the fields of rootcache.proto's StoreStats."""

    hits: int = 0
    negative_hits: int = 0
    misses: int = 0
    backend_calls: int = 0
    coalesced: int = 0
    errors: int = 0
    entries: int = 0

    def to_proto(self) -> rootcache_pb2.StoreStats:
        return rootcache_pb2.StoreStats(**{f.name: getattr(self, f.name) for f in fields(self)})


@dataclass
class _StoreCache:
    backend: RootNodes
    capacity: int
    negative_ttl: float
    positive: OrderedDict[bytes, Node] = field(default_factory=OrderedDict)
    # basename -> expiry. The TTL is constant, so insertion order is expiry
    # order and expired entries are always at the front.
    negative: OrderedDict[bytes, float] = field(default_factory=OrderedDict)
    coalescer: Coalescer[bytes, Node | None] = field(default_factory=Coalescer)
    stats: StoreStats = field(default_factory=StoreStats)
    # Guards the two dicts and `stats`; never held across an await.
    lock: threading.Lock = field(default_factory=threading.Lock)

    def hit(self, name: bytes) -> Node | None:
        with self.lock:
            node = self.positive.get(name)
            if node is not None:
                self.positive.move_to_end(name)
                self.stats.hits += 1
            return node

    def cached(self, name: bytes, now: float) -> tuple[bool, Node | None]:
        node = self.hit(name)
        if node is not None:
            return True, node
        with self.lock:
            expiry = self.negative.get(name)
            if expiry is not None:
                if expiry > now:
                    self.stats.negative_hits += 1
                    return True, None
                del self.negative[name]
            return False, None

    def remember(self, name: bytes, node: Node | None, now: float) -> None:
        with self.lock:
            if node is None:
                self._remember_absent(name, now)
                return
            self.negative.pop(name, None)
            if self.capacity == 0:
                return
            self.positive[name] = node
            self.positive.move_to_end(name)
            if len(self.positive) > self.capacity:
                self.positive.popitem(last=False)

    def _remember_absent(self, name: bytes, now: float) -> None:
        while self.negative and next(iter(self.negative.values())) <= now:
            self.negative.popitem(last=False)
        # entries = 0 turns caching off altogether.
        if self.negative_ttl <= 0 or self.capacity == 0:
            return
        self.negative[name] = now + self.negative_ttl
        self.negative.move_to_end(name)
        # Random names must not grow memory without bound within one TTL.
        if len(self.negative) > self.capacity:
            self.negative.popitem(last=False)

    def seen_in_listing(self, name: bytes, node: Node) -> None:
        with self.lock:
            # Only into free room: a big listing must not evict the names in use.
            if name not in self.positive and len(self.positive) < self.capacity:
                self.positive[name] = node
                self.negative.pop(name, None)

    def snapshot(self) -> StoreStats:
        with self.lock:
            return replace(self.stats, entries=len(self.positive))


class RootCache:
    """Root nodes of several stores, cached and coalesced.

    `resolve` and `list` belong to one trio run; `cached_node` and `stats`
    may be called from any thread.
    """

    def __init__(
        self, stores: Mapping[str, RootNodes], *, entries: int, negative_ttl: float
    ) -> None:
        self._stores = {
            name: _StoreCache(backend, entries, negative_ttl) for name, backend in stores.items()
        }

    def _store(self, store: str) -> _StoreCache:
        try:
            return self._stores[store]
        except KeyError:
            known = ", ".join(sorted(self._stores)) or "none"
            raise UnknownStoreError(f"unknown store {store!r} (stores: {known})") from None

    def cached_node(self, store: str, basename: bytes) -> Node | None:
        """The node if `basename` is in the positive cache (counted as a hit);
        None means: ask `resolve`."""
        return self._store(store).hit(basename)

    async def resolve(self, store: str, basename: bytes) -> Node | None:
        """The root node named `basename`, None if there is none; StoreError if
        the backend fails (never cached), UnknownStoreError for a bad `store`."""
        s = self._store(store)
        found, node = s.cached(basename, trio.current_time())
        if found:
            return node
        with s.lock:
            s.stats.misses += 1
        asked = False

        async def ask() -> Node | None:
            nonlocal asked
            asked = True
            with s.lock:
                s.stats.backend_calls += 1
            try:
                node = await s.backend.get_by_basename(basename)
            except Exception:
                with s.lock:
                    s.stats.errors += 1
                raise
            s.remember(basename, node, trio.current_time())
            return node

        try:
            return await s.coalescer.run(basename, ask)
        finally:
            if not asked:
                with s.lock:
                    s.stats.coalesced += 1

    def list(self, store: str) -> AsyncGenerator[tuple[bytes, Node], None]:
        """Every (basename, node) of `store`, streamed from the backend.

        UnknownStoreError is raised here, before iterating."""
        return self._list(self._store(store))

    async def _list(self, s: _StoreCache) -> AsyncGenerator[tuple[bytes, Node], None]:
        try:
            async for name, node in s.backend.list():
                s.seen_in_listing(name, node)
                yield name, node
        except Exception:
            with s.lock:
                s.stats.errors += 1
            raise

    def stats(self) -> dict[str, StoreStats]:
        """A snapshot of every store's counters."""
        return {name: s.snapshot() for name, s in self._stores.items()}


async def _take(items: AsyncIterator[T], limit: int) -> list[T]:
    batch: list[T] = []
    while len(batch) < limit:
        try:
            batch.append(await anext(items))
        except StopAsyncIteration:
            break
    return batch


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, details: str) -> NoReturn:
    context.abort(code, details)
    raise AssertionError("context.abort returns only by raising")


@contextlib.contextmanager
def _status_on_error(context: grpc.ServicerContext) -> Iterator[None]:
    """Abort the call with the status that tells the client what failed."""
    try:
        yield
    except UnknownStoreError as e:
        _abort(context, grpc.StatusCode.NOT_FOUND, str(e))
    except BackendUnavailable as e:
        _abort(context, grpc.StatusCode.UNAVAILABLE, str(e))
    except StoreError as e:
        _abort(context, grpc.StatusCode.INTERNAL, str(e))
    except (trio.RunFinishedError, trio.Cancelled):
        _abort(context, grpc.StatusCode.UNAVAILABLE, "the rootcache is stopping")


class _Servicer(rootcache_pb2_grpc.RootCacheServicer):
    """Runs in grpcio's threads; all but cache hits happen in the trio loop."""

    def __init__(
        self, cache: RootCache, token: trio.lowlevel.TrioToken, nursery: trio.Nursery
    ) -> None:
        self._cache = cache
        self._token = token
        self._nursery = nursery

    def _in_trio(
        self, context: grpc.ServicerContext, fn: Callable[..., Awaitable[T]], *args: object
    ) -> T:
        with _status_on_error(context):
            return trio.from_thread.run(fn, *args, trio_token=self._token)

    def Resolve(
        self, request: rootcache_pb2.ResolveRequest, context: grpc.ServicerContext
    ) -> rootcache_pb2.ResolveResponse:
        with _status_on_error(context):
            node = self._cache.cached_node(request.store, request.basename)
        if node is None and request.accept_pending:
            resolution = self._resolve_in_background(context, request.store, request.basename)
            remaining = context.time_remaining()
            # Half the client's time: the answer (or `pending`) reaches it in time.
            patience = PENDING_AFTER if remaining is None else min(PENDING_AFTER, remaining / 2)
            try:
                with _status_on_error(context):
                    node = resolution.result(timeout=patience)
            except concurrent.futures.TimeoutError:
                return rootcache_pb2.ResolveResponse(pending=True)
        elif node is None:
            node = self._in_trio(context, self._cache.resolve, request.store, request.basename)
        if node is None:
            return rootcache_pb2.ResolveResponse()
        return rootcache_pb2.ResolveResponse(node=node_to_proto(request.basename, node))

    def _resolve_in_background(
        self, context: grpc.ServicerContext, store: str, basename: bytes
    ) -> concurrent.futures.Future[Node | None]:
        """`cache.resolve` in a task of the rootcache's own, not of this call: a
        client told `pending` asks again and joins the same resolution."""
        resolution: concurrent.futures.Future[Node | None] = concurrent.futures.Future()

        async def resolve() -> None:
            try:
                resolution.set_result(await self._cache.resolve(store, basename))
            except Exception as e:
                resolution.set_exception(e)
            except BaseException as e:  # cancelled: the rootcache is stopping
                resolution.set_exception(trio.RunFinishedError(str(e)))
                raise

        with _status_on_error(context):
            trio.from_thread.run_sync(self._nursery.start_soon, resolve, trio_token=self._token)
        return resolution

    def List(
        self, request: rootcache_pb2.ListRequest, context: grpc.ServicerContext
    ) -> Iterator[rootcache_pb2.ListResponse]:
        async def open_listing() -> AsyncGenerator[tuple[bytes, Node], None]:
            return self._cache.list(request.store)

        items = self._in_trio(context, open_listing)
        try:
            while batch := self._in_trio(context, _take, items, LIST_BATCH):
                for name, node in batch:
                    yield rootcache_pb2.ListResponse(node=node_to_proto(name, node))
        finally:
            # A client that hung up, or a stop: end the backend's listing too.
            with contextlib.suppress(trio.RunFinishedError, trio.Cancelled, RuntimeError):
                trio.from_thread.run(items.aclose, trio_token=self._token)

    def Stats(
        self, request: rootcache_pb2.StatsRequest, context: grpc.ServicerContext
    ) -> rootcache_pb2.StatsResponse:
        stats = self._cache.stats()
        return rootcache_pb2.StatsResponse(stores={name: s.to_proto() for name, s in stats.items()})


async def serve(
    cache: RootCache,
    socket_path: str,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `cache` on the unix socket `socket_path` (mode 0600) until cancelled.

    Must run in the thread that runs trio (normally the main thread); started
    (task_status) once the socket accepts connections."""
    async with trio.open_nursery() as nursery:
        servicer = _Servicer(cache, trio.lowlevel.current_trio_token(), nursery)
        await serve_unix(
            lambda server: rootcache_pb2_grpc.add_RootCacheServicer_to_server(servicer, server),
            socket_path,
            max_workers=RPC_THREADS,
            name="rootcache",
            task_status=task_status,
        )
        nursery.cancel_scope.cancel()


async def serve_rootcache(
    config: Config,
    socket_path: str,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the root nodes of every store in `config` until cancelled."""
    services: dict[str, PathInfoService] = {}
    closers: list[Callable[[], Awaitable[None]]] = []
    try:
        for name, store in config.stores.items():
            if store.path_info_service_addr.startswith("memory:"):
                log.warning(
                    "store %r: memory:// path infos live in one process; the rootcache"
                    " sees none of the workers' data",
                    name,
                )
            # A Nix binary cache ingests into its store's blob and directory
            # services: for such a store the rootcache opens the whole store.
            if is_nix_cache(store.path_info_service_addr):
                if any(
                    addr.startswith("memory:")
                    for addr in (store.blob_service_addr, store.directory_service_addr)
                ):
                    log.warning(
                        "store %r: the rootcache ingests NARs of the binary cache into"
                        " memory:// services of its own, which no worker can read",
                        name,
                    )
                opened = Store.from_addrs(
                    store.blob_service_addr,
                    store.directory_service_addr,
                    store.path_info_service_addr,
                    timeout=store.backend_timeout,
                    prefetch_references=store.prefetch_references,
                )
                closers.append(opened.aclose)
                services[name] = opened.path_infos
            else:
                services[name] = pathinfos.from_addr(
                    store.path_info_service_addr, timeout=store.backend_timeout
                )
                closers.append(services[name].aclose)
        cache = RootCache(
            {name: PathInfoRootNodes(service) for name, service in services.items()},
            entries=config.supervisor.rootcache_entries,
            negative_ttl=config.supervisor.rootcache_negative_ttl,
        )
        async with trio.open_nursery() as nursery:
            # The services' background work (a binary cache's prefetch) ends
            # with the serving, before they are closed.
            for service in services.values():
                nursery.start_soon(service.run)
            await serve(cache, socket_path, task_status=task_status)
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            for close in closers:
                await close()


def _parent_pid() -> int:
    """The pid of the process that started us, as multiprocessing recorded it
    before the fork (os.getppid() now may already be a reaper)."""
    parent = multiprocessing.parent_process()
    if parent is not None and parent.pid is not None:
        return parent.pid
    return os.getppid()


async def _run_until_signalled(config: Config, socket_path: str, parent: int) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, PARENT_DEATH_SIGNAL) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_rootcache, config, socket_path)
            # Until the receiver existed the parent-death signal was ignored:
            # look once more, in case the parent died in that window.
            if os.getppid() == parent:
                async for signum in signals:
                    if signum != PARENT_DEATH_SIGNAL or os.getppid() != parent:
                        break
            log.info("rootcache stopping")
            nursery.cancel_scope.cancel()


def rootcache_main(config_json: str, socket_path: str) -> None:
    """The rootcache process: serve until SIGTERM or SIGINT (or the parent's
    death), then remove the socket and return (exit status 0).

    Run in a freshly forked process (multiprocessing, fork start method) that
    is not inside trio.run; `config_json` is `Config.model_dump_json()`.
    """
    procutil.prepare_child("rootcache", parent_death_signal=PARENT_DEATH_SIGNAL)
    parent = _parent_pid()
    if os.getppid() != parent:
        log.warning("rootcache: the supervisor is gone already; exiting")
        return
    config = Config.model_validate_json(config_json)
    trio.run(_run_until_signalled, config, socket_path, parent)
