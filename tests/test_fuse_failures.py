"""Real FUSE mounts when things go wrong: holes and missing blobs in the
store, a lying, hanging or unreachable backend, damaged blob files, signals,
bad mountpoints and dead mounts left behind.

Every test gets its own store and mount: faults must not leak between tests.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import signal
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest

from tests.mounting import (
    BackingStore,
    Mount,
    StoreAddrs,
    assert_errno,
    backing_store,
    errno_of,
    is_mounted,
    mounted,
    pinned,
    run_mount_expecting_failure,
    wait_until,
)
from tvix_mountd.castore.digests import B3Digest
from tvix_mountd.castore.nodes import DirectoryNode
from tvix_mountd.castore.pathinfo import PathInfo
from tvix_mountd.castore.store import Store
from tvix_mountd.workers.filesystem import READS_WITHOUT_OPEN

pytestmark = [
    pytest.mark.fuse,
]

# A functional bound for an operation on a hung backend (timeout 1 s), not a benchmark.
HANG_BOUND: Final = 10.0
BIG: Final = random.Random(5).randbytes(1024 * 1024 + 4321)


# -- data -------------------------------------------------------------------------


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)


@dataclass
class Served:
    """A store with two trees ("t" and "t2"), the sources, and what was imported."""

    store: BackingStore
    src: Path
    infos: dict[str, PathInfo]

    def basename(self, key: str) -> str:
        return self.infos[key].store_path.basename

    def digest(self, key: str, *parts: str) -> B3Digest:
        """The digest of a directory (from the store) or a file (from its bytes)."""
        path = self.src.joinpath(key, *parts)
        if path.is_dir():
            node = self.infos[key].node
            assert isinstance(node, DirectoryNode)

            async def walk(store: Store) -> B3Digest:
                digest = node.digest
                for part in parts:
                    directory = await store.directories.get(digest)
                    assert directory is not None
                    child = directory[part.encode()]
                    assert isinstance(child, DirectoryNode)
                    digest = child.digest
                return digest

            return self.store.run(walk)
        return B3Digest.of(path.read_bytes())


def _populate(store: BackingStore, base: Path) -> Served:
    src = base / "src"
    t = src / "t"
    _write(t / "good.txt", b"a good file\n")
    _write(t / "other.txt", b"another good file\n")
    _write(t / "big.bin", BIG)
    _write(t / "small.bin", b"small, one page\n")
    _write(t / "sub" / "x", b"x\n")
    _write(t / "hole" / "inside.txt", b"unreachable\n")
    _write(src / "t2" / "good.txt", b"the good file of t2\n")
    infos = dict(zip(["t", "t2"], store.import_paths([t, src / "t2"]), strict=True))
    return Served(store, src, infos)


@pytest.fixture
def served(store_kind: str, tmp_path: Path) -> Iterator[Served]:
    with backing_store(store_kind, tmp_path / "store") as store:
        yield _populate(store, tmp_path)


@pytest.fixture
def served_grpc(tmp_path: Path) -> Iterator[Served]:
    with backing_store("grpc", tmp_path / "store") as store:
        yield _populate(store, tmp_path)


def _timed(fn: Callable[[], object]) -> tuple[int | None, float]:
    start = time.monotonic()
    err = errno_of(fn)
    return err, time.monotonic() - start


def _assert_serves(mount: Mount, served: Served) -> None:
    """The daemon lives and still serves good content."""
    assert mount.alive(), mount.log()
    assert (mount.path / served.basename("t2") / "good.txt").read_bytes() == (
        b"the good file of t2\n"
    )


# -- holes and missing blobs (both stores) ------------------------------------------------


def test_directory_hole(served: Served, tmp_path: Path) -> None:
    hole = served.digest("t", "hole")
    served.store.drop_directory(hole)
    with mounted(served.store.addrs, tmp_path) as mount:
        t = mount.path / served.basename("t")
        # The directory itself is described by its parent: it stats fine.
        st = os.stat(t / "hole")
        assert stat.S_ISDIR(st.st_mode) and st.st_mode & 0o777 == 0o555
        assert st.st_size == 1
        assert sorted(os.listdir(t)) == [
            "big.bin",
            "good.txt",
            "hole",
            "other.txt",
            "small.bin",
            "sub",
        ]
        # Reading inside it fails, every time, and says which directory.
        for _ in range(2):
            assert_errno(errno.EIO, lambda: os.listdir(t / "hole"))
            assert_errno(errno.EIO, lambda: os.stat(t / "hole" / "inside.txt"))
        mount.wait_for_log(str(hole))
        assert (t / "good.txt").read_bytes() == b"a good file\n"
        _assert_serves(mount, served)


def test_missing_blob(served: Served, tmp_path: Path) -> None:
    digest = served.digest("t", "big.bin")
    served.store.drop_blob(digest)
    with mounted(served.store.addrs, tmp_path) as mount:
        big = mount.path / served.basename("t") / "big.bin"
        assert os.stat(big).st_size == len(BIG)  # the node knows its size
        for _ in range(2):
            if READS_WITHOUT_OPEN:
                # Opening asks the daemon nothing: the first read fails.
                os.close(os.open(big, os.O_RDONLY))
            else:
                assert_errno(errno.EIO, lambda: os.open(big, os.O_RDONLY))
            assert_errno(errno.EIO, big.read_bytes)
        mount.wait_for_log(str(digest))
        assert (mount.path / served.basename("t") / "other.txt").read_bytes() == (
            b"another good file\n"
        )
        _assert_serves(mount, served)


# -- a lying gRPC backend ---------------------------------------------------------------------


@dataclass(frozen=True)
class Lie:
    fault: str
    target: tuple[str, ...]  # below t; () is the store path t itself
    errnos: frozenset[int]


LIES: Final = [
    Lie("wrong_directory_digest", ("sub",), frozenset({errno.EIO})),
    Lie("unsorted_directory", ("sub",), frozenset({errno.EIO})),
    Lie("two_directories", ("sub",), frozenset({errno.EIO})),
    Lie("corrupt_blob", ("big.bin",), frozenset({errno.EIO})),
    Lie("short_blob", ("big.bin",), frozenset({errno.EIO})),
    Lie("corrupt_blob", ("small.bin",), frozenset({errno.EIO})),
    Lie("short_blob", ("small.bin",), frozenset({errno.EIO})),
    Lie("wrong_pathinfo", (), frozenset({errno.EIO, errno.ENOENT})),
]


def _access(path: Path, expected: bytes | None) -> list[str] | bytes:
    """List a directory (`expected` None), or read a file to its end."""
    if expected is None:
        return sorted(os.listdir(path))
    return path.read_bytes()


@pytest.mark.parametrize("lie", LIES, ids=[f"{x.fault}-{'/'.join(x.target) or 't'}" for x in LIES])
def test_lying_backend_is_eio_and_the_mount_survives(
    served_grpc: Served, tmp_path: Path, lie: Lie
) -> None:
    served = served_grpc
    server = served.store.server
    assert server is not None
    source = served.src.joinpath("t", *lie.target)
    expected = source.read_bytes() if source.is_file() else None
    digest = served.digest("t", *lie.target) if lie.target else None
    with mounted(served.store.addrs, tmp_path) as mount:
        t = mount.path / served.basename("t")
        target = t.joinpath(*lie.target)
        with contextlib.ExitStack() as cached:
            # Cache (and pin) what must keep working: t2, and t's listing
            # unless t itself is the target.
            cached.enter_context(pinned(mount.path / served.basename("t2") / "good.txt"))
            if lie.target:
                cached.enter_context(pinned(t))
            setattr(server.faults, lie.fault, True)
            for _ in range(2):
                got = errno_of(lambda: _access(target, expected))
                assert got in lie.errnos, (
                    f"{lie.fault}: expected {sorted(errno.errorcode[e] for e in lie.errnos)},"
                    f" got {'success' if got is None else errno.errorcode[got]};"
                    f" log:\n{mount.log()}"
                )
            if digest is not None:
                mount.wait_for_log(str(digest))
            _assert_serves(mount, served)
        # Once the backend tells the truth again, the same content is served, correctly.
        setattr(server.faults, lie.fault, False)
        got_back = _access(target, expected)
        if expected is None:
            assert got_back == sorted(os.listdir(source))
        else:
            assert got_back == expected, f"{lie.fault}: wrong bytes served after the fault"
        _assert_serves(mount, served)


# -- a damaged embedded store ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["big.bin", "small.bin"])
def test_corrupted_blob_file_is_eio(tmp_path: Path, name: str) -> None:
    with backing_store("embedded", tmp_path / "store") as store:
        served = _populate(store, tmp_path)
        store.flip_blob_byte(served.digest("t", name))
        with mounted(store.addrs, tmp_path) as mount:
            path = mount.path / served.basename("t") / name
            for _ in range(2):  # the kernel retries a failed page: it must fail too
                assert_errno(
                    errno.EIO, path.read_bytes, what=f"reading corrupted {name} to the end"
                )
            mount.wait_for_log(str(served.digest("t", name)))
            _assert_serves(mount, served)


def test_truncated_blob_file_is_eio(tmp_path: Path) -> None:
    with backing_store("embedded", tmp_path / "store") as store:
        served = _populate(store, tmp_path)
        digest = served.digest("t", "big.bin")
        blob = store.blob_file(digest)
        blob.chmod(0o644)
        os.truncate(blob, len(BIG) // 2)
        with mounted(store.addrs, tmp_path) as mount:
            path = mount.path / served.basename("t") / "big.bin"
            assert_errno(errno.EIO, path.read_bytes)
            mount.wait_for_log(str(digest))
            _assert_serves(mount, served)


# -- a hanging or unreachable gRPC backend -------------------------------------------------------


def test_hanging_backend_fails_in_bounded_time_and_recovers(
    served_grpc: Served, tmp_path: Path
) -> None:
    served = served_grpc
    server = served.store.server
    assert server is not None
    with mounted(served.store.addrs, tmp_path, backend_timeout=1) as mount:
        t = mount.path / served.basename("t")
        t2_good = mount.path / served.basename("t2") / "good.txt"
        unknown = mount.path / ("0" * 32 + "-never-added")
        # Warm up: t's listing, t2's file, attributes; pinned in the kernel's
        # caches (an inode the kernel forgets takes the daemon's cache of it along).
        listing = sorted(os.listdir(t))
        with pinned(t), pinned(t2_good) as good:
            assert os.pread(good, 100, 0) == b"the good file of t2\n"
            size = os.stat(t / "good.txt").st_size
            server.faults.hang = True
            try:
                # What needs the backend fails with EIO, within the bound.
                for what, op in [
                    ("listing an unfetched directory", lambda: os.listdir(t / "sub")),
                    ("opening an unread file", (t / "other.txt").read_bytes),
                    ("looking up an unknown store path", lambda: os.stat(unknown)),
                    ("looking up an unfetched store path", lambda: os.stat(t / "sub" / "x")),
                ]:
                    err, seconds = _timed(op)
                    assert err == errno.EIO, f"{what}: {err and errno.errorcode[err]}"
                    assert seconds < HANG_BOUND, f"{what} took {seconds:.1f} s"
                # What is cached keeps being served.
                assert sorted(os.listdir(t)) == listing, mount.log()
                assert os.stat(t / "good.txt").st_size == size
                assert os.pread(good, 100, 0) == b"the good file of t2\n"
                assert mount.alive()
                mount.wait_for_log("no progress")
                # Opening a file that is open already needs no backend: its
                # blob's reader is held (readers are shared per inode).
                err, seconds = _timed(t2_good.read_bytes)
                assert err is None and seconds < HANG_BOUND, (err, seconds)
            finally:
                server.faults.hang = False
        # Released: everything serves again, nothing negative was cached.
        assert os.listdir(t / "sub") == ["x"]
        assert (t / "other.txt").read_bytes() == b"another good file\n"
        assert t2_good.read_bytes() == b"the good file of t2\n"
        assert_errno(errno.ENOENT, lambda: os.stat(unknown))


def test_unreachable_backend_at_mount_time(tmp_path: Path) -> None:
    addrs = StoreAddrs.single(f"grpc+unix://{tmp_path}/no-such-dir/store.sock")
    some_path = "0" * 32 + "-anything"
    with mounted(addrs, tmp_path, backend_timeout=1) as mount:
        assert stat.S_ISDIR(os.stat(mount.path).st_mode)
        for _ in range(2):
            err, seconds = _timed(lambda: os.stat(mount.path / some_path))
            assert err == errno.EIO and seconds < HANG_BOUND, (err, seconds)
        # A name that cannot be a store path needs no backend.
        assert_errno(errno.ENOENT, lambda: os.stat(mount.path / "not-a-store-path"))
        assert mount.alive(), mount.log()
        assert "Traceback" not in mount.log()


def test_backend_down_at_mount_time_then_back(served_grpc: Served, tmp_path: Path) -> None:
    served = served_grpc
    server = served.store.server
    assert server is not None
    server.faults.unavailable = True
    try:
        with mounted(served.store.addrs, tmp_path, backend_timeout=1) as mount:
            t = mount.path / served.basename("t")
            assert_errno(errno.EIO, lambda: os.stat(t))
            server.faults.unavailable = False
            # The client reconnects with a backoff: poll until it is back.
            wait_until(lambda: errno_of(lambda: os.stat(t)) is None, 15, "the backend to return")
            assert (t / "good.txt").read_bytes() == b"a good file\n"
            assert mount.alive()
    finally:
        server.faults.unavailable = False


# -- signals, mountpoints, dead mounts -------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_unmounts_cleanly(tmp_path: Path, signum: int) -> None:
    with backing_store("embedded", tmp_path / "store") as store:
        served = _populate(store, tmp_path)
        with mounted(store.addrs, tmp_path) as mount:
            good = mount.path / served.basename("t") / "good.txt"
            assert good.read_bytes() == b"a good file\n"
            # A file held open (a busy mount) does not stop the unmount.
            fd = os.open(good, os.O_RDONLY)
            try:
                status = mount.signal(signum)
            finally:
                # Its flush finds the connection gone: the kernel says ENOTCONN, and closes.
                assert errno_of(lambda: os.close(fd)) in (None, errno.ENOTCONN)
            assert status == 0, mount.log()
            assert not is_mounted(mount.path)
            assert os.listdir(mount.path) == []  # the plain directory again
            assert f"received {signal.Signals(signum).name}" in mount.log()


def test_bad_mountpoints_are_refused(tmp_path: Path) -> None:
    addrs = StoreAddrs.embedded(tmp_path / "store")
    not_empty = tmp_path / "not-empty"
    _write(not_empty / "file", b"x")
    a_file = tmp_path / "a-file"
    _write(a_file, b"x")
    cases = {
        "not empty": (not_empty, "not empty"),
        "a file": (a_file, "not a directory"),
        "missing": (tmp_path / "missing", "not a directory"),
    }
    for what, (mountpoint, message) in cases.items():
        status, log = run_mount_expecting_failure(addrs, mountpoint, tmp_path / f"{what}.log")
        assert status != 0, f"{what}: exit 0"
        assert message in log and "Traceback" not in log, f"{what}: {log}"
        assert not is_mounted(mountpoint), what
    assert (not_empty / "file").read_bytes() == b"x"
    # A mountpoint with a live mount on it is refused, and the live mount keeps serving.
    with mounted(addrs, tmp_path) as live:
        status, log = run_mount_expecting_failure(addrs, live.path, tmp_path / "twice.log")
        assert status != 0 and "already" in log and "Traceback" not in log, log
        assert os.stat(live.path).st_ino == 1
        assert live.alive()


def test_dead_mount_is_cleared_by_the_next_mount(served: Served, tmp_path: Path) -> None:
    with mounted(served.store.addrs, tmp_path) as first:
        assert (first.path / served.basename("t") / "good.txt").read_bytes()
        first.kill()
        # Whatever needs the daemon fails; the root's attributes are cached "forever"
        # by the kernel, so stat alone may still succeed.
        assert_errno(errno.ENOTCONN, lambda: os.statvfs(first.path))
        assert_errno(errno.ENOTCONN, lambda: os.stat(first.path / served.basename("t2")))
        assert is_mounted(first.path)
        with mounted(served.store.addrs, tmp_path, mountpoint=first.path) as second:
            good = second.path / served.basename("t") / "good.txt"
            assert good.read_bytes() == b"a good file\n"
            assert "dead FUSE mount" in second.log()
        assert not is_mounted(first.path)
        assert os.listdir(first.path) == []
