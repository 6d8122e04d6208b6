"""Serving a gRPC service on a unix socket from a trio program.

grpcio's server runs handlers on its own thread pool; they reach the trio
loop with `trio.from_thread`. The socket is created 0600: only its owner
(root, for a system service) may talk to it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
import trio

# Seconds in-flight calls get to finish when the server stops.
STOP_GRACE = 1.0


async def serve_unix(
    add_servicers: Callable[[grpc.Server], None],
    socket_path: str,
    *,
    max_workers: int = 16,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; `task_status.started()` once the socket listens."""
    await trio.Path(socket_path).unlink(missing_ok=True)
    server = grpc.server(
        ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        options=[("grpc.so_reuseport", 0)],
    )
    add_servicers(server)
    # The socket gets its mode at bind time, from the umask: no window in
    # which another user could connect.
    old_umask = os.umask(0o177)
    try:
        if server.add_insecure_port(f"unix://{socket_path}") == 0:
            raise OSError(f"cannot listen on unix socket {socket_path}")
        server.start()
    finally:
        os.umask(old_umask)
    try:
        task_status.started()
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):
            stopped = server.stop(STOP_GRACE)
            await trio.to_thread.run_sync(stopped.wait)
            await trio.Path(socket_path).unlink(missing_ok=True)
