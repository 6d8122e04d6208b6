"""The gRPC backends against a real gRPC server (tests/grpc_server.py).

Roundtrips over a unix socket and over grpc+http on 127.0.0.1, then every way
a backend can fail: unreachable, stopped, failing or stalling mid-stream,
hanging, and lying.
"""

from __future__ import annotations

import hashlib
import random
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio

from tests.mounting import wait_until
from tvix_mountd.castore.addr import parse_address
from tvix_mountd.castore.blobs.grpc import PUT_CHUNK_SIZE, STREAM_RETAIN, GrpcBlobService
from tvix_mountd.castore.digests import EMPTY_BLOB_DIGEST, B3Digest
from tvix_mountd.castore.directories.grpc import GrpcDirectoryService
from tvix_mountd.castore.errors import (
    BackendUnavailable,
    IntegrityError,
    StoreError,
    ValidationError,
)
from tvix_mountd.castore.nodes import Directory, FileNode, Node, SymlinkNode
from tvix_mountd.castore.pathinfo import PathInfo
from tvix_mountd.castore.pathinfos.grpc import GrpcPathInfoService
from tvix_mountd.castore.storepath import StorePath

if TYPE_CHECKING:
    from tests.grpc_server import GrpcStoreServer

# tvix's servers (and tests/grpc_server.py) send Read data in 4 KiB messages.
READ_MESSAGE_SIZE = 4096

# Generous for calls that should succeed (CI machines are shared), short for
# the ones that are meant to time out.
TIMEOUT = 5.0
HANG_TIMEOUT = 0.5


@dataclass
class Clients:
    blobs: GrpcBlobService
    directories: GrpcDirectoryService
    path_infos: GrpcPathInfoService


@asynccontextmanager
async def open_clients(addr: str, backend_timeout: float = TIMEOUT) -> AsyncIterator[Clients]:
    parsed = parse_address(addr)
    clients = Clients(
        GrpcBlobService(parsed, timeout=backend_timeout),
        GrpcDirectoryService(parsed, timeout=backend_timeout),
        GrpcPathInfoService(parsed, timeout=backend_timeout),
    )
    try:
        yield clients
    finally:
        await clients.blobs.aclose()
        await clients.directories.aclose()
        await clients.path_infos.aclose()


@pytest.fixture
async def clients(grpc_store_server: GrpcStoreServer) -> AsyncIterator[Clients]:
    async with open_clients(grpc_store_server.addr) as c:
        yield c


