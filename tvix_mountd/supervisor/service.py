"""The supervisor: keeps every mount served and one rootcache alive.

Structure (trio): the supervisor's nursery owns a runner task per mount
(runner.py: the mount's FUSE connection and the workers it is lent to), one
for the rootcache, the spawner's reader, the control socket, the health
endpoint and the systemd notifier. Children are started by the spawner (see
spawner.py for why) and watched here by PID: the spawner reports each exit
at once.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any, Final

import trio

from tvix_mountd.castore.digests import B3Digest
from tvix_mountd.castore.errors import StoreError
from tvix_mountd.castore.store import Store
from tvix_mountd.config import (
    Config,
    ConfigError,
    MountConfig,
    StoreConfig,
    load_config,
    serves_differently,
)
from tvix_mountd.metrics import mark_process_dead
from tvix_mountd.supervisor import systemd
from tvix_mountd.supervisor.runner import (
    Child,
    HandoverError,
    MountRunner,
    restart_delay,
    terminate,
)
from tvix_mountd.supervisor.spawner import Spawner, SpawnError
from tvix_mountd.supervisor.state_files import (
    CONTROL_SOCKET,
    ERRORS_DIR,
    METRICS_DIR,
    PID_FILE,
    ROOTCACHE_SOCKET,
)
from tvix_mountd.workers.mount import detach, find_mount, is_dead_mount
from tvix_mountd.workers.process import fsname

log = logging.getLogger(__name__)

# What a worker runs: exec'd as `python -m WORKER_MODULE`, or WORKER_ENTRY
# called in a process forked from the fork server (spawner.py).
WORKER_MODULE = "tvix_mountd.workers"
WORKER_ENTRY = "tvix_mountd.workers.process:main"
# Set (to anything but empty): every worker exec'd, no fork server.
NO_FORK_SERVER_ENV: Final = "TVIX_MOUNTD_NO_FORK_SERVER"

# A rootcache that served this long is healthy again: its backoff starts over.
HEALTHY_AFTER = 30.0
# Deadline for a readiness probe of a store's backends.
STAT_TIMEOUT = 2.0
# Statfs probes of mounts that may hang, at most this many at once.
PROBE_THREADS = 64
# Stop (SIGTERM, SIGINT) and reload (SIGHUP).
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


EMPTY_DIRECTORY_DIGEST = B3Digest.of(b"")


class SupervisorError(Exception):
    """The supervisor cannot start (a user's problem, reported plainly)."""


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
        self._rootcache: Child | None = None
        self._rootcache_lock = trio.Lock()
        # Services for readiness probes, per store, opened on first use.
        self._probe_stores: dict[str, Store] = {}
        self._probe_configs: dict[str, StoreConfig] = {}
        self.rootcache_restarts = 0
        self._children: dict[int, Child] = {}
        self._shutdown = trio.Event()
        self._state_changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._reload_lock = trio.Lock()
        self.exit_status = 0
        self._rootcache_stats: dict[str, dict[str, int]] = {}
        self._early_signals: list[int] = []
        # Threads of statfs probes (runner.py), apart from trio's default
        # limiter: probes of hung mounts must not starve other thread users.
        self.probe_limiter = trio.CapacityLimiter(PROBE_THREADS)

    # -- bookkeeping -------------------------------------------------------

    def error_file(self, name: str) -> Path:
        return self.state_dir / ERRORS_DIR / f"{name}.error"

    def state_changed(self) -> None:
        self._state_changed.set()
        self._state_changed = trio.Event()

    async def spawn(self, kind: str, name: str, *args: Any) -> Child:
        """Fork a child through the spawner (the rootcache)."""
        return self._child(await self.spawner.spawn(kind, name, *args))

    async def exec_worker(self, name: str, spec: dict[str, Any], fds: dict[str, int]) -> Child:
        """Start a worker process for mount `name` (see workers/process.py)."""
        return self._child(await self.spawner.exec(name, WORKER_MODULE, spec, fds))

    def _child(self, pid: int) -> Child:
        # The exit may be reported before we get here: record it either way.
        return self._children.setdefault(pid, Child(pid))

    async def _dispatch_exits(self) -> None:
        async for pid, exitcode in self.spawner.exits:
            child = self._children.pop(pid, None)
            if child is None:
                child = Child(pid)  # reported before spawn() returned
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
            fork_servers = (
                {} if os.environ.get(NO_FORK_SERVER_ENV) else {WORKER_MODULE: WORKER_ENTRY}
            )
            self.spawner = Spawner.start(fork_servers=fork_servers)
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
            # Nobody reports our children's exits now; watch them ourselves,
            # so that the shutdown that waits for them ends.
            async with trio.open_nursery() as nursery:
                for child in list(self._children.values()):
                    nursery.start_soon(_watch_exit, child)
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
            await self.wait_state_change()
        systemd.notify("READY=1")
        log.info("all %d mounts serving", len(self.mounts))
        interval = systemd.watchdog_interval()
        while interval is not None:
            systemd.notify("WATCHDOG=1")
            await trio.sleep(interval)

    async def wait_state_change(self) -> None:
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
                return a != b or serves_differently(old.stores[a.store], new.stores[b.store])

            added = [m for n, m in new_mounts.items() if n not in old_mounts]
            removed = [n for n in old_mounts if n not in new_mounts]
            kept = [n for n in new_mounts if n in old_mounts]
            # A failed mount is tried again ("reload to try again"), changed or
            # not; one whose kernel-side options change is mounted again.
            restarted = [
                n
                for n in kept
                if self.mounts[n].state == "failed"
                or (changed(n) and needs_new_mount(old_mounts[n], new_mounts[n]))
            ]
            # Any other change goes to a new worker on the live connection.
            handed_over = [n for n in kept if changed(n) and n not in restarted]
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
                # The rootcache reads stores at start: give it the new ones
                # (before workers on a changed store ask it).
                if self.rootcache_pid is not None:
                    os.kill(self.rootcache_pid, signal.SIGTERM)
                changes.append("restarted rootcache")
            problems = []

            async def hand_over(name: str) -> None:
                mount = new_mounts[name]
                try:
                    await self.mounts[name].hand_over("reload", mount, new.stores[mount.store])
                except HandoverError as e:
                    problems.append(f"handover failed: {e}")
                else:
                    changes.append(f"handed over {name}")

            async with trio.open_nursery() as nursery:
                for name in handed_over:
                    nursery.start_soon(hand_over, name)
            if new.supervisor.health_listen != old.supervisor.health_listen:
                changes.append("supervisor.health_listen changes at the next start")
            log.info("reloaded %s: %s", self.config_path, ", ".join(changes) or "no changes")
            return {"problems": problems, "changes": changes}

    async def restart(self, names: list[str]) -> tuple[list[str], list[str]]:
        """Hand each named mount (every one when none are named) to a fresh
        worker, running the code installed now: (done, problems), a line each."""
        unknown = [n for n in names if n not in self.mounts]
        if unknown:
            known = ", ".join(self.mounts) or "none"
            return [], [f"no mount named {n!r} (mounts: {known})" for n in unknown]
        done: list[str] = []
        problems: list[str] = []

        async def restart_one(name: str) -> None:
            runner = self.mounts[name]
            if runner.state == "failed":
                # Given up on: start it afresh (e.g. the broken install it
                # failed on has been fixed).
                await runner.stop()
                if self.mounts.get(name) is runner and not self._shutdown.is_set():
                    del self.mounts[name]
                    runner = self._start_mount(runner.mount)
            try:
                done.append(await runner.hand_over("restart"))
            except HandoverError as e:
                problems.append(str(e))

        async with self._reload_lock, trio.open_nursery() as nursery:
            for name in names or list(self.mounts):
                nursery.start_soon(restart_one, name)
        return sorted(done), sorted(problems)

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
        problems = [p for r in self.mounts.values() if (p := r.readiness_problem()) is not None]
        # A mount whose store does not answer is up but degraded: its root
        # stats fine, every new name fails (EIO).
        degraded: dict[str, str | None] = {}

        async def probe(store: str) -> None:
            degraded[store] = await self._probe_store(store)

        async with trio.open_nursery() as nursery:
            for store in {r.mount.store for r in self.mounts.values() if r.state == "serving"}:
                nursery.start_soon(probe, store)
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


async def _watch_exit(child: Child) -> None:
    """Mark `child` exited once it is (through a pidfd: it is not our child,
    and its exit status is its parent's to read)."""
    try:
        pidfd = os.pidfd_open(child.pid)
    except ProcessLookupError:
        child.exited.set()
        return
    try:
        await trio.lowlevel.wait_readable(pidfd)
    finally:
        os.close(pidfd)
    child.exited.set()


def needs_new_mount(old: MountConfig, new: MountConfig) -> bool:
    """Whether a change of a mount's settings needs a new FUSE mount, rather
    than a new worker on the live one: the kernel fixes the mountpoint and
    allow_other at mount time, once told that extended attributes are
    not supported (show_xattr off: ENOSYS) it never asks again, and whether
    it may list without attributes is agreed once per connection (INIT)."""
    return (
        old.mountpoint != new.mountpoint
        or old.allow_other != new.allow_other
        or (new.show_xattr and not old.show_xattr)
        or old.plain_listings != new.plain_listings
    )


def _is_tvix_mountd(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"tvix-mountd" in cmdline or b"tvix_mountd" in cmdline
