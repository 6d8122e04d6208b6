"""Mounting a StoreFilesystem: the only part that talks to the kernel."""

from __future__ import annotations

import errno
import gc
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Final

import pyfuse3
import trio

from tvix_mountd.workers.filesystem import (
    KERNEL_CACHES_LISTINGS,
    PLAIN_LISTINGS,
    READS_WITHOUT_OPEN,
    StoreFilesystem,
)
from tvix_mountd.workers.inodes import ROOT_INODE
from tvix_mountd.workers.mounttable import MountEntry, detach, find_mount, find_mount_id

log = logging.getLogger(__name__)

# A larger readahead window lets the kernel send 1 MiB reads instead of
# 128 KiB ones for sequential reads: fewer requests, the main cost here.
DEFAULT_READ_AHEAD_KB = 1024
# Whether pyfuse3 reads requests the device already holds without waiting
# first (third_party/pyfuse3/05-read-queued-requests.patch; its version
# says so, it adds no name). It makes the descriptor non-blocking.
READS_QUEUED_REQUESTS: Final = "read.queued.requests" in pyfuse3.__version__


class MountError(Exception):
    """The mountpoint cannot be used (a user's problem, reported plainly)."""


@dataclass(frozen=True)
class MountOptions:
    fsname: str = "tvix-mountd"
    allow_other: bool = False
    read_ahead_kb: int = DEFAULT_READ_AHEAD_KB

    def fuse_options(self) -> set[str]:
        """Options for libfuse, when it mounts (pyfuse3.init)."""
        # ro: the kernel refuses writes itself, without a round trip.
        return {f"fsname={self.fsname}", "subtype=tvix", "ro", *self.kernel_options()}

    def kernel_options(self) -> set[str]:
        """Options of the FUSE mount itself (mount(2)'s data), beyond fd and modes."""
        # default_permissions: the kernel checks modes, so no access() calls.
        options = {"default_permissions"}
        if self.allow_other:
            options.add("allow_other")
        return options


def is_dead_mount(mountpoint: str) -> bool:
    """Whether a FUSE mount at `mountpoint` has lost its daemon (ENOTCONN).

    statfs, not stat: the kernel answers stat of a FUSE root from its
    attribute cache (kept "forever" here) even when the daemon is dead, while
    statfs always asks the daemon.
    """
    try:
        os.statvfs(mountpoint)
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            return True
        raise
    return False


def prepare_mountpoint(mountpoint: str) -> None:
    """Check `mountpoint` is an empty directory; clear a dead FUSE mount left on it."""
    existing = find_mount(mountpoint)
    if existing is not None and existing.fstype.startswith("fuse"):
        if not is_dead_mount(mountpoint):
            raise MountError(f"{mountpoint} is already a mounted FUSE filesystem")
        log.warning("%s: clearing a dead FUSE mount left behind", mountpoint)
        detach(mountpoint)
    path = Path(mountpoint)
    if not path.is_dir():
        raise MountError(f"mountpoint {mountpoint} is not a directory")
    if any(path.iterdir()):
        raise MountError(f"mountpoint {mountpoint} is not empty")


def set_read_ahead(mountpoint: str, kb: int = DEFAULT_READ_AHEAD_KB) -> None:
    """Set the readahead of the FUSE mount at `mountpoint`, once it has
    processed INIT (whose reply sets it to what the daemon offers)."""
    found = find_mount(mountpoint)
    if found is None:
        return
    bdi = Path("/sys/class/bdi") / found.device / "read_ahead_kb"
    try:
        bdi.write_text(str(kb))
    except OSError as e:
        log.info("could not set %s to %d: %s", bdi, kb, e)


async def _after_init(mountpoint: str, read_ahead_kb: int) -> None:
    """Raise the mount's readahead once the kernel has processed FUSE INIT.

    The INIT reply lowers the bdi's readahead to what the daemon offers
    (libfuse passes on the kernel's 128 KiB), so a value written before it is
    lost. A statfs is answered only after INIT, so its return marks the moment.
    Abandoned if the mount stops first: the statfs then waits for a worker.
    """
    await trio.to_thread.run_sync(os.statvfs, mountpoint, abandon_on_cancel=True)
    set_read_ahead(mountpoint, read_ahead_kb)


