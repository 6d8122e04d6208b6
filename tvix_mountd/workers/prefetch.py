"""Reading ahead the blobs of the files that come next in a directory.

Programs read many small files of one directory by name, often in name
order: a `cat *`, a build reading headers, a copy of a tree. Each file costs
the daemon a LOOKUP and a READ, and on a cold local store the READ waits for
the disk. Once the files of a directory are being read in name order (a
file's first READ follows that of the file before it, or one but one), the
blobs of the files after it are read ahead, in worker threads (the loop's
thread keeps answering requests, on the other core): the smallest whole,
checked against their digests and kept in memory until read to the end
(`SMALL`, `KEPT` bytes at most), the others asked of the disk
(`BlobService.prefetch`: posix_fadvise WILLNEED for the embedded store).
A READ of a kept file is then a slice of bytes, without a syscall.

A small file whose inode the kernel already holds (a listing handed it
over, as `ls`, a copy or `os.walk` do before reading) goes further: its
checked contents are stored straight into the kernel's page cache
(`KernelPages.store`, notify_store, from the thread), and reading it then
sends no READ at all. Its number is pinned (one more lookup count) from
when the batch is queued until its thread is done, so that it cannot be
forgotten and given to another file in between: the bytes cannot land in
the wrong file.

Reads, not lookups, start it: a stat walk, or an interpreter probing for
modules, looks up many files and reads few or none, and reading ahead for
every lookup made those slower (RESULTS.md, the `noprefetch` what-if).

Bounded: a window of files ahead per directory, small files only, a few
threads, a queue that drops rather than grows, and a bounded memory of
where recently looked-up files sit.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import Final, Protocol, TypeVar

import trio

from tvix_mountd.castore.blobs import BlobService
from tvix_mountd.castore.nodes import (
    PACKED_EXECUTABLE,
    PACKED_FILE,
    PACKED_SIZE,
    PackedNode,
    packed_digest,
)

# Files ahead of the one looked up; asked for again once half are read.
AHEAD: Final = 64
BATCH: Final = 16  # files per thread call
THREADS: Final = 4
MAX_FILE: Final = 1 << 20  # larger files have the kernel's own readahead
SMALL: Final = 64 << 10  # files this small are read whole and kept
KEPT: Final = 16 << 20  # bytes kept at most (the oldest go first)
DIRECTORIES: Final = 4096  # directories whose window and last read are remembered
QUEUE: Final = 256
# Looked-up files whose place in their directory is remembered (until read).
PLACES: Final = 1024
# Listings (readdir replies) whose entries' places are remembered: a file
# listed rather than looked up (`ls`, a copy, `os.walk`) is found there.
LISTINGS: Final = 16
# A first READ of entry i is "in name order" after one of entry i-GAP..i-1.
GAP: Final = 2

_size_field = PACKED_SIZE.unpack_from

K = TypeVar("K")
V = TypeVar("V")

# A file to read ahead: its node, and the number of its inode, pinned, if
# the kernel holds one (0 if not).
Ahead = tuple[PackedNode, int]


class KernelPages(Protocol):
    """The kernel's page cache, for files it holds an inode of."""

    def pin(self, node: PackedNode) -> int:
        """The number of `node`'s inode, if it is live, with one more lookup
        count (so it stays `node`'s); 0 if it is not."""
        ...

    def unpin(self, numbers: Sequence[int]) -> None:
        """Give back the counts `pin` took (numbers 0 ignored)."""
        ...

    def store(self, ino: int, data: bytes) -> bool:
        """From a worker thread: put `data` into inode `ino`'s page cache from
        offset 0; whether the kernel took it."""
        ...


def _remember(memory: OrderedDict[K, V], key: K, value: V, bound: int) -> None:
    """`memory[key] = value` as the newest entry, the oldest let go past `bound`."""
    memory[key] = value
    memory.move_to_end(key)
    if len(memory) > bound:
        memory.popitem(last=False)


