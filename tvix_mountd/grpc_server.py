"""Serving a gRPC service on a unix socket from a trio program.

grpcio's server runs handlers on its own thread pool; they reach the trio
loop with `trio.from_thread`. The socket is created 0600: only its owner
(root, for a system service) may talk to it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
import trio

from tvix_mountd.unixsock import clear_stale_socket, inode_of, remove_if_ours

log = logging.getLogger(__name__)

# Seconds in-flight calls get to finish when the server stops.
STOP_GRACE = 1.0
# The socket gets its mode at bind time from the umask, so there is no
# window in which another user could connect.
_SOCKET_UMASK = 0o177


class GrpcServeError(OSError):
    """The socket cannot be served (in use, not a socket, cannot bind)."""


def _start(server: grpc.Server, path: str) -> int | None:
    """Bind and start; the socket's inode, to recognise it when cleaning up."""
    try:
        clear_stale_socket(path)
    except OSError as e:
        raise GrpcServeError(f"cannot listen on {path}: {e}") from None
    # umask is per process; nothing else here creates files while we start.
    old = os.umask(_SOCKET_UMASK)
    try:
        try:
            bound = server.add_insecure_port(f"unix://{path}")
        except RuntimeError as e:
            raise GrpcServeError(f"cannot listen on {path}: {e}") from None
        if not bound:
            raise GrpcServeError(f"cannot listen on {path}")
        server.start()
    finally:
        os.umask(old)
    return inode_of(path)


def _stop(server: grpc.Server, executor: ThreadPoolExecutor, path: str, inode: int | None) -> None:
    server.stop(STOP_GRACE).wait()
    executor.shutdown(wait=False, cancel_futures=True)
    remove_if_ours(path, inode)


async def serve_unix(
    add_servicers: Callable[[grpc.Server], None],
    socket_path: str,
    *,
    max_workers: int = 16,
    name: str = "grpc",
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; `task_status.started()` once the socket accepts
    connections. Runs in the thread that runs trio, whose loop the handlers use."""
    executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=name)
    server = grpc.server(executor)
    add_servicers(server)
    inode: int | None = None
    try:
        inode = await trio.to_thread.run_sync(_start, server, socket_path)
        log.info("%s serving on %s", name, socket_path)
        task_status.started()
        await trio.sleep_forever()
    finally:
        # Shielded: calls in flight need this loop to finish within the grace.
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(_stop, server, executor, socket_path, inode)
