"""The fork server: a process that imports the workers' code once and forks
each worker from there.

An exec'd worker spends ~0.25 s of CPU importing trio, grpc, protobuf and
pyfuse3 before it serves: with 8 mounts on 2 cores that was most of the
service's start, and it is most of a handover's stall after a crash. A
worker forked from this server has all of that already.

`restart` must still start workers that run the code installed now (that is
how an upgrade reaches a running mount), so before each fork the server
looks at every file its code came from (modules, the interpreter, mapped
libraries); if one has changed since, it answers "stale" and exits, and the
spawner starts a new server (or, if that fails too, execs the worker as
before).

The spawner execs the server (`python -P -m tvix_mountd.supervisor.forkserver
MODULE:FUNCTION CONN_FD SPAWNER_PID [LOG_FD LEVEL]`) and asks it over CONN_FD,
one pickled tuple per message:
    spawner -> server   ("fork", title, spec, fd_keys) + descriptors
    server -> spawner   ("ready",) once imported
                        | ("forked", pid) | ("stale",) | ("failed", error)
The server imports MODULE, and the modules it names in FORK_SERVER_PRELOAD.
The worker runs FUNCTION with its spec on stdin, as an exec'd one runs
`python -m` with it; the spec gets the descriptors' numbers under their keys
and this server's PID as `fork_server`. It is forked twice, so that its
parent is the spawner (a child subreaper), as an exec'd worker's is: the
spawner reaps it and learns its exit status, and the worker's parent-death
signal follows the spawner. This server's own death ends no worker. The
spec is written once the middle process has gone and the spawner knows the
worker's PID, so a worker must read it before it looks at its parent.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import logging
import multiprocessing.connection
import multiprocessing.reduction
import os
import signal
import socket
import struct
import sys
from typing import Any

from tvix_mountd import logs, procutil

log = logging.getLogger(__name__)


class CodeFiles:
    """The files the code of this process came from, as they were when it was
    loaded: its modules, the interpreter and every library it has mapped.
    The code installed now is the same code if none of them changed."""

    def __init__(self) -> None:
        self._seen = {path: self._identity(path) for path in self._paths()}

    @staticmethod
    def _paths() -> set[str]:
        paths = {
            path
            for module in list(sys.modules.values())
            if isinstance(path := getattr(module, "__file__", None), str)
        }
        paths.add(os.path.realpath(sys.executable))
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].startswith("/"):
                    paths.add(fields[5].rstrip("\n"))
        return paths

    @staticmethod
    def _identity(path: str) -> tuple[int, int, int] | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def changed(self) -> str | None:
        """A file that changed since, if any."""
        for path, identity in self._seen.items():
            if self._identity(path) != identity:
                return path
        return None


def _fork_worker(main: Any, title: str, fds: list[int], keep: set[int]) -> tuple[int, int]:
    """Fork the worker (through a child that exits at once, so that it is
    reparented to the spawner): its PID, and the pipe to write its spec
    into (its stdin). Write the spec only once the spawner knows the PID:
    a worker whose spec does not come (EOF) exits without serving."""
    spec_read, spec_write = os.pipe()
    pid_read, pid_write = os.pipe()
    try:
        middle = os.fork()
        if middle == 0:
            _middle_child(main, title, spec_read, pid_write, keep | set(fds))
        os.close(pid_write)
        pid_write = -1
        with os.fdopen(pid_read, "rb", closefd=False) as f:
            raw = f.read(4)
        _, status = os.waitpid(middle, 0)
        if len(raw) != 4 or os.waitstatus_to_exitcode(status) != 0:
            raise OSError(f"could not fork {title!r} (status {status})")
        (worker,) = struct.unpack("i", raw)
    except BaseException:
        os.close(spec_write)
        raise
    finally:
        for fd in (spec_read, pid_read, pid_write):
            if fd >= 0:
                os.close(fd)
    return int(worker), spec_write


def _write_spec(spec_write: int, spec: dict[str, Any]) -> None:
    # The worker reads it as it comes, to the end (when we close it).
    with (
        contextlib.suppress(BrokenPipeError),  # died at once: the spawner reaps it
        open(spec_write, "wb") as f,
    ):
        f.write(json.dumps(spec).encode())


def _middle_child(main: Any, title: str, spec_read: int, pid_write: int, keep: set[int]) -> None:
    try:
        worker = os.fork()
        if worker == 0:
            _worker_child(main, title, spec_read, keep)
        os.write(pid_write, struct.pack("i", worker))
    finally:
        os._exit(0)


def _worker_child(main: Any, title: str, spec_read: int, keep: set[int]) -> None:
    code = 1
    try:
        with contextlib.suppress(ImportError):  # only a name in ps
            import setproctitle

            setproctitle.setproctitle(title)
        os.dup2(spec_read, 0)
        keep = keep | {0, 1, 2}
        low = 3
        for fd in sorted(keep):
            if fd >= low:
                os.closerange(low, fd)
                low = fd + 1
        os.closerange(low, os.sysconf("SC_OPEN_MAX"))
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        gc.enable()
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
    except BaseException:
        log.exception("worker crashed")
    finally:
        # Not the server's atexit handlers nor its loop: a worker ends here.
        logging.shutdown()
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def serve(entry: str, conn: multiprocessing.connection.Connection, keep: set[int]) -> None:
    module_name, _, function = entry.partition(":")
    module = importlib.import_module(module_name)
    main = getattr(module, function)
    # What the workers would import only as they start.
    for name in getattr(module, "FORK_SERVER_PRELOAD", ()):
        importlib.import_module(name)
    code = CodeFiles()
    # Forked workers then never walk (and so copy) the objects imported here.
    gc.disable()
    gc.freeze()
    with contextlib.suppress(OSError, EOFError):  # the spawner is gone: so are we
        conn.send(("ready",))
        with socket.fromfd(conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            while _serve_one(conn, sock, main, code, keep):
                pass


def _serve_one(
    conn: multiprocessing.connection.Connection,
    sock: socket.socket,
    main: Any,
    code: CodeFiles,
    keep: set[int],
) -> bool:
    """Answer one request; False once this server is done."""
    _, title, spec, fd_keys = conn.recv()
    fds = multiprocessing.reduction.recvfds(sock, len(fd_keys))
    try:
        changed = code.changed()
        if changed is not None:
            log.info("%s changed: a new fork server takes over", changed)
            conn.send(("stale",))
            return False
        spec = {**spec, **dict(zip(fd_keys, fds, strict=True)), "fork_server": os.getpid()}
        try:
            pid, spec_write = _fork_worker(main, title, fds, keep)
        except OSError as e:
            conn.send(("failed", f"{type(e).__name__}: {e}"))
            return True
        try:
            conn.send(("forked", pid))
        except BaseException:
            os.close(spec_write)  # the worker sees no spec and exits
            raise
        _write_spec(spec_write, spec)
        return True
    finally:
        for fd in fds:
            os.close(fd)


def main() -> None:
    entry, conn_fd, parent_pid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    procutil.prepare_child("forkserver", parent_pid=parent_pid)
    # A Ctrl-C reaches the terminal's whole group; as for the spawner, our
    # end is the spawner's to decide. Workers reset this.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    keep = set()
    if len(sys.argv) > 5:
        log_fd = int(sys.argv[4])
        logs.setup_exec_child_logging(log_fd, sys.argv[5], "forkserver")
        keep.add(log_fd)
    conn = multiprocessing.connection.Connection(conn_fd)
    try:
        serve(entry, conn, keep)
    except Exception:
        log.exception("the fork server failed")
        sys.exit(1)


if __name__ == "__main__":
    main()
