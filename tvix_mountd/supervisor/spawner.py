"""The spawner: a small process that starts the workers and the rootcache.

Why a separate process: the supervisor runs trio and gRPC (control socket,
rootcache client), and a process that holds gRPC threads or a trio loop must
not fork children that use gRPC and trio themselves. The spawner is forked
from the supervisor's main thread before either exists, stays single-threaded
and free of both, and forks on request. Its children inherit the supervisor's
logging queue (multiprocessing-logging needs fork) and nothing else.

Workers are not forked from here (a restarted worker must run the code
installed now): they run `python -m MODULE` with the descriptors the
supervisor passed it (SCM_RIGHTS, right after the request), the log pipe's,
and a JSON spec on stdin naming them. For a module with an entry point in
`fork_servers`, a fork server (forkserver.py) that imported that code once
forks them, and they are reparented to the spawner (a child subreaper); the
spawner execs them itself only when no fork server can.

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
from typing import Any, Final

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
    """A child that runs a fresh interpreter, watched through a pidfd:
    exec'd by us, or forked by a fork server and then adopted by us."""

    def __init__(self, pid: int, popen: subprocess.Popen[bytes] | None = None) -> None:
        self.pid = pid
        self.popen = popen
        self.pidfd = os.pidfd_open(pid)

    def reap(self) -> int:
        """Its exit status: negative for a signal, as multiprocessing's exitcode."""
        os.close(self.pidfd)
        if self.popen is not None:
            return self.popen.wait()
        _, status = os.waitpid(self.pid, 0)
        return os.waitstatus_to_exitcode(status)


def _exec_child(module: str, name: str, spec: dict[str, Any], fds: list[int]) -> _ExecChild:
    # The name is for ps and top; the child reads its spec only. -P and
    # cwd /: the code comes from the installation (sys.path), never from
    # whatever directory the service was started in, and a worker pins
    # no directory of ours.
    popen = subprocess.Popen(
        _exec_argv(module, name),
        stdin=subprocess.PIPE,
        pass_fds=[*fds, *_log_fds(spec)],
        cwd="/",
    )
    assert popen.stdin is not None
    with contextlib.suppress(BrokenPipeError):  # died at once: its exit is reported
        popen.stdin.write(json.dumps(spec).encode())
    with contextlib.suppress(BrokenPipeError):
        popen.stdin.close()
    return _ExecChild(popen.pid, popen)


def _exec_argv(module: str, name: str) -> list[str]:
    return [sys.executable, "-P", "-m", module, name]


def _log_fds(spec: dict[str, Any]) -> list[int]:
    return [spec["log_fd"]] if "log_fd" in spec else []


class _ForkServer:
    """The spawner's handle on a fork server (forkserver.py) for one module."""

    # How long a server may take to import, and to answer a request (a fork
    # takes milliseconds), before it counts as hung: it is killed, and the
    # worker forked by a new one, or exec'd.
    READY_TIMEOUT: Final = 30.0
    REPLY_TIMEOUT: Final = 2.0

    def __init__(self, module: str, entry: str) -> None:
        self.module = module
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        log_fd = logs.log_pipe_fd()
        argv = _exec_argv("tvix_mountd.supervisor.forkserver", entry)
        argv += [str(theirs.fileno()), str(os.getpid())]
        if log_fd is not None:
            level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
            argv += [str(log_fd), level]
        try:
            self._popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                pass_fds=[theirs.fileno(), *([log_fd] if log_fd is not None else [])],
                cwd="/",
            )
        finally:
            theirs.close()
        self.pid = self._popen.pid
        self.pidfd = os.pidfd_open(self.pid)
        self._sock = ours
        self._conn = multiprocessing.connection.Connection(os.dup(ours.fileno()))
        self._ready = False

    def fork(self, name: str, spec: dict[str, Any], fd_keys: list[str], fds: list[int]) -> int:
        """Have the server fork a worker; its PID. _ServerGone if the server
        cannot (it is gone afterwards: a stale one leaves by itself)."""
        if not self._ready:
            reply = self._receive(self.READY_TIMEOUT, started=False)
            if reply != ("ready",):
                raise _ServerGone(f"it said {reply!r}", retry=False)
            self._ready = True
        try:
            # Its name in ps: the command line it would have if exec'd.
            title = " ".join(_exec_argv(self.module, name))
            self._conn.send(("fork", title, spec, fd_keys))
            multiprocessing.reduction.sendfds(self._sock, fds)
        except OSError as e:
            raise _ServerGone(f"cannot send it a request: {e}", retry=True) from None
        reply = self._receive(self.REPLY_TIMEOUT, started=True)
        if reply[0] == "forked":
            return int(reply[1])
        if reply[0] == "failed":
            raise SpawnError(reply[1])
        raise _ServerGone("its code changed" if reply == ("stale",) else repr(reply), retry=True)

    def _receive(self, timeout: float, *, started: bool) -> tuple[Any, ...]:
        ready = multiprocessing.connection.wait([self._conn, self.pidfd], timeout)
        if not ready:
            # Killed before we give up on it: an answer it sent meanwhile
            # is read below, so that no worker it forked goes unknown.
            self._popen.kill()
            self._popen.wait()
        with contextlib.suppress(EOFError, OSError):
            if self._conn.poll():
                message: tuple[Any, ...] = self._conn.recv()
                return message
        why = "it exited" if ready else "it did not answer in time"
        # One that never started would not start again either; one that
        # worked and died since might.
        raise _ServerGone(why if started else f"{why} while starting", retry=started)

    def stop(self) -> int:
        """End it (it holds nothing of anyone's) and reap it; its exit status."""
        self._conn.close()
        self._sock.close()
        if self._popen.poll() is None:
            self._popen.kill()  # even a stopped one
        os.close(self.pidfd)
        return self._popen.wait()


