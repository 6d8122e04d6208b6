"""Service-level figures: start-up with 8 mounts, rootcache lookup latency and coalescing.

    .venv/bin/python -m benchmarks.service [--reps 5] [--lookups 2000]

Builds a small embedded store under benchmarks/work/service/, starts the real
supervisor (`tvix-mountd start`) with 8 mounts of it, and measures:
- start-up: from spawning `tvix-mountd start` to GET /readyz answering 200
  (every mount serving and answering a stat of its root);
- a root-node lookup through the rootcache, as a worker makes it
  (RootCacheRootNodes over the unix socket): p50 and p99 of sequential
  lookups of a cached name, and of names the store does not have;
- coalescing: 100 concurrent lookups of one new name, and how many backend
  calls they caused (from the rootcache's own counters).
Prints a Markdown table against DESIGN.md's targets.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import trio

from benchmarks.supervised import BIN, free_port, percentile, start, stop
from tvix_mountd.castore.storepath import StorePath
from tvix_mountd.workers.rootcache_client import RootCacheRootNodes, fetch_stats

WORK = Path(__file__).resolve().parent / "work" / "service"
MOUNTS = 8


def _config(port: int) -> Path:
    data = WORK / "data"
    lines = [
        "[supervisor]",
        f'state_dir = "{WORK / "run"}"',
        f'health_listen = "127.0.0.1:{port}"',
        "[stores.local]",
        f'blob_service_addr = "raw+file://{data}/blobs"',
        f'directory_service_addr = "sqlite://{data}/directories.sqlite"',
        f'path_info_service_addr = "sqlite://{data}/pathinfo.sqlite"',
    ]
    for i in range(MOUNTS):
        lines += ["[[mounts]]", f'name = "m{i}"', 'store = "local"']
        lines += [f'mountpoint = "{WORK / "mnt" / f"m{i}"}"']
    path = WORK / "mountd.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _import_sample(config: Path) -> str:
    sample = WORK / "sample" / "hello"
    (sample / "bin").mkdir(parents=True, exist_ok=True)
    (sample / "bin" / "hello").write_text("#!/bin/sh\necho hello\n")
    out = subprocess.run(
        [str(BIN), "import", "--config", str(config), "--store", "local", str(sample)],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip().rsplit("/", 1)[1]


async def _lookups(socket_path: str, basename: str, n: int) -> dict[str, float]:
    client = RootCacheRootNodes(socket_path, "local", timeout=10)
    try:
        name = basename.encode()
        assert await client.get_by_basename(name) is not None
        hits = []
        for _ in range(n):
            t = time.perf_counter()
            await client.get_by_basename(name)
            hits.append(time.perf_counter() - t)
        misses = []
        for i in range(n):
            missing = StorePath(i.to_bytes(20, "little"), "absent").basename.encode()
            t = time.perf_counter()
            assert await client.get_by_basename(missing) is None
            misses.append(time.perf_counter() - t)
        before = (await fetch_stats(socket_path, timeout=5))["local"]["backend_calls"]
        fresh = StorePath(os.urandom(20), "coalesced").basename.encode()
        async with trio.open_nursery() as nursery:
            for _ in range(100):
                nursery.start_soon(client.get_by_basename, fresh)
        after = (await fetch_stats(socket_path, timeout=5))["local"]["backend_calls"]
    finally:
        await client.aclose()
    return {
        "hit_p50": percentile(hits, 0.5),
        "hit_p99": percentile(hits, 0.99),
        "miss_p50": percentile(misses, 0.5),
        "miss_p99": percentile(misses, 0.99),
        "coalesced_backend_calls": after - before,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--lookups", type=int, default=2000)
    args = parser.parse_args()
    shutil.rmtree(WORK / "run", ignore_errors=True)
    WORK.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = _config(port)
    basename = _import_sample(config)
    startups = []
    for _ in range(args.reps):
        process, seconds = start(config, port, WORK / "supervisor.log")
        startups.append(seconds)
        stop(process)
    process, _ = start(config, port, WORK / "supervisor.log")
    try:
        figures = trio.run(_lookups, str(WORK / "run" / "rootcache.sock"), basename, args.lookups)
    finally:
        stop(process)
    ms = 1000.0
    rows = [
        ("start with 8 mounts ready (median)", f"{statistics.median(startups):.2f} s", "< 2 s"),
        ("rootcache lookup, cached name, p50", f"{figures['hit_p50'] * ms:.3f} ms", "< 0.5 ms"),
        ("rootcache lookup, cached name, p99", f"{figures['hit_p99'] * ms:.3f} ms", "-"),
        ("rootcache lookup, absent name, p50", f"{figures['miss_p50'] * ms:.3f} ms", "-"),
        ("rootcache lookup, absent name, p99", f"{figures['miss_p99'] * ms:.3f} ms", "-"),
        (
            "100 concurrent lookups of one new name: backend calls",
            f"{figures['coalesced_backend_calls']:.0f}",
            "1",
        ),
    ]
    print(f"start-up samples: {', '.join(f'{s:.2f}' for s in startups)} s")
    print("| figure | measured | target |\n|---|---:|---:|")
    for row in rows:
        print(f"| {row[0]} | {row[1]} | {row[2]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
