"""The read-only filesystem over a store view: tvix's TvixStoreFs, in Python.

A `pyfuse3.Operations` whose handlers hold all the logic and touch the kernel
only through their return values (and `pyfuse3.readdir_reply` in `readdir`),
so tests can call them directly, without a mount. `mount.py` is the thin part
that talks to the kernel.

Where we differ from tvix on purpose (see DESIGN.md): files are keyed by
digest and executable bit, `st_blocks` is real, the kernel may cache entries,
attributes and file pages forever (content never changes), negative lookups
in the root are not cached (a store path may appear later), forget is
honoured, and data from a backend is checked before it is served.
"""

from __future__ import annotations

import bisect
import errno
import logging
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Concatenate, Final, ParamSpec, Protocol, TypeVar

import pyfuse3
import trio

from tvix_mountd.castore.blobs import BlobReader, BlobService
from tvix_mountd.castore.digests import B3Digest
from tvix_mountd.castore.directories import DirectoryService
from tvix_mountd.castore.errors import StoreError, ValidationError
from tvix_mountd.castore.nodes import (
    PACKED_DIRECTORY,
    PACKED_EXECUTABLE,
    PACKED_FILE,
    PACKED_SIZE,
    PACKED_SYMLINK,
    FileNode,
    Node,
    PackedNode,
    pack_node,
    packed_digest,
    unpack_node,
)
from tvix_mountd.coalesce import Coalescer
from tvix_mountd.workers.inodes import ROOT_INODE, Children, InodeTable
from tvix_mountd.workers.names import PackedNames
from tvix_mountd.workers.rootnodes import RootNodes

log = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")

XATTR_DIRECTORY_DIGEST: Final = b"user.tvix.castore.directory.digest"
XATTR_BLOB_DIGEST: Final = b"user.tvix.castore.blob.digest"

# Content never changes: let the kernel keep entries and attributes "forever"
# (a century; FUSE takes seconds as a u64, pyfuse3 a double).
FOREVER: Final = 100 * 365 * 24 * 3600.0
# Root entries pulled from the backend per readdir (a kernel buffer holds ~25).
ROOT_READDIR_BATCH: Final = 64
# Names sliced out per batch in readdir (a kernel buffer takes ~30-250).
READDIR_NAME_BATCH: Final = 128
# How many root names (basename -> node) to remember between lookups.
ROOT_NAME_CACHE_SIZE: Final = 100_000
# Whether opendir may answer with a FileInfo, so that the kernel keeps a
# directory's listing and answers the next ones itself: pyfuse3 as patched by
# scripts/setup.sh (third_party/pyfuse3/). Stock pyfuse3 still works; every
# listing then comes to us.
KERNEL_CACHES_LISTINGS: Final = hasattr(pyfuse3.FileInfo(), "cache_readdir")
# Flags that would modify a file.
_WRITE_FLAGS: Final = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT


class RequestObserver(Protocol):
    """Where per-request figures go (tvix_mountd.metrics.RequestMetrics)."""

    def observe(
        self, op: str, seconds: float, error_errno: int | None, read_bytes: int = 0
    ) -> None: ...


def _instrumented(
    op: str,
) -> Callable[
    [Callable[Concatenate[StoreFilesystem, P], Coroutine[Any, Any, T]]],
    Callable[Concatenate[StoreFilesystem, P], Coroutine[Any, Any, T]],
]:
    """Count and time a handler, when the filesystem has an observer."""

    def wrap(
        method: Callable[Concatenate[StoreFilesystem, P], Coroutine[Any, Any, T]],
    ) -> Callable[Concatenate[StoreFilesystem, P], Coroutine[Any, Any, T]]:
        async def handler(self: StoreFilesystem, /, *args: P.args, **kwargs: P.kwargs) -> T:
            observer = self.observer
            if observer is None:
                return await method(self, *args, **kwargs)
            start = time.perf_counter()
            try:
                result = await method(self, *args, **kwargs)
            except pyfuse3.FUSEError as e:
                observer.observe(op, time.perf_counter() - start, e.errno)
                raise
            size = len(result) if isinstance(result, bytes) and op == "read" else 0
            observer.observe(op, time.perf_counter() - start, None, size)
            return result

        # Not functools.wraps: its result type hides the signature from mypy.
        handler.__name__ = handler.__qualname__ = method.__name__
        handler.__doc__ = method.__doc__
        return handler

    return wrap


