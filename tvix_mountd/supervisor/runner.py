"""One mount's runner: the FUSE connection it keeps, and the worker it lends
the connection to, one after another.

The runner mounts once (workers/connection.py) and keeps the device open, so
the mount outlives every worker: a worker that crashes, hangs or is replaced
hands the live connection to the next one. Requests that arrive meanwhile
wait in the kernel; requests the old worker had taken are handed out again
(FUSE_NOTIFY_RESEND, written by the next worker once it has processed the
kernel's INIT). Clients see a stall, never an error. The inode table and the
request journal live in the connection's state file, which the runner keeps
too.

The runner's watch over a serving worker is a statfs through the kernel,
from a thread it can abandon: a worker that answers nothing for
`hang_timeout` seconds is killed and replaced.

Only a mount that keeps failing before it serves (a crash loop, e.g. a
broken install) backs off, and past `max_restarts` is failed: its
connection is then closed and its mountpoint unmounted, so that clients get
errors instead of waiting forever. A kernel without FUSE_NOTIFY_RESEND, or a
pyfuse3 without the patch that feeds INIT, cannot hand a connection over: a
dead worker's mount is then unmounted and mounted again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import pyfuse3
import trio

from tvix_mountd import procutil
from tvix_mountd.config import MountConfig, StoreConfig
from tvix_mountd.metrics import count_handover, count_restart, set_mount_up
from tvix_mountd.supervisor.spawner import SpawnError
from tvix_mountd.workers.connection import FuseConnection
from tvix_mountd.workers.mount import (
    MountError,
    MountOptions,
    prepare_mountpoint,
    set_read_ahead,
)
from tvix_mountd.workers.process import EXIT_HANDED_BACK, EXIT_MOUNT_ERROR, fsname
from tvix_mountd.workers.spec import WorkerMount, WorkerStore, spec_dict

if TYPE_CHECKING:
    from tvix_mountd.supervisor.service import Supervisor

log = logging.getLogger(__name__)

# How long a worker may take to serve its first request.
START_TIMEOUT: Final = 15.0
# How long a worker may take to go on SIGTERM (stop) or SIGUSR1 (hand back).
STOP_TIMEOUT: Final = 10.0
HANDBACK_TIMEOUT: Final = 2.0
# Restart delays of a crash loop: immediately, then doubling from RESTART_BASE
# up to RESTART_CAP.
RESTART_BASE: Final = 0.5
RESTART_CAP: Final = 30.0
# The watch over a serving worker: one statfs this often (at most), and
# /readyz reports a worker that has not answered one for this long, before
# `hang_timeout` replaces it.
PROBE_INTERVAL: Final = 1.0
SLOW_ANSWER: Final = 2.0
# Whether a kernel with FUSE_NOTIFY_RESEND is treated as one without (to
# exercise the fallback on a kernel that has it).
NO_RESEND_ENV: Final = "TVIX_MOUNTD_NO_RESEND"
# Whether this pyfuse3 can feed a worker the INIT it did not read itself.
CAN_FEED_INIT: Final = hasattr(pyfuse3, "process_request")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def restart_delay(consecutive_failures: int) -> float:
    """0 for the first failure (serve again at once), then exponential with a cap."""
    if consecutive_failures <= 1:
        return 0.0
    return min(RESTART_CAP, RESTART_BASE * 2.0 ** (consecutive_failures - 2))


@dataclass
class Child:
    """A process started through the spawner, and how it ended."""

    pid: int
    exited: trio.Event = field(default_factory=trio.Event)
    exitcode: int | None = None


# Seconds a worker whose main thread has exited is given to be reaped.
REAP_GRACE: Final = 0.5
# How often a worker being stopped is looked at (see wait_gone).
STOPPING_POLL: Final = 0.05


async def wait_gone(child: Child, poll: float) -> None:
    """Until `child` has exited, or at least its main thread has (looked at
    every `poll` seconds).

    A worker whose main thread is gone serves no more, but it is not reaped
    while another of its threads is still in the kernel, and one may stay
    there until the *next* worker serves: a read-ahead thread in a
    notify_store waits for a page that a reader's READ to this mount has
    locked, and after a SIGKILL only the next worker can answer that READ.
    Waiting for the whole process would keep every reader of the mount
    waiting for good."""
    while not child.exited.is_set():
        if procutil.main_thread_exited(child.pid):
            # Normally the whole process follows at once, and its exit
            # status tells a handback from a crash.
            with trio.move_on_after(REAP_GRACE):
                await child.exited.wait()
            return
        with trio.move_on_after(poll):
            await child.exited.wait()


def kill(child: Child, signum: int = signal.SIGKILL) -> None:
    if not child.exited.is_set():
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signum)


async def terminate(child: Child, what: str, signum: int = signal.SIGTERM) -> None:
    """`signum` to a child, SIGKILL if it does not go in time."""
    kill(child, signum)
    with trio.move_on_after(STOP_TIMEOUT if signum == signal.SIGTERM else HANDBACK_TIMEOUT):
        await wait_gone(child, STOPPING_POLL)
        return
    log.warning("%s %d ignored %s, killing it", what, child.pid, signal.Signals(signum).name)
    kill(child)
    await wait_gone(child, STOPPING_POLL)


class HandoverError(Exception):
    """A handover did not complete (the reason, for `restart`'s line)."""


class MountRunner:
    """Keeps one mount served; its state is what `status` shows."""

    def __init__(self, supervisor: Supervisor, mount: MountConfig, store: StoreConfig) -> None:
        self.supervisor = supervisor
        self.mount = mount
        self.store = store
        self.state = "starting"
        self.pid: int | None = None
        # Workers replaced because they died or hung (not handovers on request).
        self.restarts = 0
        # Workers the live connection went to after the first.
        self.handovers = 0
        self.since = _now()
        self.error: str | None = None
        self.stopping = False
        self.cancel_scope = trio.CancelScope()
        self.done = trio.Event()
        self.connection: FuseConnection | None = None
        # Failures before serving, within restart_window: a crash loop.
        self._failures: deque[float] = deque()
        self._child: Child | None = None
        self._spawning = False
        # Why the current worker is being ended, if we end it.
        self._ending: str | None = None
        self._handover_lock = trio.Lock()
        # When the statfs in flight was sent, while one is.
        self._probe_sent: float | None = None
        # Whether the current worker served.
        self._served = False
        # The store changed (reload) and no worker has served from the new
        # one yet: the next invalidates the root entries the kernel caches.
        self._store_changed = False

    @property
    def name(self) -> str:
        return self.mount.name

    @property
    def mount_id(self) -> int | None:
        return self.connection.mount_id if self.connection is not None else None

    def _set_state(self, state: str, error: str | None = None) -> None:
        if state != self.state:
            log.info("mount %s: %s%s", self.name, state, f" ({error})" if error else "")
            self.since = _now()
            set_mount_up(self.name, state == "serving")
        self.state = state
        self.error = error
        self.supervisor.state_changed()

    def as_status(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "mountpoint": self.mount.mountpoint,
            "store": self.mount.store,
            "pid": self.pid,
            "state": self.state,
            "restarts": self.restarts,
            "handovers": self.handovers,
            "mount_id": self.mount_id,
            "since": self.since,
            "error": self.error,
        }

    def readiness_problem(self) -> str | None:
        """Why this mount does not serve right now, if it does not."""
        if self.state != "serving":
            return f"{self.name}: {self.state}" + (f" ({self.error})" if self.error else "")
        sent = self._probe_sent
        if sent is not None:
            waited = time.monotonic() - sent
            if waited > min(SLOW_ANSWER, self.mount.hang_timeout / 2):
                return (
                    f"{self.name}: worker {self.pid} has not answered for {waited:.1f} s"
                    f" (replaced after {self.mount.hang_timeout:g} s)"
                )
        return None

    # -- the loop --------------------------------------------------------------

    async def run(self) -> None:
        try:
            with self.cancel_scope:
                await self._run()
        finally:
            self._close_connection()
            self.done.set()

    async def _run(self) -> None:
        # Why the connection goes to another worker (None: a new connection).
        handover: str | None = None
        while not self.stopping:
            if self.connection is None:
                handover = None
                error = await self._mount()
                if error is not None:
                    if not await self._failed_before_serving(error):
                        return
                    continue
            child = await self._start_worker(handover)
            if child is None:
                return
            served = await self._serve(child)
            self.pid = None
            self._child = None
            if self.stopping:
                break
            ending, self._ending = self._ending, None
            handed_back = ending in ("restart", "reload")
            reason = self._exit_reason(child, ending)
            self._keep_or_close_connection(
                reason, drained=handed_back and child.exitcode == EXIT_HANDED_BACK
            )
            if handed_back:
                assert ending is not None
                handover = ending
                continue
            handover = "hang" if ending == "hang" else "crash"
            if served:
                # A worker that served is replaced at once, every time: only
                # failures before serving are a crash loop.
                self._failures.clear()
                self.restarts += 1
                count_restart(self.name)
                log.warning(
                    "mount %s: %s; replaced at once (restart %d)", self.name, reason, self.restarts
                )
                self._set_state("restarting", reason)
            elif not await self._failed_before_serving(reason):
                return
        self._set_state("stopped")

    def _keep_or_close_connection(self, reason: str, *, drained: bool) -> None:
        """After a worker ended: keep the connection for the next one if it
        can take it over, else unmount (the next round mounts again)."""
        connection = self.connection
        if connection is None:
            return
        if not connection.is_mounted():
            log.warning(
                "mount %s: %s is no longer our mount; mounting again",
                self.name,
                self.mount.mountpoint,
            )
        elif not self._can_hand_over(drained):
            log.warning(
                "mount %s: %s; unmounting and mounting again: %s",
                self.name,
                reason,
                self._why_no_handover(),
            )
        else:
            return
        self._close_connection()

    def _can_hand_over(self, drained: bool) -> bool:
        """Whether the next worker can take over this connection: it must be
        able to process the INIT the kernel sent once; and whatever the last
        worker left unanswered must be sent again, unless it drained."""
        connection = self.connection
        if connection is None or connection.init is None:
            return False
        return drained or connection.resend

    def _why_no_handover(self) -> str:
        if not CAN_FEED_INIT:
            return f"pyfuse3 ({pyfuse3.__version__}) cannot feed INIT to a new worker"
        return "kernel cannot resend what a dead worker had taken (FUSE_NOTIFY_RESEND)"

    async def _failed_before_serving(self, reason: str) -> bool:
        """A worker (or the mount) failed before it served: back off, or give
        up past max_restarts. Whether to go on."""
        config = self.supervisor.config.supervisor
        now = time.monotonic()
        self._failures.append(now)
        while self._failures and now - self._failures[0] > config.restart_window:
            self._failures.popleft()
        failures = len(self._failures)
        if failures >= config.max_restarts:
            error = (
                f"{reason}; failed {failures} times within {config.restart_window:g} s"
                " before serving, not restarting (reload or restart to try again)"
            )
            log.error("mount %s: failed: %s", self.name, error)
            self._close_connection()
            self._set_state("failed", error)
            return False
        delay = restart_delay(failures)
        self.restarts += 1
        count_restart(self.name)
        log.warning(
            "mount %s: %s; restart %d (failure %d of %d before serving) in %g s",
            self.name,
            reason,
            self.restarts,
            failures,
            config.max_restarts,
            delay,
        )
        self._set_state("restarting", f"{reason}; restarting in {delay:g} s")
        await trio.sleep(delay)
        return True

    async def _mount(self) -> str | None:
        """Mount a new connection at the mountpoint; None, or why it failed."""
        point = self.mount.mountpoint
        options = MountOptions(fsname=fsname(self.name), allow_other=self.mount.allow_other)

        def prepare() -> None:
            with contextlib.suppress(OSError):  # a file in the way: prepare says so
                Path(point).mkdir(parents=True, exist_ok=True)
            prepare_mountpoint(point)

        try:
            # A statfs of a mount left there can block: off the loop, and
            # abandoned if we are stopped meanwhile.
            await trio.to_thread.run_sync(prepare, abandon_on_cancel=True)
            # Shielded: a mount made must be ours to unmount.
            with trio.CancelScope(shield=True):
                connection = self.connection = await trio.to_thread.run_sync(
                    partial(
                        FuseConnection.mount,
                        point,
                        options,
                        read_init=CAN_FEED_INIT,
                        use_resend=not os.environ.get(NO_RESEND_ENV),
                    )
                )
        except (MountError, OSError) as e:
            return str(e)
        log.info(
            "mount %s: mounted %s (mount ID %s)%s",
            self.name,
            point,
            connection.mount_id,
            "" if self._can_hand_over(False) else f"; {self._why_no_handover()}",
        )
        return None

    async def _start_worker(self, handover: str | None) -> Child | None:
        """Start a worker on the connection; `handover`: why the one before
        it left (None: the connection is new)."""
        connection = self.connection
        assert connection is not None
        if handover is not None:
            self.handovers += 1
            count_handover(self.name, handover)
        error_file = self.supervisor.error_file(self.name)
        await trio.Path(error_file).unlink(missing_ok=True)
        spec: dict[str, Any] = {
            "mount": spec_dict(
                WorkerMount(
                    name=self.mount.name,
                    store=self.mount.store,
                    mountpoint=str(self.mount.mountpoint),
                    list_root=self.mount.list_root,
                    show_xattr=self.mount.show_xattr,
                    allow_other=self.mount.allow_other,
                    plain_listings=self.mount.plain_listings,
                    read_ahead=self.mount.read_ahead,
                )
            ),
            "store": spec_dict(
                WorkerStore(
                    blob_service_addr=self.store.blob_service_addr,
                    directory_service_addr=self.store.directory_service_addr,
                    backend_timeout=self.store.backend_timeout,
                )
            ),
            "rootcache_socket": self.supervisor.rootcache_socket,
            "error_file": str(error_file),
            "log_level": logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower(),
            "mount_id": connection.mount_id,
            "init": connection.init.raw.hex() if connection.init is not None else None,
            "resend": connection.resend,
            # A worker that left on request is not suspected of anything.
            "blame": handover not in ("restart", "reload"),
            "store_changed": self._store_changed,
        }
        try:
            # Shielded and never cancelled by stop(): a worker being started
            # must come back with its PID, or nobody could stop it.
            self._spawning = True
            with trio.CancelScope(shield=True):
                child = await self.supervisor.exec_worker(
                    self.name,
                    spec,
                    {"fuse_fd": connection.fuse_fd, "state_fd": connection.state_fd},
                )
        except SpawnError as e:
            self._close_connection()
            self._set_state("failed", str(e))
            return None
        finally:
            self._spawning = False
        self._child = child
        self.pid = child.pid
        if self.stopping:  # stop() came while starting: it waits for us
            await terminate(child, f"mount {self.name}: worker")
        return child

    async def _serve(self, child: Child) -> bool:
        """Watch `child` until it exits. Whether it served."""
        self._served = False
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch, child)
            await wait_gone(child, PROBE_INTERVAL)
            nursery.cancel_scope.cancel()
        return self._served

    async def _watch(self, child: Child) -> None:
        """Serving once a statfs through the kernel is answered; then one
        statfs a second, and a worker that leaves one unanswered for
        `hang_timeout` (or answers it with an error) is killed."""
        problem = await self._probe(START_TIMEOUT)
        if problem is not None:
            self._end(child, "hang", f"not serving: {problem}")
            return
        self._served = True
        self._store_changed = False
        self._set_state("serving")
        # Its INIT reply has set the readahead to what libfuse offers: raise it
        # (again, for a handover: harmless).
        await trio.to_thread.run_sync(set_read_ahead, self.mount.mountpoint)
        hang_timeout = self.mount.hang_timeout
        while True:
            await trio.sleep(min(PROBE_INTERVAL, hang_timeout / 4))
            problem = await self._probe(hang_timeout)
            if problem is not None:
                self._end(child, "hang", problem)
                return

    async def _probe(self, seconds: float) -> str | None:
        """None once the worker answers a statfs of the mount within
        `seconds`; else what went wrong."""
        point = self.mount.mountpoint
        self._probe_sent = time.monotonic()
        try:
            with trio.move_on_after(seconds):
                try:
                    await trio.to_thread.run_sync(
                        os.statvfs,
                        point,
                        abandon_on_cancel=True,
                        limiter=self.supervisor.probe_limiter,
                    )
                except OSError as e:
                    # Our statfs cannot fail: the worker is broken, or the
                    # connection is gone.
                    return f"statfs of {point} failed: {e.strerror}"
                return None
            return f"hung: no answer to a statfs of {point} for {seconds:g} s"
        finally:
            self._probe_sent = None

    def _end(self, child: Child, why: str, error: str) -> None:
        """Kill `child` (hung, or not starting) for the loop to replace."""
        log.error("mount %s: worker %d: %s; killing it", self.name, child.pid, error)
        self._ending = why
        self._set_state("hung", error)
        kill(child)

    def _exit_reason(self, child: Child, ending: str | None) -> str:
        if ending == "hang":
            return f"worker {child.pid} killed: {self.error}"
        if not child.exited.is_set():
            return (
                f"worker {child.pid} ended (a thread of it is still in the kernel,"
                " waiting on the mount)"
            )
        code = child.exitcode
        error_file = self.supervisor.error_file(self.name)
        if code == EXIT_MOUNT_ERROR and error_file.exists():
            return error_file.read_text().strip()
        if code is not None and code < 0:
            return f"worker {child.pid} killed by {signal.Signals(-code).name}"
        return f"worker {child.pid} exited with status {code}"

    def _close_connection(self) -> None:
        """Unmount and let the connection go: what waits on it fails now."""
        connection, self.connection = self.connection, None
        if connection is not None:
            connection.close()
            log.info("mount %s: unmounted %s", self.name, connection.mountpoint)

    # -- from outside: handover, stop ---------------------------------------------

    async def hand_over(
        self, why: str, mount: MountConfig | None = None, store: StoreConfig | None = None
    ) -> str:
        """Hand the mount to a fresh worker (with `mount` and `store` from now
        on, if given); returns once that one serves, with a line saying so."""
        async with self._handover_lock:
            if mount is not None:
                self._store_changed |= mount.store != self.mount.store
                self.mount = mount
            if store is not None:
                self._store_changed |= store != self.store
                self.store = store
            old = self._child
            started = time.monotonic()
            if old is not None:
                self._ending = why
                self._set_state("handing over")
                await terminate(old, f"mount {self.name}: worker", signal.SIGUSR1)
            await self._wait_serving(old)
            return (
                f"{self.name}: handed over from worker {old.pid if old else '-'} to {self.pid}"
                f" in {time.monotonic() - started:.2f} s (mount ID {self.mount_id})"
            )

    async def _wait_serving(self, old: Child | None) -> None:
        with trio.move_on_after(START_TIMEOUT + STOP_TIMEOUT):
            while not (
                self.state == "serving" and self._child is not None and self._child is not old
            ):
                if self.state in ("failed", "stopped") or self.done.is_set():
                    raise HandoverError(f"{self.name}: {self.state} ({self.error})")
                await self.supervisor.wait_state_change()
            return
        raise HandoverError(f"{self.name}: not serving ({self.state}: {self.error})")

    async def stop(self) -> None:
        """Stop the worker and keep it stopped, unmounted; returns once it is gone."""
        self.stopping = True
        child = self._child
        if child is not None:
            await terminate(child, f"mount {self.name}: worker")
        elif not self._spawning:
            self.cancel_scope.cancel()
        await self.done.wait()
        self._close_connection()
        self._set_state("stopped")