def blob_data(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def path_info(i: int, node: Node | None = None) -> PathInfo:
    return PathInfo(
        store_path=StorePath(hashlib.sha1(f"path {i}".encode()).digest(), f"pkg-{i}"),
        node=node or FileNode(EMPTY_BLOB_DIGEST, 0),
        nar_size=120 + i,
        nar_sha256=hashlib.sha256(f"nar {i}".encode()).digest(),
    )


@dataclass
class Tree:
    leaf: Directory
    mid: Directory
    root: Directory


def make_tree() -> Tree:
    """Three directories; `leaf` is reachable twice (via `mid` and directly)."""
    file = FileNode(B3Digest.of(b"abc"), 3)
    leaf = Directory([(b"a", file), (b"b", SymlinkNode(b"a"))])
    mid = Directory([(b"leaf", leaf.as_node()), (b"x", FileNode(B3Digest.of(b"x"), 1, True))])
    root = Directory([(b"left", mid.as_node()), (b"right", leaf.as_node()), (b"z", file)])
    return Tree(leaf, mid, root)


async def collect(aiter: AsyncIterator[Any]) -> list[Any]:
    return [item async for item in aiter]


async def read_to_end(reader: Any, offset: int = 0, step: int = 100_000) -> bytes:
    """Read on from `offset` to the end, in order, as a sequential reader would."""
    parts = []
    while True:
        part = await reader.read_at(offset, step)
        parts.append(part)
        offset += len(part)
        if len(part) < step:
            return b"".join(parts)


# Roundtrips


@pytest.mark.parametrize("server_fixture", ["grpc_store_server", "grpc_store_server_tcp"])
async def test_roundtrip(server_fixture: str, request: pytest.FixtureRequest) -> None:
    server: GrpcStoreServer = request.getfixturevalue(server_fixture)
    assert server.addr.startswith("grpc+unix://" if "tcp" not in server_fixture else "grpc+http://")
    tree = make_tree()
    data = blob_data(300_001)
    infos = [path_info(i) for i in range(150)]
    async with open_clients(server.addr) as c:
        digest = await c.blobs.put(data)
        assert digest == B3Digest.of(data)
        assert server.blobs[digest] == data
        assert await c.blobs.has(digest)
        assert not await c.blobs.has(B3Digest.of(b"absent"))
        assert await c.blobs.read_all(digest) == data

        assert await c.directories.put(tree.leaf) == tree.leaf.digest
        assert await c.directories.get(tree.leaf.digest) == tree.leaf
        assert await c.directories.put_tree([tree.leaf, tree.mid, tree.root]) == tree.root.digest
        got = await collect(c.directories.get_recursive(tree.root.digest))
        assert got == [tree.root, tree.mid, tree.leaf]  # root first, breadth first, once each

        for info in infos:
            assert await c.path_infos.put(info) == info
        assert await c.path_infos.get(infos[7].store_path.digest) == infos[7]
        assert await c.path_infos.get(path_info(999).store_path.digest) is None
        listed = await collect(c.path_infos.list())
        assert sorted(i.store_path.basename for i in listed) == sorted(
            i.store_path.basename for i in infos
        )


async def test_put_splits_big_blobs_into_small_messages(
    grpc_store_server: GrpcStoreServer, clients: Clients
) -> None:
    # More than the writer queues, so it also has to wait for the server.
    data = blob_data(10 * PUT_CHUNK_SIZE + 12345, seed=1)
    writer = await clients.blobs.open_write()
    # Written in uneven pieces, to show message size does not follow write size.
    for start in range(0, len(data), 2_500_000):
        await writer.write(data[start : start + 2_500_000])
    digest = await writer.close()
    assert digest == B3Digest.of(data)
    assert await writer.close() == digest  # closing twice answers the same
    sizes = grpc_store_server.calls.put_message_sizes
    assert sum(sizes) == len(data)
    assert max(sizes) <= PUT_CHUNK_SIZE
    assert grpc_store_server.blobs[digest] == data


async def test_empty_and_missing_blobs(clients: Clients) -> None:
    assert await clients.blobs.put(b"") == EMPTY_BLOB_DIGEST
    assert await clients.blobs.read_all(EMPTY_BLOB_DIGEST) == b""
    missing = B3Digest.of(b"missing")
    assert not await clients.blobs.has(missing)
    assert await clients.blobs.open_read(missing) is None
    assert await clients.blobs.read_all(missing) is None


async def test_streamed_reads_follow_one_stream(
    grpc_store_server: GrpcStoreServer, clients: Clients
) -> None:
    data = blob_data(STREAM_RETAIN + 500_000, seed=2)
    digest = grpc_store_server.put_blob(data)
    reader = await clients.blobs.open_read(digest)
    assert reader is not None
    try:
        assert reader.size is None  # unchunked: unknown until the stream ended
        assert await reader.read_at(0, 4096) == data[:4096]
        assert await reader.read_at(4096, 10_000) == data[4096:14_096]  # continues
        assert await reader.read_at(600_000, 1000) == data[600_000:601_000]  # skips ahead
        assert await reader.read_at(590_000, 1000) == data[590_000:591_000]  # small step back
        assert grpc_store_server.calls.reads == [digest]
        tail = await reader.read_at(len(data) - 5000, 200_000)
        assert tail == data[-5000:]
        assert reader.size == len(data)
        assert await reader.read_at(len(data) + 10, 10) == b""
        assert grpc_store_server.calls.reads == [digest]
        # Far behind the retained tail: the stream is opened again.
        assert await reader.read_at(10, 100) == data[10:110]
        assert grpc_store_server.calls.reads == [digest, digest]
    finally:
        await reader.aclose()


async def test_chunked_blob_reads_only_the_chunks_it_needs(
    grpc_store_server: GrpcStoreServer, clients: Clients
) -> None:
    size = grpc_store_server.faults.chunk_size
    data = blob_data(16 * size + 123, seed=3)
    digest = grpc_store_server.put_blob(data)
    grpc_store_server.faults.chunked = True
    chunk_digests = [B3Digest.of(data[s : s + size]) for s in range(0, len(data), size)]
    reader = await clients.blobs.open_read(digest)
    assert reader is not None
    try:
        assert reader.size == len(data)  # known from the chunk list
        offset = 10 * size + 77
        assert await reader.read_at(offset, 1000) == data[offset : offset + 1000]
        assert grpc_store_server.calls.reads == [chunk_digests[10]]
        # Across a chunk boundary, backwards: just the two chunks involved.
        offset = 4 * size - 500
        assert await reader.read_at(offset, 1000) == data[offset : offset + 1000]
        assert grpc_store_server.calls.reads == [chunk_digests[i] for i in (10, 3, 4)]
        assert await reader.read_at(4 * size, 10) == data[4 * size : 4 * size + 10]
        assert len(grpc_store_server.calls.reads) == 3  # served from the kept chunk
        assert await reader.read_at(len(data) - 10, 100) == data[-10:]
    finally:
        await reader.aclose()
    assert await clients.blobs.read_all(digest) == data
    assert digest not in grpc_store_server.calls.reads  # never the whole blob


# Unreachable and stopped servers


async def test_unreachable_socket_fails_fast(tmp_path: Path) -> None:
    addr = f"grpc+unix://{tmp_path}/missing.sock"
    tree = make_tree()
    async with open_clients(addr) as c:
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: c.blobs.has(EMPTY_BLOB_DIGEST),
            lambda: c.blobs.open_read(EMPTY_BLOB_DIGEST),
            lambda: c.blobs.put(b"data"),
            lambda: c.directories.get(tree.leaf.digest),
            lambda: c.directories.put(tree.leaf),
            lambda: collect(c.directories.get_recursive(tree.root.digest)),
            lambda: c.path_infos.get(path_info(1).store_path.digest),
            lambda: c.path_infos.put(path_info(1)),
            lambda: collect(c.path_infos.list()),
        ]
        for call in calls:
            started = time.monotonic()
            with pytest.raises(BackendUnavailable) as e:
                await call()
            # Refused at once, not after the timeout.
            assert time.monotonic() - started < TIMEOUT / 2
            assert addr in str(e.value)


