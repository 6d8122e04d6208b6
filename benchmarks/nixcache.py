"""First access of a store path from a Nix binary cache, against `nix copy`.

    .venv/bin/python -m benchmarks.nixcache [--mib 100] [--files 5000] [--reps 3]
                                            [--compression xz,zstd] [--markdown PATH]

Builds a tree of about `--mib` MiB in `--files` files (deterministic; half
random bytes, half text, so it compresses about as binaries do), adds it to a
chroot Nix store and copies it into signed binary caches with `nix copy --to
file://...?compression=C` (cached under benchmarks/work/nixcache/). Then, for
each compression and each repetition, in alternating order:

- nix: `nix copy --from file://CACHE --to <fresh chroot store> PATH`, trusting
  the cache's key;
- tvix: `tvix-mountd mount` of a fresh embedded store whose path infos come
  from `nix+file://CACHE?trusted-public-keys=...`; from the first lookup of
  the path (which fetches, verifies and ingests the NAR) through a full read
  of every file in it. Mounting is not timed. The daemon's peak RSS (VmHWM)
  is read before the lookup and after the read: the ingest happens in it.

Prints a Markdown table: medians, the ratio tvix / nix (the issue's target is
<= 1.0x), and the RSS figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.peers import load_average, status_kb, vmhwm_kb

WORK = Path(__file__).resolve().parent / "work" / "nixcache"
NIX_FEATURES = ("--extra-experimental-features", "nix-command")
KEY_NAME = "bench-cache-1"
READ_CHUNK = 1 << 20


@dataclass(frozen=True)
class Spec:
    mib: int
    files: int

    @property
    def name(self) -> str:
        return f"{self.mib}mib-{self.files}files"


def _run(*args: str) -> str:
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"{' '.join(args)} failed ({done.returncode}): {done.stderr}")
    return done.stdout.strip()


def _contents(rnd: random.Random, size: int) -> bytes:
    half = size // 2
    text = (b"the quick brown fox jumps over the lazy dog %d\n" % rnd.randrange(1000)) * (
        half // 40 + 1
    )
    return (rnd.randbytes(size - half) + text)[:size]


def build_tree(spec: Spec, root: Path) -> None:
    """`spec.files` files in directories of 50, sizes summing to about `spec.mib` MiB:
    most small (1-64 KiB), the rest of the bytes in one file per 250."""
    rnd = random.Random(spec.files * 1000 + spec.mib)
    total = spec.mib << 20
    small = [rnd.choice((1024, 4096, 16384, 65536)) // rnd.randint(1, 4) for _ in range(spec.files)]
    big_count = max(1, spec.files // 250)
    rest = max(0, total - sum(small[big_count:]))
    for i in range(big_count):
        small[i] = rest // big_count
    for i, size in enumerate(small):
        path = root / f"d{i // 50:03d}" / f"f{i:05d}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_contents(rnd, size))
        path.chmod(0o755 if i % 10 == 0 else 0o644)
    for i in range(0, spec.files, 100):
        (root / f"d{i // 50:03d}" / f"link{i}").symlink_to(f"f{i:05d}")
    (root / "empty-dir").mkdir()


@dataclass
class Data:
    store_path: str
    public_key: str
    caches: dict[str, Path]


def prepare(spec: Spec, compressions: list[str]) -> Data:
    """The tree, the chroot store and the caches, built once per spec."""
    base = WORK / spec.name
    marker = base / "ready.json"
    if marker.exists():
        ready = json.loads(marker.read_text())
        if all(c in ready["caches"] for c in compressions):
            return Data(
                ready["store_path"],
                ready["public_key"],
                {c: Path(p) for c, p in ready["caches"].items()},
            )
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    print(f"building {spec.name} under {base}", file=sys.stderr)
    src = base / "src"
    build_tree(spec, src)
    secret, public = base / "key.secret", base / "key.public"
    _run("nix-store", "--generate-binary-cache-key", KEY_NAME, str(secret), str(public))
    store_path = _run("nix-store", "--store", str(base / "nix-root"), "--add", str(src))
    caches = {}
    for compression in compressions:
        cache = base / f"cache-{compression}"
        started = time.monotonic()
        _run(
            "nix", *NIX_FEATURES, "copy", "--store", str(base / "nix-root"),
            "--to", f"file://{cache}?compression={compression}&secret-key={secret}", store_path,
        )  # fmt: skip
        print(f"  cache {compression}: {time.monotonic() - started:.1f} s", file=sys.stderr)
        caches[compression] = cache
    data = Data(store_path, public.read_text().strip(), caches)
    marker.write_text(
        json.dumps(
            {
                "store_path": store_path,
                "public_key": data.public_key,
                "caches": {c: str(p) for c, p in caches.items()},
            }
        )
    )
    return data


def _fresh(scratch: Path, name: str) -> Path:
    """A new directory for one run's store. Stores are removed only at the end:
    on this VM's ext4 (no journal) creating files soon after many were deleted
    is several times slower (ext4 skips recently freed inodes for a minute or
    more), which made whichever run followed a removal slow."""
    for n in range(1_000_000):
        path = scratch / f"{name}-{n}"
        if not path.exists():
            return path
    raise RuntimeError(f"no free name under {scratch}")


def time_nix_copy(data: Data, compression: str, scratch: Path) -> float:
    target = _fresh(scratch, "nix-dest")
    started = time.monotonic()
    _run(
        "nix", *NIX_FEATURES, "copy", "--from", f"file://{data.caches[compression]}",
        "--to", str(target), "--option", "trusted-public-keys", data.public_key, data.store_path,
    )  # fmt: skip
    return time.monotonic() - started


def _read_everything(root: Path) -> int:
    total = 0
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                os.readlink(path)
                continue
            with open(path, "rb", buffering=0) as f:
                while chunk := f.read(READ_CHUNK):
                    total += len(chunk)
    return total


@dataclass
class TvixRun:
    lookup: float  # the first stat: narinfo, NAR download, verify, ingest
    total: float  # that and the full read
    rss_before_kb: int
    peak_kb: int
    bytes_read: int


def time_tvix_mount(data: Data, compression: str, scratch: Path) -> TvixRun:
    local, mountpoint = _fresh(scratch, "tvix-local"), scratch / "mnt"
    mountpoint.mkdir(parents=True, exist_ok=True)
    cache = f"nix+file://{data.caches[compression]}?trusted-public-keys={data.public_key}"
    log = open(scratch / "mount.log", "wb")  # noqa: SIM115 - closed in finally
    daemon = subprocess.Popen(
        [
            sys.executable, "-m", "tvix_mountd.cli", "mount",
            "--blob-service-addr", f"raw+file://{local}/blobs",
            "--directory-service-addr", f"sqlite://{local}/directories.sqlite",
            "--path-info-service-addr", cache,
            str(mountpoint),
        ],
        stdout=log, stderr=log,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while os.stat(mountpoint).st_ino != 1:
            if daemon.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"tvix-mountd mount did not start: {(scratch / 'mount.log').read_text()}")
            time.sleep(0.02)
        rss_before = status_kb(daemon.pid, "VmRSS") or 0
        path = mountpoint / data.store_path.rsplit("/", 1)[1]
        started = time.monotonic()
        os.stat(path)
        lookup = time.monotonic() - started
        read = _read_everything(path)
        total = time.monotonic() - started
        peak = vmhwm_kb(daemon.pid) or 0
        return TvixRun(lookup, total, rss_before, peak, read)
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        subprocess.run(["umount", "-l", str(mountpoint)], check=False, stderr=subprocess.DEVNULL)
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=100)
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--compression", default="xz,zstd")
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args()
    spec = Spec(args.mib, args.files)
    compressions = args.compression.split(",")
    load = load_average()
    data = prepare(spec, compressions)
    scratch = WORK / "scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    lines = [
        f"Command: `python -m benchmarks.nixcache {' '.join(sys.argv[1:])}`  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())};"
        f" load average at start {load:.2f}; {spec.files} files, {spec.mib} MiB  ",
        "",
        "| compression | nix copy | tvix first access (lookup+ingest / +full read)"
        " | ratio | daemon RSS before / peak |",
        "|---|---|---|---|---|",
    ]
    for compression in compressions:
        nix_times: list[float] = []
        runs: list[TvixRun] = []
        for rep in range(args.reps):
            # Alternate which goes first, so neither always finds the caches warmer.
            order = ("nix", "tvix") if rep % 2 == 0 else ("tvix", "nix")
            for which in order:
                if which == "nix":
                    nix_times.append(time_nix_copy(data, compression, scratch))
                else:
                    runs.append(time_tvix_mount(data, compression, scratch))
            print(
                f"{compression} rep {rep}: nix {nix_times[-1]:.2f} s, tvix"
                f" {runs[-1].lookup:.2f} + {runs[-1].total - runs[-1].lookup:.2f} s,"
                f" peak {runs[-1].peak_kb / 1024:.1f} MB",
                file=sys.stderr,
            )
        nix = statistics.median(nix_times)
        lookup = statistics.median(r.lookup for r in runs)
        total = statistics.median(r.total for r in runs)
        before = statistics.median(r.rss_before_kb for r in runs) / 1024
        peak = max(r.peak_kb for r in runs) / 1024
        lines.append(
            f"| {compression} | {nix:.2f} s | {lookup:.2f} s / {total:.2f} s"
            f" | {total / nix:.2f}x | {before:.0f} MB / {peak:.0f} MB |"
        )
    table = "\n".join(lines)
    print(table)
    if args.markdown is not None:
        args.markdown.write_text(table + "\n")
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
