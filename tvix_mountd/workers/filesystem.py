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
import random
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
    PACKED_FILE_KINDS,
    PACKED_SIZE,
    PACKED_SYMLINK,
    Directory,
    FileNode,
    Node,
    PackedNode,
    pack_node,
    packed_digest,
    unpack_node,
)
from tvix_mountd.coalesce import Coalescer
from tvix_mountd.request_metrics import ReadAheadCounts
from tvix_mountd.workers import heap
from tvix_mountd.workers.dirahead import DirectoryPrefetcher
from tvix_mountd.workers.inodes import ROOT_INODE, Children, InodeTable
from tvix_mountd.workers.journal import RequestJournal, request_key
from tvix_mountd.workers.names import PackedNames
from tvix_mountd.workers.notices import KernelNotices
from tvix_mountd.workers.prefetch import BlobPrefetcher
from tvix_mountd.workers.rootnodes import RootNodes
from tvix_mountd.workers.runs import NameOrderRuns

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
# Directories with this many entries or more: once decoded, the memory the
# decoding used is given back to the system (heap.release_free_memory).
LARGE_DIRECTORY: Final = 4096
# How many root names (basename -> node) to remember between lookups.
ROOT_NAME_CACHE_SIZE: Final = 100_000
# Whether opendir may answer with a FileInfo, so that the kernel keeps a
# directory's listing and answers the next ones itself: pyfuse3 as patched by
# scripts/setup.sh (third_party/pyfuse3/). Stock pyfuse3 still works; every
# listing then comes to us.
KERNEL_CACHES_LISTINGS: Final = hasattr(pyfuse3.FileInfo(), "cache_readdir")
# Whether pyfuse3 hands read() the inode when the kernel sends handle 0
# (third_party/pyfuse3/03-zero-fh-is-inode.patch). Then open answers ENOSYS,
# once: the kernel stops sending OPEN and RELEASE (two requests fewer per
# file read) and keeps every file's pages (content never changes). On a
# stock pyfuse3 every open comes to us.
READS_WITHOUT_OPEN: Final = hasattr(pyfuse3.Operations, "zero_fh_is_inode")
# Whether pyfuse3 can answer plain READDIR (third_party/pyfuse3/
# 04-plain-readdir.patch). Then the kernel asks for attributes only for a
# listing's first buffer and while the caller looks up what it lists
# (READDIRPLUS_AUTO): `ls -f` or `find -type f` of a large directory gets
# names and types, and the kernel builds no inode per entry. On a stock
# pyfuse3 every listing is a readdirplus.
PLAIN_LISTINGS: Final = hasattr(pyfuse3.Operations, "readdirplus_auto")
# Handles of root listings: above every inode number (a handle below it is
# the inode number of the directory or file it opened).
ROOT_LISTING_HANDLES: Final = 1 << 62
# Blob readers kept open, at most (each may hold a file descriptor). With the
# kernel opening files itself no RELEASE says when a file is closed: the
# least recently read reader goes.
OPEN_READERS: Final = 512
# Flags that would modify a file.
_WRITE_FLAGS: Final = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT


class RequestObserver(Protocol):
    """Where per-request figures go (tvix_mountd.request_metrics.RequestMetrics)."""

    def observe(
        self, op: str, seconds: float, error_errno: int | None, read_bytes: int = 0
    ) -> None: ...

    def watch_read_ahead(self, source: Callable[[], ReadAheadCounts]) -> None:
        """Count what the read-aheads did: `source` gives running totals."""
        ...

    def watch_inodes(self, source: Callable[[], int]) -> None:
        """Show how many inodes are live: `source` gives the number."""
        ...


# Stable numbers for the request journal's keys (a str's hash is not stable
# across processes).
_OPCODES: Final = {
    op: i
    for i, op in enumerate(
        (
            "getattr",
            "lookup",
            "opendir",
            "readdir",
            "releasedir",
            "open",
            "read",
            "release",
            "readlink",
            "getxattr",
            "listxattr",
            "statfs",
        ),
        start=1,
    )
}


