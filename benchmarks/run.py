"""`python -m benchmarks.run`: every workload on every peer, in one run.

For each workload, repetition and peer (peers in a rotating order, so drift on
a shared machine does not always hit the same peer): a fresh mount (FUSE
peers: a new daemon, so its caches are cold too), `sync` and drop_caches, the
cold run, at once the warm run on the same mount, then the daemon's VmRSS and
VmHWM and the mount's bdi read_ahead_kb, then unmount. Medians per (workload,
peer) go into the tables; every sample goes into the JSON file.

Needs root (drop_caches, mounting). Unmounts everything it mounted and stops
every daemon it started, also on Ctrl-C, SIGTERM or an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any, Final

from benchmarks import data as data_mod
from benchmarks import peers as peers_mod
from benchmarks import report, whatif
from benchmarks.workloads import (
    DEFAULT_REPS,
    WORKLOAD_NAMES,
    IncompleteRun,
    Measurement,
    check,
    drop_caches,
    why_unavailable,
    workloads,
)

BENCH_DIR: Final = Path(__file__).resolve().parent
DEFAULT_WORK_DIR: Final = BENCH_DIR / "work"
REPO: Final = BENCH_DIR.parent


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _csv(known: tuple[str, ...]) -> Any:
    def parse(value: str) -> list[str]:
        items = [v.strip() for v in value.split(",") if v.strip()]
        unknown = [v for v in items if v not in known]
        if unknown or not items:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(known)}"
            )
        return items

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="tvix-mountd side by side with native, bindfs and squashfuse_ll.",
    )
    p.add_argument(
        "--only",
        type=_csv(WORKLOAD_NAMES),
        default=list(WORKLOAD_NAMES),
        metavar="WORKLOAD,...",
        help=f"workloads to run (default all: {','.join(WORKLOAD_NAMES)});"
        " the RSS row comes with walk, the memory table with every workload",
    )
    p.add_argument(
        "--peers",
        type=_csv(peers_mod.PEER_NAMES),
        default=list(peers_mod.DEFAULT_PEERS),
        metavar="PEER,...",
        help=f"peers to measure (default: {','.join(peers_mod.DEFAULT_PEERS)};"
        " also tvix-whatif, see --whatif)",
    )
    p.add_argument(
        "--whatif",
        type=_csv(whatif.PATCHES),
        default=[],
        metavar="PATCH,...",
        help="for the tvix-whatif peer: tvix-mountd with these benchmarks.whatif patches"
        f" ({', '.join(whatif.PATCHES)})",
    )
    p.add_argument(
        "--reps",
        type=int,
        default=None,
        metavar="N",
        help="repetitions of every workload (default "
        + ", ".join(f"{k} {v}" for k, v in DEFAULT_REPS.items())
        + "; 1 with --quick)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run on small data ({data_mod.QUICK.describe()})",
    )
    p.add_argument(
        "--markdown", type=Path, metavar="PATH", help="write the Markdown tables here too"
    )
    p.add_argument("--json", type=Path, metavar="PATH", help="raw results (default: in work dir)")
    p.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR, help=argparse.SUPPRESS)
    p.add_argument("--rebuild", action="store_true", help="rebuild the data even if cached")
    p.add_argument(
        "--peer-read-ahead-kb",
        type=int,
        default=None,
        metavar="KB",
        help="set the bdi read_ahead_kb of the bindfs and squashfuse mounts"
        " (default: leave the kernel's; tvix-mountd sets its own)",
    )
    p.add_argument(
        "--quiet-below",
        type=float,
        default=None,
        metavar="PCT",
        help="before each sample, wait (at most --quiet-max-wait s) until the CPU pressure"
        " (PSI some avg10) of this shared machine is below PCT",
    )
    p.add_argument("--quiet-max-wait", type=float, default=300.0, help=argparse.SUPPRESS)
    p.add_argument(
        "--tvix-read-ahead-kb",
        type=int,
        default=None,
        metavar="KB",
        help="set the bdi read_ahead_kb of the tvix-mountd mount from outside once it is up"
        " (default: leave what the daemon set)",
    )
    return p


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    lines = (out.stdout + out.stderr).strip().splitlines()
    # squashfuse_ll prints its usage around the version line.
    named = [line for line in lines if argv[0].split("_")[0] in line]
    return (named or lines or ["unknown"])[0].strip()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
    except OSError:
        return ""
    return out.stdout.strip()


def environment(argv: list[str]) -> dict[str, Any]:
    import pyfuse3
    import trio

    mem_kb = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    return {
        "command": shlex.join(argv),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "kernel": platform.release(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "memory_gib": round(mem_kb / (1 << 20), 1),
        "python": platform.python_version(),
        "pyfuse3": pyfuse3.__version__,
        "trio": trio.__version__,
        "bindfs": _version(["bindfs", "--version"]),
        "squashfuse": _version(["squashfuse_ll", "--version"]),
        "mksquashfs": _version(["mksquashfs", "-version"]),
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "load_average_at_start": peers_mod.load_average(),
    }


def _check_tools(peers: list[str]) -> None:
    needed = ["mksquashfs", "find", "ls", "umount"]
    if "squashfuse" in peers:
        needed.append("squashfuse_ll")
    if "bindfs" in peers:
        needed.append("bindfs")
    missing = sorted({t for t in needed if shutil.which(t) is None})
    if missing:
        raise SystemExit(
            f"missing tools: {', '.join(missing)}; run scripts/setup.sh --bench"
            " (apt-get install -y bindfs squashfuse squashfs-tools)"
        )
    if os.geteuid() != 0:
        raise SystemExit("needs root: drops the page cache and mounts FUSE filesystems")


def _phase(
    m: Measurement, before: tuple[float, float] | None, after: tuple[float, float] | None
) -> dict[str, Any]:
    """One timed run, with the daemon's user and system CPU seconds during it."""
    phase: dict[str, Any] = {"seconds": m.seconds, "count": m.count}
    if before is not None and after is not None:
        phase["daemon_user_s"] = round(after[0] - before[0], 3)
        phase["daemon_sys_s"] = round(after[1] - before[1], 3)
    return phase


