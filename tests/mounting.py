"""Helpers for tests that mount real FUSE filesystems.

`mounted(...)` runs `tvix-mountd mount ...` as a subprocess on a fresh
mountpoint, waits (with a deadline, by polling) until the kernel serves it,
and on the way out stops it with SIGTERM and checks it exited 0 and left
nothing mounted. Whatever goes wrong (a failing test, a daemon that hangs),
the daemon it started is SIGKILLed by its PID and the mountpoint lazily
unmounted, so no process or mount outlives the test.

`BackingStore` is the data side: an embedded store (sqlite files and raw+file
blobs, or objectstore+file blobs when asked, under a directory) or the
in-process gRPC test server, with the same methods for both, so a test runs
unchanged against either.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import mmap
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, TypeVar

import trio

from tests.grpc_server import GrpcStoreServer
from tvix_mountd.castore.digests import B3Digest
from tvix_mountd.castore.importer import import_path
from tvix_mountd.castore.nodes import Directory
from tvix_mountd.castore.pathinfo import PathInfo
from tvix_mountd.castore.store import Store
from tvix_mountd.castore.storepath import source_store_path
from tvix_mountd.workers.mount import detach

T = TypeVar("T")

# Generous: a loaded CI machine under `pytest -n 2` may take seconds to start
# Python, import grpc and pyfuse3, and mount.
START_TIMEOUT: Final = 30.0
STOP_TIMEOUT: Final = 20.0
_POLL: Final = 0.02
STORE_KINDS: Final = ("embedded", "grpc")
# An xdist group for the tests that drop the kernel's caches (machine-wide)
# and those that count what the kernel does not ask because it caches: they
# run one after the other, on one worker (`pytest --dist loadgroup`).
KERNEL_CACHES: Final = "kernel-caches"


# -- waiting ------------------------------------------------------------------


def wait_until(
    condition: Callable[[], bool], timeout: float, what: str, *, details: Callable[[], str] = str
) -> None:
    """Poll `condition` until it holds; AssertionError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{details()}")
        time.sleep(_POLL)


# -- mount table ----------------------------------------------------------------


