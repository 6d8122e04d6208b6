"""Reading ahead the files that follow the ones being read in name order
(workers/prefetch.py), in-process, on the embedded blob store (real files,
real threads)."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio

from tests.grpc_server import GrpcStoreServer
from tvix_mountd.castore.addr import parse_address
from tvix_mountd.castore.blobs import BlobReader
from tvix_mountd.castore.blobs.grpc import GrpcBlobService
from tvix_mountd.castore.blobs.raw import RawFileBlobService
from tvix_mountd.castore.digests import B3Digest
from tvix_mountd.castore.directories.memory import MemoryDirectoryService
from tvix_mountd.castore.directories.sqlite import SqliteDirectoryService
from tvix_mountd.castore.nodes import Directory, FileNode, Node, SymlinkNode, pack_node
from tvix_mountd.castore.storepath import StorePath
from tvix_mountd.workers import prefetch, runs
from tvix_mountd.workers.filesystem import StoreFilesystem
from tvix_mountd.workers.inodes import ROOT_INODE, InodeTable
from tvix_mountd.workers.rootnodes import StaticRootNodes

CTX: Any = None  # the handlers never look at the request context
NAME = StorePath(b"\x07" * 20, "files").basename.encode()
FILES = 40
WAIT = 10.0


class CountingBlobs(RawFileBlobService):
    """Counts the readers opened, by digest: a read served from memory opens none."""

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.opened: list[B3Digest] = []

    async def _open_raw(self, digest: B3Digest) -> BlobReader | None:
        self.opened.append(digest)
        return await super()._open_raw(digest)


async def _store(
    tmp_path: Path,
) -> tuple[CountingBlobs, MemoryDirectoryService, StaticRootNodes, dict[bytes, bytes]]:
    blobs = CountingBlobs(str(tmp_path / "blobs"))
    contents = {f"f{i:03d}".encode(): f"file {i}\n".encode() * (i + 1) for i in range(FILES)}
    contents[b"g-big"] = os.urandom(prefetch.SMALL + 1)  # read ahead by the disk only
    entries = []
    for name, data in contents.items():
        entries.append((name, FileNode(await blobs.put(data), len(data))))
    directory = Directory(entries)
    directories = MemoryDirectoryService()
    await directories.put(directory)
    root_nodes = StaticRootNodes({NAME: directory.as_node()})
    return blobs, directories, root_nodes, contents


async def _fs(tmp_path: Path) -> tuple[StoreFilesystem, CountingBlobs, dict[bytes, bytes]]:
    blobs, directories, root_nodes, contents = await _store(tmp_path)
    return StoreFilesystem(blobs, directories, root_nodes), blobs, contents


@pytest.fixture
async def background(
    tmp_path: Path,
) -> AsyncIterator[tuple[StoreFilesystem, CountingBlobs, dict[bytes, bytes]]]:
    fs, blobs, contents = await _fs(tmp_path)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fs.run_background)
        yield fs, blobs, contents
        nursery.cancel_scope.cancel()


async def _wait_kept(fs: StoreFilesystem, nodes: list[bytes]) -> None:
    """Until the prefetcher holds every one of `nodes` (read from threads)."""
    assert fs.prefetcher is not None
    with trio.fail_after(WAIT):
        while not all(fs.prefetcher.holds(node) for node in nodes):
            await fs.prefetcher.wait_batch()


async def _cat(fs: StoreFilesystem, directory: int, name: bytes) -> bytes:
    attr = await fs.lookup(directory, name, CTX)
    return await fs.read(attr.st_ino, 0, 1 << 16)


async def test_files_after_ones_read_in_name_order_are_read_ahead_and_served_from_memory(
    background: tuple[StoreFilesystem, CountingBlobs, dict[bytes, bytes]],
) -> None:
    fs, blobs, contents = background
    root = await fs.lookup(ROOT_INODE, NAME, CTX)
    # Two files read in name order: a run, the files after them are read ahead.
    for name in (b"f000", b"f001"):
        assert await _cat(fs, root.st_ino, name) == contents[name]
    later = [f"f{i:03d}".encode() for i in range(2, 10)]
    nodes = []
    for name in later:
        data = contents[name]
        nodes.append(pack_node(FileNode(B3Digest.of(data), len(data))))
    await _wait_kept(fs, nodes)
    for name in later:
        attr = await fs.lookup(root.st_ino, name, CTX)
        assert await fs.read(attr.st_ino, 0, 1 << 16) == contents[name]
    assert not set(blobs.opened) & {B3Digest.of(contents[n]) for n in later}
    # Read to the end, they are let go; the file too big to keep is read as usual.
    assert fs.prefetcher is not None and not any(fs.prefetcher.holds(n) for n in nodes)
    big = await fs.lookup(root.st_ino, b"g-big", CTX)
    assert await fs.read(big.st_ino, 0, len(contents[b"g-big"])) == contents[b"g-big"]


async def test_a_blob_that_fails_its_check_is_not_read_ahead(
    background: tuple[StoreFilesystem, CountingBlobs, dict[bytes, bytes]],
) -> None:
    fs, blobs, contents = background
    bad = contents[b"f005"]
    path = trio.Path(blobs.blob_path(B3Digest.of(bad)))
    await path.chmod(0o644)
    await path.write_bytes(b"X" + bad[1:])
    root = await fs.lookup(ROOT_INODE, NAME, CTX)
    for name in (b"f000", b"f001"):
        await _cat(fs, root.st_ino, name)
    good = contents[b"f006"]
    await _wait_kept(fs, [pack_node(FileNode(B3Digest.of(good), len(good)))])
    assert fs.prefetcher is not None
    assert not fs.prefetcher.holds(pack_node(FileNode(B3Digest.of(bad), len(bad))))
    attr = await fs.lookup(root.st_ino, b"f005", CTX)
    with pytest.raises(pyfuse3.FUSEError):  # the usual read: checked, EIO
        await fs.read(attr.st_ino, 0, 1 << 16)


async def test_a_bug_in_reading_ahead_leaves_the_reads_working(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Reading ahead is an optimisation: if it fails in a way nobody foresaw,
    that is logged, and the files are read as if nothing had been read ahead."""
    fs, blobs, contents = await _fs(tmp_path)
    calls = 0

    def broken(digest: B3Digest, size: int) -> bytes | None:
        nonlocal calls
        calls += 1
        raise RuntimeError("a bug in read_small")

    monkeypatch.setattr(blobs, "read_small", broken)
    root = await fs.lookup(ROOT_INODE, NAME, CTX)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fs.run_background)
        for name in (b"f000", b"f001"):  # a run: the next files are asked for
            assert await _cat(fs, root.st_ino, name) == contents[name]
        assert fs.prefetcher is not None
        with trio.fail_after(WAIT):
            while calls == 0:
                await fs.prefetcher.wait_batch()
        for i in range(2, FILES):  # read on, across further batches that fail too
            name = f"f{i:03d}".encode()
            assert await _cat(fs, root.st_ino, name) == contents[name]
        nursery.cancel_scope.cancel()
    assert fs.prefetcher.kept_bytes == 0
    assert re.search(r"reading \d+ files ahead", caplog.text)
    assert "a bug in read_small" in caplog.text