class BlobPrefetcher:
    def __init__(self, blobs: BlobService, pages: KernelPages | None = None) -> None:
        self._blobs = blobs
        self._pages = pages
        self.stored = 0  # files whose contents went to the kernel's page cache
        # Packed file node -> its contents, checked. Filled by the threads,
        # taken by the loop's thread.
        self._kept: OrderedDict[PackedNode, bytes] = OrderedDict()
        # Small files queued whose READ has not come yet: only those are
        # worth keeping (or storing) once read; one whose READ came first
        # would stay in memory, never read, until pushed out.
        self._wanted: set[PackedNode] = set()
        self.kept_bytes = 0
        self._lock = threading.Lock()
        # Directory (its packed node: content, unlike an inode number that
        # may be reused) -> index up to which its files were asked for.
        self._upto: OrderedDict[PackedNode, int] = OrderedDict()
        # File inode -> its place: (directory inode, directory node, index).
        self._places: OrderedDict[int, tuple[int, PackedNode, int]] = OrderedDict()
        # Recent readdir replies: (directory inode, its node, index of the
        # first entry, the numbers of the entries), the newest last.
        self._listings: deque[tuple[int, PackedNode, int, Sequence[int]]] = deque(maxlen=LISTINGS)
        # Directory node -> index of the file whose first READ came last.
        self._last_read: OrderedDict[PackedNode, int] = OrderedDict()
        self._send, self._receive = trio.open_memory_channel[Sequence[Ahead]](QUEUE)
        self._batch_done = trio.Event()

    def looked_up(self, ino: int, directory_ino: int, directory: PackedNode, index: int) -> None:
        """File inode `ino` was just looked up: entry `index` of `directory`."""
        _remember(self._places, ino, (directory_ino, directory, index), PLACES)

    def listed(
        self, directory_ino: int, directory: PackedNode, start: int, numbers: Sequence[int]
    ) -> None:
        """Entries `start`... of `directory` (inode `directory_ino`) were just
        handed to the kernel in a readdirplus reply, as inodes `numbers`."""
        if numbers:
            self._listings.append((directory_ino, directory, start, numbers))

    def _listed_place(self, ino: int) -> tuple[int, PackedNode, int] | None:
        for directory_ino, directory, start, numbers in reversed(self._listings):
            try:
                return directory_ino, directory, start + numbers.index(ino)
            except ValueError:
                continue
        return None

    def first_read(self, ino: int) -> tuple[int, PackedNode, int] | None:
        """File inode `ino` is being read from its start. Its place, if that
        continues a run of first reads in name order in its directory (then
        the caller passes the directory's entries to `read_ahead_after`)."""
        place = self._places.pop(ino, None) or self._listed_place(ino)
        if place is None:
            return None
        _, directory, index = place
        last = self._last_read.get(directory)
        _remember(self._last_read, directory, index, DIRECTORIES)
        if last is None or not last < index <= last + GAP:
            return None
        return place

    def read_ahead_after(
        self, directory: PackedNode, index: int, nodes: Sequence[PackedNode]
    ) -> None:
        """Read ahead the files after entry `index` of `directory`, whose
        entries are `nodes` (in name order)."""
        upto = self._upto.get(directory, index + 1)
        if upto - index > AHEAD // 2 or upto >= len(nodes):
            return
        stop = min(len(nodes), index + 1 + AHEAD)
        files = [
            node
            for node in nodes[max(upto, index + 1) : stop]
            if node[0] in (PACKED_FILE, PACKED_EXECUTABLE) and 0 < _size_field(node)[0] <= MAX_FILE
        ]
        _remember(self._upto, directory, stop, DIRECTORIES)
        small = {node for node in files if _size_field(node)[0] <= SMALL}
        with self._lock:
            self._wanted |= small
        pin = self._pages.pin if self._pages is not None else None
        for i in range(0, len(files), BATCH):
            batch = [
                (node, pin(node) if pin is not None and node in small else 0)
                for node in files[i : i + BATCH]
            ]
            try:
                self._send.send_nowait(batch)
            except trio.WouldBlock:
                # The disk is behind already: drop the rest.
                self._unpin(batch)
                with self._lock:
                    self._wanted.difference_update(files[i:])
                return

    def _unpin(self, batch: Sequence[Ahead]) -> None:
        if self._pages is not None:
            self._pages.unpin([ino for _, ino in batch if ino])

    def asked_upto(self, directory: PackedNode) -> int:
        """How many of `directory`'s first entries were asked for (0: none)."""
        return self._upto.get(directory, 0)

    async def wait_batch(self) -> None:
        """Until the next batch has been read ahead (for tests, and for
        whoever wants to see it work)."""
        await self._batch_done.wait()

    def holds(self, node: PackedNode) -> bool:
        """Whether the contents of file node `node` are kept, read ahead."""
        with self._lock:
            return node in self._kept

    def read(self, node: PackedNode, offset: int, size: int) -> bytes | None:
        """`size` bytes from `offset` of file node `node`, if its contents were
        read ahead (and checked); they are let go once read to the end (the
        kernel keeps the pages, it will not ask again soon)."""
        with self._lock:
            data = self._kept.get(node)
            if data is None:
                self._wanted.discard(node)  # its READ came first
                return None
            if offset + size >= len(data):
                del self._kept[node]
                self.kept_bytes -= len(data)
        return data[offset : offset + size]

    def read_ahead(self, batch: Sequence[Ahead]) -> None:
        """In a worker thread: store the small files in the kernel's page cache
        (those it holds an inode of) or keep them; have the disk read the others."""
        larger = []
        self._blobs.locate(
            [packed_digest(node) for node, _ in batch if _size_field(node)[0] <= SMALL]
        )
        for node, ino in batch:
            size = _size_field(node)[0]
            if size > SMALL:
                larger.append(packed_digest(node))
                continue
            data = self._blobs.read_small(packed_digest(node), size)
            if data is None:
                with self._lock:
                    self._wanted.discard(node)
                continue  # not cheaply readable, or wrong: the READ will say
            # `_wanted` read unlocked, as a hint: a store that a READ
            # overtook is only wasted.
            if (
                ino
                and self._pages is not None
                and node in self._wanted
                and self._pages.store(ino, data)
            ):
                with self._lock:
                    self._wanted.discard(node)
                    self.stored += 1
                continue
            with self._lock:
                # Decided with the lock that `read` takes: a READ that came
                # first leaves nothing kept that nobody will read.
                if node not in self._wanted:
                    continue
                self._wanted.discard(node)
                if node in self._kept:
                    continue
                self._kept[node] = data
                self.kept_bytes += size
                while self.kept_bytes > KEPT:
                    _, dropped = self._kept.popitem(last=False)
                    self.kept_bytes -= len(dropped)
        if larger:
            self._blobs.prefetch(larger)

    async def run(self) -> None:
        """Ask for the blobs, from up to THREADS threads at once, until cancelled."""
        slots = trio.Semaphore(THREADS)

        async def prefetch(batch: Sequence[Ahead]) -> None:
            try:
                await trio.to_thread.run_sync(self.read_ahead, batch)
            finally:
                self._unpin(batch)
                slots.release()
                self._batch_done.set()
                self._batch_done = trio.Event()

        try:
            async with trio.open_nursery() as nursery:
                async for batch in self._receive:
                    try:
                        await slots.acquire()
                    except BaseException:
                        self._unpin(batch)
                        raise
                    nursery.start_soon(prefetch, batch)
        finally:
            # Batches never started give their pins back (a worker handing
            # the mount over leaves no count too high behind).
            while True:
                try:
                    self._unpin(self._receive.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break
