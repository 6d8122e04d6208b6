"""The filesystem's logic, without a kernel: handlers called directly."""

from __future__ import annotations

import bisect
import errno
import os
from collections.abc import AsyncIterator
from typing import Any

import pyfuse3
import pytest
import trio

from tvix_mountd.castore.blobs import BlobReader
from tvix_mountd.castore.blobs.memory import MemoryBlobService
from tvix_mountd.castore.digests import B3Digest
from tvix_mountd.castore.directories.memory import MemoryDirectoryService
from tvix_mountd.castore.nodes import (
    Directory,
    DirectoryNode,
    FileNode,
    Node,
    SymlinkNode,
    pack_node,
)
from tvix_mountd.castore.pathinfo import PathInfo
from tvix_mountd.castore.pathinfos.memory import MemoryPathInfoService
from tvix_mountd.castore.storepath import StorePath
from tvix_mountd.workers import filesystem
from tvix_mountd.workers.filesystem import (
    XATTR_BLOB_DIGEST,
    XATTR_DIRECTORY_DIGEST,
    StoreFilesystem,
)
from tvix_mountd.workers.inodes import ROOT_INODE, UNLISTED_NUMBERS, InodeTable
from tvix_mountd.workers.names import PackedNames
from tvix_mountd.workers.rootnodes import PathInfoRootNodes, RootNodes, StaticRootNodes

CTX: Any = None  # the handlers never look at the request context


def store_name(n: int, name: str = "pkg") -> bytes:
    return StorePath(bytes([n]) * 20, name).basename.encode()


class Tree:
    """A small store: two roots sharing a subdirectory, files, an executable twin."""

    def __init__(self) -> None:
        self.blobs = MemoryBlobService()
        self.directories = MemoryDirectoryService()

    async def build(self) -> dict[bytes, Node]:
        hello = await self.blobs.put(b"hello\n")
        big = await self.blobs.put(bytes(range(256)) * 4096)
        shared = Directory([(b"a", FileNode(hello, 6))])
        root_a = Directory(
            [
                (b"shared", shared.as_node()),
                (b"hello", FileNode(hello, 6)),
                (b"hello-exe", FileNode(hello, 6, executable=True)),
                (b"big", FileNode(big, 256 * 4096)),
                (b"link", SymlinkNode(b"hello")),
                (b"empty", FileNode(B3Digest.of(b""), 0)),
            ]
        )
        root_b = Directory([(b"shared", shared.as_node()), (b"link", SymlinkNode(b"hello"))])
        for d in (shared, root_a, root_b):
            await self.directories.put(d)
        return {
            store_name(1, "a"): root_a.as_node(),
            store_name(2, "b"): root_b.as_node(),
            store_name(3, "file"): FileNode(hello, 6),
        }

    def fs(self, root_nodes: RootNodes, **kwargs: Any) -> StoreFilesystem:
        # As the kernel sends OPEN (stock pyfuse3); the other way has tests of its own.
        kwargs.setdefault("open_requests", True)
        return StoreFilesystem(self.blobs, self.directories, root_nodes, **kwargs)


async def make_fs(**kwargs: Any) -> tuple[StoreFilesystem, dict[bytes, Node]]:
    tree = Tree()
    roots = await tree.build()
    return tree.fs(StaticRootNodes(roots), **kwargs), roots


async def lookup_path(fs: StoreFilesystem, *names: bytes) -> pyfuse3.EntryAttributes:
    ino = ROOT_INODE
    attr = await fs.getattr(ino, CTX)
    for name in names:
        attr = await fs.lookup(ino, name, CTX)
        ino = attr.st_ino
    return attr


async def fuse_errno(coro: Any) -> int:
    with pytest.raises(pyfuse3.FUSEError) as info:
        await coro
    return info.value.errno


async def test_root_attributes() -> None:
    fs, _ = await make_fs()
    attr = await fs.getattr(ROOT_INODE, CTX)
    assert attr.st_mode == 0o040555
    assert attr.st_size == 0
    assert attr.st_uid == attr.st_gid == 0
    assert attr.st_mtime_ns == attr.st_ctime_ns == attr.st_atime_ns == 1_000_000_000