def _erofs() -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(errno.EROFS)


_MODE_OF_KIND: Final = {
    PACKED_DIRECTORY: 0o040555,
    PACKED_FILE: 0o100444,
    PACKED_EXECUTABLE: 0o100555,
    PACKED_SYMLINK: 0o120444,
}
_size_field = PACKED_SIZE.unpack_from
# Nix sets every time in /nix/store to 1 s after the epoch (tvix says 0): a
# copy out of the mount then matches a copy out of /nix/store for rsync, tar
# and make, which compare mtimes.
STORE_TIME_NS: Final = 1_000_000_000


def entry_attributes(ino: int, node: PackedNode | None) -> pyfuse3.EntryAttributes:
    """Attributes as in /nix/store: owned by root, times 1, modes 0444/0555.

    `node` None is the mount root. Built anew for every reply (~0.7 us): kept
    per inode they were 200 bytes each, 30% of a worker's memory after a walk.
    """
    attr = pyfuse3.EntryAttributes()
    attr.st_ino = ino
    attr.entry_timeout = FOREVER
    attr.attr_timeout = FOREVER
    attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = STORE_TIME_NS
    if node is None:
        attr.st_mode = 0o040555
        return attr
    kind = node[0]
    attr.st_mode = _MODE_OF_KIND[kind]
    if kind == PACKED_SYMLINK:
        attr.st_size = len(node) - 1
    else:
        size = _size_field(node)[0]
        attr.st_size = size
        if kind != PACKED_DIRECTORY:
            attr.st_blocks = (size + 511) // 512
    return attr


@dataclass
class _OpenFile:
    node: FileNode
    reader: BlobReader | None  # None for the empty file: nothing to fetch
    # The kernel may send reads of one handle concurrently (readahead); a
    # streaming reader must see them one at a time.
    lock: trio.Lock = field(default_factory=trio.Lock)
    # Set once the backend's bytes failed their check: every later read of this
    # handle fails too. (The kernel retries a failed page read on the same
    # handle, and that retry, out of order for the verifying reader, would
    # otherwise pass unchecked and hand the corrupt bytes out.)
    corrupt: bool = False


@dataclass
class _RootListing:
    """An open root directory: a window onto the streamed root listing.

    Only entries from the last offset the kernel asked for on are kept; a
    request for an earlier offset (rewinddir) restarts the stream.
    """

    stream: AsyncIterator[tuple[bytes, Node]] | None = None
    base: int = 0  # listing index of window[0]
    window: list[tuple[bytes, PackedNode]] = field(default_factory=list)
    exhausted: bool = False
    lock: trio.Lock = field(default_factory=trio.Lock)


@dataclass
class _DirListing:
    # The contents themselves: an open directory's listing must not depend
    # on the table.
    children: Children
    # The directory's inode, when the kernel may keep the listing (its
    # entries are then held, see InodeTable.hold). An open directory is
    # never forgotten, so the number stays its own, and `children` are the
    # ones the table keeps for it.
    kept_as: int | None = None


