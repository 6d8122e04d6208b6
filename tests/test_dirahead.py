"""Fetching ahead the subdirectories that a walk opens next
(workers/dirahead.py), in-process, on the embedded directory store (real
SQLite, its queries in real worker threads)."""

from __future__ import annotations

import errno
import sqlite3
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyfuse3
import pytest
import trio
import trio.testing

from tvix_mountd.castore.addr import parse_address
from tvix_mountd.castore.blobs.grpc import GrpcBlobService
from tvix_mountd.castore.blobs.memory import MemoryBlobService
from tvix_mountd.castore.digests import B3Digest
from tvix_mountd.castore.directories.grpc import GrpcDirectoryService
from tvix_mountd.castore.directories.memory import MemoryDirectoryService
from tvix_mountd.castore.directories.sqlite import SqliteDirectoryService
from tvix_mountd.castore.nodes import Directory, FileNode, pack_node
from tvix_mountd.castore.storepath import StorePath
from tvix_mountd.workers import dirahead
from tvix_mountd.workers import runs as runs_mod
from tvix_mountd.workers.filesystem import StoreFilesystem
from tvix_mountd.workers.inodes import ROOT_INODE
from tvix_mountd.workers.rootnodes import StaticRootNodes
from tvix_mountd.workers.runs import NameOrderRuns

if TYPE_CHECKING:
    from tests.grpc_server import GrpcStoreServer

CTX: Any = None  # the handlers never look at the request context
NAME = StorePath(b"\x09" * 20, "tree").basename.encode()
SUBDIRECTORIES = 60
WAIT = 10.0


class CountingDirectories(SqliteDirectoryService):
    """Counts the Directories fetched one at a time, and those fetched ahead."""

    def __init__(self, path: str) -> None:
        super().__init__(path, timeout=WAIT)
        self.got: list[B3Digest] = []
        self.got_many: list[B3Digest] = []

    async def get(self, digest: B3Digest) -> Directory | None:
        self.got.append(digest)
        return await super().get(digest)

    async def get_many(self, digests: Sequence[B3Digest]) -> dict[B3Digest, Directory]:
        self.got_many += digests
        return await super().get_many(digests)


def _subdirectory(i: int) -> Directory:
    blob = f"file in d{i:03d}\n".encode()
    return Directory([(f"f{j}".encode(), FileNode(B3Digest.of(blob), len(blob))) for j in range(3)])


async def _fs(tmp_path: Path) -> tuple[StoreFilesystem, CountingDirectories, list[Directory]]:
    directories = CountingDirectories(str(tmp_path / "dirs.sqlite"))
    subdirectories = [_subdirectory(i) for i in range(SUBDIRECTORIES)]
    top = Directory([(f"d{i:03d}".encode(), d.as_node()) for i, d in enumerate(subdirectories)])
    await directories.put_tree([*subdirectories, top])
    root_nodes = StaticRootNodes({NAME: top.as_node()})
    fs = StoreFilesystem(MemoryBlobService(), directories, root_nodes, directories_ahead=True)
    return fs, directories, subdirectories


async def _list_top(fs: StoreFilesystem) -> list[int]:
    """List the top directory as the kernel's readdirplus does (each entry a
    lookup): its subdirectories' numbers."""
    top = await fs.lookup(ROOT_INODE, NAME, CTX)
    node = fs.inodes.node(top.st_ino)
    assert node is not None
    entries = await fs.dir_entries(top.st_ino, 0, limit=SUBDIRECTORIES)
    nodes = [pack_node(entry) for _, entry, _ in entries]
    numbers = [fs.inodes.ref(entry) for entry in nodes]
    fs.runs.listed(top.st_ino, node, 0, numbers, nodes)
    return numbers


@pytest.fixture
async def walk(
    tmp_path: Path,
) -> AsyncIterator[tuple[StoreFilesystem, CountingDirectories, list[Directory], list[int]]]:
    """A tree whose top directory was just listed: its subdirectories' numbers."""
    fs, directories, subdirectories = await _fs(tmp_path)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fs.run_background)
        yield fs, directories, subdirectories, await _list_top(fs)
        nursery.cancel_scope.cancel()
    await directories.aclose()


async def _open_and_list(fs: StoreFilesystem, ino: int) -> list[bytes]:
    handle = await fs.opendir(ino, CTX)
    fh = handle.fh if isinstance(handle, pyfuse3.FileInfo) else handle
    return [name for name, _, _ in await fs.dir_entries(fh, 0)]


