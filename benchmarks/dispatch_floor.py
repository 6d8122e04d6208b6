"""`python -m benchmarks.dispatch_floor`: what one FUSE request costs a pyfuse3 +
trio daemon that does nothing.

Mounts a filesystem of one 10-byte file whose handlers return constants (no
store, no inode table), with entry and attribute timeouts of 0 so the kernel
asks every time, and times from this process:

- `fstat` of an open file: exactly one GETATTR round trip;
- `open` + `read` + `close` of the file: LOOKUP, GETATTR, OPEN, READ, RELEASE
  (FLUSH only once: it answers ENOSYS, as tvix-mountd does);
- listing a directory of `--entries` names (`os.listdir`, the getdents calls
  of `ls -f`), first on a fresh mount, then again: OPENDIR, READDIRPLUS until
  the end, RELEASEDIR, each entry with constant attributes (pyfuse3 always
  answers listings with readdirplus, and the kernel then instantiates an
  inode per entry; these entries are cached forever, as tvix-mountd's are).

That is the floor under every tvix-mountd figure: the kernel round trip plus
pyfuse3's dispatch (its session loop takes a trio.Lock and waits for the fd
for every request) plus trio's scheduler. The daemon is started, mounted
and stopped by the harness's FusePeer, as the C peers are.
"""

from __future__ import annotations

import argparse
import errno
import os
import stat
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from benchmarks.peers import FusePeer, clear_stale_mounts
from benchmarks.run import DEFAULT_WORK_DIR, log

DATA: Final = b"0123456789"
DIR_INODE: Final = 3
FIRST_ENTRY_INODE: Final = 1000
FOREVER: Final = 100 * 365 * 24 * 3600.0


def _serve(mountpoint: str, entries: int) -> None:
    """The daemon: one file and one directory, constant answers."""
    import pyfuse3
    import trio

    class NullFilesystem(pyfuse3.Operations):
        def _attributes(self, inode: int) -> pyfuse3.EntryAttributes:
            attr = pyfuse3.EntryAttributes()
            attr.st_ino = inode
            attr.entry_timeout = 0
            attr.attr_timeout = 0
            if inode in (pyfuse3.ROOT_INODE, DIR_INODE):
                attr.st_mode = stat.S_IFDIR | 0o555
            else:
                attr.st_mode = stat.S_IFREG | 0o444
                attr.st_size = len(DATA)
            return attr

        async def getattr(
            self, inode: int, ctx: pyfuse3.RequestContext | None = None
        ) -> pyfuse3.EntryAttributes:
            return self._attributes(inode)

        async def lookup(
            self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
        ) -> pyfuse3.EntryAttributes:
            if parent_inode == pyfuse3.ROOT_INODE and name == b"f":
                return self._attributes(2)
            if parent_inode == pyfuse3.ROOT_INODE and name == b"d":
                return self._attributes(DIR_INODE)
            raise pyfuse3.FUSEError(errno.ENOENT)

        async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
            return inode

        async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
            if fh != DIR_INODE:
                return
            for i in range(start_id, entries):
                attr = self._attributes(FIRST_ENTRY_INODE + i)
                # Cached "forever", as tvix-mountd's entries are.
                attr.entry_timeout = attr.attr_timeout = FOREVER
                if not pyfuse3.readdir_reply(token, b"e%06d" % i, attr, i + 1):
                    break

        async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
            pass

        async def open(
            self, inode: int, flags: int, ctx: pyfuse3.RequestContext
        ) -> pyfuse3.FileInfo:
            return pyfuse3.FileInfo(fh=inode, keep_cache=False)

        async def read(self, fh: int, off: int, size: int) -> bytes:
            return DATA[off : off + size]

    options = set(pyfuse3.default_options) | {"fsname=dispatch-floor", "ro"}
    pyfuse3.init(NullFilesystem(), mountpoint, options)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)


class NullDaemonPeer(FusePeer):
    """This module's do-nothing daemon, started and stopped like the C peers."""

    def __init__(self, mountpoint: Path, log_path: Path, entries: int) -> None:
        super().__init__("dispatch-floor", mountpoint, log_path, stop_with_sigterm=False)
        self._entries = entries

    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "benchmarks.dispatch_floor",
            "--serve",
            str(self.mountpoint),
            "--entries",
            str(self._entries),
        ]

    def part_paths(self) -> dict[str, Path]:
        return {"root": self.mountpoint}


def _measure(mountpoint: str, requests: int, entries: int) -> tuple[float, ...]:
    path = os.path.join(mountpoint, "f")
    fd = os.open(path, os.O_RDONLY)
    try:
        start = time.perf_counter()
        for _ in range(requests):
            os.fstat(fd)
        getattr_us = (time.perf_counter() - start) / requests * 1e6
    finally:
        os.close(fd)
    files = requests // 4
    start = time.perf_counter()
    for _ in range(files):
        fd = os.open(path, os.O_RDONLY)
        os.read(fd, 100)
        os.close(fd)
    file_us = (time.perf_counter() - start) / files * 1e6
    listing_ms = []
    for _ in range(2):
        start = time.perf_counter()
        listed = len(os.listdir(os.path.join(mountpoint, "d")))
        listing_ms.append((time.perf_counter() - start) * 1e3)
        if listed != entries:
            raise RuntimeError(f"listed {listed} entries, expected {entries}")
    return getattr_us, file_us, *listing_ms


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--entries", type=int, default=50_000)
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR)
    parser.add_argument("--serve", metavar="MOUNTPOINT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        _serve(args.serve, args.entries)
        return 0

    work_dir = args.work_dir.resolve()
    clear_stale_mounts(work_dir / "mnt")
    peer = NullDaemonPeer(
        work_dir / "mnt" / "dispatch-floor", work_dir / "logs" / "dispatch-floor.log", args.entries
    )
    results: list[tuple[float, ...]] = []
    for rep in range(1, args.reps + 1):
        with peer.mounted() as mount:
            result = _measure(str(mount.parts["root"]), args.requests, args.entries)
        results.append(result)
        log(
            f"rep {rep}: fstat (1 GETATTR) {result[0]:.1f} us; "
            f"open+read+close (LOOKUP, GETATTR, OPEN, READ, RELEASE) {result[1]:.1f} us; "
            f"listing {args.entries} entries {result[2]:.0f} ms, again {result[3]:.0f} ms"
        )
    median = [statistics.median(r[i] for r in results) for i in range(4)]
    log(
        f"median of {len(results)}: GETATTR {median[0]:.1f} us; "
        f"open+read+close {median[1]:.1f} us; listing {median[2]:.0f} ms, again {median[3]:.0f} ms "
        f"(load average {os.getloadavg()[0]:.1f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
