"""`python -m benchmarks.grpcwalk`: walks and reads of a tree served by a tvix-store over gRPC.

A mount whose services are a gRPC server asks it for each directory the
first time it is opened, and for each file's blob the first time it is
read: a walk (`find`, `du`) waits one round trip per directory, a `cat` of
many small files two per file (Stat, Read). This measures what reading
ahead gives, on the same server, in alternating order: the next
directories (workers/dirahead.py) against the what-if `nodirahead`, the
next files' blobs (workers/prefetch.py) against `noprefetch`.

The server is tests/grpc_server.py's (the real protocol, over a unix socket,
with the data in memory), with its `latency` fault as the network: every
call waits that long before it is answered (0: the same machine). The tree:
DIRS directories of FILES small files each, one store path. Each repetition
mounts afresh (nothing cached in the daemon, its first opens go to the
server) and runs one workload: `find -type f` over the path, `du -s` (which
stats every entry), or `cat` of every file of the first 100
directories (a shell glob: a listing, then the files in name order).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Final

from benchmarks.peers import FusePeer, load_average, vmhwm_kb
from benchmarks.run import DEFAULT_WORK_DIR, REPO, log
from tests.grpc_server import GrpcStoreServer
from tvix_mountd.castore.nodes import Directory, FileNode
from tvix_mountd.castore.pathinfo import PathInfo
from tvix_mountd.castore.storepath import StorePath

VARIANTS: Final = ("tvix", "tvix-whatif")
# Each a command with {} for the tree's path, and the what-if that takes
# away the read-ahead it measures.
WORKLOADS: Final = {
    "find": (["find", "{}", "-type", "f"], "nodirahead"),
    "du": (["du", "-s", "{}"], "nodirahead"),
    # The first 100 directories (d00000-d00099).
    "cat": (["sh", "-c", 'cat "$1"/d000??/* >/dev/null', "sh", "{}"], "noprefetch"),
}


class GrpcTvixPeer(FusePeer):
    def __init__(self, name: str, addr: str, store_path: str, work_dir: Path, whatif: str) -> None:
        super().__init__(
            name,
            (work_dir / "mnt" / f"grpc-{name}").resolve(),
            work_dir / "logs" / f"grpc-{name}.log",
            stop_with_sigterm=True,
        )
        self._addr = addr
        self._store_path = store_path
        self.env = {**os.environ, "TVIX_WHATIF": whatif if name == "tvix-whatif" else ""}
        self.cwd = REPO  # this checkout's tvix_mountd/ and benchmarks/

    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "benchmarks.whatif",
            "mount",
            "--blob-service-addr",
            self._addr,
            "--directory-service-addr",
            self._addr,
            "--path-info-service-addr",
            self._addr,
            str(self.mountpoint),
        ]

    def part_paths(self) -> dict[str, Path]:
        return {"tree": self.mountpoint / self._store_path}


def _fill(server: GrpcStoreServer, dirs: int, files: int) -> str:
    """The tree into the server; its store path's basename."""
    leaves = []
    for d in range(dirs):
        entries = []
        for f in range(files):
            data = f"file {f} of directory {d}\n".encode()
            entries.append((f"f{f:04d}".encode(), FileNode(server.put_blob(data), len(data))))
        leaves.append(Directory(entries))
    for leaf in leaves:
        server.put_directory(leaf)
    top = Directory([(f"d{d:05d}".encode(), leaf.as_node()) for d, leaf in enumerate(leaves)])
    server.put_directory(top)
    store_path = StorePath(hashlib.sha1(b"grpcwalk").digest(), "tree")
    digest = hashlib.sha256(b"not a real NAR").digest()
    server.put_path_info(PathInfo(store_path, top.as_node(), nar_size=1, nar_sha256=digest))
    return store_path.basename


def _run(peer: GrpcTvixPeer, argv: list[str]) -> tuple[float, float]:
    """Seconds, and the daemon's peak RSS (MB) after."""
    with peer.mounted() as mount:
        root = mount.parts["tree"]
        started = time.perf_counter()
        command = [str(root) if arg == "{}" else arg for arg in argv]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - started
        assert mount.pid is not None
        peak = vmhwm_kb(mount.pid)
        assert peak is not None, "the daemon is gone"
        return seconds, peak / 1024


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.grpcwalk", description=__doc__)
    p.add_argument("--dirs", type=int, default=1000)
    p.add_argument("--files", type=int, default=20)
    p.add_argument("--latency-ms", default="0,0.5", help="server latencies, comma-separated")
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    latencies = [float(x) / 1000 for x in args.latency_ms.split(",")]
    with GrpcStoreServer() as server:
        basename = _fill(server, args.dirs, args.files)
        log(f"{args.dirs} directories of {args.files} files at {server.addr}")
        rows = []
        for latency in latencies:
            server.faults.latency = latency
            for workload, (argv, whatif) in WORKLOADS.items():
                peers = {
                    v: GrpcTvixPeer(v, server.addr, basename, DEFAULT_WORK_DIR, whatif)
                    for v in VARIANTS
                }
                times: dict[str, list[float]] = {v: [] for v in VARIANTS}
                peaks: dict[str, list[float]] = {v: [] for v in VARIANTS}
                for rep in range(args.reps):
                    order = VARIANTS if rep % 2 == 0 else VARIANTS[::-1]
                    for variant in order:
                        seconds, peak = _run(peers[variant], argv)
                        times[variant].append(seconds)
                        peaks[variant].append(peak)
                        log(
                            f"latency {latency * 1000:g} ms {workload} rep {rep + 1} {variant}"
                            f" {seconds:.3f} s, VmHWM {peak:.1f} MB (load {load_average():.1f})"
                        )
                with_ahead = statistics.median(times["tvix"])
                without = statistics.median(times["tvix-whatif"])
                peak_rss = (
                    statistics.median(peaks["tvix"]),
                    statistics.median(peaks["tvix-whatif"]),
                )
                rows.append((latency, workload, with_ahead, without, peak_rss, times))
    print(f"\n{args.dirs} directories x {args.files} files; medians of {args.reps}\n")
    print(
        "| server latency | workload | read ahead (default) | what-if without | ratio"
        " | daemon peak RSS, read ahead / not |"
    )
    print("|---:|---|---:|---:|---:|---:|")
    for latency, workload, with_ahead, without, (peak, peak_without), _ in rows:
        print(
            f"| {latency * 1000:g} ms | {workload} | {with_ahead:.3f} s"
            f" | {without:.3f} s ({WORKLOADS[workload][1]})"
            f" | {with_ahead / without:.2f}x | {peak:.1f} / {peak_without:.1f} MB |"
        )
    print("\nall samples (s):")
    for latency, workload, _, _, _, times in rows:
        samples = "; ".join(f"{v}: " + ", ".join(f"{t:.3f}" for t in times[v]) for v in VARIANTS)
        print(f"  {latency * 1000:g} ms {workload}: {samples}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