def wait_for_quiet(limit: float | None, max_wait: float) -> float:
    """Wait until the CPU pressure is below `limit` (or `max_wait` passed); seconds waited."""
    if limit is None:
        return 0.0
    started = time.monotonic()
    while time.monotonic() - started < max_wait:
        pressure = peers_mod.cpu_pressure()
        if pressure is None or pressure < limit:
            break
        time.sleep(1.0)  # PSI moves on a 10 s average; poll, bounded by max_wait
    return time.monotonic() - started


def measure(
    dataset: data_mod.DataSet,
    peers: list[peers_mod.Peer],
    only: list[str],
    reps: dict[str, int],
    quiet_below: float | None = None,
    quiet_max_wait: float = 300.0,
) -> list[dict[str, Any]]:
    all_workloads = workloads(dataset)
    samples: list[dict[str, Any]] = []
    for name in only:
        workload = all_workloads[name]
        for rep in range(reps[name]):
            shift = rep % len(peers)
            for peer in peers[shift:] + peers[:shift]:
                waited = wait_for_quiet(quiet_below, quiet_max_wait)
                with peer.mounted() as mount:
                    drop_caches()
                    load = peers_mod.load_average()
                    pressure = peers_mod.cpu_pressure()
                    cpu0 = mount.cpu_seconds()
                    cold = workload.run(mount)
                    cpu1 = mount.cpu_seconds()
                    check(workload, peer.name, cold)
                    warm = None
                    if workload.warm:
                        warm = workload.run(mount)
                        check(workload, peer.name, warm)
                    cpu2 = mount.cpu_seconds()
                    sample: dict[str, Any] = {
                        "workload": name,
                        "peer": peer.name,
                        "rep": rep,
                        "cold": _phase(cold, cpu0, cpu1),
                        "warm": None if warm is None else _phase(warm, cpu1, cpu2),
                        "vmhwm_kb": mount.vmhwm_kb(),
                        "vmrss_kb": mount.vmrss_kb(),
                        "read_ahead_kb": mount.read_ahead_kb(),
                        "load_average": load,
                        "cpu_pressure": pressure,
                        "waited_for_quiet_s": round(waited, 1),
                    }
                samples.append(sample)
                warm_text = "" if warm is None else f", warm {warm.seconds:8.3f} s"
                rss, peak = sample["vmrss_kb"], sample["vmhwm_kb"]
                rss_text = (
                    ""
                    if rss is None or peak is None
                    else f", VmRSS {rss / 1024:6.1f} MB, VmHWM {peak / 1024:6.1f} MB"
                )
                log(
                    f"{name:7} rep {rep + 1}/{reps[name]} {peer.name:10}"
                    f" cold {cold.seconds:8.3f} s{warm_text}{rss_text}"
                    f" (load {load:.1f}, cpu pressure {pressure or 0:.0f}%)"
                )
    return samples


