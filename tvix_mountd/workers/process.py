"""A worker process: one mount, served until SIGTERM or its parent's death."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import trio

from tvix_mountd import procutil
from tvix_mountd.castore import blobs, directories
from tvix_mountd.supervisor.config import MountConfig, StoreConfig
from tvix_mountd.workers.filesystem import StoreFilesystem
from tvix_mountd.workers.mount import MountError, MountOptions, serve_until_signalled
from tvix_mountd.workers.rootcache_client import RootCacheRootNodes

log = logging.getLogger(__name__)

# Exit status of a worker that could not mount (as opposed to one that crashed).
EXIT_MOUNT_ERROR = 3


def fsname(mount_name: str) -> str:
    """The FUSE source name of a mount, how the supervisor recognises its own."""
    return f"tvix-mountd:{mount_name}"


async def serve_worker(mount: MountConfig, store: StoreConfig, rootcache_socket: str) -> None:
    blob_service = blobs.from_addr(store.blob_service_addr, timeout=store.backend_timeout)
    directory_service = directories.from_addr(
        store.directory_service_addr, timeout=store.backend_timeout
    )
    root_nodes = RootCacheRootNodes(rootcache_socket, mount.store, timeout=store.backend_timeout)
    metrics = None
    try:
        from tvix_mountd.metrics import RequestMetrics

        metrics = RequestMetrics(mount.name)
    except Exception:  # metrics are optional; a mount without them still serves
        log.exception("metrics unavailable")
    fs = StoreFilesystem(
        blob_service,
        directory_service,
        root_nodes,
        list_root=mount.list_root,
        show_xattr=mount.show_xattr,
        backend_timeout=store.backend_timeout,
        metrics=metrics,
    )
    options = MountOptions(fsname=fsname(mount.name), allow_other=mount.allow_other)
    try:
        async with trio.open_nursery() as nursery:
            if metrics is not None:
                nursery.start_soon(metrics.flush_periodically)
            await serve_until_signalled(fs, mount.mountpoint, options)
            nursery.cancel_scope.cancel()
    finally:
        if metrics is not None:
            metrics.flush()
        with trio.CancelScope(shield=True):
            await root_nodes.aclose()
            await blob_service.aclose()
            await directory_service.aclose()


def worker_main(mount_json: str, store_json: str, rootcache_socket: str, error_file: str) -> None:
    """Entry point of a worker process (forked by the spawner)."""
    mount = MountConfig.model_validate_json(mount_json)
    store = StoreConfig.model_validate_json(store_json)
    procutil.prepare_child(mount.name)
    try:
        trio.run(serve_worker, mount, store, rootcache_socket)
    except BaseException as e:
        error = _mount_error(e)
        if error is None:
            raise
        log.error("%s", error)
        # The supervisor shows this in status as the mount's error.
        Path(error_file).write_text(str(error))
        sys.exit(EXIT_MOUNT_ERROR)


def _mount_error(e: BaseException) -> MountError | None:
    """The MountError `e` is, also when serve_worker's nursery wrapped it in a group."""
    while isinstance(e, BaseExceptionGroup) and len(e.exceptions) == 1:
        e = e.exceptions[0]
    return e if isinstance(e, MountError) else None