async def test_stopped_server_fails_then_recovers(
    grpc_store_server: GrpcStoreServer, clients: Clients
) -> None:
    digest = grpc_store_server.put_blob(b"survives")
    assert await clients.blobs.has(digest)
    grpc_store_server.faults.unavailable = True
    with pytest.raises(BackendUnavailable):
        await clients.blobs.has(digest)
    with pytest.raises(BackendUnavailable):
        await clients.path_infos.get(path_info(1).store_path.digest)
    grpc_store_server.faults.unavailable = False
    # The channel reconnects on its own, within its (short) reconnect backoff.
    with trio.fail_after(5):
        while True:
            try:
                assert await clients.blobs.read_all(digest) == b"survives"
                break
            except BackendUnavailable:
                await trio.sleep(0.05)


async def test_services_share_a_channel_until_the_last_closes(
    grpc_store_server: GrpcStoreServer,
) -> None:
    addr = parse_address(grpc_store_server.addr)
    blobs = GrpcBlobService(addr, timeout=TIMEOUT)
    directories = GrpcDirectoryService(addr, timeout=TIMEOUT)
    try:
        assert blobs._conn.channel() is directories._conn.channel()
        await blobs.aclose()
        with pytest.raises(StoreError):
            await blobs.has(EMPTY_BLOB_DIGEST)
        leaf = make_tree().leaf
        assert await directories.put(leaf) == leaf.digest  # still open for the other
    finally:
        await blobs.aclose()
        await directories.aclose()


