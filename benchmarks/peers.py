"""The peers: where the same tree appears, and how to get a fresh mount of it.

native      the tree itself, no mount
bindfs      C passthrough of the tree: `bindfs -f -o ro TREE MNT`
squashfuse  C, read-only image: `squashfuse_ll -f IMAGE MNT`
tvix        `tvix-mountd mount ... --list-root MNT` on the embedded store; each
            part is a store path in the mount root (`MNT/<hash>-<part>`)
tvix-supervised
            the same mount served by a worker under `tvix-mountd start`, as in
            production (a worker also carries its rootcache client and metrics);
            its memory is the worker's, its code the installed one

Every daemon runs in the foreground as our own child (its PID is the one whose
VmHWM we read), in its own session so a Ctrl-C reaches only the harness, which
then unmounts. Everything mounted or started is registered until it is gone,
so `cleanup_all` can finish the job after an error in the middle of a cleanup.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from benchmarks.data import BIG, BIG_FILE_NAME, SMALL, STARTUP, WIDE, DataSet, tvix_mountd_command

REPO: Final = Path(__file__).resolve().parent.parent
MOUNT_DEADLINE: Final = 60.0
STOP_DEADLINE: Final = 30.0
PEER_NAMES: Final = ("native", "bindfs", "squashfuse", "tvix", "tvix-supervised", "tvix-whatif")
DEFAULT_PEERS: Final = ("native", "bindfs", "squashfuse", "tvix")


@dataclass(frozen=True)
class MountInfo:
    device: str  # major:minor, also the name of the mount's bdi
    fstype: str


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def find_mount(mountpoint: Path) -> MountInfo | None:
    """What is mounted at `mountpoint` (the last mount stacked there), if anything."""
    wanted = str(mountpoint)
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if _unescape(fields[4]) == wanted:
                sep = fields.index("-")
                found = MountInfo(fields[2], fields[sep + 1])
    return found


def read_ahead_kb(device: str) -> int | None:
    try:
        return int(Path("/sys/class/bdi", device, "read_ahead_kb").read_text())
    except (OSError, ValueError):
        return None


def set_read_ahead_kb(device: str, kb: int) -> None:
    Path("/sys/class/bdi", device, "read_ahead_kb").write_text(str(kb))


def status_kb(pid: int, field: str) -> int | None:
    """A KiB figure of /proc/<pid>/status (VmHWM, VmRSS...), None if unreadable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def vmhwm_kb(pid: int) -> int | None:
    """The peak resident set size of process `pid`, in KiB."""
    return status_kb(pid, "VmHWM")