async def test_attributes_as_in_nix_store() -> None:
    fs, _ = await make_fs()
    a = store_name(1, "a")
    directory = await lookup_path(fs, a)
    assert directory.st_mode == 0o040555
    assert directory.st_size == 7  # 6 entries + 1 below shared/
    hello = await lookup_path(fs, a, b"hello")
    assert (hello.st_mode, hello.st_size, hello.st_blocks) == (0o100444, 6, 1)
    exe = await lookup_path(fs, a, b"hello-exe")
    assert exe.st_mode == 0o100555
    big = await lookup_path(fs, a, b"big")
    assert big.st_blocks == 256 * 4096 // 512
    link = await lookup_path(fs, a, b"link")
    assert (link.st_mode, link.st_size) == (0o120444, 5)
    for attr in (directory, hello, exe, big, link):
        assert attr.st_mtime_ns == attr.st_ctime_ns == attr.st_atime_ns == 1_000_000_000
        assert attr.st_uid == attr.st_gid == 0


async def test_same_content_same_inode_but_not_across_executable_bit() -> None:
    fs, _ = await make_fs()
    a, b = store_name(1, "a"), store_name(2, "b")
    assert (await lookup_path(fs, a, b"shared")).st_ino == (
        await lookup_path(fs, b, b"shared")
    ).st_ino
    assert (await lookup_path(fs, a, b"link")).st_ino == (await lookup_path(fs, b, b"link")).st_ino
    assert (await lookup_path(fs, a, b"hello")).st_ino == (
        await lookup_path(fs, a, b"shared", b"a")
    ).st_ino
    assert (await lookup_path(fs, a, b"hello")).st_ino != (
        await lookup_path(fs, a, b"hello-exe")
    ).st_ino


async def test_root_lookup_errors() -> None:
    fs, _ = await make_fs()
    for name in [b"not-a-store-path", store_name(9, "a"), store_name(1, "other-name")]:
        assert await fuse_errno(fs.lookup(ROOT_INODE, name, CTX)) == errno.ENOENT
    assert await fuse_errno(fs.lookup(ROOT_INODE, b"missing", CTX)) == errno.ENOENT


async def test_lookup_of_missing_child_is_a_negative_entry_kept_for_good() -> None:
    # Nothing can appear in a store path: "no such entry" (inode 0) that the
    # kernel may cache forever. The kernel answers ENOENT (FUSE tests check).
    fs, _ = await make_fs()
    a = await lookup_path(fs, store_name(1, "a"))
    for name in (b"nope", b"hellp"):
        miss = await fs.lookup(a.st_ino, name, CTX)
        assert miss.st_ino == 0 and miss.entry_timeout == filesystem.FOREVER
    assert len(fs.inodes) == 1  # no lookup count was taken for a miss


async def test_lookup_of_a_missing_root_name_is_enoent_and_not_kept() -> None:
    # A store path may be added later: no negative entry in the root.
    fs, _ = await make_fs()
    assert await fuse_errno(fs.lookup(ROOT_INODE, store_name(9, "later"), CTX)) == errno.ENOENT


async def test_path_info_root_nodes_check_the_name() -> None:
    tree = Tree()
    roots = await tree.build()
    path_infos = MemoryPathInfoService()
    for name, node in roots.items():
        await path_infos.put(PathInfo(StorePath.parse(name), node, 0, bytes(32)))
    fs = tree.fs(PathInfoRootNodes(path_infos))
    assert (await lookup_path(fs, store_name(1, "a"))).st_mode == 0o040555
    # Same digest, different name: not the same store path.
    assert await fuse_errno(fs.lookup(ROOT_INODE, store_name(1, "b"), CTX)) == errno.ENOENT
    assert await fuse_errno(fs.lookup(ROOT_INODE, b"x" * 40, CTX)) == errno.ENOENT


async def test_negative_root_lookup_is_not_remembered() -> None:
    fs, roots = await make_fs()
    static = StaticRootNodes(roots)
    fs._root_nodes = static
    late = store_name(7, "late")
    assert await fuse_errno(fs.lookup(ROOT_INODE, late, CTX)) == errno.ENOENT
    static._nodes[late] = FileNode(B3Digest.of(b""), 0)
    assert (await fs.lookup(ROOT_INODE, late, CTX)).st_size == 0