# Run in a process of its own, so that no other thread of it is inside gRPC
# at the fork. Even so, gRPC's fork support is not dependable: a new
# channel in the child has failed its first calls ("Wrong file descriptor
# generation"), a few times in hundreds of runs under load. tvix-mountd never
# forks a process that has used gRPC (the spawner, which forks the rootcache,
# is forked before anything opens a channel; workers are exec'd); the
# per-pid channel is a guard. What the guard promises: the child never uses
# the parent's channel, and the child's calls come back, with the right
# bytes or as BackendUnavailable, never hang and never corrupt the parent's.
_FORKING_CLIENT = """
import os, sys, traceback
import trio
from tvix_mountd.castore.addr import parse_address
from tvix_mountd.castore.blobs.grpc import GrpcBlobService
from tvix_mountd.castore.digests import B3Digest
from tvix_mountd.castore.errors import BackendUnavailable

digest = B3Digest(bytes.fromhex(sys.argv[2]))
blobs = GrpcBlobService(parse_address(sys.argv[1]), timeout=float(sys.argv[3]))
# Synchronous on purpose: a child forked inside trio.run cannot run trio.
assert trio.run(blobs.has, digest)  # the parent's channel exists before the fork
parent_channel = blobs._conn.channel()
pid = os.fork()
if pid == 0:
    status = 1
    try:
        for attempt in range(3):
            try:
                data = trio.run(blobs.read_all, digest)
                break
            except BackendUnavailable as e:
                print(f"child: attempt {attempt}: {e}", file=sys.stderr)
                data = None
        own = blobs._conn.channel() is not parent_channel
        trio.run(blobs.aclose)
        status = 0 if data in (b"shared", None) and own else 2
        print(f"child: read {data!r}, own channel {own}", file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stderr.flush()
        os._exit(status)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
# The child's aclose left the parent's channel alone.
assert trio.run(blobs.read_all, digest) == b"shared"
trio.run(blobs.aclose)
"""


