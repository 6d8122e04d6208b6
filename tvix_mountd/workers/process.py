"""A worker process: serves one mount's lent FUSE connection until it is
handed back (SIGUSR1), stopped (SIGTERM) or its parent dies.

Workers are exec'd (`python -m tvix_mountd.workers`, the spec as JSON on
stdin, descriptors inherited) or forked from a fork server that imported
this code and checks it is still the code installed now
(supervisor/forkserver.py): a worker started by `restart` runs the code
installed now, which is how an upgrade reaches a running mount.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Final

import trio

import tvix_mountd
from tvix_mountd import logs, procutil
from tvix_mountd.castore import blobs, directories
from tvix_mountd.workers.connection import InitRequest
from tvix_mountd.workers.filesystem import StoreFilesystem
from tvix_mountd.workers.inodes import InodeTable
from tvix_mountd.workers.mount import (
    LentConnection,
    MountError,
    MountOptions,
    serve_lent_until_signalled,
)
from tvix_mountd.workers.rootcache_client import RootCacheRootNodes
from tvix_mountd.workers.spec import SpecError, WorkerSpec
from tvix_mountd.workers.statefile import StateFile, StateFileError

log = logging.getLogger(__name__)

# What a worker imports only as it starts, imported ahead by the fork server
# (supervisor/forkserver.py) for the workers it forks: the metrics, and the
# embedded store's backends.
FORK_SERVER_PRELOAD: Final = (
    "tvix_mountd.request_metrics",
    "tvix_mountd.metrics",
    "tvix_mountd.castore.blobs.raw",
    "tvix_mountd.castore.directories.sqlite",
)

# Exit status of a worker that could not serve (as opposed to one that crashed).
EXIT_MOUNT_ERROR: Final = 3
# Exit status of a worker that handed its connection back (SIGUSR1).
EXIT_HANDED_BACK: Final = 0


def fsname(mount_name: str) -> str:
    """The FUSE source name of a mount, how the supervisor recognises its own."""
    return f"tvix-mountd:{mount_name}"


async def serve_worker(spec: WorkerSpec) -> None:
    mount, store = spec.mount, spec.store
    blob_service = blobs.from_addr(store.blob_service_addr, timeout=store.backend_timeout)
    directory_service = directories.from_addr(
        store.directory_service_addr, timeout=store.backend_timeout
    )
    root_nodes = RootCacheRootNodes(
        spec.rootcache_socket, mount.store, timeout=store.backend_timeout
    )
    metrics = None
    try:
        from tvix_mountd.request_metrics import RequestMetrics

        metrics = RequestMetrics(mount.name)
    except Exception:  # metrics are optional; a mount without them still serves
        log.exception("metrics unavailable")
    try:
        inodes = InodeTable(StateFile(spec.state_fd))
    except (OSError, StateFileError) as e:
        raise MountError(f"cannot use the mount's state file: {e}") from None
    fs = StoreFilesystem(
        blob_service,
        directory_service,
        root_nodes,
        list_root=mount.list_root,
        show_xattr=mount.show_xattr,
        plain_listings=mount.plain_listings,
        read_ahead=mount.read_ahead,
        backend_timeout=store.backend_timeout,
        metrics=metrics,
        inodes=inodes,
        store_pages=True,
    )
    log.info(
        "worker %d: tvix-mountd %s from %s, %s",
        os.getpid(),
        tvix_mountd.__version__,
        os.path.dirname(tvix_mountd.__file__),
        "exec'd" if spec.fork_server is None else f"forked by fork server {spec.fork_server}",
    )
    left = fs.journal.take_over(blame=spec.blame)
    if left:
        log.warning(
            "%d requests were in flight when the worker before this one ended%s",
            len(left),
            "" if spec.blame else " (on request: not held against them)",
        )
    if len(inodes):
        log.info("taking over %d inodes the kernel holds", len(inodes))
    init = None
    if spec.init is not None:
        init = InitRequest.parse(bytes.fromhex(spec.init)).raw  # MountError if it is none
    connection = LentConnection(
        mountpoint=mount.mountpoint,
        mount_id=spec.mount_id,
        fuse_fd=spec.fuse_fd,
        init=init,
        resend=spec.resend,
        stale_root_names=inodes.state.root_names() if spec.store_changed else (),
    )
    options = MountOptions(fsname=fsname(mount.name), allow_other=mount.allow_other)
    try:
        async with trio.open_nursery() as nursery:
            if metrics is not None:
                nursery.start_soon(metrics.flush_periodically)
            handed_back = await serve_lent_until_signalled(fs, connection, options)
            nursery.cancel_scope.cancel()
        log.info("handed the mount back" if handed_back else "stopped")
    finally:
        if metrics is not None:
            metrics.flush()
        with trio.CancelScope(shield=True):
            await root_nodes.aclose()
            await blob_service.aclose()
            await directory_service.aclose()
        inodes.close()


def main() -> None:
    """Entry point of an exec'd worker: the spec comes on stdin."""
    try:
        spec = WorkerSpec.from_json(sys.stdin.buffer.read())
    except SpecError as e:
        print(f"tvix-mountd worker: bad spec on stdin: {e}", file=sys.stderr)
        sys.exit(2)
    procutil.prepare_child(spec.mount.name, parent_pid=spec.parent_pid)
    procutil.raise_open_file_limit()
    if spec.log_fd is not None:
        logs.setup_exec_child_logging(spec.log_fd, spec.log_level, spec.mount.name)
    try:
        trio.run(serve_worker, spec)
    except BaseException as e:
        error = _mount_error(e)
        if error is None:
            log.exception("worker crashed")
            logging.shutdown()
            sys.exit(1)
        log.error("%s", error)
        # The supervisor shows this in status as the mount's error.
        Path(spec.error_file).write_text(str(error))
        sys.exit(EXIT_MOUNT_ERROR)


def _mount_error(e: BaseException) -> MountError | None:
    """The MountError `e` is, also when serve_worker's nursery wrapped it in a group."""
    while isinstance(e, BaseExceptionGroup) and len(e.exceptions) == 1:
        e = e.exceptions[0]
    return e if isinstance(e, MountError) else None
