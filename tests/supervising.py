"""Helpers for tests that run the whole service: `tvix-mountd start` as a subprocess.

`Service` writes a config under the test's tmp_path (its state_dir is a short
directory under /tmp: unix socket paths are limited to 107 bytes), starts the
supervisor with stderr going to a file, waits for readiness through the health
endpoint (polling, with a deadline) and talks to it through the health
endpoint and the real CLI (`status`, `stop`, `reload`).

Cleanup always runs (use it as a context manager): the supervisor we started
gets SIGTERM, then SIGKILL; any child that `status` ever reported (workers,
the rootcache) and that is still the same process (same start time) gets
SIGKILL; whatever is still mounted under the test's tmp dir is lazily
unmounted. No other process is ever signalled.

`Reader` (and `readers`) run separate processes that walk and read trees
through mounts until told to stop, comparing every byte with the source tree
and recording each failed operation with its time: the "no blink" and load
checks.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import inspect
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import tvix_mountd
from tests.mounting import BackingStore, StoreAddrs, wait_until
from tvix_mountd.workers.mount import detach

CLI: Final = (sys.executable, "-m", "tvix_mountd.cli")
# Generous: a loaded CI machine under `pytest -n 2` may take seconds to start
# Python, import grpc and pyfuse3, fork the workers and mount.
START_TIMEOUT: Final = 30.0
STOP_TIMEOUT: Final = 20.0
CLI_TIMEOUT: Final = 60.0
HTTP_TIMEOUT: Final = 10.0
# Environment variables a test harness may itself run under; never inherited.
_SCRUBBED: Final = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "PROMETHEUS_MULTIPROC_DIR")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- processes and mounts, read from /proc independently of the code under test ---


def start_time(pid: int) -> int | None:
    """The start time of process `pid` (clock ticks after boot), None if it is gone.

    With the pid it names one process: a pid reused later has another start time.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after it.
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return None  # a zombie has exited; only its parent's wait is missing
    return int(fields[19])


def children_of(pid: int) -> list[int]:
    """The direct children of `pid`, from /proc (every thread's list)."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                text = Path(f"/proc/{pid}/task/{task}/children").read_text()
                found += [int(p) for p in text.split()]
    return found


def _unescape(value: str) -> str:
    return value.encode().decode("unicode_escape")


def mounts_under(root: Path) -> list[tuple[str, str, str]]:
    """(mountpoint, fstype, source) of every mount at or below `root`, in mount order."""
    prefix = os.path.realpath(root)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = _unescape(fields[4])
            if point == prefix or point.startswith(prefix + "/"):
                sep = fields.index("-")
                found.append((point, fields[sep + 1], _unescape(fields[sep + 2])))
    return found


def mount_id(point: Path) -> int | None:
    """The kernel's mount ID of what is mounted at `point` (the topmost), if anything."""
    path = os.path.realpath(point)
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if _unescape(fields[4]) == path:
                found = int(fields[0])
    return found


