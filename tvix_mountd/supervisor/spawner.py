"""The spawner: a small process that forks the workers and the rootcache.

Why a separate process: the supervisor runs trio and gRPC (control socket,
rootcache client), and a process that holds gRPC threads or a trio loop must
not fork children that use gRPC and trio themselves. The spawner is forked
from the supervisor's main thread before either exists, stays single-threaded
and free of both, and forks on request. Its children inherit the supervisor's
logging queue (multiprocessing-logging needs fork) and nothing else.

Workers are exec'd instead (a fresh interpreter, so that a restarted worker
runs the code installed now): the spawner runs `python -m MODULE` with the
descriptors the supervisor passed it (SCM_RIGHTS, right after the request),
the log pipe's, and a JSON spec on stdin naming them.

Protocol over a duplex pipe, one pickled tuple per message:
    supervisor -> spawner   ("spawn", request_id, kind, name, args)
                            | ("exec", request_id, name, module, spec, fd_keys) + descriptors
                            | ("quit",)
    spawner -> supervisor   ("spawned", request_id, pid) | ("failed", request_id, error)
                            | ("exited", pid, exitcode)
The supervisor signals and watches the children itself, by PID.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.reduction
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from multiprocessing.process import BaseProcess
from typing import Any

import trio

from tvix_mountd import logs, procutil

log = logging.getLogger(__name__)

_FORK = multiprocessing.get_context("fork")


def _entry_point(kind: str) -> Callable[..., None]:
    # Imported here so that the spawner carries nothing it does not run.
    if kind == "rootcache":
        from tvix_mountd.supervisor.rootcache import rootcache_main

        return rootcache_main
    raise ValueError(f"unknown process kind {kind!r}")


def _run_child(kind: str, *args: Any) -> None:
    """A child's body: its entry point, with a crash logged through the log stream
    (multiprocessing would print it to stderr, untagged)."""
    try:
        _entry_point(kind)(*args)
    except SystemExit:
        raise
    except BaseException:
        log.exception("%s process crashed", kind)
        logging.shutdown()
        os._exit(1)


class _ExecChild:
    """An exec'd child, watched through a pidfd."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self.popen = popen
        self.pidfd = os.pidfd_open(popen.pid)

    def reap(self) -> int:
        os.close(self.pidfd)
        return self.popen.wait()  # negative for a signal, as multiprocessing's exitcode


