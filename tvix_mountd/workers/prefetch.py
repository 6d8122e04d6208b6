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
From a store a round trip away (a tvix-store over gRPC), where each READ
would wait for it, a batch's small files are read all at once instead
(`BlobService.read_many`), checked as well, and kept or stored the same way.

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

Except in a walk that reads every file it lists (a copy, `os.walk` reading
each file, a first full read of a store path): once a run of reads in name
order has reached the last file of a directory (read ahead, that file is
kept for its READ rather than stored: the end must show even when the
threads keep ahead of the reader), the next directory listed
(a readdirplus from its first entry) has its files read ahead at once, from
the listing, instead of after its first two READs, which the reader would
otherwise overtake in every directory. The walk has to show that it goes on
reading: the last small file of each directory read ahead so is kept in
memory rather than stored, so that its READ comes; a directory listed
before that READ came ends the mode until a run reaches a directory's end
again. A wrong guess costs one directory's window.

Bounded: a window of files ahead per directory, small files only, a few
threads, a queue that drops rather than grows; where files sit and which
runs go on is runs.py's bounded memory.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Final, Protocol

import trio

from tvix_mountd.castore.blobs import BlobService
from tvix_mountd.castore.nodes import (
    PACKED_FILE_KINDS,
    PACKED_SIZE,
    PackedNode,
    packed_digest,
)
from tvix_mountd.workers.runs import DIRECTORIES, AheadWindows, remember

# Files ahead of the one looked up; asked for again once half are read.
AHEAD: Final = 64
BATCH: Final = 16  # files per thread call
THREADS: Final = 4
MAX_FILE: Final = 1 << 20  # larger files have the kernel's own readahead
SMALL: Final = 64 << 10  # files this small are read whole and kept
KEPT: Final = 16 << 20  # bytes kept at most (the oldest go first)
QUEUE: Final = 256

_size_field = PACKED_SIZE.unpack_from

log = logging.getLogger(__name__)

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