def _request(
    op: str,
) -> Callable[
    [Callable[Concatenate[StoreFilesystem, P], Coroutine[Any, Any, T]]],
    Callable[Concatenate[StoreFilesystem, P], Coroutine[Any, Any, T]],
]:
    """A kernel request's handler: journaled while it runs (journal.py), and
    counted and timed when the filesystem has an observer."""
    opcode = _OPCODES[op]

    def wrap(
        method: Callable[Concatenate[StoreFilesystem, P], Coroutine[Any, Any, T]],
    ) -> Callable[Concatenate[StoreFilesystem, P], Coroutine[Any, Any, T]]:
        async def handler(self: StoreFilesystem, /, *args: P.args, **kwargs: P.kwargs) -> T:
            journal = self.journal
            key = request_key(opcode, args)
            if key in journal.suspects:
                return await self._run_suspect(op, key, method(self, *args, **kwargs))
            slot = journal.begin(key)
            try:
                if self.observer is None:
                    return await method(self, *args, **kwargs)
                return await self._observed(op, method(self, *args, **kwargs))
            finally:
                journal.end(slot)

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


def children_of(directory: Directory) -> Children:
    """A Directory's entries as the inode table keeps them."""
    names, nodes = directory.packed_entries()
    children = PackedNames(names), nodes
    if len(nodes) >= LARGE_DIRECTORY:
        # Decoding it left memory free but resident (~220 bytes an entry).
        del directory, names
        heap.release_free_memory()
    return children


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
class _OpenBlob:
    """A file's blob reader, shared by every open of the file's inode."""

    ino: int
    packed: PackedNode  # what the inode number stood for when opened
    node: FileNode
    reader: BlobReader | None  # None for the empty file: nothing to fetch
    # The kernel may send reads of one file concurrently (readahead); a
    # streaming reader must see them one at a time.
    lock: trio.Lock = field(default_factory=trio.Lock)
    closed: bool = False  # released, or pushed out by newer open files


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


class _KernelPages:
    """prefetch.KernelPages for a mounted filesystem: pins in its inode table,
    stores by notify_store."""

    def __init__(self, inodes: InodeTable) -> None:
        self._inodes = inodes

    def pin(self, node: PackedNode) -> int:
        return self._inodes.pin(node)

    def unpin(self, numbers: Sequence[int]) -> None:
        for ino in numbers:
            self._inodes.forget(ino, 1)  # a file: nothing held to give back

    def store(self, ino: int, data: bytes) -> bool:
        try:
            pyfuse3.notify_store(ino, 0, data)
        except OSError as e:
            # The kernel forgot the inode meanwhile: the READ, if any, will come.
            log.debug("storing the pages of inode %d: %s", ino, e)
            return False
        return True