def _unescape(field: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as \ooo.
    return field.encode().decode("unicode_escape")


def mounts_at(mountpoint: Path | str) -> list[tuple[int, str]]:
    """(mount id, fstype) of everything mounted exactly at `mountpoint`, the
    topmost last. Read straight from /proc/self/mountinfo, independently of
    the code under test."""
    target = os.path.realpath(mountpoint)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if _unescape(fields[4]) == target:
                found.append((int(fields[0]), fields[fields.index("-") + 1]))
    return found


def mount_fstype(mountpoint: Path | str) -> str | None:
    """The fstype of what is mounted at `mountpoint` (the topmost), None if nothing is."""
    found = mounts_at(mountpoint)
    return found[-1][1] if found else None


def is_mounted(mountpoint: Path | str) -> bool:
    return mount_fstype(mountpoint) is not None


# -- the daemon ---------------------------------------------------------------------


@dataclass(frozen=True)
class StoreAddrs:
    blob: str
    directory: str
    path_info: str

    @classmethod
    def embedded(cls, root: Path, blob_scheme: str = "raw+file") -> StoreAddrs:
        return cls(
            f"{blob_scheme}://{root}/blobs",
            f"sqlite://{root}/directories.sqlite",
            f"sqlite://{root}/pathinfo.sqlite",
        )

    @classmethod
    def single(cls, addr: str) -> StoreAddrs:
        return cls(addr, addr, addr)

    def cli_args(self) -> list[str]:
        return [
            "--blob-service-addr",
            self.blob,
            "--directory-service-addr",
            self.directory,
            "--path-info-service-addr",
            self.path_info,
        ]


def mount_command(
    addrs: StoreAddrs,
    mountpoint: Path,
    *,
    list_root: bool = False,
    show_xattr: bool = True,
    backend_timeout: float | None = None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    cmd = [sys.executable, "-m", "tvix_mountd.cli", "mount", *addrs.cli_args(), *extra_args]
    if list_root:
        cmd.append("--list-root")
    cmd += ["--show-xattr", "true" if show_xattr else "false"]
    if backend_timeout is not None:
        cmd += ["--backend-timeout", str(backend_timeout)]
    cmd.append(str(mountpoint))
    return cmd


@dataclass
class Mount:
    """A running `tvix-mountd mount` and its mountpoint."""

    path: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    # What was mounted at `path` before this daemon started (never ours to remove).
    mounted_before: list[tuple[int, str]] = field(default_factory=list)
    served: bool = False  # the daemon mounted and answered
    stopped: bool = False  # the test stopped it with a signal
    killed: bool = False  # the test SIGKILLed it

    def log(self) -> str:
        """Everything the daemon wrote to stderr so far."""
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_for_log(self, needle: str, timeout: float = 10.0) -> str:
        """Poll the log until it contains `needle`; the log then."""
        wait_until(
            lambda: needle in self.log(),
            timeout,
            f"{needle!r} in the daemon's log",
            details=lambda: f"; log:\n{self.log()}",
        )
        return self.log()

    def signal(self, signum: int) -> int:
        """Send `signum` to this daemon, wait for it to exit; its exit status."""
        self.stopped = True
        self.process.send_signal(signum)
        try:
            return self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"tvix-mountd did not exit within {STOP_TIMEOUT:g} s of signal {signum};"
                f" log:\n{self.log()}"
            ) from None

    def kill(self) -> None:
        """SIGKILL this daemon (only it): its mount is left behind, dead (ENOTCONN)."""
        self.killed = True
        self.process.kill()  # a no-op once the process was reaped: never another PID
        self.process.wait(timeout=STOP_TIMEOUT)


def _force_cleanup(mount: Mount) -> None:
    """SIGKILL the daemon we started (if it still runs) and detach its mount."""
    if mount.process.poll() is None:
        mount.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            mount.process.wait(timeout=STOP_TIMEOUT)
    # Detach what this daemon mounted (and, if it cleared a dead mount left
    # there, its replacement), never a mount that was there before it and still is.
    current = mounts_at(mount.path)
    if current and (mount.served or current != mount.mounted_before):
        detach(str(mount.path))


def _wait_mounted(mount: Mount, timeout: float) -> None:
    def ready() -> bool:
        if mount.process.poll() is not None:
            raise AssertionError(
                f"tvix-mountd exited with status {mount.process.returncode} before"
                f" mounting {mount.path}; log:\n{mount.log()}"
            )
        if mount_fstype(mount.path) != "fuse.tvix":
            return False
        try:
            # statfs always reaches the daemon, while stat may be answered from
            # the kernel's attribute cache, even for a dead mount left there
            # (which answers ENOTCONN until the new daemon has replaced it).
            os.statvfs(mount.path)
            st = os.stat(mount.path)
        except OSError:
            return False
        return st.st_ino == 1  # the FUSE root, not the directory underneath

    wait_until(
        ready, timeout, f"{mount.path} to be mounted", details=lambda: f"; log:\n{mount.log()}"
    )
    mount.served = True


def start_mount(
    addrs: StoreAddrs,
    mountpoint: Path,
    log_path: Path,
    *,
    list_root: bool = False,
    show_xattr: bool = True,
    backend_timeout: float | None = None,
    extra_args: Sequence[str] = (),
) -> Mount:
    """Start the daemon (not waiting for anything); stderr and stdout go to `log_path`."""
    cmd = mount_command(
        addrs,
        mountpoint,
        list_root=list_root,
        show_xattr=show_xattr,
        backend_timeout=backend_timeout,
        extra_args=extra_args,
    )
    before = mounts_at(mountpoint)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    return Mount(mountpoint, process, log_path, before)


@contextlib.contextmanager
def mounted(
    addrs: StoreAddrs,
    base: Path,
    *,
    mountpoint: Path | None = None,
    list_root: bool = False,
    show_xattr: bool = True,
    backend_timeout: float | None = None,
    start_timeout: float = START_TIMEOUT,
    extra_args: Sequence[str] = (),
) -> Iterator[Mount]:
    """Mount `addrs` on a fresh directory under `base` (or on `mountpoint`).

    On a normal exit the daemon must stop on SIGTERM with status 0 and leave
    nothing mounted (unless the test SIGKILLed it). On any failure it is
    SIGKILLed and its mount detached, and the original error propagates.
    """
    base.mkdir(parents=True, exist_ok=True)
    if mountpoint is None:
        index = 0
        while (base / f"mnt{index}").exists():
            index += 1
        mountpoint = base / f"mnt{index}"
        mountpoint.mkdir()
    mountpoint = Path(os.path.realpath(mountpoint))
    index = 0
    while (log_path := base / f"{mountpoint.name}-{index}.log").exists():
        index += 1
    mount = start_mount(
        addrs,
        mountpoint,
        log_path,
        list_root=list_root,
        show_xattr=show_xattr,
        backend_timeout=backend_timeout,
        extra_args=extra_args,
    )
    try:
        _wait_mounted(mount, start_timeout)
        yield mount
        if not (mount.killed or mount.stopped):
            if not mount.alive():
                raise AssertionError(
                    f"tvix-mountd died during the test (status {mount.process.returncode});"
                    f" log:\n{mount.log()}"
                )
            status = mount.signal(signal.SIGTERM)
            assert status == 0, f"tvix-mountd exited {status} on SIGTERM; log:\n{mount.log()}"
            assert not is_mounted(mountpoint), f"{mountpoint} still mounted after SIGTERM"
    finally:
        _force_cleanup(mount)


def run_mount_expecting_failure(
    addrs: StoreAddrs,
    mountpoint: Path,
    log_path: Path,
    timeout: float = START_TIMEOUT,
    extra_args: Sequence[str] = (),
) -> tuple[int, str]:
    """Run a mount that must fail: (exit status, its stderr). Cleans up if it did not."""
    mount = start_mount(addrs, mountpoint, log_path, extra_args=extra_args)
    try:
        status = mount.process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"tvix-mountd kept running on {mountpoint}; log:\n{mount.log()}"
        ) from None
    finally:
        _force_cleanup(mount)
    return status, mount.log()