def cpu_seconds(pid: int) -> tuple[float, float] | None:
    """(user, system) CPU seconds used so far by process `pid`, all threads."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks


def cpu_pressure() -> float | None:
    """The share of the last 10 s in which some runnable task waited for a CPU (PSI)."""
    try:
        with open("/proc/pressure/cpu") as f:
            for line in f:
                if line.startswith("some"):
                    return float(line.split()[1].split("=")[1])
    except (OSError, IndexError, ValueError):
        return None
    return None


def load_average() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def lazy_unmount(mountpoint: Path) -> None:
    subprocess.run(["umount", "-l", str(mountpoint)], check=False, stderr=subprocess.DEVNULL)


@dataclass
class Mount:
    """One peer, ready: where each part is, and the daemon behind it."""

    peer: str
    parts: dict[str, Path]
    pid: int | None = None
    device: str | None = None
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def big_file(self) -> Path:
        return self.parts[BIG] / BIG_FILE_NAME

    @property
    def small_dir(self) -> Path:
        return self.parts[SMALL]

    @property
    def wide_dir(self) -> Path:
        return self.parts[WIDE]

    @property
    def startup_dir(self) -> Path:
        return self.parts[STARTUP]

    def vmhwm_kb(self) -> int | None:
        return None if self.pid is None else vmhwm_kb(self.pid)

    def vmrss_kb(self) -> int | None:
        return None if self.pid is None else status_kb(self.pid, "VmRSS")

    def read_ahead_kb(self) -> int | None:
        return None if self.device is None else read_ahead_kb(self.device)

    def cpu_seconds(self) -> tuple[float, float] | None:
        return None if self.pid is None else cpu_seconds(self.pid)


class Peer(ABC):
    name: str
    is_fuse: bool

    @abstractmethod
    def mounted(self) -> contextlib.AbstractContextManager[Mount]:
        """A fresh mount (FUSE peers), unmounted again on exit."""


class NativePeer(Peer):
    is_fuse = False

    def __init__(self, data: DataSet) -> None:
        self.name = "native"
        self._data = data

    @contextlib.contextmanager
    def mounted(self) -> Iterator[Mount]:
        yield Mount(self.name, {part: self._data.tree / part for part in self._data.parts})


# -- FUSE daemons ------------------------------------------------------------


@dataclass
class _Started:
    process: subprocess.Popen[bytes]
    mountpoint: Path
    stop_with_sigterm: bool


_ACTIVE: dict[int, _Started] = {}


def _stop(started: _Started) -> None:
    """Unmount and end one daemon we started; escalate, never hang forever."""
    process, mountpoint = started.process, started.mountpoint
    if process.poll() is None:
        if started.stop_with_sigterm:
            process.send_signal(signal.SIGTERM)  # it unmounts itself
        else:
            subprocess.run(["umount", str(mountpoint)], check=False, stderr=subprocess.DEVNULL)
        try:
            process.wait(timeout=STOP_DEADLINE)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    info = find_mount(mountpoint)
    if info is not None and info.fstype.startswith("fuse"):
        lazy_unmount(mountpoint)
    _ACTIVE.pop(process.pid, None)


def cleanup_all() -> None:
    """Stop whatever is still running or mounted (after an error or Ctrl-C)."""
    for started in list(_ACTIVE.values()):
        with contextlib.suppress(Exception):
            _stop(started)


# Locks this process holds on mount directories (see clear_stale_mounts).
_CLAIMED: dict[Path, int] = {}


def clear_stale_mounts(mount_dir: Path) -> None:
    """Claim `mount_dir` for this process (until it exits), then lazily
    unmount the FUSE mounts a killed earlier run left under it.

    Another run that is still going holds the claim: its mounts are live,
    and this run stops with a message instead of unmounting them under it
    (two runs at once would also spoil each other's timings)."""
    mount_dir.mkdir(parents=True, exist_ok=True)
    if mount_dir not in _CLAIMED:
        fd = os.open(mount_dir / ".claimed", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SystemExit(
                f"another benchmark run is using {mount_dir} (its mounts are live):"
                " wait for it to end"
            ) from None
        _CLAIMED[mount_dir] = fd
    prefix = str(mount_dir) + "/"
    with open("/proc/self/mountinfo") as f:
        mountpoints = [_unescape(line.split()[4]) for line in f]
    for mountpoint in mountpoints:
        if mountpoint.startswith(prefix):
            lazy_unmount(Path(mountpoint))


class FusePeer(Peer):
    is_fuse = True

    def __init__(
        self,
        name: str,
        mountpoint: Path,
        log_path: Path,
        *,
        stop_with_sigterm: bool,
        read_ahead_kb: int | None = None,
    ) -> None:
        self.name = name
        self.mountpoint = mountpoint
        self.log_path = log_path
        self.stop_with_sigterm = stop_with_sigterm
        self.forced_read_ahead_kb = read_ahead_kb
        self.env: dict[str, str] | None = None  # None: inherit ours
        self.cwd: Path | None = None  # None: ours

    @abstractmethod
    def argv(self) -> list[str]: ...

    @abstractmethod
    def part_paths(self) -> dict[str, Path]: ...

    def _wait_mounted(self, process: subprocess.Popen[bytes]) -> MountInfo:
        deadline = time.monotonic() + MOUNT_DEADLINE
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with status {process.returncode} before mounting;"
                    f" see {self.log_path}:\n{self._log_tail()}"
                )
            info = find_mount(self.mountpoint)
            if info is not None and info.fstype.startswith("fuse"):
                # Mounted; a stat of the root is answered once the daemon serves.
                os.stat(self.mountpoint)
                return info
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: not mounted after {MOUNT_DEADLINE:g} s")
            time.sleep(0.005)  # polling interval, bounded by the deadline above

    def _log_tail(self) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])
        except OSError:
            return ""

    @contextlib.contextmanager
    def mounted(self) -> Iterator[Mount]:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        if find_mount(self.mountpoint) is not None:
            lazy_unmount(self.mountpoint)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"--- {time.strftime('%F %T')} {' '.join(self.argv())}\n".encode())
            log.flush()
            process = subprocess.Popen(
                self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=self.env,
                cwd=self.cwd,
            )
        started = _Started(process, self.mountpoint, self.stop_with_sigterm)
        _ACTIVE[process.pid] = started
        try:
            info = self._wait_mounted(process)
            if self.forced_read_ahead_kb is not None:
                set_read_ahead_kb(info.device, self.forced_read_ahead_kb)
            yield Mount(self.name, self.part_paths(), pid=process.pid, device=info.device)
        finally:
            _stop(started)


