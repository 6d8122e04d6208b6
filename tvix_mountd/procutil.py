"""What every child process of the supervisor does first, and what a
process can tell of another from /proc."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import resource
import signal

from tvix_mountd.libc import libc

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

log = logging.getLogger(__name__)


def _prctl(option: int, value: int, name: str) -> None:
    if libc().prctl(option, value, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({name}): {os.strerror(err)}")


def set_parent_death_signal(signum: int) -> None:
    """Have the kernel send `signum` to this process when its parent dies."""
    _prctl(PR_SET_PDEATHSIG, signum, "PR_SET_PDEATHSIG")


def become_child_subreaper() -> None:
    """Adopt the orphans of our descendants (rather than init): a process
    forked by a child of ours, which then exits, becomes our child."""
    _prctl(PR_SET_CHILD_SUBREAPER, 1, "PR_SET_CHILD_SUBREAPER")


def children(pid: int | None = None) -> list[int]:
    """The PIDs of the children of process `pid` (default: this one), which
    each of its threads may have started."""
    proc = f"/proc/{'self' if pid is None else pid}/task"
    found = []
    for task in os.listdir(proc):
        # A thread that ended has no file.
        with contextlib.suppress(FileNotFoundError), open(f"{proc}/{task}/children") as f:
            found += [int(child) for child in f.read().split()]
    return found


def prepare_child(
    name: str, parent_death_signal: int = signal.SIGTERM, *, parent_pid: int | None = None
) -> None:
    """Reset inherited signal handling, follow the parent's death, tag the logs.

    The parent's signal dispositions and trio's wakeup fd are inherited by a
    fork; a child sets up its own. SIGTERM on the parent's death lets a worker
    unmount cleanly when the supervisor (or the spawner) is killed.
    `parent_pid`: the parent that started us, for a child that was exec'd
    (a forked one learns it from multiprocessing).
    """
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    with contextlib.suppress(ValueError):  # not the main thread: nothing inherited there
        signal.set_wakeup_fd(-1)
    set_parent_death_signal(parent_death_signal)
    if parent_pid is None:
        import multiprocessing  # not for the processes that only look at others

        parent = multiprocessing.parent_process()
        parent_pid = parent.pid if parent is not None else None
    if parent_pid is not None and os.getppid() != parent_pid:
        # The parent died before prctl took effect.
        os.kill(os.getpid(), parent_death_signal)
    from tvix_mountd.logs import tag_process

    tag_process(name)


def raise_open_file_limit(wanted: int = 65536) -> None:
    """Raise this process's soft limit on open files towards its hard limit.

    A worker keeps blob readers open (one descriptor each) besides its
    sockets and databases; the soft limit some service managers set (1024)
    is for programs that never need more.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def main_thread_exited(pid: int) -> bool:
    """Whether process `pid`'s main thread has ended (or the process is gone).

    Its other threads may live on: one waiting in the kernel, uninterruptibly,
    keeps the process (and what it holds) from ending. A pidfd cannot tell
    this: even one of the main thread alone (PIDFD_THREAD) becomes readable
    only once the process is reaped."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        # Gone before the open, or between the open and the read (ESRCH).
        return True
    # The state follows the command name, which may hold anything but ends
    # at the last ")".
    return stat.rpartition(b")")[2].split()[0] in (b"Z", b"X")
