"""Reading ahead the files that follow the ones being read in name order
(workers/prefetch.py), in-process, on the embedded blob store (real files,
real threads)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio

from tvix_mountd.castore.blobs import BlobReader
from tvix_mountd.castore.blobs.raw import RawFileBlobService
from tvix_mountd.castore.digests import B3Digest
from tvix_mountd.castore.directories.memory import MemoryDirectoryService
from tvix_mountd.castore.nodes import Directory, FileNode, pack_node
from tvix_mountd.castore.storepath import StorePath
from tvix_mountd.workers import prefetch
from tvix_mountd.workers.filesystem import StoreFilesystem
from tvix_mountd.workers.inodes import ROOT_INODE
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


async def _fs(tmp_path: Path) -> tuple[StoreFilesystem, CountingBlobs, dict[bytes, bytes]]:
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


async def test_what_is_kept_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prefetch, "KEPT", 1000)
    fs, _, contents = await _fs(tmp_path)
    prefetcher = fs.prefetcher
    assert prefetcher is not None
    nodes = [
        pack_node(FileNode(B3Digest.of(data), len(data)))
        for name, data in sorted(contents.items())
        if name.startswith(b"f")
    ]
    prefetcher.read_ahead([(node, 0) for node in nodes])  # what a thread does with a batch
    assert 0 < prefetcher.kept_bytes <= 1000
    # The newest are kept, the oldest let go.
    assert prefetcher.holds(nodes[-1]) and not prefetcher.holds(nodes[0])


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
