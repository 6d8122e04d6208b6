"""`python -m benchmarks.bigwalk`: a worker's memory after walking 1,000,000 entries.

DESIGN's target: "Worker RSS after walking 1,000,000 entries: bounded (forget
is honoured), under 300 MB". The store is one store path of `--dirs`
directories of `--entries-per-dir` files (or `--kind symlink`: symlinks), all
different (so no two entries share an inode), built once through the castore
API straight into sqlite (cached under
benchmarks/work/bigwalk-<kind>-<dirs>x<entries>/). A stat walk opens no file,
so the files' blobs are not stored. It is mounted with `tvix-mountd mount`
and walked with `find -printf '%s'` (an lstat of every entry), and the
daemon's memory is read:

- VmHWM and VmRSS right after the walk: the kernel now holds a lookup count
  on every entry it was handed, so every inode is alive in the daemon;
- VmRSS after `echo 2 > /proc/sys/vm/drop_caches`, which makes the kernel
  drop its unused dentries and inodes and send FORGET for them: what
  honouring forget gives back. A directory whose listing the kernel keeps in
  its page cache is not dropped by this, and it holds its entries (see
  tvix_mountd/workers/inodes.py);
- VmRSS after `echo 3` too, which drops the page cache as well: the kept
  listings, then their directories, then what those held;
- the inodes still alive in the daemon when it unmounts (its log line): RSS
  falls only as far as pymalloc can give whole arenas back, so this is the
  figure that shows every forget was honoured.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Final

import trio

from benchmarks.data import tvix_mountd_command
from benchmarks.peers import FusePeer, clear_stale_mounts, status_kb
from benchmarks.run import DEFAULT_WORK_DIR, log
from tvix_mountd.castore.digests import B3Digest
from tvix_mountd.castore.directories.sqlite import SqliteDirectoryService
from tvix_mountd.castore.nodes import Directory, FileNode, Node, SymlinkNode
from tvix_mountd.castore.pathinfo import PathInfo
from tvix_mountd.castore.pathinfos.sqlite import SqlitePathInfoService
from tvix_mountd.castore.storepath import StorePath

STORE_VERSION: Final = 3  # 3: entries of the kind asked for (2 built symlinks whatever the kind)
SETTLE_DEADLINE: Final = 60.0
BACKEND_TIMEOUT: Final = 60.0


def _status_kb(pid: int, field: str) -> int:
    value = status_kb(pid, field)
    if value is None:
        raise RuntimeError(f"no {field} in /proc/{pid}/status")
    return value


def _entry(kind: str, d: int, i: int) -> Node:
    if kind == "symlink":
        return SymlinkNode(b"target-%04d-%06d" % (d, i))
    return FileNode(B3Digest.of(b"%d/%d" % (d, i)), size=1 + i, executable=i % 7 == 0)


async def _build_store(root: Path, kind: str, dirs: int, per_dir: int) -> str:
    """Write the store; return the store path's basename."""
    directories = SqliteDirectoryService(str(root / "directories.sqlite"), timeout=BACKEND_TIMEOUT)
    path_infos = SqlitePathInfoService(str(root / "pathinfo.sqlite"), timeout=BACKEND_TIMEOUT)
    children = [
        Directory((b"e%06d" % i, _entry(kind, d, i)) for i in range(per_dir)) for d in range(dirs)
    ]
    top = Directory((b"d%04d" % d, child.as_node()) for d, child in enumerate(children))
    await directories.put_tree([*children, top])
    store_path = StorePath(bytes(20), "bigwalk")
    await path_infos.put(PathInfo(store_path, top.as_node(), nar_size=0, nar_sha256=bytes(32)))
    await directories.aclose()
    await path_infos.aclose()
    return store_path.basename


def _prepare(work_dir: Path, kind: str, dirs: int, per_dir: int) -> tuple[Path, str]:
    root = work_dir / f"bigwalk-{kind}-{dirs}x{per_dir}"
    marker = root / "store.done"
    expected = {"version": STORE_VERSION, "kind": kind, "dirs": dirs, "per_dir": per_dir}
    if marker.exists():
        done = json.loads(marker.read_text())
        if {k: done.get(k) for k in expected} == expected:
            return root, str(done["basename"])
    if root.exists():
        subprocess.run(["rm", "-rf", str(root)], check=True)
    root.mkdir(parents=True)
    started = time.perf_counter()
    log(f"bigwalk: building {dirs:,} x {per_dir:,} {kind}s in {root}")
    basename = trio.run(_build_store, root, kind, dirs, per_dir)
    os.sync()
    marker.write_text(json.dumps({**expected, "basename": basename}))
    log(f"bigwalk: built in {time.perf_counter() - started:.1f} s")
    return root, basename


