"""RootNodes served by the shared rootcache process, over its unix socket.

While the rootcache is down (crashed, being restarted) calls wait for it to
listen again, up to `timeout`, then fail with BackendUnavailable: a restarted
rootcache is used as soon as the channel's next reconnect attempt finds it,
without the worker noticing more than a slow lookup.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from functools import partial
from typing import Final

from tvix_mountd.castore.addr import parse_address
from tvix_mountd.castore.blocking import past_caller_deadline
from tvix_mountd.castore.errors import IntegrityError
from tvix_mountd.castore.grpc_channel import CHANNEL_OPTIONS, GrpcConnection, naming
from tvix_mountd.castore.nodes import Node, node_from_proto
from tvix_mountd.proto import rootcache_pb2, rootcache_pb2_grpc
from tvix_mountd.workers.rootnodes import RootNodes

# Entries one worker-thread hop collects from a List stream.
_LIST_BATCH: Final = 256

# The backoff between reconnect attempts bounds how long a worker keeps
# failing after the rootcache is back. The stores' 2 s cap (plus gRPC's 20%
# jitter) would alone exceed the 2 s a restart may take; attempts on a local
# socket cost next to nothing.
_RECONNECT: Final = {"grpc.initial_reconnect_backoff_ms": 100, "grpc.max_reconnect_backoff_ms": 500}
_CHANNEL_OPTIONS: Final = (
    *((key, value) for key, value in CHANNEL_OPTIONS if key not in _RECONNECT),
    *_RECONNECT.items(),
)


def _connection(socket_path: str, timeout: float) -> GrpcConnection:
    return GrpcConnection(
        parse_address(f"grpc+unix://{socket_path}"), timeout=timeout, options=_CHANNEL_OPTIONS
    )


class RootCacheRootNodes(RootNodes):
    """The root nodes of `store`, as the rootcache on `socket_path` resolves them.

    The rootcache answers NOT_FOUND only for a store it does not serve (a
    missing name is an empty answer), so that surfaces as a StoreError, not
    as None.
    """

    def __init__(self, socket_path: str, store: str, *, timeout: float) -> None:
        self._store = store
        self._conn = _connection(socket_path, timeout)

    def _stub(self) -> rootcache_pb2_grpc.RootCacheStub:
        return self._conn.stub(rootcache_pb2_grpc.RootCacheStub)

    async def _resolve(self, name: bytes, what: str) -> rootcache_pb2.ResolveResponse:
        return await self._conn.unary(
            self._stub().Resolve,
            rootcache_pb2.ResolveRequest(store=self._store, basename=name, accept_pending=True),
            what=what,
            wait_for_ready=True,
        )

    async def _until_resolved(self, name: bytes, what: str) -> rootcache_pb2.ResolveResponse:
        while (msg := await self._resolve(name, what)).pending:
            pass
        return msg

    async def get_by_basename(self, name: bytes) -> Node | None:
        what = f"Resolve {name.decode(errors='replace')!r} in store {self._store!r}"
        msg = await self._resolve(name, what)
        if msg.pending:
            # A download in the rootcache that keeps arriving: each call has the
            # timeout as its deadline, and the rootcache answers `pending` within
            # it while the download goes on, so a stalled or dead rootcache still
            # fails in time, while the caller's own deadline must not cut it.
            msg = await past_caller_deadline(lambda: self._until_resolved(name, what))
        if not msg.HasField("node"):
            return None
        what = self._conn.describe(what)
        with naming(f"{what}: invalid node"):
            got, node = node_from_proto(msg.node)
        if got != name:
            raise IntegrityError(f"{what}: the answer is named {got!r}")
        return node

    async def list(self) -> AsyncGenerator[tuple[bytes, Node], None]:
        stream = self._conn.open_stream(
            partial(self._stub().List, wait_for_ready=True),
            rootcache_pb2.ListRequest(store=self._store),
            what=f"List store {self._store!r}",
        )
        try:
            while batch := await stream.batch(_LIST_BATCH):
                for msg in batch:
                    with naming(f"{stream.what}: invalid node"):
                        item = node_from_proto(msg.node)
                    yield item
        finally:
            stream.cancel()

    async def aclose(self) -> None:
        self._conn.close()


# timeout is the gRPC deadline of the call (as for every backend call), not
# the caller's cancel scope.
async def fetch_stats(
    socket_path: str,
    *,
    timeout: float,  # noqa: ASYNC109
) -> dict[str, dict[str, int]]:
    """The rootcache's counters per store (StoreStats field -> value), for
    status and metrics. Does not wait for a rootcache that is down."""
    conn = _connection(socket_path, timeout)
    try:
        msg = await conn.unary(
            conn.stub(rootcache_pb2_grpc.RootCacheStub).Stats,
            rootcache_pb2.StatsRequest(),
            what="Stats",
        )
    finally:
        conn.close()
    return {
        store: {f.name: getattr(stats, f.name) for f in rootcache_pb2.StoreStats.DESCRIPTOR.fields}
        for store, stats in msg.stores.items()
    }
