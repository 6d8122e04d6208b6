"""Notices to the kernel that no request asked for: pages stored ahead of a
read (notify_store), a file's cached pages dropped (invalidate_inode).

They are written from a thread, after the reply the handler is building: in
the loop's own thread one could wait forever, for the kernel may first need
a page that a request waiting for this very loop has locked. And they are
best effort: a full queue drops a notice (the kernel then just asks), and
one the kernel refuses (an inode it no longer has) is logged at debug level.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Final

import pyfuse3
import trio

log = logging.getLogger(__name__)

# Notices waiting at most; beyond, new ones are dropped.
CAPACITY: Final = 4096

Notice = Callable[[], Awaitable[None]]


class KernelNotices:
    def __init__(self, capacity: int = CAPACITY) -> None:
        self._send, self._receive = trio.open_memory_channel[Notice](capacity)
        self.dropped = 0

    def _put(self, notice: Notice) -> None:
        try:
            self._send.send_nowait(notice)
        except trio.WouldBlock:
            self.dropped += 1

    def invalidate(self, ino: int) -> None:
        """Have the kernel drop what it caches of inode `ino`'s contents."""
        self._put(lambda: _in_thread(pyfuse3.invalidate_inode, ino))

    def store(self, ino: int, data: Callable[[], Awaitable[bytes | None]]) -> None:
        """Put `data()` (awaited when its turn comes; None: nothing) into
        inode `ino`'s page cache from offset 0."""

        async def notice() -> None:
            contents = await data()
            if contents:
                await _in_thread(pyfuse3.notify_store, ino, 0, contents)

        self._put(notice)

    async def run(self) -> None:
        """Send the notices, one at a time, until cancelled."""
        async for notice in self._receive:
            try:
                await notice()
            except Exception:
                # A bug here must not stop the mount; the kernel will just ask.
                log.exception("a notice to the kernel failed")


async def _in_thread(fn: Callable[..., None], *args: object) -> None:
    try:
        await trio.to_thread.run_sync(fn, *args)
    except OSError as e:
        # The kernel forgot the inode meanwhile, or never had it: nothing to do.
        log.debug("%s%r: %s", getattr(fn, "__name__", fn), args[:1], e)