def _tune_gc() -> None:
    """Keep the cyclic GC from rescanning what a mount accumulates.

    Inodes, nodes and listings hold no reference cycles, but every one is a
    container the collector would walk again and again as 100,000s pile up.
    Freeze what exists (the imported modules) and collect the young
    generation far less often.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


async def serve(
    fs: StoreFilesystem,
    mountpoint: str,
    options: MountOptions,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Mount `fs`, serve until cancelled or `pyfuse3.terminate()`, unmount."""
    mountpoint = os.path.abspath(mountpoint)  # noqa: ASYNC240 - no I/O, string only
    prepare_mountpoint(mountpoint)
    try:
        pyfuse3.init(fs, mountpoint, options.fuse_options())
    except RuntimeError as e:
        raise MountError(f"cannot mount {mountpoint}: {e}") from None
    try:
        log.info("mounted %s", mountpoint)
        _start_watchdog(mountpoint)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_after_init, mountpoint, options.read_ahead_kb)
            await _serve_session(fs, task_status)
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await fs.close()
        pyfuse3.close(unmount=True)
        log.info("unmounted %s", mountpoint)


def _start_watchdog(mountpoint: str) -> None:
    """Have a process abort this mount's connection if this one dies stuck
    (watchdog.py). It ends by itself once this process has ended."""
    from tvix_mountd.workers import watchdog

    found = find_mount(mountpoint)
    if found is None:  # unmounted already: nothing to watch
        return
    connection = int(found.device.partition(":")[2])
    try:
        watchdog.start(os.getpid(), connection, mountpoint)
    except OSError as e:
        log.warning("%s: no watchdog for the mount: %s", mountpoint, e)


@dataclass(frozen=True)
class LentConnection:
    """A FUSE connection that its keeper (the supervisor) mounted and lends
    to this worker (see connection.py)."""

    mountpoint: str
    mount_id: int | None
    fuse_fd: int
    # The kernel's INIT, to feed to libfuse; None: libfuse reads it from the
    # device itself (the connection's first and only worker).
    init: bytes | None
    # Whether to have the kernel hand out again what the worker before this
    # one had taken and not answered.
    resend: bool
    # Root entries the kernel may cache from another store, to invalidate.
    stale_root_names: Collection[bytes] = ()

    def detach_if_ours(self) -> None:
        """Unmount, if what is mounted at the mountpoint is still this connection."""
        if self.mount_id is not None and find_mount_id(self.mountpoint) == self.mount_id:
            detach(self.mountpoint)
            log.info("unmounted %s", self.mountpoint)