class _ServerGone(Exception):
    def __init__(self, why: str, *, retry: bool) -> None:
        super().__init__(why)
        self.retry = retry  # whether a new server is worth a try


class _Spawner:
    """The spawner process's state: its children, fork servers, and requests."""

    def __init__(
        self, conn: multiprocessing.connection.Connection, fork_servers: dict[str, str]
    ) -> None:
        self.conn = conn
        self.entries = fork_servers
        self.children: dict[int, BaseProcess] = {}
        self.exec_children: dict[int, _ExecChild] = {}
        self.servers: dict[str, _ForkServer] = {}

    def start_server(self, module: str) -> _ForkServer | None:
        try:
            server = _ForkServer(module, self.entries[module])
        except OSError as e:
            log.warning("cannot start a fork server for %s: %s", module, e)
            return None
        self.servers[module] = server
        return server

    def stop_server(self, server: _ForkServer, why: str | None = None) -> None:
        """Stop `server`; `why`, if it ended other than by our wish."""
        del self.servers[server.module]
        status = server.stop()
        if why is not None:
            log.info(
                "fork server %d for %s ended (%s, status %s)",
                server.pid,
                server.module,
                why,
                status,
            )

    def exec(self, name: str, module: str, spec: dict[str, Any], fd_keys: list[str]) -> int:
        with socket.fromfd(self.conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            fds = multiprocessing.reduction.recvfds(sock, len(fd_keys))
        try:
            spec = {**spec, "parent_pid": os.getpid()}
            log_fd = logs.log_pipe_fd()
            if log_fd is not None:
                spec["log_fd"] = log_fd
            pid = self._fork(name, module, spec, fd_keys, fds)
            if pid is not None:
                child = _ExecChild(pid)
            else:
                child = _exec_child(
                    module, name, {**spec, **dict(zip(fd_keys, fds, strict=True))}, fds
                )
        finally:
            for fd in fds:
                os.close(fd)
        self.exec_children[child.pid] = child
        return child.pid

    def _fork(
        self, name: str, module: str, spec: dict[str, Any], fd_keys: list[str], fds: list[int]
    ) -> int | None:
        """Fork the worker from `module`'s fork server, starting one if
        needed (a stale one once more); None if that cannot be done."""
        if module not in self.entries:
            return None
        for _ in range(2):
            server = self.servers.get(module) or self.start_server(module)
            if server is None:
                return None
            try:
                return server.fork(name, spec, fd_keys, fds)
            except _ServerGone as e:
                self.stop_server(server, str(e))
                if not e.retry:
                    return None
        return None

    def reap_orphans(self) -> None:
        """Reap the children we adopted and did not start (a subreaper's
        duty): a fork server's middle child whose server died with it."""
        known = {*self.children, *self.exec_children, *(s.pid for s in self.servers.values())}
        for pid in procutil.children():
            if pid not in known:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)


def _spawner_main(
    conn: multiprocessing.connection.Connection, fork_servers: dict[str, str]
) -> None:
    procutil.prepare_child("spawner")
    # A Ctrl-C reaches every process of the terminal's group: the spawner's
    # end is the supervisor's to decide (it says "quit", or goes away), or a
    # Ctrl-C would look like a crash of it. Its children reset this.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Workers forked by a fork server are reparented to us, as exec'd ones
    # are our children; an orphan we did not start wakes us to be reaped.
    procutil.become_child_subreaper()
    wakeup_read, wakeup_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wakeup_write)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    state = _Spawner(conn, fork_servers)
    for module in fork_servers:  # importing while the supervisor starts
        state.start_server(module)
    children, exec_children = state.children, state.exec_children
    while True:
        ready = multiprocessing.connection.wait(
            [
                conn,
                wakeup_read,
                *(p.sentinel for p in children.values()),
                *(c.pidfd for c in exec_children.values()),
                *(s.pidfd for s in state.servers.values()),
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
        for server in list(state.servers.values()):
            if server.pidfd in ready:
                state.stop_server(server, "exited")
        if wakeup_read in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(wakeup_read, 4096)
            state.reap_orphans()
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
                pid = state.exec(name, module, spec, fd_keys)
            except Exception as e:
                conn.send(("failed", request_id, f"{type(e).__name__}: {e}"))
                continue
            conn.send(("spawned", request_id, pid))
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
    for server in list(state.servers.values()):
        state.stop_server(server)


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
    def start(cls, fork_servers: dict[str, str] | None = None) -> Spawner:
        """Fork the spawner. Call it from the main thread, before trio and gRPC start.

        `fork_servers`: for a module that `exec` runs, the entry point
        ("package.module:function") a fork server calls instead; the
        spawner starts the server at once."""
        parent_conn, child_conn = _FORK.Pipe(duplex=True)
        process = _FORK.Process(
            target=_spawner_main,
            args=(child_conn, fork_servers or {}),
            name="tvix-mountd spawner",
        )
        process.start()
        child_conn.close()
        return cls(process, parent_conn)

    async def spawn(self, kind: str, name: str, *args: Any) -> int:
        """Fork a child running `kind`'s entry point with `args`; its PID."""
        return await self._request(name, ("spawn", kind, name, args), ())

    async def exec(self, name: str, module: str, spec: dict[str, Any], fds: dict[str, int]) -> int:
        """Start `python -m module` (or fork it from its fork server) with
        `spec` (JSON) on its stdin; each of
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