async def test_what_is_kept_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prefetch, "KEPT", 1000)
    monkeypatch.setattr(prefetch, "THREADS", 1)  # batches kept in order
    fs, _, contents = await _fs(tmp_path)
    prefetcher = fs.prefetcher
    assert prefetcher is not None
    nodes = [
        pack_node(FileNode(B3Digest.of(data), len(data)))
        for name, data in sorted(contents.items())
        if name.startswith(b"f")
    ]
    directory = pack_node(Directory([]).as_node())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(prefetcher.run)
        prefetcher.read_ahead_after(directory, 0, nodes)  # entry 0 read: the rest asked for
        with trio.fail_after(WAIT):
            while not prefetcher.holds(nodes[-1]):
                await prefetcher.wait_batch()
        nursery.cancel_scope.cancel()
    assert 0 < prefetcher.kept_bytes <= 1000
    # The newest are kept, the oldest let go.
    assert not prefetcher.holds(nodes[1])


async def test_a_file_read_before_its_turn_is_not_kept(tmp_path: Path) -> None:
    # Its READ came while its batch waited: the kernel has its pages, and
    # keeping it would hold memory nobody reads.
    fs, blobs, contents = await _fs(tmp_path)
    prefetcher = fs.prefetcher
    assert prefetcher is not None
    root = await fs.lookup(ROOT_INODE, NAME, CTX)
    early = await fs.lookup(root.st_ino, b"f005", CTX)
    for name in (b"f000", b"f001"):  # queues f002... (nothing reads them yet)
        await _cat(fs, root.st_ino, name)
    assert await fs.read(early.st_ino, 0, 1 << 16) == contents[b"f005"]
    assert B3Digest.of(contents[b"f005"]) in blobs.opened  # read from the store
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fs.run_background)
        later = contents[b"f009"]  # in f005's batch, after it
        await _wait_kept(fs, [pack_node(FileNode(B3Digest.of(later), len(later)))])
        nursery.cancel_scope.cancel()
    early_node = pack_node(FileNode(B3Digest.of(contents[b"f005"]), len(contents[b"f005"])))
    assert not prefetcher.holds(early_node)


