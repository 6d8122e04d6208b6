"""Measure a proposed change to tvix-mountd before anyone makes it.

`python -m benchmarks.whatif mount ...` is `tvix-mountd mount ...` with the
patches named in $TVIX_WHATIF (comma-separated) applied to the classes of this
process before the CLI starts. Nothing under tvix_mountd/ changes; each patch
is the smallest stand-in for a recommendation in RESULTS.md, so the harness can
put "tvix-mountd as it is" and "tvix-mountd with the change" side by side
(`--peers ...,tvix,tvix-whatif --whatif noflush,attrcache`).

Patches:
  noflush     StoreFilesystem.flush (and fsync) left to pyfuse3's default,
              which answers ENOSYS: the kernel then stops sending FLUSH at
              all, one round trip less per close().
  attrcache   one EntryAttributes per inode number, built once and reused for
              every lookup, getattr and readdirplus entry (content never
              changes, so neither do the attributes).
  gc          gc.freeze() once the modules are imported (the ~470 modules'
              objects leave the collector's view) and gen0 threshold 20,000
              instead of 700: fewer and shorter cyclic collections while
              100k inodes pile up.
  nocachereaddir
              the reverse of a shipped change: opendir answers with a plain
              handle, as on a stock pyfuse3, so the kernel does not keep
              directory listings (third_party/pyfuse3/README.md).
  pushlisting the contents of a directory's small files (<= 64 KiB, 1 MiB
              per readdir reply at most) stored into the page cache right
              after the readdir reply that gave the kernel their inodes
              (notify_store, issue 10's second lever): a later read of them
              sends no READ. What it costs when nothing is read is what the
              stat walk and `ls -f` rows show.
  noprefetch  the reverse of a shipped change: no reading ahead of the next
              files' blobs on a lookup (workers/prefetch.py), as before
              issue 10; what that read-ahead gives or costs each row.
  onearena    glibc's malloc limited to one arena (mallopt M_ARENA_MAX 1,
              what MALLOC_ARENA_MAX=1 does) before any thread starts: the
              threads (read-ahead, blocking store calls) then allocate from
              the main heap instead of an arena each, whose pages stay
              resident once touched.
  dictindex   the reverse of a shipped change: the inode table's sharing
              index as a dict (node -> number, ~80 bytes an inode) instead
              of workers/nodeindex.py's array (~16-32 bytes).
  nostorepages
              the reverse of a shipped change: files read ahead are kept in
              memory only, never stored into the kernel's page cache
              (workers/prefetch.py), so each one's READ still comes.
  notrim      the reverse of a shipped change: no malloc_trim after a large
              directory is decoded (workers/heap.py), so the memory its
              decoding used stays resident.
  plainlistings
              the mount option plain_listings on (READDIRPLUS_AUTO): the
              kernel lists without attributes where nobody stats the
              entries, and builds no inode per entry then.
  nodirahead  the reverse of a shipped change: no fetching ahead of the
              subdirectories a walk opens next (workers/dirahead.py).
  dirsahead   the directory service's SQLite file asked of the disk as a
              whole (posix_fadvise WILLNEED, asynchronous) when reads of it
              start and at most once a second while they go on, as the
              pack index is: the cold lookups' random page reads.
  noindexahead
              the reverse of a shipped change: the pack index is not asked
              of the disk as a whole when lookups start (castore/sqlite_db.py
              WholeFileReadAhead); each lookup reads its own pages.
  shortswitch the interpreter's switch interval 0.5 ms instead of 5 ms: a
              read-ahead thread back from a short syscall (a pack index
              query, a pread, a notify_store) waits for the GIL at most
              that long while the loop's thread runs Python.
  twothreads  files read ahead by 2 threads at once instead of
              workers/prefetch.py's 4: what the other two cost in memory
              (a malloc arena and a stack each) and give in speed.
  stdlibreaders
              the reverse of a shipped change: a binary cache's xz and bzip2
              NARs are read through the stdlib's LZMAFile and BZ2File (8 KiB
              of compressed input per call) and zstd's through a 128 KiB
              `read_size`, instead of 1 MiB at a time.
  nowalkahead the reverse of a shipped change: a directory listed during a
              walk that reads every file is not read ahead from its listing
              (workers/prefetch.py, `BlobPrefetcher.listed`), only after
              its first two READs.
  consecutivebatches
              the reverse of a shipped change: the files of a window read
              ahead go to the threads in batches of BATCH consecutive files,
              not interleaved (workers/prefetch.py, `_split`).
  smallkept   files read ahead and kept in memory for their READ bounded at
              4 MiB instead of KEPT's 16 MiB (workers/prefetch.py): what
              the kept contents add to the daemon's RSS in `cat`.
  readahead   not a daemon patch: the harness writes 1024 to the mount's bdi
              read_ahead_kb after the FUSE INIT (what mount.py means to do).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, Final

PATCHES: Final = (
    "noflush",
    "attrcache",
    "gc",
    "nocachereaddir",
    "pushlisting",
    "noprefetch",
    "onearena",
    "dictindex",
    "nostorepages",
    "notrim",
    "plainlistings",
    "nodirahead",
    "twothreads",
    "dirsahead",
    "noindexahead",
    "shortswitch",
    "stdlibreaders",
    "nowalkahead",
    "consecutivebatches",
    "smallkept",
    "readahead",
)
HARNESS_ONLY: Final = frozenset({"readahead"})


def _noflush() -> None:
    import pyfuse3

    from tvix_mountd.workers.filesystem import StoreFilesystem

    StoreFilesystem.flush = pyfuse3.Operations.flush  # type: ignore[method-assign]
    StoreFilesystem.fsync = pyfuse3.Operations.fsync  # type: ignore[method-assign]


def _attrcache() -> None:
    from tvix_mountd.workers import filesystem

    original: Callable[..., Any] = filesystem.entry_attributes
    cache: dict[int, Any] = {}

    def entry_attributes(ino: int, node: Any) -> Any:
        attr = cache.get(ino)
        if attr is None:
            attr = cache[ino] = original(ino, node)
        return attr

    filesystem.entry_attributes = entry_attributes


def _gc() -> None:
    import gc

    # What `mount` imports, imported now, so freeze() covers it.
    import tvix_mountd.castore.store
    import tvix_mountd.workers.filesystem
    import tvix_mountd.workers.mount
    import tvix_mountd.workers.rootnodes  # noqa: F401

    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


def _nocachereaddir() -> None:
    from tvix_mountd.workers import filesystem

    filesystem.KERNEL_CACHES_LISTINGS = False  # type: ignore[misc]


def _pushlisting() -> None:
    import trio

    from tvix_mountd.castore.nodes import (
        PACKED_EXECUTABLE,
        PACKED_FILE,
        PACKED_SIZE,
        packed_digest,
    )
    from tvix_mountd.workers import filesystem

    small, budget = 64 << 10, 1 << 20
    original = filesystem.StoreFilesystem.readdir

    async def readdir(self: Any, fh: int, start_id: int, token: Any) -> None:
        await original(self, fh, start_id, token)
        children = self.inodes.children(fh) if fh < filesystem.ROOT_LISTING_HANDLES else None
        if children is None:
            return
        _, nodes = children
        left = budget
        # The entries this reply gave the kernel: held by the listing.
        for node in nodes[start_id : self.inodes.held(fh)]:
            if node[0] not in (PACKED_FILE, PACKED_EXECUTABLE):
                continue
            size = PACKED_SIZE.unpack_from(node)[0]
            if not 0 < size <= min(small, left):
                continue
            left -= size
            ino = self.inodes._index.get(node)

            async def contents(node: Any = node, ino: int = ino, size: int = size) -> Any:
                data = await trio.to_thread.run_sync(
                    self._blobs.read_small, packed_digest(node), size
                )
                # Not if the number went to another node meanwhile.
                return data if self.inodes.node(ino) == node else None

            self.notices.store(ino, contents)

    filesystem.StoreFilesystem.readdir = readdir  # type: ignore[method-assign]


def _wrap_filesystem_init(
    *, overrides: dict[str, Any] | None = None, after: Callable[[Any], None] | None = None
) -> None:
    """StoreFilesystem built with `overrides` among its keyword arguments,
    then passed to `after`."""
    from tvix_mountd.workers import filesystem

    original = filesystem.StoreFilesystem.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **{**kwargs, **(overrides or {})})
        if after is not None:
            after(self)

    filesystem.StoreFilesystem.__init__ = __init__  # type: ignore[method-assign]


def _noprefetch() -> None:
    def no_prefetcher(fs: Any) -> None:
        fs.prefetcher = None

    _wrap_filesystem_init(after=no_prefetcher)


def _onearena() -> None:
    import ctypes

    m_arena_max = -8  # glibc's malloc.h
    ctypes.CDLL("libc.so.6").mallopt(m_arena_max, 1)


def _nostorepages() -> None:
    _wrap_filesystem_init(overrides={"store_pages": False})


def _notrim() -> None:
    from tvix_mountd.workers import heap

    heap.release_free_memory = lambda: None


def _plainlistings() -> None:
    _wrap_filesystem_init(overrides={"plain_listings": True})


def _nodirahead() -> None:
    _wrap_filesystem_init(overrides={"directories_ahead": False})


def _dirsahead() -> None:
    from tvix_mountd.castore import sqlite_db

    get = sqlite_db.SqliteTable.get
    ahead: dict[str, sqlite_db.WholeFileReadAhead] = {}

    async def get_reading_ahead(self: Any, key: bytes) -> Any:
        if self._name == "directories":
            ahead.setdefault(self.path, sqlite_db.WholeFileReadAhead(self.path))()
        return await get(self, key)

    sqlite_db.SqliteTable.get = get_reading_ahead  # type: ignore[method-assign]


def _noindexahead() -> None:
    from tvix_mountd.castore import sqlite_db

    setattr(sqlite_db, "WHOLE_FILE_MAX", -1)  # noqa: B010


def _shortswitch() -> None:
    sys.setswitchinterval(0.0005)


def _nowalkahead() -> None:
    from tvix_mountd.workers import prefetch

    prefetch.BlobPrefetcher.listed = lambda self, directory, nodes: None  # type: ignore[method-assign]


def _smallkept() -> None:
    from tvix_mountd.workers import prefetch

    prefetch.KEPT = 4 << 20  # type: ignore[misc]


def _consecutivebatches() -> None:
    from tvix_mountd.workers import prefetch

    def split(files: list[Any]) -> list[list[Any]]:
        return [files[i : i + prefetch.BATCH] for i in range(0, len(files), prefetch.BATCH)]

    setattr(prefetch, "_split", split)  # noqa: B010


def _stdlibreaders() -> None:
    import bz2
    import lzma

    import zstandard

    from tvix_mountd.castore.pathinfos import nixcache

    shipped = getattr(nixcache, "decompressing")  # noqa: B009

    def decompressing(raw: Any, compression: str) -> Any:
        if compression == "xz":
            return lzma.LZMAFile(raw)
        if compression == "bzip2":
            return bz2.BZ2File(raw)
        if compression == "zstd":
            return zstandard.ZstdDecompressor().stream_reader(
                raw, read_across_frames=True, closefd=True
            )
        return shipped(raw, compression)

    # The name nixcache.py calls.
    setattr(nixcache, "decompressing", decompressing)  # noqa: B010


def _twothreads() -> None:
    from tvix_mountd.workers import prefetch

    setattr(prefetch, "THREADS", 2)  # noqa: B010


def _dictindex() -> None:
    from tvix_mountd.workers import inodes

    class DictIndex:
        """NodeIndex's interface over a dict, as the table had it before."""

        def __init__(self, nodes: Any) -> None:
            self._nodes = nodes
            self._by_node: dict[bytes, int] = {}

        def __len__(self) -> int:
            return len(self._by_node)

        def get(self, node: bytes) -> int | None:
            return self._by_node.get(node)

        def probe(self, node: bytes) -> tuple[int, int]:
            return self._by_node.get(node, 0), 0

        def insert(self, ino: int, slot: int) -> None:
            self._by_node[self._nodes[ino]] = ino

        def remove(self, ino: int) -> bool:
            node = self._nodes[ino]
            if self._by_node.get(node) != ino:
                return False
            del self._by_node[node]
            return True

    # The name inodes.py looks up when a table is made.
    setattr(inodes, "NodeIndex", DictIndex)  # noqa: B010