# -- keeping content cached -----------------------------------------------------------


@contextlib.contextmanager
def pinned(path: Path | str) -> Iterator[int]:
    """Keep `path` in the kernel's caches while inside; yields an open descriptor.

    The descriptor pins its inode and dentry (and so every directory above
    it); a shared mapping with every page populated pins its pages: neither
    memory pressure nor drop_caches (which a benchmark running alongside may
    do) evicts them, so the kernel never has to ask the daemon again.

    The mapping is populated by the mmap call itself (MAP_POPULATE, with the
    GIL released) and never touched from Python: a page fault taken while
    holding the GIL would deadlock against the in-process gRPC test server
    that the daemon needs to answer it.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size == 0 or os.path.isdir(path):
            yield fd
            return
        os.pread(fd, size, 0)  # into the page cache first, without the GIL
        flags = mmap.MAP_SHARED | mmap.MAP_POPULATE
        with mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ):
            yield fd
    finally:
        os.close(fd)


# -- errno helpers ---------------------------------------------------------------


def errno_of(fn: Callable[..., object], *args: object) -> int | None:
    """The errno `fn(*args)` fails with, None if it succeeds."""
    try:
        fn(*args)
    except OSError as e:
        return e.errno
    return None


def assert_errno(expected: int, fn: Callable[..., object], *args: object, what: str = "") -> None:
    """`fn(*args)` fails with `expected`."""
    got = errno_of(fn, *args)
    if not what:
        what = f"{getattr(fn, '__name__', fn)}{args!r}"
    assert got == expected, (
        f"{what}: expected {errno.errorcode[expected]},"
        f" got {'success' if got is None else errno.errorcode.get(got, got)}"
    )


# -- the data side -------------------------------------------------------------------


def _run(store_factory: Callable[[], Store], fn: Callable[[Store], Awaitable[T]]) -> T:
    async def main() -> T:
        store = store_factory()
        try:
            return await fn(store)
        finally:
            with trio.CancelScope(shield=True):
                await store.aclose()

    return trio.run(main)


class BackingStore:
    """A store a mount serves: embedded (files under `root`) or the gRPC test server.

    Every method works the same on both kinds; the data goes in through the
    store's real client (import_path, put, put_tree), except where a test
    must damage the store behind the daemon's back (`drop_*`, `blob_file`).
    """

    def __init__(
        self,
        kind: str,
        root: Path,
        server: GrpcStoreServer | None = None,
        blob_scheme: str = "raw+file",
    ) -> None:
        assert kind in STORE_KINDS
        self.kind = kind
        self.root = root
        self.server = server
        if kind == "grpc":
            assert server is not None
            self.addrs = StoreAddrs.single(server.addr)
        else:
            self.addrs = StoreAddrs.embedded(root, blob_scheme)

    def open(self) -> Store:
        return Store.from_addrs(self.addrs.blob, self.addrs.directory, self.addrs.path_info)

    def run(self, fn: Callable[[Store], Awaitable[T]]) -> T:
        """Run `fn(store)` in a fresh trio run with a freshly opened store."""
        return _run(self.open, fn)

    def import_paths(
        self, paths: Sequence[Path], names: Sequence[str | None] = ()
    ) -> list[PathInfo]:
        """import_path each of `paths` (with the matching name, if given)."""
        wanted = list(names) + [None] * (len(paths) - len(names))

        async def go(store: Store) -> list[PathInfo]:
            return [await import_path(store, p, n) for p, n in zip(paths, wanted, strict=True)]

        return self.run(go)

    def add_renamed(self, info: PathInfo, names: Iterable[str]) -> list[PathInfo]:
        """The same tree under other names: the store paths `nix-store --add` would give."""
        renamed = [
            PathInfo(
                store_path=source_store_path(info.nar_sha256, name),
                node=info.node,
                nar_size=info.nar_size,
                nar_sha256=info.nar_sha256,
                ca=info.ca,
            )
            for name in names
        ]
        self.put_path_infos(renamed)
        return renamed

    def put_path_infos(self, infos: Sequence[PathInfo]) -> None:
        async def go(store: Store) -> None:
            for info in infos:
                await store.path_infos.put(info)

        self.run(go)

    def put_blob(self, data: bytes) -> B3Digest:
        async def go(store: Store) -> B3Digest:
            return await store.blobs.put(data)

        return self.run(go)

    def put_tree(self, directories: Sequence[Directory]) -> B3Digest:
        """Directories leaves first; the last is the root (through the store's client)."""

        async def go(store: Store) -> B3Digest:
            return await store.directories.put_tree(directories)

        return self.run(go)

    def preload_tree(self, directories: Sequence[Directory]) -> B3Digest:
        """`put_tree`, but straight into the gRPC server's dict when there is one:
        a huge Directory then costs no upload and no server-side validation."""
        if self.server is None:
            return self.put_tree(directories)
        for directory in directories:
            self.server.put_directory(directory)
        return directories[-1].digest

    # Damage behind the daemon's back.

    def blob_file(self, digest: B3Digest) -> Path:
        assert self.addrs.blob.startswith("raw+file:"), "only raw+file keeps a blob in one file"
        hexdigest = digest.hex()
        return self.root / "blobs" / "b3" / hexdigest[:2] / hexdigest

    def packed_place(self, digest: B3Digest) -> tuple[Path, int, int] | None:
        """(pack, offset, size) of a packed blob of the embedded store."""
        index = self.root / "blobs" / "packs" / "index.sqlite"
        if not index.exists():
            return None
        with contextlib.closing(sqlite3.connect(index)) as db:
            row = db.execute(
                "SELECT pack, offset, size FROM packed WHERE digest = ?", (bytes(digest),)
            ).fetchone()
        return None if row is None else (index.parent / row[0], row[1], row[2])

    def flip_blob_byte(self, digest: B3Digest) -> None:
        """One bit of a stored blob's middle byte flipped, packed or a file."""
        place = self.packed_place(digest)
        if place is None:
            path = self.blob_file(digest)
            path.chmod(0o644)
            place = (path, 0, path.stat().st_size)
        path, offset, size = place
        with open(path, "r+b") as f:
            f.seek(offset + size // 2)
            byte = f.read(1)[0]
            f.seek(offset + size // 2)
            f.write(bytes([byte ^ 0x01]))

    def drop_blob(self, digest: B3Digest) -> None:
        if self.server is not None:
            del self.server.blobs[digest]  # one dict operation: atomic under the GIL
        elif self.packed_place(digest) is not None:
            index = self.root / "blobs" / "packs" / "index.sqlite"
            with contextlib.closing(sqlite3.connect(index)) as db, db:
                db.execute("DELETE FROM packed WHERE digest = ?", (bytes(digest),))
        else:
            self.blob_file(digest).unlink()

    def drop_directory(self, digest: B3Digest) -> None:
        if self.server is not None:
            del self.server.directories[digest]
            return
        database = self.root / "directories.sqlite"
        with contextlib.closing(sqlite3.connect(database)) as conn, conn:
            deleted = conn.execute(
                "DELETE FROM directories WHERE digest = ?", (bytes(digest),)
            ).rowcount
        assert deleted == 1, f"directory {digest} was not in the embedded store"


@contextlib.contextmanager
def backing_store(
    kind: str, root: Path, *, blob_scheme: str = "raw+file"
) -> Iterator[BackingStore]:
    """A fresh, empty store of `kind`; for grpc, a server running until the end.
    An embedded store keeps its blobs under `blob_scheme` (raw+file or objectstore+file)."""
    root.mkdir(parents=True, exist_ok=True)
    if kind == "grpc":
        with GrpcStoreServer() as server:
            yield BackingStore(kind, root, server)
    else:
        yield BackingStore(kind, root, blob_scheme=blob_scheme)


def listdir_bytes(path: Path | str) -> list[bytes]:
    return os.listdir(os.fsencode(path))


# -- directory streams through libc (telldir / seekdir) ------------------------------


class _Dirent(ctypes.Structure):
    # glibc's struct dirent on 64-bit Linux (readdir is readdir64 there).
    _fields_ = (
        ("d_ino", ctypes.c_uint64),
        ("d_off", ctypes.c_int64),
        ("d_reclen", ctypes.c_ushort),
        ("d_type", ctypes.c_ubyte),
        ("d_name", ctypes.c_char * 256),
    )


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.opendir.argtypes = (ctypes.c_char_p,)
_libc.opendir.restype = ctypes.c_void_p
_libc.readdir.argtypes = (ctypes.c_void_p,)
_libc.readdir.restype = ctypes.POINTER(_Dirent)
_libc.telldir.argtypes = (ctypes.c_void_p,)
_libc.telldir.restype = ctypes.c_long
_libc.seekdir.argtypes = (ctypes.c_void_p, ctypes.c_long)
_libc.seekdir.restype = None
_libc.closedir.argtypes = (ctypes.c_void_p,)
_libc.closedir.restype = ctypes.c_int


class DirStream:
    """A libc DIR*: readdir, telldir, seekdir, as C programs (ls, find) use them."""

    def __init__(self, path: Path | str) -> None:
        handle = _libc.opendir(os.fsencode(path))
        if not handle:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
        self._dir: int | None = handle

    def __enter__(self) -> DirStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        handle, self._dir = self._dir, None
        if handle is not None:
            _libc.closedir(handle)

    def read(self) -> tuple[bytes, int] | None:
        """The next (name, d_type), skipping . and ..; None at the end."""
        while True:
            ctypes.set_errno(0)
            entry = _libc.readdir(self._dir)
            if not entry:
                err = ctypes.get_errno()
                if err:
                    raise OSError(err, os.strerror(err))
                return None
            name: bytes = entry.contents.d_name
            if name not in (b".", b".."):
                return name, int(entry.contents.d_type)

    def read_many(self, count: int) -> list[bytes]:
        names: list[bytes] = []
        while len(names) < count:
            item = self.read()
            if item is None:
                break
            names.append(item[0])
        return names

    def tell(self) -> int:
        return int(_libc.telldir(self._dir))

    def seek(self, position: int) -> None:
        _libc.seekdir(self._dir, position)


def read_with_positions(path: Path | str) -> list[tuple[bytes, int, int]]:
    """Every (name, d_type, telldir() after it) of one pass over `path`."""
    out = []
    with DirStream(path) as stream:
        while (item := stream.read()) is not None:
            out.append((item[0], item[1], stream.tell()))
    return out


def read_in_fresh_handles(path: Path | str, chunk: int) -> list[bytes]:
    """Every name of `path`, `chunk` at a time, each chunk through a new
    handle that seeks to where the last one stopped (as a listing resumed
    across opendir calls does)."""
    names: list[bytes] = []
    position = 0
    while True:
        with DirStream(path) as stream:
            if position:
                stream.seek(position)
            got = stream.read_many(chunk)
            position = stream.tell()
        if not got:
            return names
        names += got


# Requests the kernel may hand the daemon ahead of queued FORGETs (fs/fuse/dev.c).
FORGETS_OVERTAKEN: Final = 8


def assert_everything_forgotten(mount: Mount) -> None:
    """Have the kernel forget every inode of `mount`, stop its daemon, and
    check that the daemon held no inode at the end (forget honoured,
    listings the kernel kept included). For tests in the KERNEL_CACHES group."""
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    # The kernel queued a FORGET for everything; it hands queued forgets to
    # the daemon before requests, except that up to 8 requests in a row may
    # overtake them (forget_batch). A request the daemon answers after them
    # is one it read after them: STATFS creates no inode.
    for _ in range(FORGETS_OVERTAKEN + 1):
        os.statvfs(mount.path)
    assert mount.signal(signal.SIGTERM) == 0
    alive = re.findall(r"inodes alive at unmount: (\d+)", mount.log())
    assert alive == ["0"], mount.log()