def _read_ahead_summary(samples: list[dict[str, Any]]) -> dict[str, list[int]]:
    seen: dict[str, set[int]] = {}
    for s in samples:
        if s["read_ahead_kb"] is not None:
            seen.setdefault(s["peer"], set()).add(s["read_ahead_kb"])
    return {peer: sorted(values) for peer, values in seen.items()}


def markdown_document(
    env: dict[str, Any],
    spec: data_mod.DataSpec,
    dataset: data_mod.DataSet,
    header: list[str],
    rows: list[list[str]],
    spread: str,
    read_ahead: dict[str, list[int]],
    reps: dict[str, int],
    samples: list[dict[str, Any]],
    whatif_patches: list[str],
    memory: str,
) -> str:
    loads = sorted(s["load_average"] for s in samples)
    pressures = sorted(s["cpu_pressure"] for s in samples if s.get("cpu_pressure") is not None)
    load_text = (
        f"Other jobs share this machine ({env['cpus']} CPUs). At the start of the samples:"
        f" 1-min load average min {loads[0]:.1f} / median {loads[len(loads) // 2]:.1f}"
        f" / max {loads[-1]:.1f}"
        if loads
        else ""
    )
    if pressures:
        load_text += (
            f"; CPU pressure (PSI some avg10) min {pressures[0]:.0f}%"
            f" / median {pressures[len(pressures) // 2]:.0f}% / max {pressures[-1]:.0f}%"
        )
    load_text += "  " if load_text else ""
    ra = ", ".join(
        f"{report.PEER_LABELS[p]} {'/'.join(str(v) for v in vs)} KiB"
        for p, vs in read_ahead.items()
    )
    return "\n".join(
        [
            f"Command: `{env['command']}`  ",
            f"Date: {env['date']}; kernel {env['kernel']}; {env['cpus']} x {env['cpu']};"
            f" {env['memory_gib']} GiB RAM  ",
            f"Versions: Python {env['python']}, pyfuse3 {env['pyfuse3']}, trio {env['trio']};"
            f" {env['bindfs']}; {env['squashfuse']}; {env['mksquashfs']};"
            f" tvix-mountd at {env['git_commit']}{' (dirty tree)' if env['git_dirty'] else ''},"
            f" tvix_mountd/ content hash {env.get('tvix_mountd_code', '?')}  ",
            f"Data: {spec.describe()}; squashfs `{' '.join(dataset.squashfs_options)}`  ",
            (
                f"tvix-whatif: tvix-mountd with `{','.join(whatif_patches)}`  "
                if whatif_patches
                else ""
            ),
            "Repetitions (medians of): " + ", ".join(f"{k} {v}" for k, v in reps.items()) + "  ",
            load_text,
            f"bdi read_ahead_kb of the FUSE mounts: {ra or '-'}",
            "",
            report.render_markdown(header, rows),
            "",
            "min / median / max:",
            "",
            spread,
            "",
            "Daemon memory after each workload (VmRSS then / VmHWM, the peak; medians):",
            "",
            memory,
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    spec = data_mod.QUICK if args.quick else data_mod.FULL
    if args.reps is not None and args.reps < 1:
        raise SystemExit("--reps must be at least 1")
    default_reps = 1 if args.quick else None
    reps = {
        name: args.reps or default_reps or DEFAULT_REPS[name]
        for name in WORKLOAD_NAMES
        if name in args.only
    }
    peer_names = [p for p in peers_mod.PEER_NAMES if p in args.peers]
    if "tvix-whatif" in peer_names and not args.whatif:
        raise SystemExit("the tvix-whatif peer needs --whatif PATCH,...")
    _check_tools(peer_names)
    work_dir: Path = args.work_dir.resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    env = environment([sys.executable.rsplit("/", 1)[-1], "-m", "benchmarks.run", *sys.argv[1:]])

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    peers_mod.clear_stale_mounts(work_dir / "mnt")
    try:
        dataset = data_mod.prepare(spec, work_dir, rebuild=args.rebuild, log=log)
        available = workloads(dataset)
        for name in [n for n in args.only if n not in available]:
            log(f"skipping {name}: {why_unavailable(name)}")
        only = [n for n in args.only if n in available]
        reps = {name: n for name, n in reps.items() if name in only}
        code_dir, code_hash = peers_mod.snapshot_code(work_dir)
        env["tvix_mountd_code"] = code_hash
        log(f"tvix-mountd daemons run the copy {code_dir} of tvix_mountd/")
        peers = peers_mod.make_peers(
            peer_names,
            dataset,
            work_dir,
            peer_read_ahead_kb=args.peer_read_ahead_kb,
            tvix_read_ahead_kb=args.tvix_read_ahead_kb,
            code_dir=code_dir,
            whatif=args.whatif,
        )
        log(f"measuring {', '.join(only)} on {', '.join(peer_names)} ({spec.describe()})")
        started = time.perf_counter()
        samples = measure(dataset, peers, only, reps, args.quiet_below, args.quiet_max_wait)
        log(f"measured in {time.perf_counter() - started:.0f} s")
    except (IncompleteRun, RuntimeError, OSError, subprocess.CalledProcessError) as e:
        log(f"benchmark failed: {e}")
        return 1
    except KeyboardInterrupt:
        log("interrupted; unmounting")
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        peers_mod.cleanup_all()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    table = report.summarize(samples, peer_names)
    header, rows = report.table_rows(table, peer_names, spec)
    spread = report.render_spread_markdown(table, peer_names, spec)
    memory_header, memory_rows = report.memory_rows(samples, peer_names, spec)
    read_ahead = _read_ahead_summary(samples)
    print(report.render_text(header, rows))
    print()
    print(report.render_text(memory_header, memory_rows))
    if read_ahead:
        print(
            "bdi read_ahead_kb: "
            + ", ".join(f"{p} {'/'.join(map(str, v))}" for p, v in read_ahead.items())
        )

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    markdown = markdown_document(
        env,
        spec,
        dataset,
        header,
        rows,
        spread,
        read_ahead,
        reps,
        samples,
        args.whatif,
        report.render_markdown(memory_header, memory_rows),
    )
    md_path = args.markdown or work_dir / f"results-{spec.name}-{stamp}.md"
    md_path.write_text(markdown)
    json_path = args.json or work_dir / f"results-{spec.name}-{stamp}.json"
    results = {
        "environment": env,
        "spec": dataclasses.asdict(spec),
        "data_version": data_mod.DATA_VERSION,
        "squashfs_options": list(dataset.squashfs_options),
        "store_paths": dataset.store_paths,
        "reps": reps,
        "peers": peer_names,
        "whatif": args.whatif,
        "quiet_below": args.quiet_below,
        "samples": samples,
        "medians": {
            key: {peer: cell.value for peer, cell in cells.items()} for key, cells in table.items()
        },
        "ratios": report.ratios(table),
        "read_ahead_kb": read_ahead,
        "table": {"header": header, "rows": rows},
        "memory_table": {"header": memory_header, "rows": memory_rows},
    }
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    log(f"wrote {md_path} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
