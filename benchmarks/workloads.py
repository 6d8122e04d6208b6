"""The workloads, each timed with time.perf_counter and checked for completeness.

Every peer runs exactly the same code. A run returns (seconds, count); the count
(bytes read, entries seen) is compared with what the data set holds, so a peer
that fails part-way cannot look fast.

- read: one file read sequentially in 1 MiB chunks (readinto one buffer).
- walk: `find DIR -printf '%i %s\\n'` at C speed: every entry is listed and
  lstat'ed (%s needs the stat), output counted in lines.
- ls:   the real `ls -f DIR` (no sorting, no stat), output counted in lines.
- cat:  one in-process loop over the small files in name order:
        open, read until EOF (64 KiB reads), close.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from benchmarks.data import DataSet
from benchmarks.peers import Mount

READ_CHUNK: Final = 1 << 20
CAT_READ: Final = 64 << 10
_ENV: Final = {**os.environ, "LC_ALL": "C"}


@dataclass(frozen=True)
class Measurement:
    seconds: float
    count: int


class IncompleteRun(RuntimeError):
    """A workload saw less (or more) than the data set holds."""


def drop_caches() -> None:
    """Write back, then drop page cache, dentries and inodes (needs root)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def sequential_read(path: str) -> Measurement:
    buf = bytearray(READ_CHUNK)
    total = 0
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            total += n
    return Measurement(time.perf_counter() - started, total)


def stat_walk(path: str) -> Measurement:
    started = time.perf_counter()
    out = subprocess.run(
        ["find", path, "-printf", "%i %s\n"], check=True, stdout=subprocess.PIPE, env=_ENV
    ).stdout
    seconds = time.perf_counter() - started
    return Measurement(seconds, out.count(b"\n") - 1)  # without the starting point


def list_directory(path: str) -> Measurement:
    started = time.perf_counter()
    out = subprocess.run(["ls", "-f", path], check=True, stdout=subprocess.PIPE, env=_ENV).stdout
    seconds = time.perf_counter() - started
    names = out.split(b"\n")
    # Not every filesystem reports "." and ".." (tvix-mountd does not): count entries only.
    count = sum(1 for name in names if name not in (b"", b".", b".."))
    return Measurement(seconds, count)


def cat_files(paths: list[str]) -> Measurement:
    total = 0
    read, close, open_, rdonly = os.read, os.close, os.open, os.O_RDONLY
    started = time.perf_counter()
    for path in paths:
        fd = open_(path, rdonly)
        try:
            while chunk := read(fd, CAT_READ):
                total += len(chunk)
        finally:
            close(fd)
    return Measurement(time.perf_counter() - started, total)


@dataclass(frozen=True)
class Workload:
    """A group of rows: a cold run on a fresh mount with dropped caches,
    optionally followed at once by a warm run on the same mount."""

    name: str
    warm: bool
    run: Callable[[Mount], Measurement]
    expected: int
    unit: str  # what `count` counts, for messages


def workloads(data: DataSet) -> dict[str, Workload]:
    spec = data.spec
    small_rel = list(spec.small_relpaths())

    def read(mount: Mount) -> Measurement:
        return sequential_read(str(mount.big_file))

    def walk(mount: Mount) -> Measurement:
        return stat_walk(str(mount.small_dir))

    def ls(mount: Mount) -> Measurement:
        return list_directory(str(mount.wide_dir))

    def cat(mount: Mount) -> Measurement:
        base = str(mount.small_dir)
        return cat_files([f"{base}/{rel}" for rel in small_rel])

    return {
        "read": Workload("read", True, read, spec.big_bytes, "bytes"),
        "walk": Workload("walk", True, walk, spec.small_files + spec.small_dirs, "entries"),
        "ls": Workload("ls", True, ls, spec.wide_files, "entries"),
        "cat": Workload("cat", False, cat, data.small_bytes, "bytes"),
    }


WORKLOAD_NAMES: Final = ("read", "walk", "ls", "cat")
# Median of this many repetitions unless --reps says otherwise.
DEFAULT_REPS: Final = {"read": 3, "walk": 5, "ls": 5, "cat": 3}


def check(workload: Workload, peer: str, m: Measurement) -> None:
    if m.count != workload.expected:
        raise IncompleteRun(
            f"{workload.name} on {peer}: {m.count:,} {workload.unit},"
            f" expected {workload.expected:,}"
        )