async def serve_lent(
    fs: StoreFilesystem,
    connection: LentConnection,
    options: MountOptions,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `fs` on a lent connection until `pyfuse3.terminate()`; the mount
    stays (it is the keeper's to end)."""
    from tvix_mountd.workers.connection import request_resend

    block_unless_reading_queued(connection.fuse_fd, READS_QUEUED_REQUESTS)
    try:
        # libfuse takes /dev/fd/N as "this descriptor, already mounted".
        pyfuse3.init(fs, f"/dev/fd/{connection.fuse_fd}", options.fuse_options())
    except RuntimeError as e:
        raise MountError(f"cannot serve {connection.mountpoint}: {e}") from None
    try:
        if connection.init is not None:
            # Answered by the first worker; for a later one the reply names a
            # request the kernel no longer knows (ENOENT), which libfuse ignores.
            await pyfuse3.process_request(connection.init)
        if connection.resend:
            request_resend(connection.fuse_fd)
        if connection.stale_root_names:
            log.info(
                "the store changed: invalidating %d root entries the kernel may cache",
                len(connection.stale_root_names),
            )
            # Asynchronous (a thread of pyfuse3's): the kernel takes the
            # root's lock, which a lookup waiting for us may hold.
            for name in connection.stale_root_names:
                pyfuse3.invalidate_entry_async(ROOT_INODE, name, ignore_enoent=True)
        log.info("serving %s", connection.mountpoint)
        # Not a statfs of our own mount here (for the readahead, as `serve`
        # does): a request the session reads as it is ended is dropped
        # unanswered (libfuse), and a thread of ours waiting on it would keep
        # this process, and the connection, alive. The keeper sets it.
        await _serve_session(fs, task_status)
    finally:
        with trio.CancelScope(shield=True):
            await fs.close()
        pyfuse3.close(unmount=False)


def block_unless_reading_queued(fuse_fd: int, reads_queued: bool) -> None:
    """Give a pyfuse3 that waits for every request a blocking descriptor.

    The workers of a connection share its open file, O_NONBLOCK included,
    and one with patch 05 sets it. A later worker without it (a downgrade)
    would then see EAGAIN from a read after "readable" whose request was
    withdrawn meanwhile (its caller killed), which stock pyfuse3 raises, and
    the worker would end; blocking, the read waits for the next request."""
    if not reads_queued:
        os.set_blocking(fuse_fd, True)


async def _serve_session(fs: StoreFilesystem, task_status: trio.TaskStatus[None]) -> None:
    if not (KERNEL_CACHES_LISTINGS and READS_WITHOUT_OPEN and PLAIN_LISTINGS):
        log.info(
            "this pyfuse3 (%s) cannot let the kernel keep directory listings, read"
            " files it did not open here or list without attributes;"
            " scripts/setup.sh builds one that can",
            pyfuse3.__version__,
        )
    _tune_gc()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fs.run_background)
        task_status.started()
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def serve_until_signalled(
    fs: StoreFilesystem,
    mountpoint: str,
    options: MountOptions,
    *,
    background: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """`serve`, ending cleanly (unmounted) on SIGTERM or SIGINT; `background`
    (the store's own work) runs for as long as the mount is served."""
    await _until_signalled(
        partial(serve, fs, mountpoint, options), fs, _STOP, lambda signum: None, background
    )


async def serve_lent_until_signalled(
    fs: StoreFilesystem, connection: LentConnection, options: MountOptions
) -> bool:
    """`serve_lent` until a signal: SIGUSR1 hands the connection back for
    the next worker (the mount stays); SIGTERM or SIGINT (a stop, or the
    supervisor's death) unmount first. Whether it was handed back."""
    handed_back = False

    def on_signal(signum: int) -> None:
        nonlocal handed_back
        if signum == signal.SIGUSR1:
            handed_back = True
        else:
            connection.detach_if_ours()

    await _until_signalled(
        partial(serve_lent, fs, connection, options), fs, (*_STOP, signal.SIGUSR1), on_signal
    )
    return handed_back


_STOP: Final = (signal.SIGTERM, signal.SIGINT)
# Seconds the session goes on answering requests after a signal, for what
# waits on the kernel to finish (StoreFilesystem.settle).
SETTLE_TIMEOUT: Final = 1.0


async def _until_signalled(
    serve_fn: Callable[[], Awaitable[None]],
    fs: StoreFilesystem,
    signums: tuple[int, ...],
    on_signal: Callable[[int], None],
    background: Callable[[], Awaitable[None]] | None = None,
) -> None:
    with trio.open_signal_receiver(*signums) as signals:
        try:
            async with trio.open_nursery() as nursery:

                async def stop_on_signal() -> None:
                    async for signum in signals:
                        name = signal.Signals(signum).name
                        if signum == signal.SIGUSR1:
                            log.info("received %s, handing the mount over", name)
                        else:
                            log.info("received %s, unmounting", name)
                        on_signal(signum)
                        with trio.move_on_after(SETTLE_TIMEOUT):
                            await fs.settle()
                        pyfuse3.terminate()
                        return

                nursery.start_soon(stop_on_signal)
                if background is not None:
                    nursery.start_soon(background)
                await serve_fn()
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The nursery wraps what `serve` raised; callers expect the error
            # itself (the CLI reports a MountError as one line, not a traceback).
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise


__all__ = [
    "LentConnection",
    "MountEntry",
    "MountError",
    "MountOptions",
    "detach",
    "find_mount",
    "find_mount_id",
    "is_dead_mount",
    "serve",
    "serve_lent",
    "serve_lent_until_signalled",
    "serve_until_signalled",
    "set_read_ahead",
]