_APPLY: Final[dict[str, Callable[[], None]]] = {
    "nocachereaddir": _nocachereaddir,
    "noflush": _noflush,
    "attrcache": _attrcache,
    "gc": _gc,
    "pushlisting": _pushlisting,
    "noprefetch": _noprefetch,
    "onearena": _onearena,
    "dictindex": _dictindex,
    "nostorepages": _nostorepages,
    "notrim": _notrim,
    "plainlistings": _plainlistings,
    "nodirahead": _nodirahead,
    "twothreads": _twothreads,
    "dirsahead": _dirsahead,
    "noindexahead": _noindexahead,
    "shortswitch": _shortswitch,
    "stdlibreaders": _stdlibreaders,
    "nowalkahead": _nowalkahead,
    "consecutivebatches": _consecutivebatches,
    "smallkept": _smallkept,
}


def parse(value: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in PATCHES]
    if unknown:
        raise ValueError(f"unknown what-if patches {unknown}; known: {', '.join(PATCHES)}")
    return names


def apply_from_env() -> list[str]:
    names = parse(os.environ.get("TVIX_WHATIF", ""))
    for name in names:
        if name not in HARNESS_ONLY:
            _APPLY[name]()
    return names


def main() -> int:
    from tvix_mountd import cli

    apply_from_env()
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