def test_a_forked_child_opens_its_own_channel(grpc_store_server: GrpcStoreServer) -> None:
    digest = grpc_store_server.put_blob(b"shared")
    client = subprocess.run(
        [sys.executable, "-c", _FORKING_CLIENT, grpc_store_server.addr, digest.hex(), str(TIMEOUT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert client.returncode == 0, client.stderr


# Failing and stalling servers


async def test_error_mid_stream(grpc_store_server: GrpcStoreServer, clients: Clients) -> None:
    data = blob_data(100_000, seed=4)
    digest = grpc_store_server.put_blob(data)
    tree = make_tree()
    for d in (tree.leaf, tree.mid, tree.root):
        grpc_store_server.put_directory(d)
    for i in range(20):
        grpc_store_server.put_path_info(path_info(i))
    grpc_store_server.faults.error_mid_stream = True

    def server_failure(e: pytest.ExceptionInfo[StoreError]) -> bool:
        return not isinstance(e.value, ValidationError | BackendUnavailable) and (
            "INTERNAL" in str(e.value)
        )

    with pytest.raises(StoreError) as e:
        await clients.blobs.read_all(digest)
    assert server_failure(e)
    with pytest.raises(StoreError) as e:
        await clients.directories.get(tree.leaf.digest)
    assert server_failure(e)
    received: list[Directory] = []
    with pytest.raises(StoreError) as e:
        async for directory in clients.directories.get_recursive(tree.root.digest):
            received.append(directory)
    assert server_failure(e)
    assert received == [tree.root]
    listed: list[PathInfo] = []
    with pytest.raises(StoreError) as e:
        async for info in clients.path_infos.list():
            listed.append(info)
    assert server_failure(e)
    assert len(listed) == 10  # what came before the failure was handed out, one by one
    with pytest.raises(StoreError) as e:
        await clients.blobs.put(blob_data(3 * PUT_CHUNK_SIZE, seed=5))
    assert server_failure(e)


async def test_a_small_blob_of_known_size_is_read_without_a_stat(
    grpc_store_server: GrpcStoreServer, clients: Clients
) -> None:
    """`open_read_sized` (what the filesystem opens files with: it knows
    their size from the node) asks a small blob with one Read, and its reads
    still check the size and the digest; a missing one fails its first read;
    a large one is opened as before (a Stat, for its chunk list)."""
    server = grpc_store_server
    data = blob_data(5000, seed=1)
    digest = server.put_blob(data)
    reader = await clients.blobs.open_read_sized(digest, len(data))
    assert reader is not None
    try:
        assert await read_to_end(reader, step=1000) == data
    finally:
        await reader.aclose()
    assert server.calls.stats == []
    assert server.calls.reads == [digest]
    # The node says another size than the server has: an error, not bytes.
    reader = await clients.blobs.open_read_sized(digest, len(data) + 1)
    assert reader is not None
    with pytest.raises(IntegrityError, match="expected 5001"):
        await read_to_end(reader)
    await reader.aclose()
    # Wrong bytes under the digest: the digest check fails at the end.
    server.blobs[digest] = b"X" + data[1:]
    reader = await clients.blobs.open_read_sized(digest, len(data))
    assert reader is not None
    with pytest.raises(IntegrityError):
        await read_to_end(reader)
    await reader.aclose()
    missing = B3Digest.of(b"missing")
    reader = await clients.blobs.open_read_sized(missing, 10)
    assert reader is not None
    with pytest.raises(StoreError, match="not found"):
        await reader.read_at(0, 10)
    await reader.aclose()
    big = blob_data(300 << 10, seed=2)
    big_digest = server.put_blob(big)
    reader = await clients.blobs.open_read_sized(big_digest, len(big))
    assert reader is not None
    try:
        assert await read_to_end(reader) == big
    finally:
        await reader.aclose()
    assert server.calls.stats == [big_digest]


async def test_small_blobs_read_many_with_one_read_each(
    grpc_store_server: GrpcStoreServer, clients: Clients
) -> None:
    """`read_many` (the read-ahead's) reads each blob whole with one Read by
    its own digest, also one the server keeps in chunks, and checks it: a
    wrong or missing one, or one of another size, is left out."""
    server = grpc_store_server
    server.faults.chunk_size = 1024
    whole, chunked, wrong, short = (blob_data(n, seed=n) for n in (500, 3000, 700, 900))
    digests = {data: server.put_blob(data) for data in (whole, chunked, wrong, short)}
    server.blobs[digests[wrong]] = b"X" + wrong[1:]
    server.faults.chunked = True
    missing = B3Digest.of(b"not there")
    wanted = [(digests[d], len(d)) for d in (whole, chunked, wrong)]
    wanted += [(digests[short], len(short) + 1), (missing, 10)]
    got = await clients.blobs.read_many(wanted)
    assert got == {digests[whole]: whole, digests[chunked]: chunked}
    assert sorted(server.calls.reads) == sorted(digest for digest, _ in wanted)


async def test_directories_got_many_at_once(
    grpc_store_server: GrpcStoreServer, clients: Clients
) -> None:
    """`get_many` asks for all of them at once (a walk's read-ahead waits one
    round trip for a batch), and leaves out what the server does not have."""
    tree = make_tree()
    for directory in (tree.leaf, tree.mid, tree.root):
        grpc_store_server.put_directory(directory)
    missing = B3Digest.of(b"no such directory")
    wanted = [tree.leaf.digest, missing, tree.mid.digest, tree.root.digest]
    grpc_store_server.faults.hang = True
    got: dict[B3Digest, Directory] = {}

    async def get_many() -> None:
        got.update(await clients.directories.get_many(wanted))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(get_many)
        # Every call is held by the server at the same time.
        await trio.to_thread.run_sync(
            wait_until,
            lambda: grpc_store_server.calls.held == len(wanted),
            TIMEOUT,
            "every Get held by the server at once",
        )
        grpc_store_server.faults.hang = False
    assert got == {d.digest: d for d in (tree.leaf, tree.mid, tree.root)}


async def test_hanging_server_times_out(grpc_store_server: GrpcStoreServer) -> None:
    tree = make_tree()
    grpc_store_server.put_directory(tree.leaf)
    grpc_store_server.faults.hang = True
    big = blob_data(16 * PUT_CHUNK_SIZE, seed=11)  # more than flow control lets through
    async with open_clients(grpc_store_server.addr, HANG_TIMEOUT) as c:
        calls: dict[str, Callable[[], Awaitable[object]]] = {
            "has": lambda: c.blobs.has(EMPTY_BLOB_DIGEST),
            "open_read": lambda: c.blobs.open_read(EMPTY_BLOB_DIGEST),
            "put blob": lambda: c.blobs.put(b"data"),
            "put big blob": lambda: c.blobs.put(big),
            "get directory": lambda: c.directories.get(tree.leaf.digest),
            "get_recursive": lambda: collect(c.directories.get_recursive(tree.leaf.digest)),
            "put_tree": lambda: c.directories.put_tree([tree.leaf]),
            "get path info": lambda: c.path_infos.get(path_info(1).store_path.digest),
            "list": lambda: collect(c.path_infos.list()),
        }
        outcomes: dict[str, tuple[BaseException | None, float]] = {}

        async def run(name: str, call: Callable[[], Awaitable[object]]) -> None:
            started = time.monotonic()
            try:
                await call()
            except Exception as e:
                outcomes[name] = (e, time.monotonic() - started)
            else:
                outcomes[name] = (None, time.monotonic() - started)

        # All at once, so the test waits for one timeout, not nine.
        async with trio.open_nursery() as nursery:
            for name, call in calls.items():
                nursery.start_soon(run, name, call)
    for name, (error, elapsed) in outcomes.items():
        assert isinstance(error, BackendUnavailable), (name, error)
        assert HANG_TIMEOUT * 0.9 <= elapsed < HANG_TIMEOUT + 2, (name, elapsed)
    assert len(outcomes) == len(calls)


async def test_stream_stalling_midway_times_out(grpc_store_server: GrpcStoreServer) -> None:
    data = blob_data(200_000, seed=6)
    digest = grpc_store_server.put_blob(data)
    for i in range(10):
        grpc_store_server.put_path_info(path_info(i))
    grpc_store_server.faults.hang_mid_stream = True
    async with open_clients(grpc_store_server.addr, HANG_TIMEOUT) as c:
        reader = await c.blobs.open_read(digest)
        assert reader is not None
        try:
            assert await reader.read_at(0, 4096) == data[:4096]
            with pytest.raises(BackendUnavailable):
                await reader.read_at(4096, len(data))
            # Once the server is well again, the same reader serves again
            # (from a new stream), e.g. for a file the kernel keeps open.
            grpc_store_server.faults.hang_mid_stream = False
            assert await read_to_end(reader, 4096) == data[4096:]
            assert grpc_store_server.calls.reads == [digest, digest]
            grpc_store_server.faults.hang_mid_stream = True
        finally:
            await reader.aclose()
        listed = []
        with pytest.raises(BackendUnavailable):
            async for info in c.path_infos.list():
                listed.append(info)
        # Messages collected in the same worker-thread hop as the stall are
        # lost with it; never more than the server sent.
        assert len(listed) <= 5
        # Released, the server answers again at once on the same channel.
        grpc_store_server.faults.hang_mid_stream = False
        assert await c.blobs.read_all(digest) == data


async def test_slow_but_live_stream_does_not_time_out(grpc_store_server: GrpcStoreServer) -> None:
    data = blob_data(5 * READ_MESSAGE_SIZE, seed=10)
    digest = grpc_store_server.put_blob(data)
    grpc_store_server.faults.message_delay = HANG_TIMEOUT * 0.4
    async with open_clients(grpc_store_server.addr, HANG_TIMEOUT) as c:
        started = time.monotonic()
        # One read for the whole blob: it takes longer than the timeout, but
        # no message is late by more than the timeout.
        assert await c.blobs.read_all(digest) == data
        assert time.monotonic() - started > HANG_TIMEOUT


# Lying servers


async def test_wrong_directory_digest(grpc_store_server: GrpcStoreServer, clients: Clients) -> None:
    tree = make_tree()
    for d in (tree.leaf, tree.mid, tree.root):
        grpc_store_server.put_directory(d)
    grpc_store_server.faults.wrong_directory_digest = True
    with pytest.raises(IntegrityError):
        await clients.directories.get(tree.leaf.digest)
    with pytest.raises(IntegrityError):
        await collect(clients.directories.get_recursive(tree.root.digest))


async def test_unsorted_directory(grpc_store_server: GrpcStoreServer, clients: Clients) -> None:
    leaf = make_tree().leaf
    grpc_store_server.put_directory(leaf)
    grpc_store_server.faults.unsorted_directory = True
    with pytest.raises(ValidationError, match="sorting") as e:
        await clients.directories.get(leaf.digest)
    assert not isinstance(e.value, IntegrityError)
    with pytest.raises(ValidationError, match="sorting"):
        await collect(clients.directories.get_recursive(leaf.digest))


async def test_two_directories_for_one_is_an_error(
    grpc_store_server: GrpcStoreServer, clients: Clients
) -> None:
    leaf = make_tree().leaf
    grpc_store_server.put_directory(leaf)
    assert await clients.directories.get(leaf.digest) == leaf
    grpc_store_server.faults.two_directories = True
    with pytest.raises(ValidationError, match="more than one"):
        await clients.directories.get(leaf.digest)


async def test_missing_directories(grpc_store_server: GrpcStoreServer, clients: Clients) -> None:
    tree = make_tree()
    assert await clients.directories.get(tree.root.digest) is None
    with pytest.raises(StoreError, match="not sent"):
        await collect(clients.directories.get_recursive(tree.root.digest))
    # A hole below the root: the server fails the stream part-way.
    grpc_store_server.put_directory(tree.root)
    grpc_store_server.put_directory(tree.mid)
    with pytest.raises(StoreError):
        await collect(clients.directories.get_recursive(tree.root.digest))


async def test_short_blob(grpc_store_server: GrpcStoreServer, clients: Clients) -> None:
    data = blob_data(50_000, seed=7)
    digest = grpc_store_server.put_blob(data)
    grpc_store_server.faults.short_blob = True
    reader = await clients.blobs.open_read(digest)
    assert reader is not None
    try:
        assert await reader.read_at(0, 1000) == data[:1000]
        with pytest.raises(IntegrityError):
            await read_to_end(reader, 1000)
    finally:
        await reader.aclose()


async def test_corrupt_blob_fails_at_the_end_of_a_sequential_read(
    grpc_store_server: GrpcStoreServer, clients: Clients
) -> None:
    data = blob_data(300_000, seed=8)
    digest = grpc_store_server.put_blob(data)
    grpc_store_server.faults.corrupt_blob = True
    reader = await clients.blobs.open_read(digest)
    assert reader is not None
    try:
        assert await reader.read_at(0, 100_000) == data[:100_000]  # before the flipped byte
        with pytest.raises(IntegrityError):
            await read_to_end(reader, 100_000, step=30_000)
    finally:
        await reader.aclose()


@pytest.mark.parametrize("fault", ["corrupt_blob", "short_blob"])
async def test_bad_chunk_fails_even_a_random_read(
    grpc_store_server: GrpcStoreServer, clients: Clients, fault: str
) -> None:
    size = grpc_store_server.faults.chunk_size
    data = blob_data(5 * size, seed=9)
    digest = grpc_store_server.put_blob(data)
    grpc_store_server.faults.chunked = True
    setattr(grpc_store_server.faults, fault, True)
    reader = await clients.blobs.open_read(digest)
    assert reader is not None
    try:
        with pytest.raises(IntegrityError, match="chunk 3"):
            await reader.read_at(3 * size + 10, 100)
    finally:
        await reader.aclose()


async def test_wrong_path_info(grpc_store_server: GrpcStoreServer, clients: Clients) -> None:
    info = path_info(3)
    grpc_store_server.put_path_info(info)
    assert await clients.path_infos.get(info.store_path.digest) == info
    grpc_store_server.faults.wrong_pathinfo = True
    with pytest.raises(IntegrityError):
        await clients.path_infos.get(info.store_path.digest)


async def test_wrong_put_digests(grpc_store_server: GrpcStoreServer, clients: Clients) -> None:
    tree = make_tree()
    grpc_store_server.faults.wrong_put_digest = True
    with pytest.raises(IntegrityError):
        await clients.blobs.put(b"some data")
    with pytest.raises(IntegrityError):
        await clients.directories.put(tree.leaf)
    with pytest.raises(IntegrityError):
        await clients.directories.put_tree([tree.leaf, tree.mid, tree.root])


async def test_put_tree_is_checked_before_sending(
    grpc_store_server: GrpcStoreServer, clients: Clients
) -> None:
    tree = make_tree()
    with pytest.raises(ValidationError):
        await clients.directories.put_tree([tree.mid, tree.root])  # leaf left out
    assert grpc_store_server.directories == {}


async def test_single_put_cannot_refer_to_stored_children(
    grpc_store_server: GrpcStoreServer, clients: Clients
) -> None:
    # tvix validates each Put stream on its own: a parent alone is refused
    # even when its child is stored, so trees must go up with put_tree.
    tree = make_tree()
    assert await clients.directories.put(tree.leaf) == tree.leaf.digest
    with pytest.raises(StoreError, match="INTERNAL"):
        await clients.directories.put(tree.mid)
    assert tree.mid.digest not in grpc_store_server.directories