async def read_dir(fs: StoreFilesystem, ino: int, batch: int = 2) -> list[bytes]:
    """All names, in batches of `batch`, resuming at the offsets handed out."""
    fh = await fs.open_directory(ino)
    names: list[bytes] = []
    offset = 0
    while entries := await fs.dir_entries(fh, offset, limit=batch):
        names += [name for name, _, _ in entries]
        offset = entries[-1][2]
    await fs.releasedir(fh)
    return names


async def test_readdir_in_batches_is_complete_and_ordered() -> None:
    fs, _ = await make_fs()
    a = await lookup_path(fs, store_name(1, "a"))
    names = await read_dir(fs, a.st_ino)
    assert names == sorted([b"shared", b"hello", b"hello-exe", b"big", b"link", b"empty"])


async def test_readdir_resumes_at_any_offset() -> None:
    fs, _ = await make_fs()
    a = await lookup_path(fs, store_name(1, "a"))
    full = await read_dir(fs, a.st_ino, batch=100)
    fh = await fs.open_directory(a.st_ino)
    for offset in range(len(full) + 1):
        entries = await fs.dir_entries(fh, offset, limit=100)
        assert [name for name, _, _ in entries] == full[offset:]
        assert [next_id for _, _, next_id in entries] == list(range(offset + 1, len(full) + 1))