def _exec_child(
    conn: multiprocessing.connection.Connection,
    name: str,
    module: str,
    spec: dict[str, Any],
    fd_keys: list[str],
) -> _ExecChild:
    with socket.fromfd(conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        fds = multiprocessing.reduction.recvfds(sock, len(fd_keys))
    try:
        spec = {**spec, **dict(zip(fd_keys, fds, strict=True)), "parent_pid": os.getpid()}
        pass_fds = list(fds)
        log_fd = logs.log_pipe_fd()
        if log_fd is not None:
            spec["log_fd"] = log_fd
            pass_fds.append(log_fd)
        # The name is for ps and top; the child reads its spec only. -P and
        # cwd /: the code comes from the installation (sys.path), never from
        # whatever directory the service was started in, and a worker pins
        # no directory of ours.
        popen = subprocess.Popen(
            [sys.executable, "-P", "-m", module, name],
            stdin=subprocess.PIPE,
            pass_fds=pass_fds,
            cwd="/",
        )
    finally:
        for fd in fds:
            os.close(fd)
    assert popen.stdin is not None
    with contextlib.suppress(BrokenPipeError):  # died at once: its exit is reported
        popen.stdin.write(json.dumps(spec).encode())
    with contextlib.suppress(BrokenPipeError):
        popen.stdin.close()
    return _ExecChild(popen)


def _spawner_main(conn: multiprocessing.connection.Connection) -> None:
    procutil.prepare_child("spawner")
    # A Ctrl-C reaches every process of the terminal's group: the spawner's
    # end is the supervisor's to decide (it says "quit", or goes away), or a
    # Ctrl-C would look like a crash of it. Its children reset this.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    children: dict[int, BaseProcess] = {}
    exec_children: dict[int, _ExecChild] = {}
    while True:
        ready = multiprocessing.connection.wait(
            [
                conn,
                *(p.sentinel for p in children.values()),
                *(c.pidfd for c in exec_children.values()),
            ]
        )
        for pid, process in list(children.items()):
            if process.sentinel in ready:
                process.join()
                del children[pid]
                conn.send(("exited", pid, process.exitcode))
        for pid, child in list(exec_children.items()):
            if child.pidfd in ready:
                del exec_children[pid]
                conn.send(("exited", pid, child.reap()))
        if conn not in ready:
            continue
        try:
            message = conn.recv()
        except EOFError:
            break  # the supervisor is gone; our children follow us (parent watch)
        if message[0] == "quit":
            break
        if message[0] == "exec":
            _, request_id, name, module, spec, fd_keys = message
            try:
                child = _exec_child(conn, name, module, spec, fd_keys)
            except Exception as e:
                conn.send(("failed", request_id, f"{type(e).__name__}: {e}"))
                continue
            exec_children[child.popen.pid] = child
            conn.send(("spawned", request_id, child.popen.pid))
            continue
        _, request_id, kind, name, args = message
        try:
            _entry_point(kind)  # an unknown kind fails here, not in the child
            # daemon: should the spawner leave first, multiprocessing's exit
            # handler SIGTERMs the children instead of waiting for them.
            process = _FORK.Process(
                target=_run_child, args=(kind, *args), name=f"tvix-mountd {name}", daemon=True
            )
            process.start()
        except Exception as e:
            conn.send(("failed", request_id, f"{type(e).__name__}: {e}"))
            continue
        assert process.pid is not None
        children[process.pid] = process
        conn.send(("spawned", request_id, process.pid))
    # Leaving: the children notice through their parent watch and exit.


class SpawnError(Exception):
    pass


class Spawner:
    """The supervisor's handle on the spawner process."""

    def __init__(self, process: BaseProcess, conn: multiprocessing.connection.Connection) -> None:
        self.process = process
        self._conn = conn
        self._next_request = 0
        self._pending: dict[int, trio.MemorySendChannel[int | str]] = {}
        self._exit_send, self.exits = trio.open_memory_channel[tuple[int, int | None]](1000)

    @classmethod
    def start(cls) -> Spawner:
        """Fork the spawner. Call it from the main thread, before trio and gRPC start."""
        parent_conn, child_conn = _FORK.Pipe(duplex=True)
        process = _FORK.Process(
            target=_spawner_main, args=(child_conn,), name="tvix-mountd spawner"
        )
        process.start()
        child_conn.close()
        return cls(process, parent_conn)

    async def spawn(self, kind: str, name: str, *args: Any) -> int:
        """Fork a child running `kind`'s entry point with `args`; its PID."""
        return await self._request(name, ("spawn", kind, name, args), ())

    async def exec(self, name: str, module: str, spec: dict[str, Any], fds: dict[str, int]) -> int:
        """Start `python -m module` with `spec` (JSON) on its stdin; each of
        `fds` is passed to it and named in the spec under its key (with the
        number it has there). The spec also gets `parent_pid` and, if there
        is a log pipe, `log_fd`. Its PID."""
        keys = list(fds)
        return await self._request(
            name, ("exec", name, module, spec, keys), [fds[key] for key in keys]
        )

    async def _request(self, name: str, message: tuple[Any, ...], fds: Sequence[int]) -> int:
        request_id = self._next_request
        self._next_request += 1
        send, receive = trio.open_memory_channel[int | str](1)
        self._pending[request_id] = send
        try:
            # No checkpoint between the message and its descriptors: nothing
            # else is sent in between.
            self._conn.send((message[0], request_id, *message[1:]))
            if fds:
                with socket.fromfd(self._conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    multiprocessing.reduction.sendfds(s, list(fds))
            result = await receive.receive()
        finally:
            del self._pending[request_id]
        if isinstance(result, str):
            raise SpawnError(f"could not start {name}: {result}")
        return result

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read the spawner's messages until it exits (then raise SpawnError)."""
        task_status.started()
        fd = self._conn.fileno()
        while True:
            await trio.lowlevel.wait_readable(fd)
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                raise SpawnError("the spawner process died") from None
            if message[0] == "exited":
                await self._exit_send.send((message[1], message[2]))
            else:
                _, request_id, result = message
                waiter = self._pending.get(request_id)
                if waiter is not None:
                    waiter.send_nowait(result)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.send(("quit",))
        self._conn.close()
        self.process.join(timeout=5)
        if self.process.is_alive():
            assert self.process.pid is not None
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.join()
