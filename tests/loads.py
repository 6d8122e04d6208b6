"""Client load that a worker's death must not disturb: the ways running
programs use a mount, each in a process of its own.

- `pread`: one file descriptor opened once, its pages dropped before every
  pread (posix_fadvise DONTNEED), so that every read reaches the worker.
- `openat`: a directory descriptor opened once; files opened, read and
  stat'd relative to it.
- `mmap`: a file mapped once; the mapping's pages dropped (madvise) and the
  page cache's too, then read again through the mapping (page faults that
  become READ requests).
- `cwd`: a process whose working directory is inside the mount, using
  relative paths: list, stat, readlink, read.

Each records every failed operation (with its time and errno) and its
slowest operations, and checks every byte it reads against the source.
`Reader` (supervising.py) adds the walkers.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from tests.mounting import wait_until

KINDS: Final = ("pread", "openat", "mmap", "cwd")


def _load(spec_file: str) -> None:  # pragma: no cover - runs in a separate process
    """One kind of load until told to stop. Stdlib only (a fresh interpreter)."""
    import errno
    import hashlib
    import json
    import mmap
    import os
    import time

    with open(spec_file) as f:
        spec = json.load(f)
    kind: str = spec["kind"]
    directory: str = spec["directory"]
    files: dict[str, str] = spec["files"]  # name -> sha256, in `directory`
    link: list[str] | None = spec["link"]  # [name, target] in `directory`
    stop_file: str = spec["stop_file"]
    deadline = time.monotonic() + spec["max_seconds"]
    ops = 0
    failure_count = 0
    failures: list[dict[str, object]] = []
    slowest: list[float] = []

    def fail(op: str, what: str) -> None:
        nonlocal failure_count
        failure_count += 1
        if len(failures) < 100:
            failures.append({"t": time.monotonic(), "op": op, "error": what})

    def describe(e: OSError) -> str:
        return errno.errorcode.get(e.errno or 0, str(e.errno)) + f" {e.strerror}"

    def check(op: str, data: bytes, name: str) -> None:
        if hashlib.sha256(data).hexdigest() != files[name]:
            fail(op, f"{name}: content differs ({len(data)} bytes)")

    def read_fd(fd: int) -> bytes:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)

    names = sorted(files)
    big = max(names, key=lambda n: os.stat(os.path.join(directory, n)).st_size)
    setup: dict[str, object] = {}
    if kind == "pread":
        setup["fd"] = os.open(os.path.join(directory, big), os.O_RDONLY)
    elif kind == "openat":
        setup["dirfd"] = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    elif kind == "mmap":
        fd = os.open(os.path.join(directory, big), os.O_RDONLY)
        setup["fd"] = fd
        setup["map"] = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
    elif kind == "cwd":
        os.chdir(directory)
    else:
        raise ValueError(kind)

    def step() -> None:
        if kind == "pread":
            fd = setup["fd"]
            assert isinstance(fd, int)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            check("pread", os.pread(fd, 1 << 24, 0), big)
        elif kind == "openat":
            dirfd = setup["dirfd"]
            assert isinstance(dirfd, int)
            for name in names:
                os.stat(name, dir_fd=dirfd)
                fd = os.open(name, os.O_RDONLY, dir_fd=dirfd)
                try:
                    check("openat", read_fd(fd), name)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
        elif kind == "mmap":
            mapping = setup["map"]
            fd = setup["fd"]
            assert isinstance(mapping, mmap.mmap) and isinstance(fd, int)
            mapping.madvise(mmap.MADV_DONTNEED)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            check("mmap", mapping[:], big)
        else:
            listing = sorted(os.listdir("."))
            expected = sorted([*names, *([link[0]] if link else [])])
            if listing != expected:
                fail("listdir", f"listing differs: {listing[:5]}")
            if link and os.readlink(link[0]) != link[1]:
                fail("readlink", f"{link[0]} points elsewhere")
            for name in names:
                os.stat(name)
                with open(name, "rb") as f:
                    check("read", f.read(), name)
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)

    while not os.path.exists(stop_file) and time.monotonic() < deadline:
        started = time.monotonic()
        try:
            step()
        except OSError as e:
            fail(kind, describe(e))
        took = time.monotonic() - started
        slowest = sorted([*slowest, took])[-5:]
        ops += 1
        if ops % 10 == 0:
            with open(spec["progress_file"] + ".tmp", "w") as f:
                json.dump({"ops": ops, "failures": failure_count}, f)
            os.replace(spec["progress_file"] + ".tmp", spec["progress_file"])
    result = {
        "ops": ops,
        "failure_count": failure_count,
        "failures": failures,
        "slowest": slowest,
    }
    with open(spec["result_file"] + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(spec["result_file"] + ".tmp", spec["result_file"])


@dataclass
class LoadResult:
    kind: str
    ops: int
    failure_count: int
    failures: list[dict[str, Any]]
    slowest: list[float]


class Load:
    """One load process on `directory` (inside a mount), whose files are
    those of `source` (the tree it was imported from)."""

    def __init__(
        self, workdir: Path, kind: str, directory: Path, source: Path, max_seconds: float = 300.0
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.kind = kind
        self.stop_file = workdir / "stop"
        self.progress_file = workdir / "progress.json"
        self.result_file = workdir / "result.json"
        files = {
            p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in source.iterdir()
            if p.is_file() and not p.is_symlink()
        }
        links = [p for p in source.iterdir() if p.is_symlink()]
        spec = {
            "kind": kind,
            "directory": str(directory),
            "files": files,
            "link": [links[0].name, os.readlink(links[0])] if links else None,
            "stop_file": str(self.stop_file),
            "progress_file": str(self.progress_file),
            "result_file": str(self.result_file),
            "max_seconds": max_seconds,
        }
        spec_file = workdir / "spec.json"
        spec_file.write_text(json.dumps(spec))
        code = inspect.getsource(_load) + f"\n_load({str(spec_file)!r})\n"
        self.process = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.DEVNULL, cwd=workdir
        )

    def ops(self) -> int:
        try:
            ops: int = json.loads(self.progress_file.read_text())["ops"]
        except (FileNotFoundError, json.JSONDecodeError):
            return 0
        return ops

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise AssertionError(f"the {self.kind} load exited with {self.process.returncode}")

    def stop(self, timeout: float = 30.0) -> LoadResult:
        self.stop_file.touch()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the {self.kind} load did not stop") from None
        assert self.process.returncode == 0, f"the {self.kind} load exited with {self.process}"
        return LoadResult(self.kind, **json.loads(self.result_file.read_text()))

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@contextlib.contextmanager
def loads(
    workdir: Path, directory: Path, source: Path, kinds: Sequence[str] = KINDS
) -> Iterator[list[Load]]:
    """One Load per kind on `directory`; every one killed on the way out if still running."""
    started: list[Load] = []
    try:
        for kind in kinds:
            started.append(Load(workdir / kind, kind, directory, source))
        yield started
    finally:
        for load in started:
            load.kill()


def wait_progress(running: Sequence[Load], ops: int = 3, timeout: float = 30.0) -> None:
    """Wait until every load has done `ops` more operations than now."""
    targets = [(load, load.ops() + ops) for load in running]

    def done() -> bool:
        for load, target in targets:
            load.check_alive()
            if load.ops() < target:
                return False
        return True

    wait_until(done, timeout, f"every load to do {ops} more operations")