class BindfsPeer(FusePeer):
    def __init__(self, data: DataSet, mountpoint: Path, log_path: Path, **kw: int | None) -> None:
        super().__init__("bindfs", mountpoint, log_path, stop_with_sigterm=False, **kw)
        self._data = data

    def argv(self) -> list[str]:
        return ["bindfs", "-f", "-o", "ro", str(self._data.tree), str(self.mountpoint)]

    def part_paths(self) -> dict[str, Path]:
        return {part: self.mountpoint / part for part in self._data.parts}


class SquashfusePeer(FusePeer):
    def __init__(self, data: DataSet, mountpoint: Path, log_path: Path, **kw: int | None) -> None:
        super().__init__("squashfuse", mountpoint, log_path, stop_with_sigterm=False, **kw)
        self._data = data

    def argv(self) -> list[str]:
        return ["squashfuse_ll", "-f", str(self._data.image), str(self.mountpoint)]

    def part_paths(self) -> dict[str, Path]:
        return {part: self.mountpoint / part for part in self._data.parts}


class TvixPeer(FusePeer):
    def __init__(
        self,
        data: DataSet,
        mountpoint: Path,
        log_path: Path,
        *,
        command: list[str] | None = None,
        code_dir: Path | None = None,
        read_ahead_kb: int | None = None,
        name: str = "tvix",
    ) -> None:
        # tvix-mountd sets its own bdi read_ahead_kb; `read_ahead_kb` overrides
        # it from outside once the mount is up (to measure that lever).
        super().__init__(
            name, mountpoint, log_path, stop_with_sigterm=True, read_ahead_kb=read_ahead_kb
        )
        self._data = data
        if code_dir is not None:
            # Run the frozen copy in code_dir (see snapshot_code).
            self.cwd = code_dir
            self.command = command or [sys.executable, "-m", "tvix_mountd.cli"]
        else:
            self.command = command or tvix_mountd_command()

    def argv(self) -> list[str]:
        data = self._data
        return [
            *self.command,
            "mount",
            "--blob-service-addr",
            data.blob_service_addr,
            "--directory-service-addr",
            data.directory_service_addr,
            "--path-info-service-addr",
            data.path_info_service_addr,
            "--list-root",
            str(self.mountpoint),
        ]

    def part_paths(self) -> dict[str, Path]:
        return {
            part: self.mountpoint / os.path.basename(self._data.store_paths[part])
            for part in self._data.parts
        }