class StoreFilesystem(pyfuse3.Operations):
    """A read-only view of a store: root names from `root_nodes`, trees from
    `directories`, file contents from `blobs`."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(
        self,
        blobs: BlobService,
        directories: DirectoryService,
        root_nodes: RootNodes,
        *,
        list_root: bool = False,
        show_xattr: bool = True,
        backend_timeout: float = 10.0,
        metrics: RequestObserver | None = None,
    ) -> None:
        super().__init__()
        self.observer = metrics
        # The largest read the kernel sent (logged at unmount): how well
        # readahead and max_pages let sequential reads batch up.
        self.largest_read = 0
        self._blobs = blobs
        self._directories = directories
        self._root_nodes = root_nodes
        self.list_root = list_root
        self.show_xattr = show_xattr
        self.backend_timeout = backend_timeout
        self.inodes = InodeTable()
        self._root_attr = entry_attributes(ROOT_INODE, None)
        self._root_names: OrderedDict[bytes, PackedNode] = OrderedDict()
        self._root_lookups: Coalescer[bytes, Node | None] = Coalescer()
        self._directory_fetches: Coalescer[B3Digest, Children] = Coalescer()
        self._files: dict[int, _OpenFile] = {}
        # Blobs whose bytes failed their check once: opened without keep_cache
        # from then on, so the kernel drops pages cached before the check failed.
        self._corrupt_blobs: set[B3Digest] = set()
        self._dirs: dict[int, _RootListing | _DirListing] = {}
        self._next_handle = 1

    # -- helpers ---------------------------------------------------------

    async def _backend(
        self, fn: Callable[[], Awaitable[T]], what: str, *args: object, deadline: bool = True
    ) -> T:
        """Run a backend call: any failure or a timeout is EIO and a log line.

        `what % args` describes the call; it is formatted only for a log line,
        since digests print through a base64 encode. The deadline is a bare
        CancelScope (trio.fail_after's context manager costs twice as much);
        `deadline=False` is for calls that cannot wait on anything (local
        reads done inline), where even the bare scope costs as much as the call.
        """
        try:
            if not deadline:
                return await fn()
            with trio.CancelScope(deadline=trio.current_time() + self.backend_timeout):
                return await fn()
            log.warning("%s: backend made no progress for %g s", what % args, self.backend_timeout)
        except StoreError as e:
            log.warning("%s: %s", what % args, e)
        except Exception:
            # A bug or an unexpected backend failure must not take the mount down.
            log.exception("%s: unexpected error", what % args)
        raise pyfuse3.FUSEError(errno.EIO)

    def _node(self, ino: int) -> PackedNode:
        node = self.inodes.node(ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def _handle(self) -> int:
        handle = self._next_handle
        self._next_handle += 1
        return handle

    def _remember_root_name(self, name: bytes, node: PackedNode) -> None:
        self._root_names[name] = node
        self._root_names.move_to_end(name)
        if len(self._root_names) > ROOT_NAME_CACHE_SIZE:
            self._root_names.popitem(last=False)

    async def _resolve_root_name(self, name: bytes) -> PackedNode:
        node = self._root_names.get(name)
        if node is not None:
            self._root_names.move_to_end(name)
            return node

        async def fetch() -> Node | None:
            return await self._backend(
                lambda: self._root_nodes.get_by_basename(name), "root lookup %r", name
            )

        found = await self._root_lookups.run(name, fetch)
        if found is None:
            # Not cached, by us or the kernel: the path may be added later.
            raise pyfuse3.FUSEError(errno.ENOENT)
        packed = pack_node(found)
        self._remember_root_name(name, packed)
        return packed

    async def _children(self, ino: int) -> Children:
        """A directory inode's (names, nodes), fetched on first use."""
        children = self.inodes.children(ino)
        if children is not None:
            return children
        node = self._node(ino)
        if node[0] != PACKED_DIRECTORY:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        digest = packed_digest(node)

        async def fetch() -> Children:
            directory = await self._backend(
                lambda: self._directories.get(digest), "directory %s", digest
            )
            if directory is None:
                # A hole: the directory itself stats fine, its contents fail.
                log.warning("directory %s not found in the directory service", digest)
                raise pyfuse3.FUSEError(errno.EIO)
            names, nodes = directory.packed_entries()
            return PackedNames(names), nodes

        children = await self._directory_fetches.run(digest, fetch)
        self.inodes.set_children(ino, node, children)
        return children

    # -- attributes and lookups -------------------------------------------

    @_instrumented("getattr")
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if inode == ROOT_INODE:
            return self._root_attr
        return entry_attributes(inode, self._node(inode))

    @_instrumented("lookup")
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if parent_inode == ROOT_INODE:
            node = await self._resolve_root_name(name)
        else:
            names, nodes = await self._children(parent_inode)
            i = bisect.bisect_left(names, name)
            if i == len(names) or names[i] != name:
                raise pyfuse3.FUSEError(errno.ENOENT)
            node = nodes[i]
        return entry_attributes(self.inodes.ref(node), node)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            self.inodes.forget(ino, count)

    # -- directories -------------------------------------------------------

    async def open_directory(self, inode: int, *, kernel_keeps: bool = False) -> int:
        """A handle for listing directory `inode`: what `opendir` does, for
        callers other than the kernel. `kernel_keeps`: the listing goes to a
        kernel that may keep it."""
        handle = self._handle()
        if inode == ROOT_INODE:
            if not self.list_root:
                raise pyfuse3.FUSEError(errno.EPERM)
            self._dirs[handle] = _RootListing()
        else:
            children = await self._children(inode)
            self._dirs[handle] = _DirListing(children, inode if kernel_keeps else None)
        return handle

    @_instrumented("opendir")
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int | pyfuse3.FileInfo:
        # The root's listing is not the kernel's to keep: store paths may be
        # added. Any other directory's content never changes.
        keeps = KERNEL_CACHES_LISTINGS and inode != ROOT_INODE
        handle = await self.open_directory(inode, kernel_keeps=keeps)
        if not keeps:
            return handle
        return pyfuse3.FileInfo(fh=handle, keep_cache=True, cache_readdir=True)

    @_instrumented("readdir")
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        names, nodes, first = await self._listing(fh, start_id)
        start = start_id - first
        stop = self._reply_entries(token, names, nodes, first, start)
        listing = self._dirs.get(fh)
        if isinstance(listing, _DirListing) and listing.kept_as is not None:
            self.inodes.hold(listing.kept_as, start, stop)

    def _reply_entries(
        self,
        token: pyfuse3.ReaddirToken,
        names: Sequence[bytes],
        nodes: Sequence[PackedNode],
        first: int,
        i: int,
    ) -> int:
        """Hand `names[i:]` to the kernel until its buffer is full; the index
        of the first entry it did not take."""
        ref = self.inodes.ref
        reply = pyfuse3.readdir_reply
        # Entries are built one at a time until the kernel's buffer is full:
        # a big directory's readdir costs only what one buffer holds. Names
        # come a batch at a time (one split of the packed names).
        while i < len(names):
            for name in names[i : i + READDIR_NAME_BATCH]:
                # readdirplus: each entry the kernel takes counts as a lookup.
                node = nodes[i]
                ino = ref(node)
                if not reply(token, name, entry_attributes(ino, node), first + i + 1):
                    self.inodes.forget(ino, 1)
                    return i
                i += 1
        return i

    async def dir_entries(
        self, fh: int, start_id: int, limit: int = 1024
    ) -> list[tuple[bytes, Node, int]]:
        """Up to `limit` entries from offset `start_id`: (name, node, next offset),
        as `readdir` hands them to the kernel (without counting lookups)."""
        names, nodes, first = await self._listing(fh, start_id)
        end = min(len(names), start_id - first + limit)
        return [
            (names[i], unpack_node(nodes[i]), first + i + 1) for i in range(start_id - first, end)
        ]

    async def _listing(
        self, fh: int, start_id: int
    ) -> tuple[Sequence[bytes], Sequence[PackedNode], int]:
        """(names, nodes, offset of names[0]) covering offset `start_id` on.

        Offsets are positions in the name-ordered listing, so a listing
        resumed at any offset continues exactly where it stopped.
        """
        listing = self._dirs.get(fh)
        if listing is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        if isinstance(listing, _RootListing):
            # Root entries come from a stream: pull about one kernel buffer.
            window = await self._root_window(listing, start_id, ROOT_READDIR_BATCH)
            return [name for name, _ in window], [node for _, node in window], start_id
        names, nodes = listing.children
        return names, nodes, 0

    async def _root_window(
        self, listing: _RootListing, start_id: int, limit: int
    ) -> list[tuple[bytes, PackedNode]]:
        async with listing.lock:
            if listing.stream is None or start_id < listing.base:
                await self._restart_root_stream(listing)
            while listing.base + len(listing.window) < start_id and not listing.exhausted:
                await self._pull_root_entry(listing)
            drop = min(len(listing.window), start_id - listing.base)
            del listing.window[:drop]
            listing.base += drop
            if listing.base < start_id:
                return []  # the listing ended before start_id
            while len(listing.window) < limit and not listing.exhausted:
                await self._pull_root_entry(listing)
            return listing.window[:limit]

    async def _restart_root_stream(self, listing: _RootListing) -> None:
        if listing.stream is not None:
            await _aclose(listing.stream)
        listing.stream = aiter(self._root_nodes.list())
        listing.base = 0
        listing.window.clear()
        listing.exhausted = False

    async def _pull_root_entry(self, listing: _RootListing) -> None:
        stream = listing.stream
        assert stream is not None

        async def step() -> tuple[bytes, Node] | None:
            try:
                return await anext(stream)
            except StopAsyncIteration:
                return None

        try:
            item = await self._backend(step, "root listing")
        except pyfuse3.FUSEError:
            # The stream is in an unknown state now; the next readdir restarts it.
            listing.stream = None
            raise
        if item is None:
            listing.exhausted = True
        else:
            name, node = item[0], pack_node(item[1])
            self._remember_root_name(name, node)
            listing.window.append((name, node))

    @_instrumented("releasedir")
    async def releasedir(self, fh: int) -> None:
        listing = self._dirs.pop(fh, None)
        if isinstance(listing, _RootListing) and listing.stream is not None:
            await _aclose(listing.stream)

    # -- files -------------------------------------------------------------

    @_instrumented("open")
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & _WRITE_FLAGS:
            raise _erofs()
        if inode == ROOT_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        packed = self._node(inode)
        if packed[0] == PACKED_DIRECTORY:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if packed[0] == PACKED_SYMLINK:
            raise pyfuse3.FUSEError(errno.ELOOP)
        node = unpack_node(packed)
        assert type(node) is FileNode
        reader = None
        if node.size > 0:
            digest = node.digest
            reader = await self._backend(
                lambda: self._blobs.open_read(digest),
                "open blob %s",
                digest,
                deadline=not self._blobs.local_reads,
            )
            if reader is None:
                log.warning("blob %s not found in the blob service", digest)
                raise pyfuse3.FUSEError(errno.EIO)
            if reader.size is not None and reader.size != node.size:
                log.warning(
                    "blob %s has %d bytes, its node says %d", digest, reader.size, node.size
                )
                await reader.aclose()
                raise pyfuse3.FUSEError(errno.EIO)
        handle = self._handle()
        self._files[handle] = _OpenFile(node, reader)
        # Content never changes: pages cached by an earlier open stay valid,
        # unless they may hold bytes of a blob that failed its check.
        keep_cache = node.digest not in self._corrupt_blobs
        return pyfuse3.FileInfo(fh=handle, keep_cache=keep_cache)

    @_instrumented("read")
    async def read(self, fh: int, off: int, size: int) -> bytes:
        open_file = self._files.get(fh)
        if open_file is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        if size > self.largest_read:
            self.largest_read = size
        node = open_file.node
        reader = open_file.reader
        if off >= node.size or reader is None:
            return b""
        want = min(size, node.size - off)
        # At the end, ask one byte more: a blob longer than its node shows up,
        # and the reader sees its end (and checks the digest).
        ask = want + 1 if off + want == node.size else want

        async def read_checked() -> bytes:
            try:
                return await reader.read_at(off, ask)
            except ValidationError:
                self._caught_corrupt(open_file)
                raise

        # Uncontended (every read of a local blob, which never yields), the
        # lock is taken without a trip through trio's scheduler, which
        # `async with lock` makes even when the lock is free.
        lock = open_file.lock
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:
            await lock.acquire()
        try:
            if open_file.corrupt:
                raise pyfuse3.FUSEError(errno.EIO)
            data = await self._backend(
                read_checked,
                "read blob %s at %d",
                node.digest,
                off,
                deadline=not self._blobs.local_reads,
            )
            if len(data) != want:
                log.warning(
                    "blob %s: %d bytes at offset %d, expected %d", node.digest, len(data), off, want
                )
                self._caught_corrupt(open_file)
                raise pyfuse3.FUSEError(errno.EIO)
        finally:
            lock.release()
        return data

    def _caught_corrupt(self, open_file: _OpenFile) -> None:
        open_file.corrupt = True
        self._corrupt_blobs.add(open_file.node.digest)

    @_instrumented("release")
    async def release(self, fh: int) -> None:
        open_file = self._files.pop(fh, None)
        if open_file is not None and open_file.reader is not None:
            await open_file.reader.aclose()

    # flush and fsync are left to pyfuse3's default (ENOSYS): the kernel then
    # stops sending them at all, one round trip less per close().

    @_instrumented("readlink")
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = None if inode == ROOT_INODE else self._node(inode)
        if node is None or node[0] != PACKED_SYMLINK:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return node[1:]

    # -- extended attributes ----------------------------------------------

    def _xattrs(self, inode: int) -> dict[bytes, bytes]:
        if not self.show_xattr:
            # Like tvix: ENOSYS tells the kernel to stop asking at all.
            raise pyfuse3.FUSEError(errno.ENOSYS)
        if inode == ROOT_INODE:
            return {}
        node = self._node(inode)
        kind = node[0]
        if kind == PACKED_SYMLINK:
            return {}
        name = XATTR_DIRECTORY_DIGEST if kind == PACKED_DIRECTORY else XATTR_BLOB_DIGEST
        return {name: str(packed_digest(node)).encode()}

    @_instrumented("getxattr")
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        value = self._xattrs(inode).get(name)
        if value is None:
            raise pyfuse3.FUSEError(errno.ENODATA)
        return value

    @_instrumented("listxattr")
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return list(self._xattrs(inode))

    @_instrumented("statfs")
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        stat = pyfuse3.StatvfsData()
        stat.f_bsize = 4096
        stat.f_frsize = 4096
        stat.f_namemax = 255
        return stat

    # -- everything that would write: read-only ------------------------------

    async def setattr(self, *args: object) -> pyfuse3.EntryAttributes:
        raise _erofs()

    async def mknod(self, *args: object) -> pyfuse3.EntryAttributes:
        raise _erofs()

    async def mkdir(self, *args: object) -> pyfuse3.EntryAttributes:
        raise _erofs()

    async def unlink(self, *args: object) -> None:
        raise _erofs()

    async def rmdir(self, *args: object) -> None:
        raise _erofs()

    async def symlink(self, *args: object) -> pyfuse3.EntryAttributes:
        raise _erofs()

    async def rename(self, *args: object) -> None:
        raise _erofs()

    async def link(self, *args: object) -> pyfuse3.EntryAttributes:
        raise _erofs()

    async def create(self, *args: object) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        raise _erofs()

    async def write(self, *args: object) -> int:
        raise _erofs()

    async def setxattr(self, *args: object) -> None:
        raise _erofs()

    async def removexattr(self, *args: object) -> None:
        raise _erofs()

    async def close(self) -> None:
        """Release every open handle (at unmount)."""
        if self.largest_read:
            log.info("largest read request: %d bytes", self.largest_read)
        # What the kernel still held a count on (or a kept listing held).
        log.info("inodes alive at unmount: %d", len(self.inodes))
        for fh in list(self._files):
            await self.release(fh)
        for fh in list(self._dirs):
            await self.releasedir(fh)


async def _aclose(stream: AsyncIterator[object]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()