def _names(directory: Directory) -> list[bytes]:
    return list(directory.packed_entries()[0])


async def test_subdirectories_opened_in_name_order_are_fetched_ahead(
    walk: tuple[StoreFilesystem, CountingDirectories, list[Directory], list[int]],
) -> None:
    """After two subdirectories opened in name order, the next ones come in
    batches (one query each), checked, and opening them fetches nothing more;
    what they list is what the store holds."""
    fs, directories, subdirectories, numbers = walk
    assert fs.directory_prefetcher is not None
    for i in (0, 1):
        assert await _open_and_list(fs, numbers[i]) == _names(subdirectories[i])
    ahead = dirahead.AHEAD
    with trio.fail_after(WAIT):
        while fs.directory_prefetcher.given < ahead:
            await fs.directory_prefetcher.wait_batch()
    fetched_ahead = {d.digest for d in subdirectories[2 : 2 + ahead]}
    assert set(directories.got_many) == fetched_ahead
    one_by_one = list(directories.got)
    for i in range(2, 2 + ahead):
        assert await _open_and_list(fs, numbers[i]) == _names(subdirectories[i])
    # Opening those asked the store for nothing; the window moved on as
    # they were opened, so the rest came ahead too.
    assert directories.got == one_by_one
    for i in range(2 + ahead, SUBDIRECTORIES):
        assert await _open_and_list(fs, numbers[i]) == _names(subdirectories[i])
    assert len(directories.got) < len(one_by_one) + dirahead.BATCH


async def test_an_open_waits_for_its_fetch_ahead_rather_than_fetching_again(
    walk: tuple[StoreFilesystem, CountingDirectories, list[Directory], list[int]],
) -> None:
    fs, directories, subdirectories, numbers = walk
    for i in range(SUBDIRECTORIES):
        # No waiting in between: the next opens come while their batch is
        # still in its worker thread.
        assert await _open_and_list(fs, numbers[i]) == _names(subdirectories[i])
    fetched_alone = set(directories.got)
    assert fetched_alone.isdisjoint(directories.got_many)
    assert {subdirectories[0].digest, subdirectories[1].digest} <= fetched_alone
    assert len(directories.got_many) > SUBDIRECTORIES // 2


async def test_opens_out_of_name_order_fetch_nothing_ahead(
    walk: tuple[StoreFilesystem, CountingDirectories, list[Directory], list[int]],
) -> None:
    """A program that opens a few directories here and there (an interpreter
    looking for modules) makes no reads ahead."""
    fs, directories, subdirectories, numbers = walk
    for i in (30, 10, 20, 5, 40):
        assert await _open_and_list(fs, numbers[i]) == _names(subdirectories[i])
    assert directories.got_many == []
    assert fs.directory_prefetcher is not None and fs.directory_prefetcher.given == 0


async def test_a_damaged_directory_ahead_fails_its_own_open_only(
    tmp_path: Path,
    walk: tuple[StoreFilesystem, CountingDirectories, list[Directory], list[int]],
) -> None:
    """A row that fails its check is not given to its inode by the read-ahead:
    its open fails with EIO, as without reading ahead, and the directories
    around it list as stored."""
    fs, directories, subdirectories, numbers = walk
    damaged = subdirectories[5]
    with sqlite3.connect(directories.path) as db:
        db.execute(
            "UPDATE directories SET data = ? WHERE digest = ?",
            (damaged.encode()[:-1] + b"\x00", bytes(damaged.digest)),
        )
    for i in range(SUBDIRECTORIES):
        if i == 5:
            with pytest.raises(pyfuse3.FUSEError) as failed:
                await _open_and_list(fs, numbers[i])
            assert failed.value.errno == errno.EIO
            continue
        assert await _open_and_list(fs, numbers[i]) == _names(subdirectories[i])
    assert len(directories.got_many) > SUBDIRECTORIES // 2


