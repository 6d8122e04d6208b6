"""The watchdog of a standalone mount: it aborts the connection of a daemon
that died but cannot finish dying.

A standalone `tvix-mountd mount` holds its FUSE connection alone. Killed
(SIGKILL, the OOM killer, a crash), it normally closes the connection as it
dies, and the mountpoint answers ENOTCONN until the next mount clears it.
But a thread waiting in the kernel, uninterruptibly, for something only the
daemon could do keeps the process from ending: a read-ahead thread's store
into the page cache (notify_store) waits for a page that a reader's READ has
locked, and that READ is never answered. The process then holds the
connection for good, and every reader of the mount waits with it. (Under
the supervisor, the next worker answers that READ.)

`tvix-mountd mount` starts this process (`python -m
tvix_mountd.workers.watchdog PID CONNECTION MOUNTPOINT`) once it has
mounted. It waits for the daemon's main thread to end; if the process is
still there STUCK_AFTER seconds later, it aborts the connection (fusectl):
the waits fail, the process ends, and the mount is left dead, as any killed
daemon's is. Then, or when the daemon ends normally, it ends too. It holds
nothing of the daemon's: not the FUSE descriptor, not the mountpoint.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import sys
import time
from typing import Final

from tvix_mountd import procutil
from tvix_mountd.workers import fusectl

log = logging.getLogger(__name__)

# How often the daemon's main thread is looked at, and how long its other
# threads may outlive it before they count as stuck (they normally end with
# it at once).
POLL: Final = 0.25
STUCK_AFTER: Final = 2.0


def start(daemon_pid: int, connection: int, mountpoint: str) -> subprocess.Popen[bytes]:
    """Start the watchdog of this daemon's mount (from the daemon)."""
    return subprocess.Popen(
        [sys.executable, "-m", __name__, str(daemon_pid), str(connection), mountpoint],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,  # its log lines go to the daemon's stderr
        cwd="/",  # not the mountpoint, nor anything under it
        close_fds=True,  # not the FUSE descriptor: that would keep the connection up
        start_new_session=True,  # a Ctrl-C meant for the daemon is not for it
    )


def watch(daemon_pid: int, connection: int, mountpoint: str) -> None:
    """Until the daemon has ended; abort its connection if it cannot."""
    try:
        pidfd = os.pidfd_open(daemon_pid)
    except ProcessLookupError:
        return  # ended already
    except OSError as e:  # no pidfds (Linux < 5.3): nothing safe to watch with
        log.error("cannot watch tvix-mountd %d (%s): %s", daemon_pid, mountpoint, e)
        return
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        stuck_since: float | None = None
        aborted = False
        # The pidfd becomes readable once every thread of the daemon has
        # ended (a zombie keeps its PID until reaped): /proc is read only
        # while it is not, and the loop ends at the next poll once it is.
        while not poller.poll(POLL * 1000):
            if aborted or not procutil.main_thread_exited(daemon_pid):
                continue
            now = time.monotonic()
            if stuck_since is None:
                stuck_since = now
            elif now - stuck_since >= STUCK_AFTER:
                aborted = True
                _abort(daemon_pid, connection, mountpoint)
    finally:
        os.close(pidfd)


def _abort(daemon_pid: int, connection: int, mountpoint: str) -> None:
    try:
        found = fusectl.abort_connection(connection)
    except OSError as e:
        log.error(
            "tvix-mountd %d ended, but a thread of it is stuck in the kernel, and"
            " its FUSE connection %d (%s) could not be aborted: %s; readers of the"
            " mount wait until it is (echo 1 > %s/%d/abort)",
            daemon_pid,
            connection,
            mountpoint,
            e,
            fusectl.FUSECTL,
            connection,
        )
        return
    if found:
        log.warning(
            "tvix-mountd %d ended, but a thread of it was stuck in the kernel:"
            " aborted its FUSE connection %d, so that readers of %s fail instead"
            " of waiting for good",
            daemon_pid,
            connection,
            mountpoint,
        )


def main() -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s watchdog: %(message)s"
    )
    # The daemon's end is this process's; a signal for its session is not.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    daemon_pid, connection, mountpoint = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    watch(daemon_pid, connection, mountpoint)
    return 0


if __name__ == "__main__":
    sys.exit(main())