class StoreFilesystem(pyfuse3.Operations):
    """A read-only view of a store: root names from `root_nodes`, trees from
    `directories`, file contents from `blobs`."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False
    # A read's handle is the file's inode number, whether open made it or not.
    zero_fh_is_inode = True
    # Listings without attributes where the kernel needs none (PLAIN_LISTINGS);
    # per mount, see __init__. Asked for at INIT, so fixed per connection.
    readdirplus_auto = False

    def __init__(
        self,
        blobs: BlobService,
        directories: DirectoryService,
        root_nodes: RootNodes,
        *,
        list_root: bool = False,
        show_xattr: bool = True,
        plain_listings: bool = False,
        read_ahead: bool = True,
        backend_timeout: float = 10.0,
        metrics: RequestObserver | None = None,
        inodes: InodeTable | None = None,
        open_requests: bool = not READS_WITHOUT_OPEN,
        store_pages: bool = False,
        directories_ahead: bool | None = None,
    ) -> None:
        """`inodes`: the table to serve from, with what it already holds (a
        mount handed over from another worker); a fresh one by default.
        `open_requests` false: `open` answers ENOSYS, and the kernel reads
        files without opening them here (see READS_WITHOUT_OPEN).
        `store_pages`: a kernel serves this filesystem (pyfuse3 is mounted),
        and files read ahead may be stored into its page cache.
        `plain_listings`: let the kernel list without attributes where the
        caller stats nothing (READDIRPLUS_AUTO, see PLAIN_LISTINGS): `ls -f`
        of a large directory faster, a stat walk ~6% slower. Plain READDIRs
        are answered correctly either way.
        `read_ahead` false: nothing is read ahead, neither files
        (prefetch.py) nor directories (dirahead.py).
        `directories_ahead`: fetch the next subdirectories of a walk before
        they are opened (dirahead.py); by default if the directory service
        gains from it (`reads_ahead`)."""
        super().__init__()
        self.open_requests = open_requests
        self.inodes = inodes if inodes is not None else InodeTable()
        # Both run by whoever serves this filesystem (`run_background`).
        self.notices = KernelNotices()
        # Where entries sit and which are used in name order: what both
        # read-aheads start from.
        self.runs = NameOrderRuns()
        self.prefetcher = (
            BlobPrefetcher(blobs, _KernelPages(self.inodes) if store_pages else None)
            if read_ahead and (blobs.prefetches or blobs.fetches_ahead)
            else None
        )
        if directories_ahead is None:
            directories_ahead = directories.reads_ahead
        self.directory_prefetcher = (
            DirectoryPrefetcher(directories, self.inodes, self.runs, children_of, backend_timeout)
            if read_ahead and directories_ahead
            else None
        )
        # Where a read-ahead waits on a round trip, every listed entry's place
        # is worth remembering (runs.py); locally, the last replies' do.
        self._places_of_listed = self.directory_prefetcher is not None or (
            self.prefetcher is not None and blobs.fetches_ahead
        )
        self.observer = metrics
        if metrics is not None:
            metrics.watch_inodes(self.inodes.__len__)
            if self.prefetcher or self.directory_prefetcher:
                metrics.watch_read_ahead(self.read_ahead_counts)
        # The largest read the kernel sent (logged at unmount): how well
        # readahead and max_pages let sequential reads batch up.
        self.largest_read = 0
        self._blobs = blobs
        self._directories = directories
        self._root_nodes = root_nodes
        self.list_root = list_root
        self.show_xattr = show_xattr
        self.readdirplus_auto = plain_listings
        self.backend_timeout = backend_timeout
        self.journal = RequestJournal(self.inodes.state.journal)
        self._root_attr = entry_attributes(ROOT_INODE, None)
        # A lookup's answer "no such entry, and there never will be".
        self._no_entry = pyfuse3.EntryAttributes()
        self._no_entry.st_ino = 0
        self._no_entry.entry_timeout = FOREVER
        self._root_names: OrderedDict[bytes, PackedNode] = OrderedDict()
        self._root_lookups: Coalescer[bytes, Node | None] = Coalescer()
        self._directory_fetches: Coalescer[B3Digest, Children] = Coalescer()
        # Handles carry no state of their own: a file's or a directory's
        # handle is its inode number, so that a worker that takes a mount over
        # can answer for the handles of files and listings opened before.
        # Blob readers of open files, by inode, opened again on demand;
        # `_opens` counts the opens this process saw, to close a reader when
        # the last of them is released.
        self._readers: OrderedDict[int, _OpenBlob] = OrderedDict()
        self._opens: dict[int, int] = {}
        # Blobs whose bytes failed their check: read (and checked) again in
        # full before another byte of them is served, and meanwhile opened
        # without keep_cache, so that the kernel drops what it cached before.
        self._corrupt_blobs: set[B3Digest] = set()
        # Root listings (the one listing whose state is a stream), by handle.
        self._root_listings: dict[int, _RootListing] = {}
        # Unlikely to meet handles of a worker before this one, still held by
        # the kernel (which would share a listing's state: slower, not wrong).
        self._next_root_listing = ROOT_LISTING_HANDLES + (random.getrandbits(40) << 20)

    async def run_background(self) -> None:
        """What the filesystem does besides answering requests (notices to
        the kernel, reading ahead), until cancelled; run it while serving."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.notices.run)
            if self.prefetcher is not None:
                nursery.start_soon(self.prefetcher.run)
            if self.directory_prefetcher is not None:
                nursery.start_soon(self.directory_prefetcher.run)

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

    async def _observed(self, op: str, call: Coroutine[Any, Any, T]) -> T:
        observer = self.observer
        assert observer is not None
        start = time.perf_counter()
        try:
            result = await call
        except pyfuse3.FUSEError as e:
            observer.observe(op, time.perf_counter() - start, e.errno)
            raise
        size = len(result) if isinstance(result, bytes) and op == "read" else 0
        observer.observe(op, time.perf_counter() - start, None, size)
        return result

    async def _run_suspect(self, op: str, key: int, call: Coroutine[Any, Any, T]) -> T:
        """A request that was in flight when a worker died (journal.py)."""
        journal = self.journal
        if journal.convicted(key):
            call.close()
            log.error(
                "a %s request was in flight at %d worker crashes: answering it with EIO",
                op,
                journal.suspects[key],
            )
            raise pyfuse3.FUSEError(errno.EIO)
        async with journal.quarantine:
            slot = journal.begin(key)
            try:
                if self.observer is None:
                    result = await call
                else:
                    result = await self._observed(op, call)
            except pyfuse3.FUSEError:
                journal.cleared(key)
                raise
            finally:
                journal.end(slot)
        journal.cleared(key)
        return result

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
        self.inodes.state.log_root_name(name)
        return packed

    async def _children(self, ino: int) -> Children:
        """A directory inode's (names, nodes), fetched on first use."""
        children = self.inodes.children(ino)
        if children is not None:
            return children
        node = self._node(ino)
        if node[0] != PACKED_DIRECTORY:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if self.directory_prefetcher is not None:
            # Being fetched ahead: wait for that rather than fetch it twice.
            await self.directory_prefetcher.settled(packed_digest(node))
            children = self.inodes.children(ino)
            if children is not None:
                return children
        children = await self._fetch_children(node)
        self.inodes.set_children(ino, node, children)
        return children

    async def _fetch_children(self, node: PackedNode) -> Children:
        """The (names, nodes) of directory node `node`, from the directory service."""
        digest = packed_digest(node)

        async def fetch() -> Children:
            directory = await self._backend(
                lambda: self._directories.get(digest), "directory %s", digest
            )
            if directory is None:
                # A hole: the directory itself stats fine, its contents fail.
                log.warning("directory %s not found in the directory service", digest)
                raise pyfuse3.FUSEError(errno.EIO)
            return children_of(directory)

        return await self._directory_fetches.run(digest, fetch)

    # -- attributes and lookups -------------------------------------------

    @_request("getattr")
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if inode == ROOT_INODE:
            return self._root_attr
        return entry_attributes(inode, self._node(inode))

    @_request("lookup")
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if parent_inode == ROOT_INODE:
            node = await self._resolve_root_name(name)
            return entry_attributes(self.inodes.ref(node), node)
        names, nodes = await self._children(parent_inode)
        i = bisect.bisect_left(names, name)
        if i == len(names) or names[i] != name:
            # Nothing can ever appear in a store path: the kernel may keep
            # the miss for good (loaders and interpreters probe many names).
            return self._no_entry
        node = nodes[i]
        ino = self.inodes.ref(node)
        # Its place, for the read-ahead that would start from it, if any.
        ahead = self.directory_prefetcher if node[0] == PACKED_DIRECTORY else self.prefetcher
        if ahead is not None:
            parent = self.inodes.node(parent_inode)
            assert parent is not None  # its children were just read
            self.runs.looked_up(ino, parent_inode, parent, i)
        return entry_attributes(ino, node)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        unresolved: list[tuple[PackedNode, int]] = []
        for ino, count in inode_list:
            unresolved += self.inodes.forget(ino, count)
        # Directories that held children of a listing read before a handover:
        # their contents are needed to give those back.
        while unresolved:
            node, held = unresolved.pop()
            try:
                _, nodes = await self._fetch_children(node)
            except pyfuse3.FUSEError:
                # Their counts stay too high: a leak, never a wrong answer.
                log.warning("could not give back %d entries held by a forgotten directory", held)
                continue
            unresolved += self.inodes.release_held(nodes[:held])

    # -- directories -------------------------------------------------------

    async def open_directory(self, inode: int) -> int:
        """A handle for listing directory `inode`: what `opendir` does, for
        callers other than the kernel. A directory's handle is its inode
        number; the root's names a listing of its own (a stream)."""
        if inode != ROOT_INODE:
            await self._children(inode)  # a hole fails here, as in tvix
            return inode
        if not self.list_root:
            raise pyfuse3.FUSEError(errno.EPERM)
        handle = self._next_root_listing
        self._next_root_listing += 1
        self._root_listings[handle] = _RootListing()
        return handle

    @_request("opendir")
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int | pyfuse3.FileInfo:
        if self.directory_prefetcher is not None and inode != ROOT_INODE:
            self.directory_prefetcher.opened(inode)
        handle = await self.open_directory(inode)
        # The root's listing is not the kernel's to keep: store paths may be
        # added. Any other directory's content never changes.
        if inode == ROOT_INODE or not KERNEL_CACHES_LISTINGS:
            return handle
        return pyfuse3.FileInfo(fh=handle, keep_cache=True, cache_readdir=True)

    @_request("readdir")
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        names, nodes, first = await self._listing(fh, start_id)
        start = start_id - first
        # A stock pyfuse3 answers every listing with readdirplus.
        plus: bool = getattr(token, "plus", True)
        caches = KERNEL_CACHES_LISTINGS and fh < ROOT_LISTING_HANDLES
        counted_from = start
        if not plus:
            # A plain entry is no lookup: only those the kernel may keep in
            # its cached listing need numbers that last (InodeTable.hold).
            held = self.inodes.holding_from(fh, start) if caches else None
            counted_from = len(names) if held is None else held
        numbers: list[int] = []
        stop = self._reply_entries(token, names, nodes, first, start, numbers, counted_from, plus)
        if fh < ROOT_LISTING_HANDLES:
            if caches:
                # The kernel may keep this listing: see InodeTable.hold.
                self.inodes.hold(fh, start, stop, numbers, counted=not plus)
            directory = self.inodes.node(fh)
            if directory is not None and (self.prefetcher or self.directory_prefetcher):
                self.runs.listed(
                    fh, directory, start, numbers, nodes if self._places_of_listed else None
                )
            if directory is not None and self.prefetcher is not None and plus and start == 0:
                self.prefetcher.listed(directory, nodes)

    def _reply_entries(
        self,
        token: pyfuse3.ReaddirToken,
        names: Sequence[bytes],
        nodes: Sequence[PackedNode],
        first: int,
        i: int,
        numbers: list[int],
        counted_from: int = 0,
        plus: bool = True,
    ) -> int:
        """Hand `names[i:]` to the kernel until its buffer is full; the index
        of the first entry it did not take. The numbers of those it took are
        appended to `numbers`: those of entries from `counted_from` on with
        their lookup counts raised by one (each entry of a readdirplus is a
        lookup), the others as `InodeTable.entry_number` names them.

        `plus`: entries with their attributes (readdirplus), else names and
        types only (a plain READDIR reads only st_ino and st_mode)."""
        ref = self.inodes.ref
        number = self.inodes.entry_number
        reply = pyfuse3.readdir_reply
        taken = numbers.append
        plain = None if plus else pyfuse3.EntryAttributes()
        # Entries are built one at a time until the kernel's buffer is full:
        # a big directory's readdir costs only what one buffer holds. Names
        # come a batch at a time (one split of the packed names).
        while i < len(names):
            for name in names[i : i + READDIR_NAME_BATCH]:
                node = nodes[i]
                ino = ref(node) if i >= counted_from else number(node)
                if plain is None:
                    attr = entry_attributes(ino, node)
                else:
                    # Copied into the reply at once: one object does for all.
                    attr = plain
                    attr.st_ino = ino
                    attr.st_mode = _MODE_OF_KIND[node[0]]
                if not reply(token, name, attr, first + i + 1):
                    if i >= counted_from:
                        self.inodes.forget(ino, 1)
                    return i
                taken(ino)
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
        resumed at any offset continues exactly where it stopped, also in a
        worker that took the mount over from the one that opened it.
        """
        if fh < ROOT_LISTING_HANDLES:
            names, nodes = await self._children(fh)
            return names, nodes, 0
        listing = self._root_listings.get(fh)
        if listing is None:
            # Opened before a handover: the stream starts again.
            if not self.list_root:
                raise pyfuse3.FUSEError(errno.EPERM)
            listing = self._root_listings[fh] = _RootListing()
        # Root entries come from a stream: pull about one kernel buffer.
        window = await self._root_window(listing, start_id, ROOT_READDIR_BATCH)
        return [name for name, _ in window], [node for _, node in window], start_id

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

    @_request("releasedir")
    async def releasedir(self, fh: int) -> None:
        listing = self._root_listings.pop(fh, None)
        if listing is not None and listing.stream is not None:
            await _aclose(listing.stream)

    # -- files -------------------------------------------------------------

    @_request("open")
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if not self.open_requests:
            # Once: the kernel opens files itself from now on (a missing or
            # unreadable blob then fails the first read, not the open).
            raise pyfuse3.FUSEError(errno.ENOSYS)
        if flags & _WRITE_FLAGS:
            raise _erofs()
        if inode == ROOT_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        packed = self._node(inode)
        if packed[0] == PACKED_DIRECTORY:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if packed[0] == PACKED_SYMLINK:
            raise pyfuse3.FUSEError(errno.ELOOP)
        blob = await self._open_blob(inode)
        self._opens[inode] = self._opens.get(inode, 0) + 1
        # Content never changes: pages cached by an earlier open stay valid,
        # unless they may hold bytes of a blob that failed its check.
        keep_cache = blob.node.digest not in self._corrupt_blobs
        return pyfuse3.FileInfo(fh=inode, keep_cache=keep_cache)

    async def _open_blob(self, ino: int) -> _OpenBlob:
        """The reader of file inode `ino`'s blob, opened if this process has
        none (a first open, or a file opened before a handover)."""
        packed = self.inodes.node(ino)
        blob = self._readers.get(ino)
        if blob is not None:
            if blob.packed == packed:
                self._readers.move_to_end(ino)
                return blob
            # The number was forgotten and given to another file since.
            await self._close_blob(ino)
        if packed is None or packed[0] not in PACKED_FILE_KINDS:
            raise pyfuse3.FUSEError(errno.EBADF)
        node = unpack_node(packed)
        assert type(node) is FileNode
        reader = None
        if node.size > 0:
            digest, size = node.digest, node.size
            reader = await self._backend(
                lambda: self._blobs.open_read_sized(digest, size),
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
        existing = self._readers.get(ino)
        if existing is not None:  # opened by another request meanwhile
            if existing.packed == packed:
                if reader is not None:
                    await reader.aclose()
                return existing
            await self._close_blob(ino)
        blob = self._readers[ino] = _OpenBlob(ino, packed, node, reader)
        if len(self._readers) > OPEN_READERS:
            oldest = next(iter(self._readers))
            await self._close_blob(oldest)
        return blob

    async def _close_blob(self, ino: int) -> None:
        blob = self._readers.pop(ino, None)
        if blob is None:
            return
        # After a read in progress; without a scheduler trip when none is.
        lock = blob.lock
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:
            await lock.acquire()
        try:
            blob.closed = True
            if blob.reader is not None:
                await blob.reader.aclose()
        finally:
            lock.release()

    def read_ahead_counts(self) -> ReadAheadCounts:
        """Running totals of what the read-aheads did, for the metrics."""
        files = self.prefetcher
        directories = self.directory_prefetcher
        return ReadAheadCounts(
            files_read=0 if files is None else files.taken,
            files_stored=0 if files is None else files.stored,
            files_served=0 if files is None else files.served,
            directories=0 if directories is None else directories.given,
        )

    def _read_ahead_after(self, ino: int, node: PackedNode) -> None:
        """File `ino` (`node`) is being read from its start: if that goes on
        a run in name order, have the files after it read ahead."""
        assert self.prefetcher is not None
        place, on_run = self.runs.first_use_place(ino)
        if place is None:
            return
        directory_ino, directory, index = place
        nodes = self.inodes.entries_around(directory_ino, directory, index, node)
        if nodes is not None:
            self.prefetcher.read_ahead_after(directory, index, nodes, on_run)

    @_request("read")
    async def read(self, fh: int, off: int, size: int) -> bytes:
        if size > self.largest_read:
            self.largest_read = size
        if self.prefetcher is not None:
            packed = self.inodes.node(fh)
            if off == 0 and packed is not None:
                self._read_ahead_after(fh, packed)
            ahead = None if packed is None else self.prefetcher.read(packed, off, size)
            if ahead is not None:  # read ahead, and checked
                return ahead
        while True:
            blob = self._readers.get(fh)
            # Readers are kept by inode number, which the kernel may have
            # forgotten and we given to another file (no RELEASE closes them
            # when the kernel does not open files here).
            if blob is None or blob.packed != self.inodes.node(fh):
                blob = await self._open_blob(fh)
            if blob.node.digest in self._corrupt_blobs:
                await self._check_again(blob)  # EIO while it is still wrong
                continue
            # Uncontended (every read of a local blob, which never yields), the
            # lock is taken without a trip through trio's scheduler, which
            # `async with lock` makes even when the lock is free.
            lock = blob.lock
            try:
                lock.acquire_nowait()
            except trio.WouldBlock:
                await lock.acquire()
            try:
                if not blob.closed:  # else closed while we waited: open it again
                    return await self._read_locked(blob, off, size)
            finally:
                lock.release()

    async def _read_locked(self, blob: _OpenBlob, off: int, size: int) -> bytes:
        node = blob.node
        reader = blob.reader
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
                self._caught_corrupt(blob)
                raise

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
            self._caught_corrupt(blob)
            raise pyfuse3.FUSEError(errno.EIO)
        return data

    def _caught_corrupt(self, blob: _OpenBlob) -> None:
        # From now on no byte of this blob is served unless all of it checks
        # out again: the kernel retries a failed page read, and that retry,
        # out of order for the verifying reader, would pass unchecked.
        self._corrupt_blobs.add(blob.node.digest)
        if not self.open_requests:
            # No open will come to say "without keep_cache": drop now any page
            # the kernel cached before the check failed.
            self.notices.invalidate(blob.ino)

    async def _check_again(self, blob: _OpenBlob) -> None:
        """Read a blob that failed its check once, all of it, and check it
        again: EIO if it still fails; else it is served again, by a new reader."""
        digest = blob.node.digest
        if not await self._backend(
            lambda: self._blobs.check(digest), "blob %s, read again in full", digest
        ):
            raise pyfuse3.FUSEError(errno.EIO)
        self._corrupt_blobs.discard(digest)
        await self._close_blob(blob.ino)

    @_request("release")
    async def release(self, fh: int) -> None:
        left = self._opens.pop(fh, 0) - 1
        if left > 0:
            self._opens[fh] = left
        else:
            await self._close_blob(fh)

    # flush and fsync are left to pyfuse3's default (ENOSYS): the kernel then
    # stops sending them at all, one round trip less per close().

    @_request("readlink")
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

    @_request("getxattr")
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        value = self._xattrs(inode).get(name)
        if value is None:
            raise pyfuse3.FUSEError(errno.ENODATA)
        return value

    @_request("listxattr")
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return list(self._xattrs(inode))

    @_request("statfs")
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

    async def settle(self) -> None:
        """Before the session stops answering requests: finish what may wait
        on the kernel for a request's answer (see BlobPrefetcher.settle)."""
        if self.prefetcher is not None:
            await self.prefetcher.settle()

    async def close(self) -> None:
        """Release every open handle (at unmount)."""
        if self.largest_read:
            log.info("largest read request: %d bytes", self.largest_read)
        if self.prefetcher is not None and self.prefetcher.stored:
            log.info("files stored ahead into the kernel's page cache: %d", self.prefetcher.stored)
        # What the kernel still held a count on (or a kept listing held).
        log.info("inodes alive at unmount: %d", len(self.inodes))
        for ino in list(self._readers):
            await self._close_blob(ino)
        for fh in list(self._root_listings):
            await self.releasedir(fh)


async def _aclose(stream: AsyncIterator[object]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()