async def test_lookups_alone_and_reads_out_of_order_read_nothing_ahead(
    background: tuple[StoreFilesystem, CountingBlobs, dict[bytes, bytes]],
) -> None:
    """A stat walk or an interpreter probing for modules looks files up and
    reads few of them, not in name order: nothing is read ahead for them."""
    fs, _, contents = background
    assert fs.prefetcher is not None
    root = await fs.lookup(ROOT_INODE, NAME, CTX)
    directory = fs.inodes.node(root.st_ino)
    assert directory is not None
    for i in range(FILES):
        await fs.lookup(root.st_ino, f"f{i:03d}".encode(), CTX)
    assert fs.prefetcher.asked_upto(directory) == 0
    for name in (b"f020", b"f010", b"f005", b"f030"):  # backwards, or too far apart
        assert await _cat(fs, root.st_ino, name) == contents[name]
    assert fs.prefetcher.asked_upto(directory) == 0
    assert fs.prefetcher.kept_bytes == 0
    # One but one after the last is still a run (a file skipped, say).
    assert await _cat(fs, root.st_ino, b"f032") == contents[b"f032"]
    assert fs.prefetcher.asked_upto(directory) > 33


async def test_listed_files_go_to_the_page_cache_checked_and_their_pins_are_given_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files the kernel holds an inode of (a listing gave them) are stored into
    its page cache, only with bytes that match their digests, and every count
    taken to pin their numbers meanwhile is given back."""
    stored: dict[int, bytes] = {}

    def notify_store(ino: int, offset: int, data: bytes) -> None:
        assert offset == 0
        stored[ino] = bytes(data)

    monkeypatch.setattr(pyfuse3, "notify_store", notify_store)
    blobs, directories, root_nodes, contents = await _store(tmp_path)
    bad = contents[b"f005"]
    path = trio.Path(blobs.blob_path(B3Digest.of(bad)))
    await path.chmod(0o644)
    await path.write_bytes(b"X" + bad[1:])
    fs = StoreFilesystem(blobs, directories, root_nodes, store_pages=True)
    assert fs.prefetcher is not None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fs.run_background)
        root = await fs.lookup(ROOT_INODE, NAME, CTX)
        directory = fs.inodes.node(root.st_ino)
        children = await fs.dir_entries(root.st_ino, 0, limit=1000)
        names = [name for name, _, _ in children]
        # What readdirplus does with the entries it hands the kernel.
        numbers = [fs.inodes.ref(pack_node(node)) for _, node, _ in children]
        assert directory is not None
        fs.runs.listed(root.st_ino, directory, 0, numbers)
        counts = [fs.inodes.lookups(ino) for ino in numbers]
        for i in (0, 1):  # two files read in name order
            assert await fs.read(numbers[i], 0, 1 << 16) == contents[names[i]]
        small = {
            ino: contents[name]
            for name, ino in zip(names[2:], numbers[2:], strict=True)
            if len(contents[name]) <= prefetch.SMALL and name != b"f005"
        }
        with trio.fail_after(WAIT):
            while not small.keys() <= stored.keys():
                await fs.prefetcher.wait_batch()
        nursery.cancel_scope.cancel()
    assert {ino: stored[ino] for ino in small} == small
    bad_ino = numbers[names.index(b"f005")]
    assert bad_ino not in stored  # failed its check: the READ will say EIO
    assert set(stored) <= set(small) | set(numbers[:2])
    assert [fs.inodes.lookups(ino) for ino in numbers] == counts
    with pytest.raises(pyfuse3.FUSEError):
        await fs.read(bad_ino, 0, 1 << 16)


def test_pin_takes_a_count_of_a_live_inode_and_allocates_nothing() -> None:
    table = InodeTable()
    node = pack_node(FileNode(B3Digest.of(b"x"), 1))
    other = pack_node(FileNode(B3Digest.of(b"y"), 1))
    assert table.pin(other) == 0 and len(table) == 0
    ino = table.ref(node)
    assert table.pin(node) == ino and table.lookups(ino) == 2
    table.forget(ino, 1)
    assert table.node(ino) == node
    table.forget(ino, 1)
    assert table.node(ino) is None and table.pin(node) == 0
    table.close()


@pytest.fixture
async def remote(
    grpc_store_server: GrpcStoreServer,
) -> AsyncIterator[tuple[StoreFilesystem, GrpcStoreServer, dict[bytes, bytes]]]:
    """The same files, their blobs on a tvix-store over gRPC."""
    contents = {f"f{i:03d}".encode(): f"file {i}\n".encode() * (i + 1) for i in range(FILES)}
    entries = [
        (name, FileNode(grpc_store_server.put_blob(d), len(d))) for name, d in contents.items()
    ]
    directory = Directory(entries)
    directories = MemoryDirectoryService()
    await directories.put(directory)
    blobs = GrpcBlobService(parse_address(grpc_store_server.addr), timeout=WAIT)
    fs = StoreFilesystem(blobs, directories, StaticRootNodes({NAME: directory.as_node()}))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fs.run_background)
        yield fs, grpc_store_server, contents
        nursery.cancel_scope.cancel()
    await blobs.aclose()


async def test_files_on_a_remote_store_are_fetched_ahead_all_at_once(
    remote: tuple[StoreFilesystem, GrpcStoreServer, dict[bytes, bytes]],
) -> None:
    """From a tvix-store, the files after two read in name order are read
    ahead, checked, and their READs then ask the server nothing; one whose
    blob the server answers wrongly is left to its READ, which fails."""
    fs, server, contents = remote
    assert fs.prefetcher is not None  # on by default for gRPC
    wrong = B3Digest.of(contents[b"f005"])
    server.blobs[wrong] = b"X" + contents[b"f005"][1:]
    root = await fs.lookup(ROOT_INODE, NAME, CTX)
    for name in (b"f000", b"f001"):
        assert await _cat(fs, root.st_ino, name) == contents[name]
    later = [f"f{i:03d}".encode() for i in range(2, FILES) if i != 5]
    await _wait_kept(
        fs, [pack_node(FileNode(B3Digest.of(contents[n]), len(contents[n]))) for n in later]
    )
    reads = len(server.calls.reads)
    for name in later:
        assert await _cat(fs, root.st_ino, name) == contents[name]
    assert len(server.calls.reads) == reads
    with pytest.raises(pyfuse3.FUSEError):
        await _cat(fs, root.st_ino, b"f005")


# -- a walk that reads every file it lists ------------------------------------------------------

WALK_DIRS = 6
WALK_FILES = 12
WALK_LINKS = 20


class _Plus:
    """A readdirplus token for `StoreFilesystem.readdir` called directly."""

    plus = True


async def _list_as_the_kernel_does(fs: StoreFilesystem, directory: int) -> None:
    """A readdirplus of `directory` from its first entry (every entry fits),
    then the request after it, which finds the listing's end: the kernel
    sends it once the caller has read the first reply."""
    fh = await fs.open_directory(directory)
    await fs.readdir(fh, 0, _Plus())  # type: ignore[arg-type]
    children = fs.inodes.children(directory)
    assert children is not None
    await fs.readdir(fh, len(children[1]), _Plus())  # type: ignore[arg-type]


async def _walk_store(
    tmp_path: Path,
) -> tuple[StoreFilesystem, dict[bytes, dict[bytes, bytes]]]:
    """A store path of WALK_DIRS directories of WALK_FILES small files, an
    empty file and WALK_LINKS symlinks each (named after the files: a
    directory's last file is followed by many entries)."""
    blobs = CountingBlobs(str(tmp_path / "blobs"))
    directories = MemoryDirectoryService()
    contents: dict[bytes, dict[bytes, bytes]] = {}
    subdirs = []
    for d in range(WALK_DIRS):
        name = f"d{d}".encode()
        files = {f"f{i:02d}".encode(): f"{d}/{i}\n".encode() * (i + 2) for i in range(WALK_FILES)}
        entries: list[tuple[bytes, Node]] = [
            (n, FileNode(await blobs.put(data), len(data))) for n, data in files.items()
        ]
        # An empty file after them: no READ ever shows that it was read.
        entries.append((b"g-empty", FileNode(await blobs.put(b""), 0)))
        entries += [(b"link%02d" % i, SymlinkNode(b"f00")) for i in range(WALK_LINKS)]
        directory = Directory(entries)
        await directories.put(directory)
        subdirs.append((name, directory.as_node()))
        contents[name] = files
    top = Directory(subdirs)
    await directories.put(top)
    root_nodes = StaticRootNodes({NAME: top.as_node()})
    return StoreFilesystem(blobs, directories, root_nodes, store_pages=True), contents


async def test_a_walk_that_reads_every_file_has_the_next_directories_read_ahead_from_their_listing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once a directory was read to its end in name order, the next one
    listed has its files stored before any READ of it (but the last small
    one, kept for its READ: the sign that the walk reads on); a directory
    listed before that READ came ends it. A walk that reads nothing never
    starts it."""
    stored: dict[int, bytes] = {}

    def notify_store(ino: int, offset: int, data: bytes) -> None:
        stored[ino] = bytes(data)

    monkeypatch.setattr(pyfuse3, "notify_store", notify_store)
    monkeypatch.setattr(pyfuse3, "readdir_reply", lambda token, name, attr, offset: True)
    fs, contents = await _walk_store(tmp_path)
    prefetcher = fs.prefetcher
    assert prefetcher is not None

    async def listed(directory: int) -> dict[bytes, int]:
        """readdirplus of `directory` from its start: its files' numbers."""
        await _list_as_the_kernel_does(fs, directory)
        return {name: node_ino for name, node_ino in await _numbers(fs, directory)}

    def asked(directory: int) -> int:
        node = fs.inodes.node(directory)
        assert node is not None
        return prefetcher.asked_upto(node)

    async def stored_of(numbers: dict[bytes, int], names: set[bytes]) -> dict[int, bytes]:
        """Once the files `names` (of `numbers`) are stored: what was."""
        wanted = {numbers[n] for n in names}
        with trio.fail_after(WAIT):
            while not wanted <= stored.keys():
                await prefetcher.wait_batch()
        return {ino: data for ino, data in stored.items() if ino in numbers.values()}

    async with trio.open_nursery() as nursery:
        nursery.start_soon(fs.run_background)
        top = (await fs.lookup(ROOT_INODE, NAME, CTX)).st_ino
        subdirs = await listed(top)
        # A stat walk: every directory listed, nothing read: nothing ahead.
        for d in (b"d0", b"d1"):
            await listed(subdirs[d])
            assert asked(subdirs[d]) == 0
        # d0 listed, then read in name order to its end as the kernel reads
        # it: after two READs the files after them are stored, and read
        # without a READ; but the directory's last file is kept for its
        # READ, which says that the directory was read to its end.
        numbers = await listed(subdirs[b"d0"])
        files = contents[b"d0"]
        names = sorted(files)
        for name in names[:2]:
            assert await fs.read(numbers[name], 0, 1 << 16) == files[name]
        ahead = set(names[2:-1])
        assert await stored_of(numbers, ahead) == {numbers[n]: files[n] for n in ahead}
        assert await fs.read(numbers[names[-1]], 0, 1 << 16) == files[names[-1]]
        assert numbers[names[-1]] not in stored
        # d1 listed: its files stored from the listing, before any READ of
        # them, but its last file, kept for its READ.
        numbers = await listed(subdirs[b"d1"])
        files = contents[b"d1"]
        last = max(files)
        ahead = {n for n in files if n != last}
        assert await stored_of(numbers, ahead) == {numbers[n]: files[n] for n in ahead}
        sentinel = pack_node(FileNode(B3Digest.of(files[last]), len(files[last])))
        await _wait_kept(fs, [sentinel])
        assert await fs.read(numbers[last], 0, 1 << 16) == files[last]  # the walk reads on
        # d2 the same; but its last file is not read before d3 is listed: d3
        # and what comes after it are left to their READs.
        numbers = await listed(subdirs[b"d2"])
        await stored_of(numbers, set(contents[b"d2"]) - {max(contents[b"d2"])})
        for d in (b"d3", b"d4"):
            await listed(subdirs[d])
            assert asked(subdirs[d]) == 0
        nursery.cancel_scope.cancel()


async def _numbers(fs: StoreFilesystem, directory: int) -> list[tuple[bytes, int]]:
    """The live inode numbers of `directory`'s entries (as its listing gave them)."""
    children = fs.inodes.children(directory)
    assert children is not None
    names, nodes = children
    return [(name, fs.inodes.number_of(node)) for name, node in zip(names, nodes, strict=True)]


@pytest.mark.parametrize("files", [1, 3, 4, 17, 50, prefetch.AHEAD])
def test_a_window_is_split_so_that_the_threads_take_its_first_files_first(files: int) -> None:
    """Every file once, no batch over BATCH, and the first files each in
    another batch (one a thread): a reader in name order meets them first."""
    nodes = [pack_node(FileNode(B3Digest.of(b"%d" % i), i + 1)) for i in range(files)]
    batches = prefetch._split(nodes)
    assert sorted(n for batch in batches for n in batch) == sorted(nodes)
    assert all(0 < len(batch) <= prefetch.BATCH for batch in batches)
    firsts = nodes[: min(files, prefetch.THREADS)]
    assert len({i for i, batch in enumerate(batches) for n in batch if n in firsts}) == len(firsts)
    assert [batch[0] for batch in batches[: len(firsts)]] == firsts


# -- a million entries ---------------------------------------------------------------------------

BIG_DIRS = 2_000
BIG_ENTRIES = 500  # a directory: 1,000,000 entries in all
BIG_FILES = 10  # of them small files, read; the others symlinks, listed only


async def _big_walk_store(tmp_path: Path) -> tuple[StoreFilesystem, list[bytes]]:
    """BIG_DIRS directories of BIG_ENTRIES distinct entries (no node shared,
    so every entry takes an inode of its own), in real files: packed blobs
    and sqlite directories. Directory d's files hold `_big_contents(d)`, in
    name order."""
    blobs = RawFileBlobService(str(tmp_path / "blobs"))
    directories = SqliteDirectoryService(str(tmp_path / "dirs.sqlite"), timeout=WAIT)
    tree = []
    for d in range(BIG_DIRS):
        files = _big_contents(d)
        await blobs.put_batch([(B3Digest.of(data), data) for data in files])
        # The files last: a walk that reads a directory to its end goes on
        # into the next one (see prefetch's doc).
        entries: list[tuple[bytes, Node]] = [
            (b"s%03d" % i, SymlinkNode(b"t%d-%d" % (d, i))) for i in range(BIG_ENTRIES - BIG_FILES)
        ]
        entries += [
            (b"u%02d" % i, FileNode(B3Digest.of(data), len(data))) for i, data in enumerate(files)
        ]
        tree.append((b"d%04d" % d, Directory(entries)))
    top = Directory([(name, directory.as_node()) for name, directory in tree])
    await directories.put_tree([directory for _, directory in tree] + [top])
    root_nodes = StaticRootNodes({NAME: top.as_node()})
    fs = StoreFilesystem(blobs, directories, root_nodes, store_pages=True)
    return fs, [name for name, _ in tree]


def _big_contents(d: int) -> list[bytes]:
    return [b"%d/%d\n" % (d, i) * (i + 20) for i in range(BIG_FILES)]


async def test_a_reading_walk_of_a_million_entries_stores_files_ahead_in_bounded_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A walk that lists 1,000,000 entries and reads every file, the files
    stored into the page cache ahead of it from the listings (notify_store),
    the kernel forgetting each directory once walked but keeping the store
    path's directory, whose cached listing names them all: what the worker
    allocates stops growing once its bounded tables are full (made small
    here, so that they fill early), numbers are given again, and every
    inode comes back in the end."""
    for table in ("DIRECTORIES", "PLACES", "LISTED_PLACES"):
        monkeypatch.setattr(runs, table, 64)
    monkeypatch.setattr(prefetch, "KEPT", 64 << 10)
    stored: set[int] = set()

    def notify_store(ino: int, offset: int, data: bytes) -> None:
        stored.add(ino)

    monkeypatch.setattr(pyfuse3, "notify_store", notify_store)
    replied: list[tuple[bytes, int]] = []

    def readdir_reply(token: Any, name: bytes, attr: pyfuse3.EntryAttributes, offset: int) -> bool:
        replied.append((name, attr.st_ino))
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", readdir_reply)
    fs, names = await _big_walk_store(tmp_path)
    prefetcher = fs.prefetcher
    assert prefetcher is not None

    async def listed(directory: int) -> list[tuple[bytes, int]]:
        """A readdirplus of `directory` from its start: its entries' numbers."""
        replied.clear()
        await _list_as_the_kernel_does(fs, directory)
        return list(replied)

    reads = 0
    # After each directory: the interpreter's allocated blocks (every object
    # and buffer, whatever its size) and the highest inode number so far.
    blocks: list[int] = []
    highest: list[int] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fs.run_background)
        top = (await fs.lookup(ROOT_INODE, NAME, CTX)).st_ino
        subdirs = dict(await listed(top))
        for d, name in enumerate(names):
            directory = subdirs[name]
            entries = await listed(directory)
            files = [ino for entry, ino in entries if entry.startswith(b"u")]
            if d > 0:  # the walk reads on: all but the last stored ahead
                with trio.fail_after(WAIT):
                    while not stored.issuperset(files[:-1]):
                        await prefetcher.wait_batch()
            for ino, data in zip(files, _big_contents(d), strict=True):
                if ino not in stored:  # else the kernel has its pages
                    assert await fs.read(ino, 0, 1 << 16) == data
                    reads += 1
            stored.difference_update(files)  # numbers are given again
            await fs.releasedir(directory)
            await fs.forget([(ino, 1) for _, ino in entries] + [(directory, 1)])
            blocks.append(sys.getallocatedblocks())
            highest.append(max([ino for _, ino in entries] + highest[-1:]))
        await prefetcher.settle()
        nursery.cancel_scope.cancel()
    assert reads == BIG_FILES + BIG_DIRS - 1  # the first directory, then each one's last
    assert prefetcher.kept_bytes <= 64 << 10
    await fs.forget([(top, 1)])
    assert len(fs.inodes) == 0
    # Past the first tenth nothing grows: numbers are given again, and fewer
    # blocks are allocated than one for every 100 of the 900,000 entries
    # that came after.
    settled = BIG_DIRS // 10
    assert highest[-1] == highest[settled]
    assert max(blocks) - max(blocks[:settled]) < 9_000, (max(blocks[:settled]), max(blocks))
