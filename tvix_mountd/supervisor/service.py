"""The supervisor: keeps one worker per mount and one rootcache alive.

Structure (trio): the supervisor's nursery owns a runner task per mount, one
for the rootcache, the spawner's reader, the control socket, the health
endpoint and the systemd notifier. Workers are forked by the spawner (see
spawner.py for why) and watched here by PID: the spawner reports each exit at
once, the runner clears a dead mount and restarts the worker with
exponential backoff, and a mount that keeps crashing is marked failed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import trio

from tvix_mountd.castore.digests import B3Digest
from tvix_mountd.castore.errors import StoreError
from tvix_mountd.castore.store import Store
from tvix_mountd.metrics import count_restart, mark_process_dead, set_mount_up
from tvix_mountd.supervisor import systemd
from tvix_mountd.supervisor.config import (
    Config,
    ConfigError,
    MountConfig,
    StoreConfig,
    load_config,
)
from tvix_mountd.supervisor.spawner import Spawner, SpawnError
from tvix_mountd.workers.mount import detach, find_mount, is_dead_mount
from tvix_mountd.workers.process import EXIT_MOUNT_ERROR, fsname

log = logging.getLogger(__name__)

PID_FILE = "tvix-mountd.pid"
CONTROL_SOCKET = "control.sock"
ROOTCACHE_SOCKET = "rootcache.sock"
METRICS_DIR = "metrics"
ERRORS_DIR = "errors"

# How long a mount may take to come up, and to go down on SIGTERM.
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
# Restart delays: immediately, then doubling from RESTART_BASE up to RESTART_CAP.
RESTART_BASE = 0.5
RESTART_CAP = 30.0
# A worker that served this long is healthy again: its backoff starts over.
HEALTHY_AFTER = 30.0
# Deadline for a stat of a mount's root (start-up and /readyz).
STAT_TIMEOUT = 2.0
POLL_INTERVAL = 0.02
# Stop (SIGTERM, SIGINT) and reload (SIGHUP).
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


EMPTY_DIRECTORY_DIGEST = B3Digest.of(b"")


class SupervisorError(Exception):
    """The supervisor cannot start (a user's problem, reported plainly)."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def restart_delay(consecutive_crashes: int) -> float:
    """0 for the first crash (serve again at once), then exponential with a cap."""
    if consecutive_crashes <= 1:
        return 0.0
    return min(RESTART_CAP, RESTART_BASE * 2.0 ** (consecutive_crashes - 2))


async def stat_with_deadline(path: str, seconds: float = STAT_TIMEOUT) -> str | None:
    """None if `path` stats within `seconds`, else why not."""
    with trio.move_on_after(seconds):
        try:
            await trio.to_thread.run_sync(os.stat, path, abandon_on_cancel=True)
        except OSError as e:
            return f"stat of {path} failed: {e.strerror}"
        return None
    return f"{path} did not answer a stat within {seconds:g} s"


@dataclass
class _Child:
    """A process started through the spawner, and how it ended."""

    pid: int
    exited: trio.Event = field(default_factory=trio.Event)
    exitcode: int | None = None


async def terminate(child: _Child, what: str) -> None:
    """SIGTERM a child (a worker unmounts), SIGKILL if it does not go in time."""
    if child.exited.is_set():
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(child.pid, signal.SIGTERM)
    with trio.move_on_after(STOP_TIMEOUT):
        await child.exited.wait()
    if not child.exited.is_set():
        log.warning("%s %d ignored SIGTERM, killing it", what, child.pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signal.SIGKILL)
        await child.exited.wait()


class MountRunner:
    """Keeps one mount's worker running; its state is what `status` shows."""

    def __init__(self, supervisor: Supervisor, mount: MountConfig, store: StoreConfig) -> None:
        self.supervisor = supervisor
        self.mount = mount
        self.store = store
        self.state = "starting"
        self.pid: int | None = None
        self.restarts = 0
        self.since = _now()
        self.error: str | None = None
        self.stopping = False
        self.cancel_scope = trio.CancelScope()
        self.done = trio.Event()
        self._crashes: deque[float] = deque()
        self._child: _Child | None = None
        self._spawning = False

    @property
    def name(self) -> str:
        return self.mount.name

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
            "since": self.since,
            "error": self.error,
        }

    async def clear_mountpoint(self) -> None:
        """Detach a mount left on our mountpoint by a dead worker."""
        # statfs of a hung mount can block: keep it off the supervisor's loop.
        await trio.to_thread.run_sync(self._clear_mountpoint, abandon_on_cancel=True)

    def _clear_mountpoint(self) -> None:
        found = find_mount(self.mount.mountpoint)
        if (
            found is not None
            and found.fstype.startswith("fuse")
            and is_dead_mount(self.mount.mountpoint)
        ):
            log.info("mount %s: detaching the dead mount at %s", self.name, self.mount.mountpoint)
            detach(self.mount.mountpoint)

    async def run(self) -> None:
        try:
            with self.cancel_scope:
                await self._run()
        finally:
            self.done.set()

    async def _run(self) -> None:
        error_file = self.supervisor.error_file(self.name)
        while not self.stopping:
            await self.clear_mountpoint()
            # A mountpoint that cannot be made (a file is in the way) is the
            # worker's to report: it fails, and that counts as this mount's crash,
            # never as the supervisor's.
            with contextlib.suppress(OSError):
                await trio.Path(self.mount.mountpoint).mkdir(parents=True, exist_ok=True)
            await trio.Path(error_file).unlink(missing_ok=True)
            try:
                # Shielded and never cancelled by stop(): a worker being forked
                # must come back with its PID, or nobody could stop it.
                self._spawning = True
                with trio.CancelScope(shield=True):
                    child = await self.supervisor.spawn(
                        "worker",
                        self.name,
                        self.mount.model_dump_json(),
                        self.store.model_dump_json(),
                        self.supervisor.rootcache_socket,
                        str(error_file),
                    )
            except SpawnError as e:
                self._set_state("failed", str(e))
                return
            finally:
                self._spawning = False
            self._child = child
            self.pid = child.pid
            if self.stopping:  # stop() came while forking: it waits for us
                await terminate(child, f"mount {self.name}: worker")
            started = time.monotonic()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_start, child, nursery.cancel_scope)
                await child.exited.wait()
                nursery.cancel_scope.cancel()
            self.pid = None
            await self.clear_mountpoint()
            self._child = None
            if self.stopping:
                break
            reason = self._exit_reason(child, error_file)
            now = time.monotonic()
            if now - started > HEALTHY_AFTER:
                self._crashes.clear()
            self._crashes.append(now)
            window = self.supervisor.config.supervisor.restart_window
            while self._crashes and now - self._crashes[0] > window:
                self._crashes.popleft()
            if len(self._crashes) >= self.supervisor.config.supervisor.max_restarts:
                self._set_state(
                    "failed",
                    f"{reason}; crashed {len(self._crashes)} times within {window:g} s,"
                    " not restarting (reload to try again)",
                )
                return
            delay = restart_delay(len(self._crashes))
            self.restarts += 1
            count_restart(self.name)
            self._set_state("restarting", f"{reason}; restarting in {delay:g} s")
            await trio.sleep(delay)
        self._set_state("stopped")

    def _exit_reason(self, child: _Child, error_file: Path) -> str:
        code = child.exitcode
        if code == EXIT_MOUNT_ERROR and error_file.exists():
            return error_file.read_text().strip()
        if code is not None and code < 0:
            return f"worker killed by {signal.Signals(-code).name}"
        return f"worker exited with status {code}"

    async def _watch_start(self, child: _Child, scope: trio.CancelScope) -> None:
        """Serving once our FUSE mount is up and its root answers a stat."""
        with trio.move_on_after(START_TIMEOUT):
            while True:
                found = find_mount(self.mount.mountpoint)
                if found is not None and found.fstype == "fuse.tvix":
                    problem = await stat_with_deadline(self.mount.mountpoint)
                    if problem is None:
                        self._set_state("serving")
                        return
                await trio.sleep(POLL_INTERVAL)
        self._set_state("starting", f"not mounted after {START_TIMEOUT:g} s")

    async def stop(self) -> None:
        """Stop the worker and keep it stopped; returns once it is gone."""
        self.stopping = True
        child = self._child
        if child is not None:
            await terminate(child, f"mount {self.name}: worker")
        elif not self._spawning:
            self.cancel_scope.cancel()
        await self.done.wait()
        await self.clear_mountpoint()
        self._set_state("stopped")


