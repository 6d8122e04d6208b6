"""`python -m benchmarks.profile`: where a tvix-mountd daemon spends one workload.

Two passes on the same (cached) data, each on a fresh mount with dropped caches:

1. probe: the daemon runs as `python -m benchmarks.tvix_probe mount ...`, which
   counts and times every request handler. SIGUSR1 brackets exactly the
   measured run, so the numbers are: requests per op, wall time inside our
   handlers, the daemon's CPU time, read sizes. Daemon CPU minus handler time
   is what pyfuse3 + trio (+ libfuse) cost around the handlers.
2. py-spy: the plain daemon, sampled with `py-spy record --pid` (with --native,
   so pyfuse3's Cython frames and libfuse show up; that pauses the process per
   sample, so the rate is kept low). Each sample is put in one bucket: inside
   a handler (ours / backend / hashing / trio called from a handler) or
   dispatch (pyfuse3 / libfuse / trio loop), by the innermost frame that
   belongs to a known package.

`--phase warm` runs the workload once cold first and profiles the second run.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

from benchmarks import data as data_mod
from benchmarks import peers as peers_mod
from benchmarks.run import DEFAULT_WORK_DIR, REPO, log
from benchmarks.workloads import (
    WORKLOAD_NAMES,
    Measurement,
    Workload,
    drop_caches,
    why_unavailable,
    workloads,
)

SNAPSHOT_DEADLINE: Final = 10.0


def _tvix_peer(
    dataset: data_mod.DataSet, work_dir: Path, probe_out: Path | None
) -> peers_mod.TvixPeer:
    code_dir, code_hash = peers_mod.snapshot_code(work_dir)
    log(f"tvix_mountd/ content hash {code_hash}")
    peer = peers_mod.TvixPeer(
        dataset,
        (work_dir / "mnt" / "tvix-profile").resolve(),
        work_dir / "logs" / "tvix-profile.log",
        command=[sys.executable, "-m", "benchmarks.tvix_probe"] if probe_out else None,
        code_dir=code_dir,
    )
    if probe_out is not None:
        peer.env = {
            **os.environ,
            "TVIX_PROBE_OUT": str(probe_out),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
    return peer


def _wait_for(path: Path) -> dict[str, Any]:
    deadline = time.monotonic() + SNAPSHOT_DEADLINE
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the probe wrote no {path}")
        time.sleep(0.01)
    result: dict[str, Any] = json.loads(path.read_text())
    return result


def _run_phase(workload: Workload, mount: peers_mod.Mount, phase: str) -> None:
    drop_caches()
    if phase == "warm":
        workload.run(mount)


def probe(
    workload: Workload, dataset: data_mod.DataSet, work_dir: Path, phase: str
) -> dict[str, Any]:
    out = work_dir / "profile" / f"probe-{workload.name}-{phase}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(out.name + "*"):
        stale.unlink()
    peer = _tvix_peer(dataset, work_dir, out)
    with peer.mounted() as mount:
        assert mount.pid is not None
        _run_phase(workload, mount, phase)
        os.kill(mount.pid, signal.SIGUSR1)  # reset: count only the measured run
        _wait_for(Path(f"{out}.1"))
        load = peers_mod.load_average()
        cpu_before = peers_mod.cpu_seconds(mount.pid)
        m = workload.run(mount)
        cpu_after = peers_mod.cpu_seconds(mount.pid)
        os.kill(mount.pid, signal.SIGUSR1)
        counts = _wait_for(Path(f"{out}.2"))
        vmhwm = mount.vmhwm_kb()
    counts["wall_seconds"] = m.seconds
    counts["count"] = m.count
    assert cpu_before is not None and cpu_after is not None
    counts["daemon_user_s"] = cpu_after[0] - cpu_before[0]
    counts["daemon_sys_s"] = cpu_after[1] - cpu_before[1]
    counts["load_average"] = load
    counts["vmhwm_kb"] = vmhwm
    return counts


def pyspy(
    workload: Workload,
    dataset: data_mod.DataSet,
    work_dir: Path,
    phase: str,
    *,
    rate: int,
    native: bool,
) -> tuple[Measurement, Path]:
    spy_bin = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    out = work_dir / "profile" / f"pyspy-{workload.name}-{phase}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    peer = _tvix_peer(dataset, work_dir, None)
    with peer.mounted() as mount:
        _run_phase(workload, mount, phase)
        argv = [spy_bin, "record", "--pid", str(mount.pid), "-r", str(rate), "-f", "raw"]
        argv += ["-o", str(out), "--native" if native else "--nonblocking"]
        spy = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            assert spy.stdout is not None
            first = spy.stdout.readline().decode(errors="replace")  # "Sampling process ..."
            if "Sampling" not in first:
                raise RuntimeError(f"py-spy did not start: {first}")
            m = workload.run(mount)
        finally:
            spy.send_signal(signal.SIGINT)
            tail = spy.communicate(timeout=120)[0].decode(errors="replace")
        log(tail.strip().splitlines()[-2] if tail.strip() else "py-spy: no output")
    return m, out


# -- reading py-spy's raw (collapsed) stacks ------------------------------------

_FRAME: Final = re.compile(r"^(?P<func>.*?) \((?P<where>[^()]*)\)$")


def _frames(stack: str) -> list[tuple[str, str]]:
    frames = []
    for raw in stack.split(";"):
        match = _FRAME.match(raw)
        if match is None:
            frames.append((raw, ""))
        else:
            frames.append((match["func"], match["where"]))
    return frames


def _owner(func: str, where: str) -> str | None:
    if "blake3" in where or "blake3" in func or "_hasher.update" in func:
        return "hashing (blake3)"
    if "tvix_mountd/castore/" in where:
        return "backend"
    if "tvix_mountd/" in where:
        return "ours"
    if where.startswith(("handlers.pxi", "__init__.pyx", "internal.pxi", "_pyfuse3")) or (
        "pyfuse3" in where or func.startswith(("__pyx", "__Pyx"))
    ):
        return "pyfuse3"
    if "libfuse" in where:
        return "libfuse"
    if "trio/" in where or "outcome/" in where:
        return "trio"
    if where.startswith(("libc.so", "libpthread")):
        return "libc (syscalls)"
    return None


def _samples(path: Path) -> Iterator[tuple[list[tuple[str, str]], int]]:
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if stack:
                yield _frames(stack), int(count)


def _blobs_verify_hashing(frames: list[tuple[str, str]]) -> bool:
    # Without --native, blake3's C code shows as the line in VerifyingReader.read_at
    # that calls it.
    func, where = frames[-1]
    return func.endswith("VerifyingReader.read_at") and "blobs/__init__.py" in where


def _is_idle(frames: list[tuple[str, str]]) -> bool:
    """A thread waiting: trio's idle worker threads, or the loop in epoll_wait.

    py-spy's own idle detection misses these in --native mode.
    """
    python = [func for func, where in frames if ".py:" in where or where.endswith(".py")]
    last = python[-1] if python else ""
    return (
        last in ("WorkerThread._work", "EpollIOManager.get_events")
        and not frames[-1][1].endswith(".py")
    ) or frames[-1][0] == "epoll_wait"


def analyse(path: Path, top: int) -> dict[str, Any]:
    """Buckets, inclusive time of our handlers, and the top self-time functions."""
    total = 0
    idle = 0
    buckets: collections.Counter[str] = collections.Counter()
    handlers: collections.Counter[str] = collections.Counter()
    selfs: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    for frames, count in _samples(path):
        if _is_idle(frames):
            idle += count
            continue
        total += count
        in_handler = any("tvix_mountd/" in where and "cli.py" not in where for _, where in frames)
        owner = None
        for func, where in reversed(frames):
            owner = _owner(func, where)
            if owner is not None:
                break
        if owner == "backend" and _blobs_verify_hashing(frames):
            owner = "hashing (blake3)"
        owner = owner or "other (interpreter, stdlib)"
        side = "handler" if in_handler else "dispatch"
        buckets[f"{side}: {owner}"] += count
        seen: set[str] = set()
        for func, where in frames:
            name = f"{func} ({where.rsplit(':', 1)[0]})"
            if name not in seen:
                inclusive[name] += count
                seen.add(name)
        ops = {
            func.removeprefix("StoreFilesystem.")
            for func, where in frames
            if func.startswith("StoreFilesystem.") and "filesystem.py" in where
        }
        for op in ops:
            handlers[op] += count
        leaf_func, leaf_where = frames[-1]
        selfs[f"{leaf_func} ({leaf_where})"] += count
    return {
        "samples": total,
        "idle_samples": idle,
        "buckets": dict(buckets.most_common()),
        "handler_inclusive": dict(handlers.most_common()),
        "top_self": selfs.most_common(top),
        "top_inclusive": inclusive.most_common(top),
    }


def _pct(n: int, total: int) -> str:
    return f"{100 * n / total:5.1f}%" if total else "-"


def render(
    workload: str, phase: str, counts: dict[str, Any] | None, spy: dict[str, Any] | None
) -> str:
    lines = [f"# tvix-mountd profile: {workload}, {phase}", ""]
    if counts is not None:
        wall = counts["wall_seconds"]
        user, system = counts["daemon_user_s"], counts["daemon_sys_s"]
        cpu = user + system
        requests = sum(counts["calls"].values())
        handler_s = sum(counts["handler_seconds"].values())
        lines += [
            "## Requests (probe)",
            "",
            f"wall {wall:.3f} s (load average {counts['load_average']:.1f} at start);"
            f" daemon CPU {cpu:.3f} s ({100 * cpu / wall:.0f}% of wall:"
            f" user {user:.3f} s, system {system:.3f} s);"
            f" {requests:,} requests; {1e6 * cpu / max(requests, 1):.1f} us CPU per request, of"
            f" which {1e6 * handler_s / max(requests, 1):.1f} us inside our handlers"
            f" (wrapper included); dispatch and the rest"
            f" {1e6 * (cpu - handler_s) / max(requests, 1):.1f} us;"
            f" wall per request {1e6 * wall / max(requests, 1):.1f} us",
            "",
            "| op | calls | handler time | us per call |",
            "|---|---:|---:|---:|",
        ]
        for op, n in sorted(counts["calls"].items(), key=lambda kv: -kv[1]):
            s = counts["handler_seconds"].get(op, 0.0)
            lines.append(f"| {op} | {n:,} | {s:.3f} s | {1e6 * s / n:.1f} |")
        buckets = counts.get("duration_buckets", {})
        if buckets:
            lines += [
                "",
                "handler times (calls in each range, us):",
                "",
            ]
            for op, by_bucket in sorted(buckets.items(), key=lambda kv: -counts["calls"][kv[0]]):
                ranges = sorted((int(b), n) for b, n in by_bucket.items())
                lines.append(f"- {op}: " + ", ".join(f"<{1 << b}: {n:,}" for b, n in ranges))
        sizes = counts["read_sizes"]
        if sizes:
            lines += [
                "",
                "read sizes asked by the kernel: "
                + ", ".join(f"{int(k) // 1024} KiB x {v:,}" for k, v in sizes.items()),
            ]
        lines += [
            f"forgotten inodes: {counts['forgotten_inodes']:,};"
            f" readdir entries taken: {counts['readdir_entries']:,};"
            f" daemon VmHWM {(counts['vmhwm_kb'] or 0) / 1024:.1f} MB",
            "",
        ]
    if spy is not None:
        total = spy["samples"]
        lines += [
            f"## py-spy ({total:,} samples; idle excluded)",
            "",
            "| bucket | share |",
            "|---|---:|",
        ]
        for bucket, n in spy["buckets"].items():
            lines.append(f"| {bucket} | {_pct(n, total)} |")
        lines += [
            "",
            "inclusive, per handler: "
            + ", ".join(
                f"{op} {_pct(n, total).strip()}" for op, n in spy["handler_inclusive"].items()
            ),
            "",
        ]
        lines += ["| top self | share |", "|---|---:|"]
        for name, n in spy["top_self"]:
            lines.append(f"| `{name}` | {_pct(n, total)} |")
        lines += ["", "| top inclusive | share |", "|---|---:|"]
        for name, n in spy["top_inclusive"]:
            lines.append(f"| `{name}` | {_pct(n, total)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.profile", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--workload", choices=WORKLOAD_NAMES, required=True)
    p.add_argument("--phase", choices=("cold", "warm"), default="cold")
    p.add_argument("--tool", choices=("probe", "py-spy", "both"), default="both")
    p.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    p.add_argument(
        "--no-native", action="store_true", help="py-spy without --native (non-blocking)"
    )
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("needs root: drops the page cache and mounts FUSE filesystems")
    work_dir: Path = args.work_dir.resolve()
    spec = data_mod.QUICK if args.quick else data_mod.FULL
    peers_mod.clear_stale_mounts(work_dir / "mnt")
    try:
        dataset = data_mod.prepare(spec, work_dir, log=log)
        available = workloads(dataset)
        if args.workload not in available:
            raise SystemExit(f"no {args.workload} here: {why_unavailable(args.workload)}")
        workload = available[args.workload]
        counts = spy = None
        if args.tool in ("probe", "both"):
            counts = probe(workload, dataset, work_dir, args.phase)
        if args.tool in ("py-spy", "both"):
            m, raw = pyspy(
                workload, dataset, work_dir, args.phase, rate=args.rate, native=not args.no_native
            )
            log(f"under py-spy: {m.seconds:.3f} s")
            spy = analyse(raw, args.top)
    except KeyboardInterrupt:
        return 130
    finally:
        peers_mod.cleanup_all()
    text = render(args.workload, args.phase, counts, spy)
    out = work_dir / "profile" / f"profile-{spec.name}-{args.workload}-{args.phase}.md"
    out.write_text(text)
    print(text)
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