class SupervisedTvixPeer(TvixPeer):
    """The tvix peer's mount, served by a worker of the real supervisor.

    Workers are exec'd from the installed package (`python -P`, cwd /), so
    there is no frozen copy of the code here. The Mount's pid is the
    worker's: its memory and CPU are what the tables report."""

    def __init__(self, data: DataSet, mountpoint: Path, log_path: Path, state_dir: Path) -> None:
        super().__init__(data, mountpoint, log_path, name="tvix-supervised")
        self._state_dir = state_dir
        self._config = state_dir.parent / f"{state_dir.name}.toml"
        self._port = 0

    def argv(self) -> list[str]:
        return [*tvix_mountd_command(), "start", "--config", str(self._config)]

    def _write_config(self) -> None:
        from benchmarks.supervised import free_port

        data = self._data
        self._port = free_port()
        self._config.parent.mkdir(parents=True, exist_ok=True)
        self._config.write_text(
            f"""[supervisor]
state_dir = "{self._state_dir}"
health_listen = "127.0.0.1:{self._port}"

[stores.bench]
blob_service_addr = "{data.blob_service_addr}"
directory_service_addr = "{data.directory_service_addr}"
path_info_service_addr = "{data.path_info_service_addr}"

[[mounts]]
name = "bench"
store = "bench"
mountpoint = "{self.mountpoint}"
list_root = true
"""
        )

    def _worker_pid(self) -> int:
        deadline = time.monotonic() + MOUNT_DEADLINE
        while True:
            try:
                url = f"http://127.0.0.1:{self._port}/status"
                with urllib.request.urlopen(url, timeout=5) as r:
                    mount = json.load(r)["mounts"][0]
                if mount["state"] == "serving" and mount["pid"]:
                    return int(mount["pid"])
            except (OSError, ValueError, KeyError, IndexError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: no worker serving; see {self.log_path}")
            time.sleep(0.005)  # polling another process's state, bounded by the deadline

    @contextlib.contextmanager
    def mounted(self) -> Iterator[Mount]:
        self._write_config()
        with super().mounted() as mount:
            yield dataclasses.replace(mount, pid=self._worker_pid())


def snapshot_code(work_dir: Path) -> tuple[Path, str]:
    """A frozen copy of tvix_mountd/ for the daemons of one run, and its hash.

    Others may edit the package while a run goes on; every daemon of the run
    starts from this copy (`python -m tvix_mountd.cli` with the copy's parent as
    its working directory, which comes first on sys.path, ahead of the
    editable install), so all repetitions measure the same code, and the
    hash in the results says which.
    """
    source = REPO / "tvix_mountd"
    files = sorted(p for p in source.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(source)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    code_hash = digest.hexdigest()[:12]
    root = work_dir / ".code" / code_hash  # hidden: mypy and ruff skip it
    if not (root / "tvix_mountd").is_dir():
        tmp = work_dir / ".code" / f"{code_hash}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        shutil.copytree(source, tmp / "tvix_mountd", ignore=shutil.ignore_patterns("__pycache__"))
        os.replace(tmp, root)
    return root, code_hash


def whatif_peer(
    data: DataSet,
    work_dir: Path,
    patches: list[str],
    *,
    code_dir: Path | None,
    name: str = "tvix-whatif",
    module: str = "benchmarks.whatif",
) -> TvixPeer:
    """tvix-mountd with the benchmarks.whatif `patches` applied (see that module)."""
    peer = TvixPeer(
        data,
        (work_dir / "mnt" / name).resolve(),
        work_dir / "logs" / f"{name}.log",
        command=[sys.executable, "-m", module],
        code_dir=code_dir,
        read_ahead_kb=1024 if "readahead" in patches else None,
        name=name,
    )
    pythonpath = [str(REPO), os.environ.get("PYTHONPATH", "")]
    peer.env = {
        **os.environ,
        "TVIX_WHATIF": ",".join(patches),
        "PYTHONPATH": os.pathsep.join(p for p in pythonpath if p),
    }
    return peer


def make_peers(
    names: list[str],
    data: DataSet,
    work_dir: Path,
    *,
    peer_read_ahead_kb: int | None = None,
    tvix_read_ahead_kb: int | None = None,
    code_dir: Path | None = None,
    whatif: list[str] | None = None,
) -> list[Peer]:
    mounts = (work_dir / "mnt").resolve()
    logs = work_dir / "logs"
    peers: list[Peer] = []
    for name in names:
        if name == "native":
            peers.append(NativePeer(data))
        elif name == "bindfs":
            peers.append(
                BindfsPeer(
                    data, mounts / name, logs / f"{name}.log", read_ahead_kb=peer_read_ahead_kb
                )
            )
        elif name == "squashfuse":
            peers.append(
                SquashfusePeer(
                    data, mounts / name, logs / f"{name}.log", read_ahead_kb=peer_read_ahead_kb
                )
            )
        elif name == "tvix":
            peers.append(
                TvixPeer(
                    data, mounts / name, logs / f"{name}.log", read_ahead_kb=tvix_read_ahead_kb
                )
            )
        elif name == "tvix-supervised":
            peers.append(
                SupervisedTvixPeer(
                    data, mounts / name, logs / f"{name}.log", (work_dir / "supervised").resolve()
                )
            )
        elif name == "tvix-whatif":
            peers.append(whatif_peer(data, work_dir, whatif or [], code_dir=code_dir))
        else:
            raise ValueError(f"unknown peer {name!r} (known: {', '.join(PEER_NAMES)})")
    return peers