def _split(files: list[PackedNode]) -> list[list[PackedNode]]:
    """`files` (in name order) in batches to read ahead: interleaved (file i
    in batch i % n), one a thread at least, so that the threads finish them
    about in the order a reader comes to them. A batch each of consecutive
    files had the reader wait on the first thread while the others read
    what it needs later."""
    count = max(-(-len(files) // BATCH), min(THREADS, len(files)))
    return [files[k::count] for k in range(count)]


def _last_file(nodes: Sequence[PackedNode]) -> int:
    """The index of the last regular file among `nodes` that is not empty
    (the kernel never READs an empty file), -1 if none."""
    for index in range(len(nodes) - 1, -1, -1):
        node = nodes[index]
        if node[0] in PACKED_FILE_KINDS and _size_field(node)[0]:
            return index
    return -1


class BlobPrefetcher:
    def __init__(self, blobs: BlobService, pages: KernelPages | None = None) -> None:
        self._blobs = blobs
        self._pages = pages
        # Counts, for the metrics: files read ahead whole and checked; of
        # those, stored into the kernel's page cache, or whose READ was
        # answered from memory.
        self.taken = 0
        self.stored = 0
        self.served = 0
        # Packed file node -> its contents, checked. Filled by the threads,
        # taken by the loop's thread.
        self._kept: OrderedDict[PackedNode, bytes] = OrderedDict()
        # Small files queued whose READ has not come yet: only those are
        # worth keeping (or storing) once read; one whose READ came first
        # would stay in memory, never read, until pushed out.
        self._wanted: set[PackedNode] = set()
        self.kept_bytes = 0
        self._lock = threading.Lock()
        self._windows = AheadWindows(AHEAD)
        self._send, self._receive = trio.open_memory_channel[Sequence[Ahead]](QUEUE)
        self._batch_done = trio.Event()
        # A slot per thread reading ahead; all of them: none is.
        self._slots = trio.Semaphore(THREADS)
        # Cleared before the session stops answering requests (`settle`).
        self._storing = True
        # A walk reads every file it lists (see the module's doc); the file
        # whose READ would show that it still does, until that READ comes.
        self._reading_walk = False
        self._sentinel: PackedNode | None = None
        # Directory -> the index of its last file READ (`_last_file`,
        # found once: entries after it may be many).
        self._last_files: OrderedDict[PackedNode, int] = OrderedDict()

    def read_ahead_after(
        self, directory: PackedNode, index: int, nodes: Sequence[PackedNode], on_run: bool = True
    ) -> None:
        """Entry `index` of `directory`, whose entries are `nodes` (in name
        order), is being read from its start: if that continues a run of
        reads in name order (`on_run`), read ahead the files after it."""
        last = self._last_files.get(directory)
        if last is None:
            last = _last_file(nodes)
            remember(self._last_files, directory, last, DIRECTORIES)
        if index == last and self._windows.asked_upto(directory) > last:
            # A directory read ahead to its last file, and read to it.
            self._reading_walk = True
        if on_run:
            self._read_ahead(directory, index, nodes)

    def listed(self, directory: PackedNode, nodes: Sequence[PackedNode]) -> None:
        """`directory`'s entries `nodes` were just handed to the kernel with
        their inodes, from the first one on (a readdirplus from offset 0): in
        a walk that reads every file, read its first files ahead now."""
        if not self._reading_walk:
            return
        if self._sentinel is not None:
            # The last directory read ahead so was not read to its end.
            self._reading_walk = False
            self._sentinel = None
            return
        # From its first file on: subdirectories and symlinks named before
        # it would take the window's places.
        first = next((i for i, node in enumerate(nodes) if node[0] in PACKED_FILE_KINDS), None)
        if first is not None:
            self._read_ahead(directory, first - 1, nodes, from_listing=True)

    def _read_ahead(
        self,
        directory: PackedNode,
        index: int,
        nodes: Sequence[PackedNode],
        from_listing: bool = False,
    ) -> None:
        window = self._windows.next(directory, index, len(nodes))
        files = [
            node
            for node in nodes[window.start : window.stop]
            if node[0] in PACKED_FILE_KINDS and 0 < _size_field(node)[0] <= MAX_FILE
        ]
        small = {node for node in files if _size_field(node)[0] <= SMALL}
        # Kept, not stored (no pin), so that its READ comes.
        kept_for_its_read = None
        if from_listing and small:
            # If the walk reads on.
            kept_for_its_read = next(node for node in reversed(files) if node in small)
            self._sentinel = kept_for_its_read
        elif window.start <= (last := self._last_files.get(directory, -1)) < window.stop:
            # The directory's last file: its READ says that the directory
            # was read to its end (`read_ahead_after`), which a store would
            # hide when the threads keep ahead of the reader.
            kept_for_its_read = nodes[last]
        with self._lock:
            self._wanted |= small
        pin = self._pages.pin if self._pages is not None else None
        batches = _split(files)
        for k, nodes_of_batch in enumerate(batches):
            batch = [
                (
                    node,
                    pin(node)
                    if pin is not None and node in small and node != kept_for_its_read
                    else 0,
                )
                for node in nodes_of_batch
            ]
            try:
                self._send.send_nowait(batch)
            except trio.WouldBlock:
                # The disk is behind already: drop the rest.
                self._unpin(batch)
                with self._lock:
                    for rest in batches[k:]:
                        self._wanted.difference_update(rest)
                return

    def _unpin(self, batch: Sequence[Ahead]) -> None:
        if self._pages is not None:
            self._pages.unpin([ino for _, ino in batch if ino])

    def asked_upto(self, directory: PackedNode) -> int:
        """How many of `directory`'s first entries were asked for (0: none)."""
        return self._windows.asked_upto(directory)

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
        if node == self._sentinel:
            self._sentinel = None  # the walk reads on
        with self._lock:
            data = self._kept.get(node)
            if data is None:
                self._wanted.discard(node)  # its READ came first
                return None
            if offset + size >= len(data):
                del self._kept[node]
                self.kept_bytes -= len(data)
            if offset == 0:
                self.served += 1
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
            self._take(node, ino, self._blobs.read_small(packed_digest(node), size))
        if larger:
            self._blobs.prefetch(larger)

    async def fetch_ahead(self, batch: Sequence[Ahead]) -> None:
        """Read the small files of `batch` from a blob service a round trip
        away, all at once (`read_many`), then store or keep them as
        `read_ahead` does (in a worker thread: storing into the page cache
        may wait for the kernel)."""
        small = [(node, ino) for node, ino in batch if _size_field(node)[0] <= SMALL]
        found = await self._blobs.read_many(
            [(packed_digest(node), _size_field(node)[0]) for node, _ in small]
        )

        def take_all() -> None:
            for node, ino in small:
                self._take(node, ino, found.get(packed_digest(node)))

        await trio.to_thread.run_sync(take_all)

    def _take(self, node: PackedNode, ino: int, data: bytes | None) -> None:
        """A small file's contents read ahead (checked; None if they could not
        be read cheaply, or were wrong: the READ will say): stored into the
        page cache of inode `ino` (0: none held) or kept for its READ."""
        if data is None:
            with self._lock:
                self._wanted.discard(node)
            return
        size = len(data)
        with self._lock:
            self.taken += 1
        # `_wanted` read unlocked, as a hint: a store that a READ
        # overtook is only wasted.
        if (
            ino
            and self._pages is not None
            and self._storing
            and node in self._wanted
            and self._pages.store(ino, data)
        ):
            with self._lock:
                self._wanted.discard(node)
                self.stored += 1
            return
        with self._lock:
            # Decided with the lock that `read` takes: a READ that came
            # first leaves nothing kept that nobody will read.
            if node not in self._wanted:
                return
            self._wanted.discard(node)
            if node in self._kept:
                return
            self._kept[node] = data
            self.kept_bytes += size
            while self.kept_bytes > KEPT:
                _, dropped = self._kept.popitem(last=False)
                self.kept_bytes -= len(dropped)

    async def settle(self) -> None:
        """Store no more pages, and wait for the threads reading ahead now.

        For before the session stops answering requests: a store into the
        page cache waits for pages that a reader's READ has locked, until
        that READ is answered; a thread left waiting so would keep the
        process from ever ending, and the mount with it."""
        self._storing = False
        for _ in range(THREADS):
            await self._slots.acquire()
        for _ in range(THREADS):
            self._slots.release()

    async def run(self) -> None:
        """Ask for the blobs, from up to THREADS threads at once, until cancelled."""
        slots = self._slots

        async def prefetch(batch: Sequence[Ahead]) -> None:
            try:
                if self._blobs.prefetches:
                    await trio.to_thread.run_sync(self.read_ahead, batch)
                else:
                    await self.fetch_ahead(batch)
            except Exception:
                # A bug must not take the mount down: the files' READs still
                # read them, and nothing of this batch is waited for.
                log.exception("reading %d files ahead", len(batch))
                with self._lock:
                    self._wanted.difference_update(node for node, _ in batch)
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