async def test_opendir_lets_the_kernel_keep_listings_except_the_roots(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # scripts/setup.sh installs the pyfuse3 that takes a FileInfo from opendir.
    assert filesystem.KERNEL_CACHES_LISTINGS
    fs, roots = await make_fs(list_root=True)
    a = await lookup_path(fs, store_name(1, "a"))
    info = await fs.opendir(a.st_ino, CTX)
    assert isinstance(info, pyfuse3.FileInfo)
    assert info.cache_readdir and info.keep_cache
    assert [name for name, _, _ in await fs.dir_entries(info.fh, 0)] == await read_dir(fs, a.st_ino)
    root = await fs.opendir(ROOT_INODE, CTX)
    assert isinstance(root, int)
    assert {name for name, _, _ in await fs.dir_entries(root, 0)} == set(roots)
    # With a stock pyfuse3: plain handles, every listing comes to us.
    monkeypatch.setattr(filesystem, "KERNEL_CACHES_LISTINGS", False)
    assert isinstance(await fs.opendir(a.st_ino, CTX), int)


async def test_root_listing_needs_list_root() -> None:
    fs, _ = await make_fs(list_root=False)
    assert await fuse_errno(fs.opendir(ROOT_INODE, CTX)) == errno.EPERM


class CountingRootNodes(StaticRootNodes):
    def __init__(self, nodes: dict[bytes, Node]) -> None:
        super().__init__(nodes)
        self.pulled = 0
        self.streams = 0

    async def list(self) -> AsyncIterator[tuple[bytes, Node]]:
        self.streams += 1
        async for item in super().list():
            self.pulled += 1
            yield item


async def test_root_listing_streams_and_restarts_on_rewind() -> None:
    node = FileNode(B3Digest.of(b""), 0)
    roots = CountingRootNodes({store_name(i % 256, f"p{i}"): node for i in range(1000)})
    tree = Tree()
    fs = tree.fs(roots, list_root=True)
    fh = await fs.open_directory(ROOT_INODE)
    first = await fs.dir_entries(fh, 0, limit=10)
    assert len(first) == 10
    # Only about one batch is pulled from the backend for the first readdir.
    assert roots.pulled < 200
    rest = []
    offset = first[-1][2]
    while entries := await fs.dir_entries(fh, offset, limit=50):
        rest += entries
        offset = entries[-1][2]
    names = [n for n, _, _ in first + rest]
    assert names == sorted(roots._nodes)
    assert roots.streams == 1
    # rewinddir: the listing starts again from the backend.
    again = await fs.dir_entries(fh, 0, limit=5)
    assert [n for n, _, _ in again] == names[:5]
    assert roots.streams == 2
    await fs.releasedir(fh)


async def test_read_exact_bytes_at_any_offset() -> None:
    fs, _ = await make_fs()
    big = await lookup_path(fs, store_name(1, "a"), b"big")
    data = bytes(range(256)) * 4096
    info = await fs.open(big.st_ino, os.O_RDONLY, CTX)
    assert info.keep_cache
    for off, size in [(0, 4096), (1, 100), (131072, 131072), (len(data) - 10, 100), (5, 0)]:
        assert await fs.read(info.fh, off, size) == data[off : off + size]
    assert await fs.read(info.fh, len(data) + 5, 10) == b""
    await fs.release(info.fh)


async def test_sequential_read_of_a_corrupt_blob_fails_at_the_end() -> None:
    tree = Tree()
    roots = await tree.build()
    good = (roots[store_name(3, "file")]).digest  # type: ignore[union-attr]
    tree.blobs.blobs[good] = b"hellO\n"  # same size, other bytes
    fs = tree.fs(StaticRootNodes(roots))
    attr = await lookup_path(fs, store_name(3, "file"))
    info = await fs.open(attr.st_ino, os.O_RDONLY, CTX)
    assert await fuse_errno(fs.read(info.fh, 0, 4096)) == errno.EIO


async def test_short_or_missing_blob_is_eio() -> None:
    tree = Tree()
    roots = await tree.build()
    digest = roots[store_name(3, "file")].digest  # type: ignore[union-attr]
    tree.blobs.blobs[digest] = b"hel"
    fs = tree.fs(StaticRootNodes(roots))
    attr = await lookup_path(fs, store_name(3, "file"))
    assert await fuse_errno(fs.open(attr.st_ino, os.O_RDONLY, CTX)) == errno.EIO
    del tree.blobs.blobs[digest]
    assert await fuse_errno(fs.open(attr.st_ino, os.O_RDONLY, CTX)) == errno.EIO


async def test_empty_file_needs_no_blob() -> None:
    fs, _ = await make_fs()
    empty = await lookup_path(fs, store_name(1, "a"), b"empty")
    info = await fs.open(empty.st_ino, os.O_RDONLY, CTX)
    assert await fs.read(info.fh, 0, 100) == b""


async def test_directory_hole_stats_but_fails_inside() -> None:
    tree = Tree()
    hole = DirectoryNode(B3Digest.of(b"not stored"), 3)
    fs = tree.fs(StaticRootNodes({store_name(5, "hole"): hole}))
    attr = await lookup_path(fs, store_name(5, "hole"))
    assert attr.st_mode == 0o040555
    assert await fuse_errno(fs.lookup(attr.st_ino, b"x", CTX)) == errno.EIO
    assert await fuse_errno(fs.opendir(attr.st_ino, CTX)) == errno.EIO


class HangingDirectories(MemoryDirectoryService):
    async def get(self, digest: B3Digest) -> Directory | None:
        await trio.sleep_forever()
        raise AssertionError("unreachable")


async def test_hanging_backend_is_eio_after_the_timeout(autojump_clock: trio.abc.Clock) -> None:
    tree = Tree()
    roots = await tree.build()
    fs = StoreFilesystem(
        tree.blobs, HangingDirectories(), StaticRootNodes(roots), backend_timeout=5
    )
    attr = await lookup_path(fs, store_name(1, "a"))
    start = trio.current_time()
    assert await fuse_errno(fs.lookup(attr.st_ino, b"hello", CTX)) == errno.EIO
    assert trio.current_time() - start == pytest.approx(5)


class SlowRemoteBlobs(MemoryBlobService):
    """Blobs whose reads wait on something, as a remote backend's do."""

    local_reads = False

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay
        self.reading = 0
        self.most_at_once = 0

    async def _open_raw(self, digest: B3Digest) -> BlobReader | None:
        reader = await super()._open_raw(digest)
        if reader is None:
            return None
        service = self
        inner_read = reader.read_at

        async def read_at(offset: int, n: int) -> bytes:
            service.reading += 1
            service.most_at_once = max(service.most_at_once, service.reading)
            try:
                await trio.sleep(service.delay)
                return await inner_read(offset, n)
            finally:
                service.reading -= 1

        reader.read_at = read_at  # type: ignore[method-assign]
        return reader


async def test_hanging_blob_read_is_eio_after_the_timeout(autojump_clock: trio.abc.Clock) -> None:
    tree = Tree()
    tree.blobs = SlowRemoteBlobs(delay=float("inf"))
    roots = await tree.build()
    fs = tree.fs(StaticRootNodes(roots), backend_timeout=5)
    attr = await lookup_path(fs, store_name(1, "a"), b"hello")
    info = await fs.open(attr.st_ino, os.O_RDONLY, CTX)
    start = trio.current_time()
    assert await fuse_errno(fs.read(info.fh, 0, 4096)) == errno.EIO
    assert trio.current_time() - start == pytest.approx(5)


async def test_concurrent_reads_of_one_handle_reach_the_reader_one_at_a_time(
    autojump_clock: trio.abc.Clock,
) -> None:
    tree = Tree()
    blobs = tree.blobs = SlowRemoteBlobs(delay=1)
    roots = await tree.build()
    fs = tree.fs(StaticRootNodes(roots))
    attr = await lookup_path(fs, store_name(1, "a"), b"big")
    info = await fs.open(attr.st_ino, os.O_RDONLY, CTX)
    chunks: dict[int, bytes] = {}

    async def read(off: int) -> None:
        chunks[off] = await fs.read(info.fh, off, 65536)

    async with trio.open_nursery() as nursery:
        for off in range(0, 256 * 4096, 65536):
            nursery.start_soon(read, off)
    assert blobs.most_at_once == 1
    assert b"".join(chunks[off] for off in sorted(chunks)) == bytes(range(256)) * 4096


class CountingDirectories(MemoryDirectoryService):
    def __init__(self) -> None:
        super().__init__()
        self.gets = 0

    async def get(self, digest: B3Digest) -> Directory | None:
        self.gets += 1
        await trio.sleep(0.01)
        return await super().get(digest)


async def test_concurrent_lookups_fetch_a_directory_once() -> None:
    tree = Tree()
    tree.directories = CountingDirectories()
    roots = await tree.build()
    fs = tree.fs(StaticRootNodes(roots))
    attr = await lookup_path(fs, store_name(1, "a"))
    results: list[int] = []

    async def look(name: bytes) -> None:
        results.append((await fs.lookup(attr.st_ino, name, CTX)).st_ino)

    async with trio.open_nursery() as nursery:
        for name in [b"hello", b"big", b"link"] * 10:
            nursery.start_soon(look, name)
    assert len(results) == 30
    assert tree.directories.gets == 1


async def test_forget_drops_inodes() -> None:
    fs, _ = await make_fs()
    a = await lookup_path(fs, store_name(1, "a"))
    hello = await fs.lookup(a.st_ino, b"hello", CTX)
    assert fs.inodes.node(hello.st_ino) is not None
    await fs.forget([(hello.st_ino, 1)])
    assert fs.inodes.node(hello.st_ino) is None
    assert await fuse_errno(fs.getattr(hello.st_ino, CTX)) == errno.ENOENT
    # Looked up again, it comes back.
    again = await fs.lookup(a.st_ino, b"hello", CTX)
    assert again.st_size == 6


async def test_readlink_and_einval() -> None:
    fs, _ = await make_fs()
    link = await lookup_path(fs, store_name(1, "a"), b"link")
    assert await fs.readlink(link.st_ino, CTX) == b"hello"
    hello = await lookup_path(fs, store_name(1, "a"), b"hello")
    assert await fuse_errno(fs.readlink(hello.st_ino, CTX)) == errno.EINVAL
    assert await fuse_errno(fs.readlink(ROOT_INODE, CTX)) == errno.EINVAL


async def test_open_a_directory_is_eisdir_and_writes_are_erofs() -> None:
    fs, _ = await make_fs()
    a = await lookup_path(fs, store_name(1, "a"))
    assert await fuse_errno(fs.open(a.st_ino, os.O_RDONLY, CTX)) == errno.EISDIR
    hello = await lookup_path(fs, store_name(1, "a"), b"hello")
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
        assert await fuse_errno(fs.open(hello.st_ino, flags, CTX)) == errno.EROFS
    assert await fuse_errno(fs.mkdir(a.st_ino, b"x", 0o755, CTX)) == errno.EROFS
    assert await fuse_errno(fs.unlink(a.st_ino, b"hello", CTX)) == errno.EROFS
    assert await fuse_errno(fs.write(0, 0, b"x")) == errno.EROFS


async def test_xattrs() -> None:
    fs, roots = await make_fs(show_xattr=True)
    a = await lookup_path(fs, store_name(1, "a"))
    digest = roots[store_name(1, "a")].digest  # type: ignore[union-attr]
    assert await fs.listxattr(a.st_ino, CTX) == [XATTR_DIRECTORY_DIGEST]
    assert await fs.getxattr(a.st_ino, XATTR_DIRECTORY_DIGEST, CTX) == str(digest).encode()
    hello = await lookup_path(fs, store_name(1, "a"), b"hello")
    assert await fs.listxattr(hello.st_ino, CTX) == [XATTR_BLOB_DIGEST]
    assert (await fs.getxattr(hello.st_ino, XATTR_BLOB_DIGEST, CTX)).startswith(b"b3:")
    assert await fuse_errno(fs.getxattr(hello.st_ino, b"user.other", CTX)) == errno.ENODATA
    link = await lookup_path(fs, store_name(1, "a"), b"link")
    assert await fs.listxattr(link.st_ino, CTX) == []

    hidden, _ = await make_fs(show_xattr=False)
    a = await lookup_path(hidden, store_name(1, "a"))
    assert await fuse_errno(hidden.listxattr(a.st_ino, CTX)) == errno.ENOSYS


def test_inode_table_keys_and_forget() -> None:
    table = InodeTable()
    digest = B3Digest.of(b"x")
    plain_node = pack_node(FileNode(digest, 1))
    plain = table.ref(plain_node)
    assert plain > ROOT_INODE
    assert table.ref(pack_node(FileNode(digest, 1))) == plain
    assert table.lookups(plain) == 2
    assert table.ref(pack_node(FileNode(digest, 1, executable=True))) != plain
    assert table.ref(pack_node(FileNode(digest, 2))) != plain
    symlink = pack_node(SymlinkNode(b"t"))
    assert table.ref(symlink) == table.ref(pack_node(SymlinkNode(b"t")))
    dir_ino = table.ref(pack_node(DirectoryNode(digest, 1)))
    assert dir_ino != plain
    assert len(table) == 5
    table.forget(plain, 1)
    assert table.node(plain) == plain_node
    table.forget(plain, 1)
    assert table.node(plain) is None
    assert table.lookups(plain) == 0
    assert len(table) == 4
    # A forgotten number is free for the next new node, with a fresh count.
    other = pack_node(SymlinkNode(b"other"))
    assert table.ref(other) == plain
    assert table.node(plain) == other
    assert table.lookups(plain) == 1
    for unknown in (0, ROOT_INODE, 12345, -1):
        table.forget(unknown, 1)  # ignored
        assert table.node(unknown) is None


def test_inode_table_children_belong_to_the_live_inode() -> None:
    table = InodeTable()
    directory = pack_node(DirectoryNode(B3Digest.of(b"d"), 1))
    children = (PackedNames([b"a"]), (pack_node(SymlinkNode(b"t")),))
    ino = table.ref(directory)
    table.set_children(ino, directory, children)
    assert table.children(ino) == children
    # Forgotten, then the number reused by another node while a fetch for the
    # old one was in flight: the late result is not attached to the new one.
    table.forget(ino, 1)
    assert table.children(ino) is None
    other = pack_node(DirectoryNode(B3Digest.of(b"e"), 1))
    assert table.ref(other) == ino
    table.set_children(ino, directory, children)
    assert table.children(ino) is None


def test_a_kept_listing_holds_its_entries_until_the_directory_is_forgotten() -> None:
    table = InodeTable()
    leaf = pack_node(FileNode(B3Digest.of(b"leaf"), 1))
    inner = pack_node(DirectoryNode(B3Digest.of(b"inner"), 1))
    other = pack_node(SymlinkNode(b"other"))
    top = pack_node(DirectoryNode(B3Digest.of(b"top"), 3))
    top_ino = table.ref(top)
    table.set_children(top_ino, top, (PackedNames([b"a", b"b", b"c"]), (inner, leaf, other)))
    # The kernel took the first two of top's entries, then the third.
    inner_ino, leaf_ino = table.ref(inner), table.ref(leaf)
    table.hold(top_ino, 0, 2)
    other_ino = table.ref(other)
    table.hold(top_ino, 2, 3)
    table.hold(top_ino, 0, 3)  # the same run again: held once
    assert table.held(top_ino) == 3
    # inner's own listing: leaf again.
    table.set_children(inner_ino, inner, (PackedNames([b"x"]), (leaf,)))
    table.hold(inner_ino, 0, 1)
    # A run that does not start at the held prefix cannot be in the cache.
    table.hold(inner_ino, 5, 7)
    assert table.held(inner_ino) == 1
    # The kernel forgets every entry: all stay, under their numbers.
    for ino in (inner_ino, leaf_ino, other_ino):
        table.forget(ino, 1)
    assert table.node(inner_ino) == inner and table.node(leaf_ino) == leaf
    assert table.node(other_ino) == other
    assert table.ref(leaf) == leaf_ino
    table.forget(leaf_ino, 1)
    # Then the directory: what it held goes, and what inner held with it.
    table.forget(top_ino, 1)
    for ino in (top_ino, inner_ino, leaf_ino, other_ino):
        assert table.node(ino) is None, ino
    assert len(table) == 0
    assert table.held(top_ino) == 0


def test_a_plain_listing_holds_with_the_counts_its_numbers_took() -> None:
    # A plain READDIR's entries are no lookups: the count `ref` took for a
    # kept listing's entry is the hold's own, and the one of an entry
    # outside the held run is not taken at all (entry_number names it).
    table = InodeTable()
    a, b = pack_node(SymlinkNode(b"a")), pack_node(SymlinkNode(b"b"))
    top = pack_node(DirectoryNode(B3Digest.of(b"top"), 2))
    top_ino = table.ref(top)
    table.set_children(top_ino, top, (PackedNames([b"a", b"b"]), (a, b)))
    assert table.holding_from(top_ino, 1) is None  # would not continue the run
    assert table.holding_from(top_ino, 0) == 0
    a_ino = table.ref(a)
    table.hold(top_ino, 0, 1, [a_ino], counted=True)
    assert table.lookups(a_ino) == 1 and table.held(top_ino) == 1
    # b, listed again from the start: a is named by its number, uncounted.
    assert table.holding_from(top_ino, 0) == 1
    assert table.entry_number(a) == a_ino
    b_ino = table.ref(b)
    table.hold(top_ino, 0, 2, [a_ino, b_ino], counted=True)
    assert table.lookups(a_ino) == 1 and table.lookups(b_ino) == 1
    table.forget(top_ino, 1)
    assert len(table) == 0


def test_an_entry_without_an_inode_is_named_outside_the_table() -> None:
    table = InodeTable()
    node, other = pack_node(SymlinkNode(b"n")), pack_node(SymlinkNode(b"o"))
    unlisted = table.entry_number(node)
    assert unlisted >= UNLISTED_NUMBERS and unlisted == table.entry_number(node)
    assert len(table) == 0  # nothing allocated, nothing counted
    assert table.entry_number(other) != unlisted
    ino = table.ref(node)
    assert ino < UNLISTED_NUMBERS and table.entry_number(node) == ino


def test_a_listing_is_not_held_for_a_forgotten_directory() -> None:
    table = InodeTable()
    directory = pack_node(DirectoryNode(B3Digest.of(b"d"), 1))
    entry = pack_node(SymlinkNode(b"t"))
    ino = table.ref(directory)
    table.set_children(ino, directory, (PackedNames([b"e"]), (entry,)))
    table.forget(ino, 1)
    table.hold(ino, 0, 1)
    assert len(table) == 0


def test_packed_names_read_like_a_tuple() -> None:
    names = [b"a", b"bb", b"c" * 255, b"z", b"\xff"]  # in byte order
    packed = PackedNames(names)
    assert len(packed) == 5
    assert list(packed) == names
    assert [packed[i] for i in range(-5, 5)] == names + names
    assert packed[1:4] == names[1:4]
    for i in (5, -6, 10**9):
        with pytest.raises(IndexError):
            packed[i]
    for i, name in enumerate(names):
        assert bisect.bisect_left(packed, name) == i
    assert bisect.bisect_left(packed, b"b") == 1
    assert bisect.bisect_left(packed, b"zz") == 4
    assert packed[0:5] == names
    assert packed[3:99] == names[3:]
    assert packed[4:2] == []
    assert packed[::2] == names[::2]
    with pytest.raises(ValueError, match="NUL"):
        PackedNames([b"a\0b"])
    empty = PackedNames([])
    assert len(empty) == 0
    assert list(empty) == []
    assert bisect.bisect_left(empty, b"a") == 0