class Supervisor:
    def __init__(self, config: Config, config_path: Path | None) -> None:
        self.config = config
        self.config_path = config_path
        self.spawner: Spawner  # started by `start`, after prepare_state_dir
        self.state_dir = Path(config.supervisor.state_dir)
        self.rootcache_socket = str(self.state_dir / ROOTCACHE_SOCKET)
        self.control_socket = str(self.state_dir / CONTROL_SOCKET)
        self.mounts: dict[str, MountRunner] = {}
        self.rootcache_pid: int | None = None
        self._rootcache: _Child | None = None
        self._rootcache_lock = trio.Lock()
        # Services for readiness probes, per store, opened on first use.
        self._probe_stores: dict[str, Store] = {}
        self._probe_configs: dict[str, StoreConfig] = {}
        self.rootcache_restarts = 0
        self._children: dict[int, _Child] = {}
        self._shutdown = trio.Event()
        self._state_changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._reload_lock = trio.Lock()
        self.exit_status = 0
        self._rootcache_stats: dict[str, dict[str, int]] = {}
        self._early_signals: list[int] = []

    # -- bookkeeping -------------------------------------------------------

    def error_file(self, name: str) -> Path:
        return self.state_dir / ERRORS_DIR / f"{name}.error"

    def state_changed(self) -> None:
        self._state_changed.set()
        self._state_changed = trio.Event()

    async def spawn(self, kind: str, name: str, *args: Any) -> _Child:
        pid = await self.spawner.spawn(kind, name, *args)
        # The exit may be reported before we get here: record it either way.
        child = self._children.setdefault(pid, _Child(pid))
        return child

    async def _dispatch_exits(self) -> None:
        async for pid, exitcode in self.spawner.exits:
            child = self._children.pop(pid, None)
            if child is None:
                child = _Child(pid)  # reported before spawn() returned
                self._children[pid] = child
            child.exitcode = exitcode
            child.exited.set()
            log.debug("process %d exited with %s", pid, exitcode)
            mark_process_dead(pid)

    # -- start-up ----------------------------------------------------------

    def prepare_state_dir(self) -> None:
        """Create state_dir; refuse a running supervisor; clean what a dead one left."""
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        (self.state_dir / ERRORS_DIR).mkdir(exist_ok=True, mode=0o700)
        pid_file = self.state_dir / PID_FILE
        if pid_file.exists():
            try:
                old = int(pid_file.read_text().strip())
            except ValueError:
                old = 0
            if old and old != os.getpid() and _is_tvix_mountd(old):
                raise SupervisorError(
                    f"another tvix-mountd (pid {old}) is running with state_dir {self.state_dir}"
                )
            log.info("removing stale pid file of process %d", old)
        for stale in (CONTROL_SOCKET, ROOTCACHE_SOCKET):
            (self.state_dir / stale).unlink(missing_ok=True)
        pid_file.write_text(f"{os.getpid()}\n")
        for mount in self.config.mounts:
            found = find_mount(mount.mountpoint)
            if (
                found is not None
                and found.fstype.startswith("fuse")
                and (is_dead_mount(mount.mountpoint) or found.source == fsname(mount.name))
            ):
                log.warning("clearing a stale mount left at %s", mount.mountpoint)
                detach(mount.mountpoint)

    def check_mountpoints(self, mounts: list[MountConfig]) -> list[str]:
        """Problems with mountpoints, before anything is mounted."""
        problems = []
        for i, mount in enumerate(mounts):
            path = Path(mount.mountpoint)
            if find_mount(mount.mountpoint) is not None and mount.name not in self.mounts:
                problems.append(f"mounts.{i}.mountpoint: {path} is already a mountpoint")
            elif path.exists() and not path.is_dir():
                problems.append(f"mounts.{i}.mountpoint: {path} is not a directory")
            elif path.is_dir() and mount.name not in self.mounts and any(path.iterdir()):
                problems.append(f"mounts.{i}.mountpoint: {path} is not empty")
        return problems

    def cleanup_state_dir(self) -> None:
        for name in (PID_FILE, CONTROL_SOCKET, ROOTCACHE_SOCKET):
            (self.state_dir / name).unlink(missing_ok=True)

    # -- running -----------------------------------------------------------

    def start(self) -> int:
        """Run until SIGTERM/SIGINT or `stop`; the exit status."""
        # Until trio listens (in _run), these signals would end the process at
        # once, leaving the pid file and half a start behind: note them, and
        # act on them once trio runs.
        previous = {signum: signal.signal(signum, self._early_signal) for signum in _SIGNALS}
        try:
            return self._start()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _early_signal(self, signum: int, frame: object) -> None:
        self._early_signals.append(signum)

    def _start(self) -> int:
        self.prepare_state_dir()
        try:
            problems = self.check_mountpoints(self.config.mounts)
            if problems:
                raise SupervisorError("\n".join(problems))
            from tvix_mountd.metrics import setup_multiprocess_dir

            # Before the fork: the children inherit where to write their metrics.
            setup_multiprocess_dir(str(self.state_dir / METRICS_DIR))
            self.spawner = Spawner.start()
            try:
                trio.run(self._run)
            finally:
                self.spawner.close()
        finally:
            self.cleanup_state_dir()
        return self.exit_status

    async def _run(self) -> None:
        from tvix_mountd.supervisor.control import serve_control
        from tvix_mountd.supervisor.health import HealthError, serve_health

        failed: SupervisorError | None = None
        with trio.open_signal_receiver(*_SIGNALS) as signals:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                # Signals that came before trio listened: a stop, before anything starts.
                for signum in self._early_signals:
                    if signum != signal.SIGHUP:
                        await self._on_signal(signum)
                nursery.start_soon(self._watch_spawner)
                nursery.start_soon(self._dispatch_exits)
                nursery.start_soon(self._handle_signals, signals)
                nursery.start_soon(self._run_rootcache)
                # Known (status, readiness) from now on; started once the
                # endpoints listen, so that nothing mounts when they cannot.
                runners = [] if self._shutdown.is_set() else self._add_mounts(self.config.mounts)
                await nursery.start(serve_control, self, self.control_socket)
                try:
                    await nursery.start(
                        serve_health, self.config.supervisor.health_listen, self.health_app()
                    )
                except HealthError as e:
                    # Raised once everything started so far is stopped, outside
                    # the nursery (which would wrap it in an exception group).
                    failed = SupervisorError(str(e))
                    self.mounts.clear()
                    self.request_shutdown()
                else:
                    for runner in runners:
                        nursery.start_soon(runner.run)
                    nursery.start_soon(self._notify_systemd)
                    if signal.SIGHUP in self._early_signals:  # a reload, once mounts run
                        nursery.start_soon(self._on_signal, signal.SIGHUP)
                await self._shutdown.wait()
                log.info("shutting down")
                systemd.notify("STOPPING=1")
                async with trio.open_nursery() as stopping:
                    for runner in list(self.mounts.values()):
                        stopping.start_soon(runner.stop)
                await self._stop_rootcache()
                for store in self._probe_stores.values():
                    await store.aclose()
                nursery.cancel_scope.cancel()
        if failed is not None:
            raise failed
        log.info("stopped")

    def health_app(self) -> Any:
        from tvix_mountd.supervisor.health import make_app

        return make_app(self)

    def request_shutdown(self) -> None:
        self._shutdown.set()

    async def _handle_signals(self, signals: Any) -> None:
        async for signum in signals:
            await self._on_signal(signum)

    async def _on_signal(self, signum: int) -> None:
        if signum == signal.SIGHUP:
            result = await self.reload()
            for line in result["problems"]:
                log.error("reload refused: %s", line)
        else:
            log.info("received %s", signal.Signals(signum).name)
            self.request_shutdown()

    async def _watch_spawner(self) -> None:
        try:
            await self.spawner.run()
        except SpawnError as e:
            # Every worker is a child of the spawner and follows it out.
            log.error("%s; shutting down (the service manager may restart us)", e)
            self.exit_status = 1
            self.request_shutdown()

    def _add_mounts(self, mounts: list[MountConfig]) -> list[MountRunner]:
        runners = [MountRunner(self, m, self.config.stores[m.store]) for m in mounts]
        self.mounts.update((runner.name, runner) for runner in runners)
        return runners

    def _start_mount(self, mount: MountConfig) -> MountRunner:
        assert self._nursery is not None
        (runner,) = self._add_mounts([mount])
        self._nursery.start_soon(runner.run)
        return runner

    async def _run_rootcache(self) -> None:
        """Keep the rootcache running; it has no failed state, it is retried forever."""
        crashes = 0
        while not self._shutdown.is_set():
            await trio.Path(self.rootcache_socket).unlink(missing_ok=True)
            # Shielded, and under the lock _stop_rootcache takes: a fork in
            # flight must come back with its PID, or nobody could stop it.
            async with self._rootcache_lock:
                if self._shutdown.is_set():
                    return
                with trio.CancelScope(shield=True):
                    child = await self.spawn(
                        "rootcache",
                        "rootcache",
                        self.config.model_dump_json(),
                        self.rootcache_socket,
                    )
                self.rootcache_pid = child.pid
                self._rootcache = child
            started = time.monotonic()
            await child.exited.wait()
            self.rootcache_pid = None
            if self._shutdown.is_set():
                return
            crashes = 1 if time.monotonic() - started > HEALTHY_AFTER else crashes + 1
            self.rootcache_restarts += 1
            log.warning("rootcache exited with %s; restarting", child.exitcode)
            await trio.sleep(restart_delay(crashes))

    async def _stop_rootcache(self) -> None:
        async with self._rootcache_lock:  # waits for a fork in flight
            child = self._rootcache
        if child is not None:
            await terminate(child, "rootcache")

    async def _notify_systemd(self) -> None:
        while not all(r.state == "serving" for r in self.mounts.values()):
            await self._wait_state_change()
        systemd.notify("READY=1")
        log.info("all %d mounts serving", len(self.mounts))
        interval = systemd.watchdog_interval()
        while interval is not None:
            systemd.notify("WATCHDOG=1")
            await trio.sleep(interval)

    async def _wait_state_change(self) -> None:
        await self._state_changed.wait()

    # -- reload --------------------------------------------------------------

    async def reload(self) -> dict[str, list[str]]:
        """Re-read the config and apply the difference; nothing changes if it is invalid."""
        async with self._reload_lock:
            if self._shutdown.is_set():
                return {"problems": ["the supervisor is stopping"], "changes": []}
            if self.config_path is None:
                return {"problems": ["started without --config: nothing to reload"], "changes": []}
            try:
                new = await trio.to_thread.run_sync(load_config, self.config_path)
            except ConfigError as e:
                return {"problems": e.problems, "changes": []}
            old = self.config
            if new.supervisor.state_dir != old.supervisor.state_dir:
                return {
                    "problems": ["supervisor.state_dir cannot change while running"],
                    "changes": [],
                }
            old_mounts = {m.name: m for m in old.mounts}
            new_mounts = {m.name: m for m in new.mounts}

            def changed(name: str) -> bool:
                a, b = old_mounts[name], new_mounts[name]
                return a != b or old.stores[a.store] != new.stores[b.store]

            added = [m for n, m in new_mounts.items() if n not in old_mounts]
            removed = [n for n in old_mounts if n not in new_mounts]
            # A failed mount is tried again ("reload to try again"), changed or not.
            restarted = [
                n
                for n in new_mounts
                if n in old_mounts and (changed(n) or self.mounts[n].state == "failed")
            ]
            # Mountpoints that become free in this reload may be reused by new mounts.
            problems = self.check_mountpoints(
                [
                    m
                    for m in added
                    if m.mountpoint not in {old_mounts[n].mountpoint for n in removed}
                ]
            )
            if problems:
                return {"problems": problems, "changes": []}
            changes = []
            self.config = new
            async with trio.open_nursery() as nursery:
                for name in removed + restarted:
                    nursery.start_soon(self.mounts[name].stop)
            for name in removed:
                del self.mounts[name]
                changes.append(f"stopped {name}")
            if self._shutdown.is_set():
                # SIGTERM came while mounts stopped: start nothing behind the
                # shutdown's back (it has taken its list of mounts to stop).
                return {"problems": ["the supervisor is stopping"], "changes": changes}
            for name in restarted:
                del self.mounts[name]
                self._start_mount(new_mounts[name])
                changes.append(f"restarted {name}")
            for mount in added:
                self._start_mount(mount)
                changes.append(f"started {mount.name}")
            if new.stores != old.stores or new.supervisor != old.supervisor:
                # The rootcache reads stores at start: give it the new ones.
                if self.rootcache_pid is not None:
                    os.kill(self.rootcache_pid, signal.SIGTERM)
                changes.append("restarted rootcache")
            if new.supervisor.health_listen != old.supervisor.health_listen:
                changes.append("supervisor.health_listen changes at the next start")
            log.info("reloaded %s: %s", self.config_path, ", ".join(changes) or "no changes")
            return {"problems": [], "changes": changes}

    # -- status (the control socket and the health endpoint) -----------------

    async def status_document(self) -> dict[str, Any]:
        await self._refresh_rootcache_stats()
        return {
            "mounts": [r.as_status() for r in self.mounts.values()],
            "rootcache": {
                "pid": self.rootcache_pid,
                "restarts": self.rootcache_restarts,
                "stores": self._rootcache_stats,
            },
        }

    async def _refresh_rootcache_stats(self) -> None:
        from tvix_mountd.workers.rootcache_client import fetch_stats

        try:
            self._rootcache_stats = await fetch_stats(self.rootcache_socket, timeout=1.0)
        except Exception as e:  # status must answer even while the rootcache is down
            log.debug("rootcache stats unavailable: %s", e)
            self._rootcache_stats = {}

    async def readiness(self) -> list[str]:
        problems: list[str] = []
        # A mount whose store does not answer is up but degraded: its root
        # stats fine, every new name fails (EIO).
        degraded: dict[str, str | None] = {}

        async def probe(store: str) -> None:
            degraded[store] = await self._probe_store(store)

        async def check(runner: MountRunner) -> None:
            if runner.state != "serving":
                problems.append(
                    f"{runner.name}: {runner.state}"
                    + (f" ({runner.error})" if runner.error else "")
                )
                return
            problem = await stat_with_deadline(runner.mount.mountpoint)
            if problem is not None:
                problems.append(f"{runner.name}: {problem}")

        async with trio.open_nursery() as nursery:
            for store in {r.mount.store for r in self.mounts.values() if r.state == "serving"}:
                nursery.start_soon(probe, store)
            for runner in self.mounts.values():
                nursery.start_soon(check, runner)
        for runner in self.mounts.values():
            why = degraded.get(runner.mount.store)
            if why is not None and runner.state == "serving":
                problems.append(f"{runner.name}: degraded: {why}")
        return sorted(problems)

    async def _probe_store(self, name: str) -> str | None:
        """None if every backend of store `name` answers within STAT_TIMEOUT, else why not.

        Each service is asked for something that need not exist (the empty
        directory, a null path digest): any answer, found or not, will do.
        """
        config = self.config.stores[name]
        store = self._probe_stores.get(name)
        if store is not None and self._probe_configs.get(name) != config:
            del self._probe_stores[name]  # changed by a reload
            await store.aclose()
            store = None
        if store is None:
            timeout = min(config.backend_timeout, STAT_TIMEOUT)
            store = Store.from_addrs(
                config.blob_service_addr,
                config.directory_service_addr,
                config.path_info_service_addr,
                timeout=timeout,
            )
            self._probe_stores[name], self._probe_configs[name] = store, config
        checks: list[tuple[str, Callable[[], Awaitable[object]]]] = [
            ("blob service", partial(store.blobs.has, EMPTY_DIRECTORY_DIGEST)),
            ("directory service", partial(store.directories.get, EMPTY_DIRECTORY_DIGEST)),
            ("path info service", partial(store.path_infos.get, bytes(20))),
        ]
        for what, call in checks:
            try:
                with trio.fail_after(STAT_TIMEOUT):
                    await call()
            except trio.TooSlowError:
                return f"the {what} of store {name!r} did not answer within {STAT_TIMEOUT:g} s"
            except StoreError as e:
                return f"the {what} of store {name!r} is unavailable: {e}"
        return None

    async def metrics(self) -> tuple[bytes, str]:
        from tvix_mountd.metrics import render, rootcache_collector

        await self._refresh_rootcache_stats()
        return render([rootcache_collector(lambda: self._rootcache_stats)])


def _is_tvix_mountd(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"tvix-mountd" in cmdline or b"tvix_mountd" in cmdline
