"""The workloads, each timed with time.perf_counter and checked for completeness.

Every peer runs exactly the same code. A run returns (seconds, count); the count
(bytes read, entries seen) is compared with what the data set holds, so a peer
that fails part-way cannot look fast.

- read: one file read sequentially in 1 MiB chunks (readinto one buffer).
- walk: `find DIR -printf '%i %s\\n'` at C speed: every entry is listed and
  lstat'ed (%s needs the stat), output counted in lines.
- ls:   the real `ls -f DIR` (no sorting, no stat), output counted in lines.
- lsl:  the real `ls -lU DIR` on the same directory: the whole listing first,
        then every entry lstat'ed, output counted in lines. The case plain
        listings (READDIRPLUS_AUTO) cost most: only the first buffer comes
        with attributes.
- cat:  one in-process loop over the small files in name order:
        open, read until EOF (64 KiB reads), close.
- find: `find DIR -type f` at C speed over the small files, output counted in
        lines: unlike walk, the type comes from the listing (d_type), no stat.
- cat4: 4 processes at once, each the cat loop over its own quarter of the
        small files (consecutive in name order, so each has its own
        directories); the time until the last is done, bytes summed.
- copy: every small file read as a copy or `tar` reads a tree: each
        directory listed (os.walk, in the order it lists), then its files
        opened and read in that order; counted in bytes.
- startup: Debian's python3.11 started from the mount, importing a set of
        stdlib modules (benchmarks.interpreter); counted in loaded modules,
        every one from the mount.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from benchmarks import interpreter
from benchmarks.data import DataSet
from benchmarks.peers import Mount

READ_CHUNK: Final = 1 << 20
CAT_READ: Final = 64 << 10
CONCURRENT_READERS: Final = 4
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


def _timed_output(argv: list[str], env: dict[str, str] = _ENV) -> tuple[float, bytes]:
    """Seconds a command took from start to exit, and its output (it must succeed)."""
    started = time.perf_counter()
    out = subprocess.run(argv, check=True, stdout=subprocess.PIPE, env=env).stdout
    return time.perf_counter() - started, out


def stat_walk(path: str) -> Measurement:
    seconds, out = _timed_output(["find", path, "-printf", "%i %s\n"])
    return Measurement(seconds, out.count(b"\n") - 1)  # without the starting point


def find_files(path: str) -> Measurement:
    seconds, out = _timed_output(["find", path, "-type", "f"])
    return Measurement(seconds, out.count(b"\n"))


def list_directory(path: str) -> Measurement:
    seconds, out = _timed_output(["ls", "-f", path])
    names = out.split(b"\n")
    # Not every filesystem reports "." and ".." (tvix-mountd does not): count entries only.
    count = sum(1 for name in names if name not in (b"", b".", b".."))
    return Measurement(seconds, count)


def long_listing(path: str) -> Measurement:
    seconds, out = _timed_output(["ls", "-lU", "--color=never", path])
    lines = out.split(b"\n")
    count = sum(1 for line in lines[1:] if line)  # without the "total" line
    return Measurement(seconds, count)


def cat_files(paths: Iterable[str]) -> Measurement:
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


def copy_tree(root: str) -> Measurement:
    # The listing happens inside the timed loop, one directory at a time.
    return cat_files(
        f"{directory}/{name}" for directory, _, files in os.walk(root) for name in files
    )


def _cat_in_child(paths: list[str], go: int, result: int) -> None:
    """A forked reader: wait for `go` to close, cat `paths`, write the byte count; never return."""
    status = 1
    try:
        os.read(go, 1)  # EOF once the parent closes its end: all readers start at once
        os.write(result, str(cat_files(paths).count).encode())
        status = 0
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
    finally:
        # The child must not run the harness's cleanups (unmounts) or flush its buffers.
        os._exit(status)


def concurrent_cat(path_sets: list[list[str]]) -> Measurement:
    """`cat_files` over each set in its own process, all at once; bytes summed.

    The readers are forked and waiting before the clock starts, so their
    start-up is not timed; the time ends when the last has exited.
    """
    go_read, go_write = os.pipe()
    readers: list[tuple[int, int]] = []  # (pid, read end of its result pipe)
    try:
        for paths in path_sets:
            result_read, result_write = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(go_write)
                _cat_in_child(paths, go_read, result_write)
            os.close(result_write)
            readers.append((pid, result_read))
        started = time.perf_counter()
        os.close(go_write)
        go_write = -1
        total = 0
        failed: list[int] = []
        for pid, result_read in readers:
            with os.fdopen(result_read, "rb") as result:
                count = result.read()
            _, status = os.waitpid(pid, 0)
            if os.waitstatus_to_exitcode(status) != 0 or not count:
                failed.append(pid)
            else:
                total += int(count)
        seconds = time.perf_counter() - started
    finally:
        os.close(go_read)
        if go_write >= 0:
            os.close(go_write)
    if failed:
        raise IncompleteRun(f"{len(failed)} of {len(path_sets)} concurrent readers failed")
    return Measurement(seconds, total)


def start_interpreter(part: Path, peer: str) -> Measurement:
    """The start-up program of benchmarks.interpreter, run from `part`; counted in modules."""
    seconds, out = _timed_output(interpreter.argv(part), env=interpreter.ENV)
    try:
        return Measurement(seconds, interpreter.loaded_modules(out, part))
    except ValueError as e:
        raise IncompleteRun(f"startup on {peer}: {e}") from None


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

    def lsl(mount: Mount) -> Measurement:
        return long_listing(str(mount.wide_dir))

    def cat(mount: Mount) -> Measurement:
        base = str(mount.small_dir)
        return cat_files([f"{base}/{rel}" for rel in small_rel])

    def find(mount: Mount) -> Measurement:
        return find_files(str(mount.small_dir))

    def cat4(mount: Mount) -> Measurement:
        base = str(mount.small_dir)
        paths = [f"{base}/{rel}" for rel in small_rel]
        n = len(paths)
        quarters = [
            paths[i * n // CONCURRENT_READERS : (i + 1) * n // CONCURRENT_READERS]
            for i in range(CONCURRENT_READERS)
        ]
        return concurrent_cat(quarters)

    def copy(mount: Mount) -> Measurement:
        return copy_tree(str(mount.small_dir))

    def startup(mount: Mount) -> Measurement:
        return start_interpreter(mount.startup_dir, mount.peer)

    by_name = {
        "read": Workload("read", True, read, spec.big_bytes, "bytes"),
        "walk": Workload("walk", True, walk, spec.small_files + spec.small_dirs, "entries"),
        "ls": Workload("ls", True, ls, spec.wide_files, "entries"),
        "lsl": Workload("lsl", True, lsl, spec.wide_files, "entries"),
        "cat": Workload("cat", False, cat, data.small_bytes, "bytes"),
        "find": Workload("find", False, find, spec.small_files, "files"),
        "cat4": Workload("cat4", False, cat4, data.small_bytes, "bytes"),
        "copy": Workload("copy", False, copy, data.small_bytes, "bytes"),
    }
    if data.startup_modules is not None:
        by_name["startup"] = Workload("startup", True, startup, data.startup_modules, "modules")
    return by_name


def why_unavailable(name: str) -> str:
    """Why `workloads()` has no workload `name` on this machine."""
    if name == "startup":
        return interpreter.missing() or "the data set was built without its startup part"
    return "unknown workload"


WORKLOAD_NAMES: Final = ("read", "walk", "ls", "lsl", "cat", "find", "cat4", "copy", "startup")
# Median of this many repetitions unless --reps says otherwise.
DEFAULT_REPS: Final = {
    "read": 3,
    "walk": 5,
    "ls": 5,
    "lsl": 3,
    "cat": 3,
    "find": 5,
    "cat4": 3,
    "copy": 3,
    "startup": 5,
}


def check(workload: Workload, peer: str, m: Measurement) -> None:
    if m.count != workload.expected:
        raise IncompleteRun(
            f"{workload.name} on {peer}: {m.count:,} {workload.unit},"
            f" expected {workload.expected:,}"
        )
