"""Fetching the contents of the directories that come next in a walk.

`find`, `os.walk`, `du`, a copy of a tree: each opens the subdirectories of
a directory one after another, in the order its listing gave them (name
order), and each first open waits for the directory service (a cold SQLite
page, or a round trip to a tvix-store). Once a directory's subdirectories
are being opened in name order (runs.py), the next ones are fetched ahead,
a batch per backend call (SQLite: one query, decoded and checked in its
worker thread), and their contents given to their inodes, which the kernel
holds already (a listing handed them over). Opening them then waits for
nothing.

Bounded: a window of AHEAD subdirectories per directory, of inodes the
kernel holds (whose contents the inode table keeps anyway once they are
opened, until the kernel forgets them); BATCHES backend calls at once; a
queue that drops rather than grows. A fetch that fails is left to the open
that needs it, which fails or retries as any other.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Final

import trio

from tvix_mountd.castore.digests import B3Digest
from tvix_mountd.castore.directories import DirectoryService
from tvix_mountd.castore.errors import StoreError
from tvix_mountd.castore.nodes import PACKED_DIRECTORY, Directory, PackedNode, packed_digest
from tvix_mountd.workers.inodes import Children, InodeTable
from tvix_mountd.workers.runs import AheadWindows, NameOrderRuns

log = logging.getLogger(__name__)

# Subdirectories ahead of the one opened; asked for again once half are open.
AHEAD: Final = 32
BATCH: Final = 8  # directories per backend call
BATCHES: Final = 2  # backend calls at once
QUEUE: Final = 64


class DirectoryPrefetcher:
    def __init__(
        self,
        directories: DirectoryService,
        inodes: InodeTable,
        runs: NameOrderRuns,
        children_of: Callable[[Directory], Children],
        timeout: float,
    ) -> None:
        """`children_of`: a fetched Directory as the inode table keeps it;
        `timeout`: how long a backend call may make no progress."""
        self._directories = directories
        self._inodes = inodes
        self._runs = runs
        self._children_of = children_of
        self._timeout = timeout
        self._windows = AheadWindows(AHEAD)
        # Digest -> set once its batch is done (fetched or not).
        self._inflight: dict[B3Digest, trio.Event] = {}
        self._send, self._receive = trio.open_memory_channel[Sequence[PackedNode]](QUEUE)
        self.given = 0  # directories whose contents were given ahead of their open
        self._batch_done = trio.Event()
        # Whether `run` takes batches: without it nothing is queued, so that
        # no open waits on a fetch that would never come.
        self._running = False

    def opened(self, ino: int) -> None:
        """Directory inode `ino` is being opened: if that goes on a run in
        name order, fetch the subdirectories after it."""
        place = self._runs.first_use(ino)
        if place is None or not self._running:
            return
        _, directory, index = place
        node = self._inodes.node(ino)
        nodes = None if node is None else self._inodes.entries_around(*place, node)
        if nodes is None:
            return
        window = self._windows.next(directory, index, len(nodes))
        wanted = [
            node
            for node in nodes[window.start : window.stop]
            if node[0] == PACKED_DIRECTORY
            and packed_digest(node) not in self._inflight
            and self._needs_children(node)
        ]
        for i in range(0, len(wanted), BATCH):
            batch = wanted[i : i + BATCH]
            try:
                self._send.send_nowait(batch)
            except trio.WouldBlock:
                return  # the backend is behind already: the opens will fetch
            for node in batch:
                self._inflight[packed_digest(node)] = trio.Event()

    async def settled(self, digest: B3Digest) -> None:
        """Until a fetch ahead of `digest`, if one is queued or running, is
        done; no longer than one backend call may take (a batch queued behind
        others on a hung backend must not hold an open for longer than its
        own fetch would)."""
        event = self._inflight.get(digest)
        if event is not None:
            with trio.move_on_after(self._timeout):
                await event.wait()

    async def wait_batch(self) -> None:
        """Until the next batch is done (for tests, and whoever wants to see it work)."""
        await self._batch_done.wait()

    def asked_upto(self, directory: PackedNode) -> int:
        """How many of `directory`'s first entries were asked for (0: none)."""
        return self._windows.asked_upto(directory)

    async def _fetch(self, batch: Sequence[PackedNode]) -> None:
        digests = [packed_digest(node) for node in batch]
        try:
            found: dict[B3Digest, Directory] = {}
            # Only those whose inodes still hold no contents (not opened meanwhile).
            wanted = [
                digest
                for node, digest in zip(batch, digests, strict=True)
                if self._needs_children(node)
            ]
            if wanted:
                with trio.move_on_after(self._timeout):
                    try:
                        found = await self._directories.get_many(wanted)
                    except StoreError as e:
                        # The open that needs it fetches it again, and reports.
                        log.debug("fetching %d directories ahead: %s", len(wanted), e)
                    except Exception:
                        # A bug must not take the mount down; the opens still work.
                        log.exception("fetching %d directories ahead", len(wanted))
            for node, digest in zip(batch, digests, strict=True):
                directory = found.get(digest)
                if directory is not None and self._needs_children(node):
                    ino = self._inodes.number_of(node)
                    self._inodes.set_children(ino, node, self._children_of(directory))
                    self.given += 1
        finally:
            for digest in digests:
                event = self._inflight.pop(digest, None)
                if event is not None:
                    event.set()
            self._batch_done.set()
            self._batch_done = trio.Event()

    def _needs_children(self, node: PackedNode) -> bool:
        ino = self._inodes.number_of(node)
        return bool(ino) and self._inodes.children(ino) is None

    async def run(self) -> None:
        """Fetch what `opened` asks for, BATCHES calls at once, until cancelled."""
        slots = trio.Semaphore(BATCHES)

        async def fetch(batch: Sequence[PackedNode]) -> None:
            try:
                await self._fetch(batch)
            finally:
                slots.release()

        self._running = True
        try:
            async with trio.open_nursery() as nursery:
                async for batch in self._receive:
                    await slots.acquire()
                    nursery.start_soon(fetch, batch)
        finally:
            self._running = False
            # Whoever waits on a batch never started stops waiting.
            for event in self._inflight.values():
                event.set()
            self._inflight.clear()
