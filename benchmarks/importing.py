"""`tvix-mountd import` against `nix-store --add`, on the benchmark tree.

    .venv/bin/python -m benchmarks.importing [--quick | --small-files N --wide-files N --big-mib N]
                                             [--reps 3] [--only tree,small,big] [--markdown PATH]

The tree is benchmarks/data.py's (built once, cached under benchmarks/work/):
`big/big.bin` (1 GiB of random bytes), `small/` (100,000 files of 1-4 KiB in
1,000 directories) and `wide/` (one directory of 50,000 such files). The
workloads, each imported by both tools into a store of its own:

- tree:  the three parts in one command (three store paths);
- small: `small/` alone;
- big:   `big/big.bin` alone (a store path that is one file).

Per workload and repetition, in alternating order: `nix-store --store DIR
--add PATHS` into a fresh chroot store (as root, without a daemon; /nix/store
is never touched), and `tvix-mountd import` into a fresh embedded store
(raw+file blobs, sqlite directories and path infos); then `tvix-mountd
import` again into that store (the re-import: everything is there already).
Before each timed command: `sync` and `echo 3 > /proc/sys/vm/drop_caches`
(needs root), so each starts with cold caches and nothing left to write back
from the one before (Nix does not sync what it writes; the sync before the
next command is not timed). Peak RSS is the command's own (GNU time's %M).

Both print the same store paths, or the run stops.

The stores are removed only at the end of the run: on this VM's ext4 (no
journal) creating files soon after many were deleted is several times
slower (ext4 skips recently freed inodes for up to minutes), which would
make the first command after a removal slow for no reason of its own.

Prints a Markdown table: medians, the ratio tvix / nix (the issue's target:
<= 1.0x) and the peak RSS of each.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from benchmarks.data import BIG, BIG_FILE_NAME, FULL, QUICK, SMALL, WIDE, DataSpec, prepare_tree
from benchmarks.data import tvix_mountd_command as tvix_mountd
from benchmarks.peers import load_average
from benchmarks.workloads import drop_caches

WORK: Final = Path(__file__).resolve().parent / "work"
SCRATCH: Final = WORK / "importing"
WORKLOADS: Final = ("tree", "small", "big")


@dataclass(frozen=True)
class Timed:
    seconds: float
    peak_rss_kb: int
    stdout: str


def timed(command: list[str]) -> Timed:
    """Run `command` after dropping caches; its wall time and peak RSS.

    The peak comes from GNU time, whose child is forked from a small
    process: a child forked from this one would start its count at this
    process's own peak (Linux keeps the larger across fork and exec).
    """
    drop_caches()
    with tempfile.NamedTemporaryFile("r") as rss, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        done = subprocess.run(
            ["/usr/bin/time", "--format", "%M", "--output", rss.name, *command],
            stdout=subprocess.PIPE,
            stderr=err,
            check=False,
        )
        elapsed = time.perf_counter() - started
        if done.returncode != 0:
            err.seek(0)
            sys.exit(f"{' '.join(command)} failed ({done.returncode}): {err.read().decode()}")
        return Timed(elapsed, int(rss.read().split()[-1]), done.stdout.decode())


def paths_of(tree: Path, workload: str) -> list[str]:
    if workload == "tree":
        return [str(tree / part) for part in (BIG, SMALL, WIDE)]
    if workload == "small":
        return [str(tree / SMALL)]
    return [str(tree / BIG / BIG_FILE_NAME)]


def nix_add(store: Path, paths: list[str]) -> list[str]:
    return ["nix-store", "--store", str(store), "--add", *paths]


def tvix_import(store: Path, paths: list[str]) -> list[str]:
    config = store.with_suffix(".toml")
    config.write_text(
        "[stores.bench]\n"
        f'blob_service_addr = "raw+file://{store}/blobs"\n'
        f'directory_service_addr = "sqlite://{store}/directories.sqlite"\n'
        f'path_info_service_addr = "sqlite://{store}/pathinfo.sqlite"\n'
    )
    return [*tvix_mountd(), "--log-level", "warning", "import", "--config", str(config),
            "--store", "bench", *paths]  # fmt: skip


@dataclass
class Samples:
    nix: list[Timed]
    tvix: list[Timed]
    reimport: list[Timed]


def measure(tree: Path, workload: str, reps: int, scratch: Path) -> Samples:
    samples = Samples([], [], [])
    paths = paths_of(tree, workload)
    for rep in range(reps):
        # Alternate which goes first, so neither always runs on a fresher disk.
        order = ("nix", "tvix") if rep % 2 == 0 else ("tvix", "nix")
        for which in order:
            store = scratch / f"{workload}-{which}-{rep}"
            if which == "nix":
                samples.nix.append(timed(nix_add(store, paths)))
            else:
                samples.tvix.append(timed(tvix_import(store, paths)))
                samples.reimport.append(timed(tvix_import(store, paths)))
        nix, tvix, again = samples.nix[-1], samples.tvix[-1], samples.reimport[-1]
        if not nix.stdout.split() == tvix.stdout.split() == again.stdout.split():
            sys.exit(f"different store paths: nix {nix.stdout!r}, tvix {tvix.stdout!r}")
        print(
            f"{workload} rep {rep}: nix {nix.seconds:.2f} s ({nix.peak_rss_kb / 1024:.0f} MB),"
            f" tvix {tvix.seconds:.2f} s ({tvix.peak_rss_kb / 1024:.0f} MB),"
            f" re-import {again.seconds:.2f} s",
            file=sys.stderr,
        )
    return samples


def _median(runs: list[Timed]) -> float:
    return statistics.median(r.seconds for r in runs)


def _peak_mb(runs: list[Timed]) -> float:
    return max(r.peak_rss_kb for r in runs) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the quick data set (64 MiB, 10k)")
    parser.add_argument("--small-files", type=int, help="a custom data set: small files")
    parser.add_argument("--wide-files", type=int, help="...entries in the wide directory")
    parser.add_argument("--big-mib", type=int, help="...MiB in the big file")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--only", default=",".join(WORKLOADS))
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root: it drops the page cache before each command")
    spec: DataSpec = QUICK if args.quick else FULL
    if args.small_files or args.wide_files or args.big_mib:
        small = args.small_files or spec.small_files
        spec = DataSpec(
            f"custom-{small}-{args.wide_files or spec.wide_files}-{args.big_mib or 0}",
            (args.big_mib << 20) if args.big_mib else spec.big_bytes,
            small,
            max(1, small // 100),
            args.wide_files or spec.wide_files,
        )
    workloads = args.only.split(",")
    load = load_average()
    root, _ = prepare_tree(spec, WORK)
    tree = root / "tree"
    scratch = SCRATCH / time.strftime("%Y%m%d-%H%M%S")
    scratch.mkdir(parents=True)
    lines = [
        f"Command: `python -m benchmarks.importing {' '.join(sys.argv[1:])}`  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; load average at start"
        f" {load:.2f}; data: {spec.describe()}  ",
        "",
        "| workload | nix-store --add | tvix-mountd import | ratio | re-import"
        " | peak RSS nix / tvix |",
        "|---|---|---|---|---|---|",
    ]
    try:
        for workload in workloads:
            samples = measure(tree, workload, args.reps, scratch)
            nix, tvix = _median(samples.nix), _median(samples.tvix)
            lines.append(
                f"| {workload} | {nix:.2f} s | {tvix:.2f} s | {tvix / nix:.2f}x"
                f" | {_median(samples.reimport):.2f} s"
                f" | {_peak_mb(samples.nix):.0f} MB / {_peak_mb(samples.tvix):.0f} MB |"
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    lines.append("")
    lines.append(f"Load average at the end: {load_average():.2f}")
    table = "\n".join(lines)
    print(table)
    if args.markdown is not None:
        args.markdown.write_text(table + "\n")


if __name__ == "__main__":
    main()