def process_figures(pid: int) -> tuple[int, int] | None:
    """(RSS in KiB, open file descriptors) of `pid`, None if it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]), fds
    return None


# -- metrics ------------------------------------------------------------------------

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_metrics(text: str) -> Samples:
    """Prometheus text exposition -> {(name, labels): value}."""
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)", line)
        assert match, f"not a sample line: {line!r}"
        labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
        samples[(match.group(1), labels)] = float(match.group(3))
    return samples


def sample(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


class DaemonRequests:
    """FUSE requests mount `mount`'s worker has handled, by operation, from
    the service's /metrics.

    A worker writes its figures in batches, so a reading marks its point in
    time with a request the kernel never answers itself (a getxattr of
    `marker`, a directory in the mount): once that request shows, so do the
    ones before it, or they are being written: a batch is written figure by
    figure, and a worker preempted in the middle of one has shown the
    marker before the READs of the same batch (seen on a busy machine). The
    worker writes one batch after the other, so once a second marker shows,
    the first one's batch is whole.
    """

    OPS: Final = ("lookup", "open", "release", "read", "getattr", "opendir", "readdir")

    def __init__(self, svc: Service, mount: str, marker: Path) -> None:
        self._svc = svc
        self._mount = mount
        self._marker = marker
        self._marks = 0

    def _counts(self) -> dict[str, float]:
        s = parse_metrics(self._svc.http("/metrics")[1])
        return {
            op: sample(s, "tvix_mountd_requests_total", mount=self._mount, op=op) or 0
            for op in (*self.OPS, "getxattr")
        }

    def _mark(self) -> None:
        from tvix_mountd.workers.filesystem import XATTR_DIRECTORY_DIGEST

        os.getxattr(self._marker, XATTR_DIRECTORY_DIGEST)
        self._marks += 1
        self._svc.wait_for(lambda: self._counts()["getxattr"] >= self._marks, "the figures")

    def now(self) -> dict[str, float]:
        """Counts so far, everything before this call included."""
        self._mark()
        self._mark()  # the first one's batch written to its end
        return self._counts()

    def during(self, action: Callable[[], object]) -> dict[str, float]:
        """Requests `action()` caused, by operation (the marker's excepted)."""
        before = self.now()
        action()
        after = self.now()
        return {op: after[op] - before[op] for op in self.OPS}


# -- the config ---------------------------------------------------------------------


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string for everything we write
    raise TypeError(f"no TOML for {value!r}")


def render_config(
    supervisor: Mapping[str, object],
    stores: Mapping[str, Mapping[str, object]],
    mounts: Sequence[Mapping[str, object]],
    extra: str = "",
) -> str:
    lines = ["[supervisor]", *(f"{k} = {_toml(v)}" for k, v in supervisor.items()), ""]
    for name, store in stores.items():
        lines += [f"[stores.{name}]", *(f"{k} = {_toml(v)}" for k, v in store.items()), ""]
    for mount in mounts:
        lines += ["[[mounts]]", *(f"{k} = {_toml(v)}" for k, v in mount.items()), ""]
    return "\n".join(lines) + extra


def store_table(addrs: StoreAddrs, **extra: object) -> dict[str, object]:
    return {
        "blob_service_addr": addrs.blob,
        "directory_service_addr": addrs.directory,
        "path_info_service_addr": addrs.path_info,
        **extra,
    }


# -- the service ----------------------------------------------------------------------


@dataclass
class Service:
    """One `tvix-mountd start` of a test, its config, state_dir and log."""

    base: Path
    stores: dict[str, dict[str, object]] = field(default_factory=dict)
    mounts: list[dict[str, object]] = field(default_factory=list)
    supervisor: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.base = Path(os.path.realpath(self.base))
        self.base.mkdir(parents=True, exist_ok=True)
        self.state_dir = Path(tempfile.mkdtemp(prefix="tvmd-"))
        self.port = free_port()
        self.config_path = self.base / "mountd.toml"
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.base / "supervisor.log"
        self.extra_env: dict[str, str] = {}
        # pid -> start time of every child `status` reported: the only ones we kill.
        self._children: dict[int, int] = {}
        # The supervisor's own pid and start time, and descendants seen in /proc
        # (checked for leftovers, never signalled).
        self._supervisor: tuple[int, int] | None = None
        self._descendants: dict[int, int] = {}
        self._extra_processes: list[subprocess.Popen[bytes]] = []

    def successor(self) -> Service:
        """A Service for the next `start` of this one's config, state_dir and port
        (after this one died); it cleans up after itself as this one does."""
        again = Service(self.base, dict(self.stores), list(self.mounts), dict(self.supervisor))
        shutil.rmtree(again.state_dir, ignore_errors=True)
        again.state_dir, again.port = self.state_dir, self.port
        again.log_path = self.base / "successor.log"
        again.write_config()
        return again

    # -- config

    def mountpoint(self, name: str) -> Path:
        return self.base / "mnt" / name

    def add_store(self, name: str, addrs: StoreAddrs, **extra: object) -> None:
        self.stores[name] = store_table(addrs, **extra)

    def add_mount(self, name: str, store: str = "local", **extra: object) -> Path:
        path = self.mountpoint(name)
        path.mkdir(parents=True, exist_ok=True)
        self.mounts.append({"name": name, "store": store, "mountpoint": str(path), **extra})
        return path

    def remove_mount(self, name: str) -> None:
        self.mounts = [m for m in self.mounts if m["name"] != name]

    def mount_entry(self, name: str) -> dict[str, object]:
        (entry,) = [m for m in self.mounts if m["name"] == name]
        return entry

    def config_text(self) -> str:
        supervisor = {
            "state_dir": str(self.state_dir),
            "health_listen": f"127.0.0.1:{self.port}",
            **self.supervisor,
        }
        return render_config(supervisor, self.stores, self.mounts)

    def write_config(self, text: str | None = None) -> Path:
        """Write the config (this service's, or `text` as given) atomically."""
        temp = self.config_path.with_suffix(".tmp")
        temp.write_text(self.config_text() if text is None else text)
        temp.replace(self.config_path)
        return self.config_path

    # -- running

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED}
        env.update(self.extra_env)
        return env

    def use_overlay(self) -> Path:
        """Run the service from a copy of the tvix_mountd package (first on
        PYTHONPATH), and return where it is: what a test changes there is
        "the code installed now" for processes started afterwards."""
        overlay = self.base / "overlay"
        package = overlay / "tvix_mountd"
        shutil.copytree(
            Path(tvix_mountd.__file__).parent,
            package,
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        path = os.environ.get("PYTHONPATH")
        self.extra_env["PYTHONPATH"] = str(overlay) + (f":{path}" if path else "")
        return package

    def start(
        self, *, wait: bool = True, timeout: float = START_TIMEOUT, new_session: bool = False
    ) -> None:
        """`tvix-mountd start --config ...`; by default wait until /readyz answers 200.
        `new_session`: in a process group of its own, as a terminal runs it
        (for `signal_group`)."""
        assert self.process is None, "one start per Service"
        if not self.config_path.exists():
            self.write_config()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [*CLI, "start", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=self.env(),
                start_new_session=new_session,
            )
        started = start_time(self.process.pid)
        if started is not None:
            self._supervisor = (self.process.pid, started)
        if wait:
            self.wait_ready(timeout)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        """Everything the supervisor (and through it every child) wrote so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _details(self) -> str:
        return f"; supervisor log:\n{self.log()}"

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
        """Poll `condition` (the supervisor must stay alive meanwhile)."""

        def check() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(
                    f"the supervisor exited with {self.process.returncode} while waiting for"
                    f" {what}{self._details()}"
                )
            return condition()

        wait_until(check, timeout, what, details=self._details)

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        self.wait_for(lambda: self.readyz()[0] == 200, "/readyz to answer 200", timeout)
        self.status()  # learn the children's pids, for cleanup

    def wait_exit(self, timeout: float = STOP_TIMEOUT) -> int:
        assert self.process is not None
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"the supervisor did not exit within {timeout:g} s{self._details()}"
            ) from None

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self._note_descendants()
        self.process.send_signal(signum)

    def signal_group(self, signum: int) -> None:
        """`signum` to every process of the supervisor's group, as a terminal
        sends Ctrl-C (only for a Service started with `new_session`)."""
        assert self.process is not None
        assert os.getpgid(self.process.pid) == self.process.pid, "not started in a session"
        self._note_descendants()
        os.killpg(self.process.pid, signum)

    # -- talking to it

    def http(self, path: str, timeout: float = HTTP_TIMEOUT) -> tuple[int, str]:
        """GET `path` from the health endpoint: (status, body); (0, why) if it does not answer."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read().decode()
        except OSError as e:
            return 0, str(e)
        finally:
            conn.close()

    def readyz(self) -> tuple[int, str]:
        return self.http("/readyz")

    def status(self) -> dict[str, Any]:
        """The /status document (and remember the children it names)."""
        code, body = self.http("/status")
        assert code == 200, f"/status answered {code}: {body}{self._details()}"
        document: dict[str, Any] = json.loads(body)
        self.remember(document)
        return document

    def states(self) -> dict[str, str]:
        """Mount name -> state; empty while the endpoint does not answer (yet)."""
        code, body = self.http("/status")
        if code != 200:
            return {}
        document = json.loads(body)
        self.remember(document)
        return {m["name"]: m["state"] for m in document["mounts"]}

    def mount_status(self, name: str) -> dict[str, Any]:
        found = [m for m in self.status()["mounts"] if m["name"] == name]
        assert found, f"no mount {name!r} in status"
        mount: dict[str, Any] = found[0]
        return mount

    def pids(self) -> dict[str, int | None]:
        return {m["name"]: m["pid"] for m in self.status()["mounts"]}

    def remember(self, document: Mapping[str, Any]) -> None:
        """Record the children a status document names, to clean them up later."""
        pids = [m.get("pid") for m in document.get("mounts", [])]
        pids.append(document.get("rootcache", {}).get("pid"))
        for pid in pids:
            if isinstance(pid, int) and pid not in self._children:
                started = start_time(pid)
                if started is not None:
                    self._children[pid] = started
        self._note_descendants()

    def _note_descendants(self) -> None:
        if self._supervisor is None or not self._same(*self._supervisor):
            return
        queue = [self._supervisor[0]]
        while queue:
            for child in children_of(queue.pop()):
                started = start_time(child)
                if started is not None and child not in self._descendants:
                    self._descendants[child] = started
                    queue.append(child)

    def cli(
        self, *args: str, timeout: float = CLI_TIMEOUT, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run `tvix-mountd ARGS...` (text output captured)."""
        return subprocess.run(
            [*CLI, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env(),
            cwd=cwd,
            check=False,
        )

    def status_cli(self) -> dict[str, Any]:
        """`tvix-mountd status --json --config ...`, parsed."""
        done = self.cli("status", "--json", "--config", str(self.config_path))
        assert done.returncode == 0, f"status failed: {done.stderr}{self._details()}"
        document: dict[str, Any] = json.loads(done.stdout)
        self.remember(document)
        return document

    def start_another(self, *args: str) -> subprocess.Popen[bytes]:
        """Another `tvix-mountd ARGS...` process, cleaned up with this service."""
        log = self.base / f"extra-{len(self._extra_processes)}.log"
        with open(log, "ab") as f:
            process = subprocess.Popen(
                [*CLI, *args], stdin=subprocess.DEVNULL, stdout=f, stderr=f, env=self.env()
            )
        self._extra_processes.append(process)
        return process

    # -- what is left

    @staticmethod
    def _same(pid: int, started: int) -> bool:
        return start_time(pid) == started

    def live_processes(self) -> list[int]:
        """Our supervisor, its children and descendants seen so far, that still run."""
        self._note_descendants()
        candidates = dict(self._children) | dict(self._descendants)
        if self._supervisor is not None:
            candidates[self._supervisor[0]] = self._supervisor[1]
        return sorted(pid for pid, started in candidates.items() if self._same(pid, started))

    def live_mounts(self) -> list[tuple[str, str, str]]:
        return mounts_under(self.base)

    def assert_nothing_left(self, timeout: float = 10.0) -> None:
        """No mount under the test dir, none of our processes, no pid file or sockets.

        Call it once the supervisor exited: it unmounts everything before it
        exits, so mounts are checked at once; processes get `timeout` to go.
        """
        assert self.live_mounts() == [], f"left mounted: {self.live_mounts()}{self._details()}"
        wait_until(
            lambda: not self.live_mounts() and not self.live_processes(),
            timeout,
            "every mount and process to be gone",
            details=lambda: (
                f"; mounts: {self.live_mounts()}, processes: {self.live_processes()}"
                f"{self._details()}"
            ),
        )
        left = sorted(p.name for p in self.state_dir.glob("*") if p.name != "metrics")
        assert not {"tvix-mountd.pid", "control.sock", "rootcache.sock"} & set(left), left

    # -- cleanup

    def close(self) -> None:
        """SIGTERM, then SIGKILL, the supervisor we started; SIGKILL the children
        it reported (if still the same processes); detach what is mounted under
        the test dir; remove the state_dir."""
        if self.alive():
            self._note_descendants()
        for process in [*self._extra_processes, self.process]:
            if process is None or process.poll() is not None:
                continue
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=STOP_TIMEOUT)
        for pid, started in self._children.items():
            if self._same(pid, started):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        # Children exit and unmount on their parent's death: give them a moment
        # before detaching, so that a mount is not detached under a live daemon.
        deadline = time.monotonic() + 5.0
        while self.live_processes() and time.monotonic() < deadline:
            time.sleep(0.02)
        for point, _fstype, _source in reversed(self.live_mounts()):
            with contextlib.suppress(OSError):
                detach(point)
        shutil.rmtree(self.state_dir, ignore_errors=True)

    def __enter__(self) -> Service:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# -- data -------------------------------------------------------------------------------


def make_tree(
    root: Path, files: int = 4, size: int = 3000, subdirs: int = 2, links: int = 0
) -> Path:
    """A small tree of distinct files (in `subdirs` directories) under `root`;
    `links` symlinks in each directory, named after its files."""
    for d in range(subdirs):
        for i in range(files):
            path = root / f"dir{d}" / f"file{i}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(f"{root.name}/{d}/{i}\n".encode() * (size // 8 + i))
        for i in range(links):
            (root / f"dir{d}" / f"link{i}").symlink_to(f"file{i % files}")
    (root / "top").write_text(f"top of {root.name}\n")
    return root


def tree_files(root: Path) -> dict[str, bytes]:
    """Relative path -> content of every file under `root`."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def embedded_store(root: Path, trees: Sequence[Path]) -> tuple[StoreAddrs, list[str]]:
    """An embedded store under `root` holding `trees`: its addresses and the
    store path basename of each tree, in order."""
    store = BackingStore("embedded", root)
    infos = store.import_paths(list(trees))
    return store.addrs, [info.store_path.basename for info in infos]


# -- reader processes -------------------------------------------------------------------


def _reader(spec_file: str) -> None:  # pragma: no cover - runs in a separate process
    """Walk and read trees until told to stop; record every failed operation.

    Runs in a fresh interpreter (see Reader): stdlib only, builtin annotations only.
    """
    import errno
    import hashlib
    import json
    import os
    import stat
    import time

    # Below the daemons and other tests: a reader only adds load, it must not
    # starve the processes under test (nor a test running alongside).
    os.nice(10)
    with open(spec_file) as f:
        spec = json.load(f)
    stop_file: str = spec["stop_file"]
    deadline: float = time.monotonic() + spec["max_seconds"]
    ops = 0
    passes = 0
    failures: list[dict[str, object]] = []
    failure_count = 0

    def fail(label: str, op: str, path: str, what: str) -> None:
        nonlocal failure_count
        failure_count += 1
        if len(failures) < 200:
            failures.append(
                {"t": time.monotonic(), "root": label, "op": op, "path": path, "error": what}
            )

    def describe(e: OSError) -> str:
        return errno.errorcode.get(e.errno or 0, str(e.errno)) + f" {e.strerror}"

    def walk(label: str, root: str, rel: str, seen: dict[str, str]) -> None:
        nonlocal ops
        path = os.path.join(root, rel) if rel else root
        try:
            entries = sorted(os.listdir(path))
            ops += 1
        except OSError as e:
            fail(label, "listdir", path, describe(e))
            return
        for name in entries:
            child_rel = os.path.join(rel, name) if rel else name
            child = os.path.join(root, child_rel)
            try:
                st = os.lstat(child)
                ops += 1
            except OSError as e:
                fail(label, "lstat", child, describe(e))
                continue
            if stat.S_ISDIR(st.st_mode):
                walk(label, root, child_rel, seen)
                continue
            try:
                fd = os.open(child, os.O_RDONLY)
                try:
                    digest = hashlib.sha256()
                    while chunk := os.read(fd, 1 << 16):
                        digest.update(chunk)
                    # Drop the pages: the next pass asks the daemon again.
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
                ops += 1
            except OSError as e:
                fail(label, "read", child, describe(e))
                continue
            seen[child_rel] = digest.hexdigest()

    while not os.path.exists(stop_file) and time.monotonic() < deadline:
        for label, root in spec["roots"]:
            seen: dict[str, str] = {}
            before = failure_count
            walk(label, root, "", seen)
            expected: dict[str, str] = spec["expected"][label]
            if failure_count == before and seen != expected:
                wrong = sorted(
                    k for k in set(seen) | set(expected) if seen.get(k) != expected.get(k)
                )
                fail(label, "compare", root, f"content differs: {wrong[:5]}")
        passes += 1
        progress = spec["progress_file"]
        with open(progress + ".tmp", "w") as f:
            json.dump({"ops": ops, "passes": passes, "failures": failure_count}, f)
        os.replace(progress + ".tmp", progress)
    result = {"ops": ops, "passes": passes, "failure_count": failure_count, "failures": failures}
    with open(spec["result_file"] + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(spec["result_file"] + ".tmp", spec["result_file"])


def file_digests(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `root` (what a reader expects)."""
    return {k: hashlib.sha256(v).hexdigest() for k, v in tree_files(root).items()}


@dataclass
class ReaderResult:
    ops: int
    passes: int
    failure_count: int
    failures: list[dict[str, Any]]


class Reader:
    """A separate process that walks and reads trees through mounts until stopped.

    `roots` are (label, path of a store path in a mount, the source tree it
    must equal). Every failed operation is recorded with its monotonic time
    (CLOCK_MONOTONIC is system wide, so comparable with the test's clock).
    """

    def __init__(
        self, workdir: Path, roots: Sequence[tuple[str, Path, Path]], max_seconds: float = 300.0
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.spec_file = workdir / "spec.json"
        self.stop_file = workdir / "stop"
        self.progress_file = workdir / "progress.json"
        self.result_file = workdir / "result.json"
        spec = {
            "roots": [(label, str(path)) for label, path, _ in roots],
            "expected": {label: file_digests(source) for label, _, source in roots},
            "stop_file": str(self.stop_file),
            "progress_file": str(self.progress_file),
            "result_file": str(self.result_file),
            "max_seconds": max_seconds,
        }
        self.spec_file.write_text(json.dumps(spec))
        code = inspect.getsource(_reader) + f"\n_reader({str(self.spec_file)!r})\n"
        self.process = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.DEVNULL, cwd=workdir
        )

    def progress(self) -> dict[str, int]:
        try:
            progress: dict[str, int] = json.loads(self.progress_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {"ops": 0, "passes": 0, "failures": 0}
        return progress

    def wait_passes(self, passes: int, timeout: float = 30.0) -> None:
        """Wait until the reader has finished `passes` more passes than now."""
        target = self.progress()["passes"] + passes

        def done() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"the reader exited with {self.process.returncode}")
            return self.progress()["passes"] >= target

        wait_until(done, timeout, f"the reader to reach {target} passes")

    def stop(self, timeout: float = 30.0) -> ReaderResult:
        self.stop_file.touch()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError("the reader did not stop") from None
        assert self.process.returncode == 0, f"the reader exited with {self.process.returncode}"
        result = json.loads(self.result_file.read_text())
        return ReaderResult(**result)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@contextlib.contextmanager
def readers(
    workdir: Path, specs: Sequence[Sequence[tuple[str, Path, Path]]], max_seconds: float = 300.0
) -> Iterator[list[Reader]]:
    """One Reader per entry of `specs`; every one killed on the way out if still running."""
    started: list[Reader] = []
    try:
        for i, roots in enumerate(specs):
            started.append(Reader(workdir / f"reader{i}", roots, max_seconds))
        yield started
    finally:
        for reader in started:
            reader.kill()


@dataclass
class World:
    """A service over an embedded store holding some trees."""

    svc: Service
    sources: dict[str, Path]  # store path basename -> the tree it was imported from

    @property
    def names(self) -> list[str]:
        return sorted(self.sources)

    def path(self, mount: str, name: str | None = None) -> Path:
        return self.svc.mountpoint(mount) / (name or self.names[0])

    def check_serves(self, mount: str) -> None:
        """Every tree reads back exactly, through `mount`."""
        for name, source in self.sources.items():
            assert tree_files(self.path(mount, name)) == tree_files(source), (mount, name)


@contextlib.contextmanager
def world(
    tmp_path: Path,
    mounts: tuple[str, ...] = ("a", "b"),
    trees: int = 2,
    files: int = 4,
    subdirs: int = 2,
    links: int = 0,
    **supervisor: object,
) -> Iterator[World]:
    """A running service with `mounts` of one embedded store holding `trees`
    trees (make_tree's, of `files` files and `links` symlinks per directory)."""
    sources = [
        make_tree(tmp_path / "src" / f"tree{i}", files, subdirs=subdirs, links=links)
        for i in range(trees)
    ]
    addrs, names = embedded_store(tmp_path / "store", sources)
    with Service(tmp_path / "svc") as svc:
        svc.supervisor.update(supervisor)
        svc.add_store("local", addrs)
        for name in mounts:
            svc.add_mount(name)
        yield World(svc, dict(zip(names, sources, strict=True)))