class BigWalkPeer(FusePeer):
    def __init__(self, store: Path, basename: str, mountpoint: Path, log_path: Path) -> None:
        super().__init__("tvix", mountpoint, log_path, stop_with_sigterm=True)
        self._store = store
        self._basename = basename

    def argv(self) -> list[str]:
        return [
            *tvix_mountd_command(),
            "mount",
            "--blob-service-addr",
            "memory://",
            "--directory-service-addr",
            f"sqlite://{self._store}/directories.sqlite",
            "--path-info-service-addr",
            f"sqlite://{self._store}/pathinfo.sqlite",
            str(self.mountpoint),
        ]

    def part_paths(self) -> dict[str, Path]:
        return {"bigwalk": self.mountpoint / self._basename}


def _settled_rss_kb(pid: int) -> int:
    """VmRSS once it stops falling (FORGETs arrive in batches), within a deadline."""
    deadline = time.monotonic() + SETTLE_DEADLINE
    last = _status_kb(pid, "VmRSS")
    while time.monotonic() < deadline:
        time.sleep(1.0)  # sampling interval of a value that settles, bounded above
        now = _status_kb(pid, "VmRSS")
        if now >= last:
            return now
        last = now
    return last


def _drop_caches(pid: int, what: int) -> int:
    """The daemon's settled VmRSS after `echo what > drop_caches`."""
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write(f"{what}\n")
    return _settled_rss_kb(pid)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dirs", type=int, default=1_000)
    parser.add_argument("--entries-per-dir", type=int, default=1_000)
    parser.add_argument("--kind", choices=("file", "symlink"), default="file")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR)
    args = parser.parse_args()
    work_dir = args.work_dir.resolve()
    store, basename = _prepare(work_dir, args.kind, args.dirs, args.entries_per_dir)
    mount_dir = work_dir / "mnt"
    clear_stale_mounts(mount_dir)
    peer = BigWalkPeer(store, basename, mount_dir / "bigwalk", work_dir / "logs" / "bigwalk.log")
    expected = 1 + args.dirs + args.dirs * args.entries_per_dir
    with peer.mounted() as mount:
        assert mount.pid is not None
        idle_kb = _status_kb(mount.pid, "VmRSS")
        started = time.perf_counter()
        find = subprocess.run(
            ["find", str(mount.parts["bigwalk"]), "-printf", "%s\n"],
            check=True,
            stdout=subprocess.PIPE,
        )
        seconds = time.perf_counter() - started
        lines = find.stdout.count(b"\n")
        if lines != expected:
            raise RuntimeError(f"find listed {lines:,} entries, expected {expected:,}")
        hwm_kb = _status_kb(mount.pid, "VmHWM")
        rss_kb = _status_kb(mount.pid, "VmRSS")
        # The inode table's state file (a memfd the supervisor keeps for the
        # next worker) counts as shared memory; the rest is the process's own.
        anon_kb = _status_kb(mount.pid, "RssAnon")
        shmem_kb = _status_kb(mount.pid, "RssShmem")
        forgotten_kb = _drop_caches(mount.pid, 2)
        dropped_kb = _drop_caches(mount.pid, 3)
    alive = re.findall(r"inodes alive at unmount: (\d+)", peer.log_path.read_text())
    log(
        f"bigwalk: walked {lines:,} entries ({args.kind}s) in {seconds:.1f} s; daemon RSS idle "
        f"{idle_kb / 1024:.1f} MB, after the walk {rss_kb / 1024:.1f} MB (VmHWM "
        f"{hwm_kb / 1024:.1f} MB, {(hwm_kb - idle_kb) * 1024 / lines:.0f} B per entry;"
        f" anonymous {anon_kb / 1024:.1f} MB, state file {shmem_kb / 1024:.1f} MB), "
        f"after drop_caches 2 (kernel forgets) {forgotten_kb / 1024:.1f} MB, "
        f"after drop_caches 3 (listings too) {dropped_kb / 1024:.1f} MB; "
        f"inodes alive at unmount: {alive[-1] if alive else 'not logged'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