async def test_on_by_default_only_where_the_directories_are_a_round_trip_away(
    tmp_path: Path, grpc_store_server: GrpcStoreServer
) -> None:
    """The embedded store's SQLite answers inline as fast as a read-ahead
    (RESULTS.md): only a gRPC directory service gets one by default."""
    local = SqliteDirectoryService(str(tmp_path / "dirs.sqlite"), timeout=WAIT)
    fs = StoreFilesystem(MemoryBlobService(), local, StaticRootNodes({}))
    assert fs.directory_prefetcher is None
    remote = GrpcDirectoryService(parse_address(grpc_store_server.addr), timeout=WAIT)
    fs = StoreFilesystem(MemoryBlobService(), remote, StaticRootNodes({}))
    assert fs.directory_prefetcher is not None
    fs = StoreFilesystem(MemoryBlobService(), remote, StaticRootNodes({}), directories_ahead=False)
    assert fs.directory_prefetcher is None
    # The mount's `read_ahead = false` turns every read-ahead off.
    blobs = GrpcBlobService(parse_address(grpc_store_server.addr), timeout=WAIT)
    fs = StoreFilesystem(blobs, remote, StaticRootNodes({}))
    assert fs.directory_prefetcher is not None and fs.prefetcher is not None
    fs = StoreFilesystem(blobs, remote, StaticRootNodes({}), read_ahead=False)
    assert fs.directory_prefetcher is None and fs.prefetcher is None
    await blobs.aclose()
    await remote.aclose()
    await local.aclose()


async def test_without_its_task_nothing_is_fetched_ahead_and_opens_do_not_wait(
    tmp_path: Path,
) -> None:
    """A filesystem whose background task is not running (not yet, or no
    longer) queues nothing an open would then wait for."""
    fs, directories, subdirectories = await _fs(tmp_path)
    numbers = await _list_top(fs)
    with trio.fail_after(WAIT):
        for i in range(10):
            assert await _open_and_list(fs, numbers[i]) == _names(subdirectories[i])
    assert directories.got_many == []
    await directories.aclose()


def test_a_walks_files_do_not_push_its_subdirectories_places_out() -> None:
    """A walk lists a directory's subdirectories, then many files in the
    first of them, before it opens the next subdirectory: that one's place
    (which the read-ahead starts from) is still known."""
    runs = NameOrderRuns()
    top = pack_node(Directory([]).as_node())
    subdirectories = [pack_node(_subdirectory(i).as_node()) for i in range(3)]
    runs.listed(1, top, 0, [10, 11, 12], subdirectories)
    count = runs_mod.LISTED_PLACES + 1
    files = [pack_node(FileNode(B3Digest.of(b"%d" % i), 1)) for i in range(count)]
    numbers = list(range(100, 100 + len(files)))
    # In more replies than the last ones kept whole.
    step = len(files) // (runs_mod.LISTINGS + 1)
    for start in range(0, len(files), step):
        runs.listed(10, subdirectories[0], start, numbers[start : start + step], files)
    runs.first_use(10)  # the walk opens the first subdirectory, then the next
    assert runs.first_use(11) == (1, top, 1)


class HangingAhead(MemoryDirectoryService):
    """Answers one Directory at a time; a batch never (a backend that hangs
    on what a read-ahead asks)."""

    async def get_many(self, digests: Sequence[B3Digest]) -> dict[B3Digest, Directory]:
        await trio.sleep_forever()
        raise AssertionError("unreachable")


async def test_an_open_waits_for_a_fetch_ahead_no_longer_than_a_backend_call(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A directory whose fetch ahead is queued behind batches that hang waits
    at most the backend timeout for it, then fetches it itself."""
    timeout = 5.0
    directories = HangingAhead()
    subdirectories = [_subdirectory(i) for i in range(SUBDIRECTORIES)]
    top = Directory([(f"d{i:03d}".encode(), d.as_node()) for i, d in enumerate(subdirectories)])
    await directories.put_tree([*subdirectories, top])
    fs = StoreFilesystem(
        MemoryBlobService(),
        directories,
        StaticRootNodes({NAME: top.as_node()}),
        directories_ahead=True,
        backend_timeout=timeout,
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fs.run_background)
        await trio.testing.wait_all_tasks_blocked()  # the read-ahead takes batches
        numbers = await _list_top(fs)
        for i in (0, 1):  # a run: 2.. are asked for, in batches, the last ones queued
            await _open_and_list(fs, numbers[i])
        last = 1 + dirahead.AHEAD
        started = trio.current_time()
        assert await _open_and_list(fs, numbers[last]) == _names(subdirectories[last])
        waited = trio.current_time() - started
        assert timeout <= waited < 2 * timeout
        nursery.cancel_scope.cancel()
