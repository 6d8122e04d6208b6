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

    .venv/bin/python -m benchmarks.nixcache --closure [--libs 16] [--mib 100]
        [--files 5000] [--prefetch 4] [--reps 3] [--compression xz,zstd]

A program's closure instead: `--libs` trees ("libraries", together `--mib`
MiB in `--files` files, each of its own content) and a small "app" tree whose
narinfo names them all as references (re-signed with the cache's key). Per
compression and repetition: `nix copy` of the app, which brings its closure;
and tvix-mountd without and with `--prefetch-references N`, timed from the
first lookup of the app through a full read of the app and then of every
library in turn, as a program that loads them one after another would.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from benchmarks import whatif as whatif_mod
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


def build_tree(spec: Spec, root: Path, seed: int = 0) -> None:
    """`spec.files` files in directories of 50, sizes summing to about `spec.mib` MiB:
    most small (1-64 KiB), the rest of the bytes in one file per 250. Trees of
    one spec and another `seed` share no content."""
    rnd = random.Random(spec.files * 1000 + spec.mib + seed * 1_000_003)
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
    # "dummy://": without a store named, Nix would create /nix/store.
    _run(
        "nix-store",
        "--store",
        "dummy://",
        "--generate-binary-cache-key",
        KEY_NAME,
        str(secret),
        str(public),
    )
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


def _nix_copy_from(cache: Path, public_key: str, path: str, scratch: Path) -> tuple[float, Path]:
    """Seconds of `nix copy` of `path` (and its closure) out of `cache` into a
    fresh chroot store, trusting `public_key`; and that store."""
    target = _fresh(scratch, "nix-dest")
    started = time.monotonic()
    _run(
        "nix", *NIX_FEATURES, "copy", "--from", f"file://{cache}",
        "--to", str(target), "--option", "trusted-public-keys", public_key, path,
    )  # fmt: skip
    return time.monotonic() - started, target


def time_nix_copy(data: Data, compression: str, scratch: Path) -> float:
    cache = data.caches[compression]
    return _nix_copy_from(cache, data.public_key, data.store_path, scratch)[0]


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


@contextlib.contextmanager
def _tvix_mount(
    cache: Path,
    public_key: str,
    scratch: Path,
    extra_args: tuple[str, ...] = (),
    whatif: tuple[str, ...] = (),
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """`tvix-mountd mount` of a fresh embedded store fed by `cache`, served
    (with the benchmarks.whatif patches `whatif`, if any)."""
    local, mountpoint = _fresh(scratch, "tvix-local"), scratch / "mnt"
    mountpoint.mkdir(parents=True, exist_ok=True)
    addr = f"nix+file://{cache}?trusted-public-keys={public_key}"
    log = open(scratch / "mount.log", "wb")  # noqa: SIM115 - closed in finally
    module = "benchmarks.whatif" if whatif else "tvix_mountd.cli"
    daemon = subprocess.Popen(
        [
            sys.executable, "-m", module, "mount",
            "--blob-service-addr", f"raw+file://{local}/blobs",
            "--directory-service-addr", f"sqlite://{local}/directories.sqlite",
            "--path-info-service-addr", addr,
            *extra_args,
            str(mountpoint),
        ],
        stdout=log, stderr=log, env={**os.environ, "TVIX_WHATIF": ",".join(whatif)},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while os.stat(mountpoint).st_ino != 1:
            if daemon.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"tvix-mountd mount did not start: {(scratch / 'mount.log').read_text()}")
            time.sleep(0.02)
        yield daemon, mountpoint
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        subprocess.run(["umount", "-l", str(mountpoint)], check=False, stderr=subprocess.DEVNULL)
        log.close()


def time_tvix_mount(
    data: Data, compression: str, scratch: Path, whatif: tuple[str, ...] = ()
) -> TvixRun:
    cache = data.caches[compression]
    with _tvix_mount(cache, data.public_key, scratch, whatif=whatif) as (daemon, mountpoint):
        rss_before = status_kb(daemon.pid, "VmRSS") or 0
        path = mountpoint / data.store_path.rsplit("/", 1)[1]
        started = time.monotonic()
        os.stat(path)
        lookup = time.monotonic() - started
        read = _read_everything(path)
        total = time.monotonic() - started
        peak = vmhwm_kb(daemon.pid) or 0
        return TvixRun(lookup, total, rss_before, peak, read)


# -- a closure ------------------------------------------------------------------


@dataclass
class Closure:
    app: str
    libs: list[str]
    public_key: str
    caches: dict[str, Path]


def prepare_closure(libs: int, spec: Spec, compressions: list[str]) -> Closure:
    """`libs` trees sharing `spec` between them, an app referring to all, and
    caches of them (built once per shape)."""
    from tests.nixcache import Key, resign_narinfo
    from tvix_mountd.castore.storepath import StorePath

    base = WORK / f"closure-{libs}x-{spec.name}"
    marker = base / "ready.json"
    if marker.exists():
        ready = json.loads(marker.read_text())
        if all(c in ready["caches"] for c in compressions):
            caches = {c: Path(p) for c, p in ready["caches"].items()}
            return Closure(ready["app"], ready["libs"], ready["public_key"], caches)
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    print(f"building a closure of {libs} x {spec.name} under {base}", file=sys.stderr)
    nix_root = str(base / "nix-root")
    lib_spec = Spec(max(1, spec.mib // libs), max(1, spec.files // libs))
    lib_paths = []
    for i in range(libs):
        src = base / "src" / f"lib{i:02d}"
        build_tree(lib_spec, src, seed=i + 1)
        lib_paths.append(_run("nix-store", "--store", nix_root, "--add", str(src)))
    app_src = base / "src" / "app"
    build_tree(Spec(1, 20), app_src, seed=0)
    app = _run("nix-store", "--store", nix_root, "--add", str(app_src))
    key = Key.generate(KEY_NAME, base)
    caches = {}
    for compression in compressions:
        cache = base / f"cache-{compression}"
        _run(
            "nix", *NIX_FEATURES, "copy", "--store", nix_root,
            "--to", f"file://{cache}?compression={compression}&secret-key={key.secret_file}",
            app, *lib_paths,
        )  # fmt: skip
        narinfo = cache / (os.path.basename(app)[:32] + ".narinfo")
        resign_narinfo(narinfo, [StorePath.parse_absolute(p) for p in lib_paths], key)
        caches[compression] = cache
    closure = Closure(app, lib_paths, key.public, caches)
    marker.write_text(
        json.dumps(
            {
                "app": app,
                "libs": lib_paths,
                "public_key": key.public,
                "caches": {c: str(p) for c, p in caches.items()},
            }
        )
    )
    return closure


def time_nix_copy_closure(closure: Closure, compression: str, scratch: Path) -> float:
    cache = closure.caches[compression]
    elapsed, target = _nix_copy_from(cache, closure.public_key, closure.app, scratch)
    copied = _run("nix-store", "--store", str(target), "--query", "--requisites", closure.app)
    if len(copied.split()) != len(closure.libs) + 1:
        sys.exit(f"nix copy did not copy the closure: {copied}")
    return elapsed


def time_tvix_closure(
    closure: Closure, compression: str, scratch: Path, prefetch: int
) -> tuple[float, int]:
    """Seconds from the app's first lookup through reading it and every
    library in turn; and the daemon's peak RSS in KiB."""
    extra = ("--prefetch-references", str(prefetch)) if prefetch else ()
    cache = closure.caches[compression]
    with _tvix_mount(cache, closure.public_key, scratch, extra) as (daemon, mountpoint):
        started = time.monotonic()
        for path in [closure.app, *closure.libs]:
            _read_everything(mountpoint / os.path.basename(path))
        return time.monotonic() - started, vmhwm_kb(daemon.pid) or 0


def closure_table(args: argparse.Namespace) -> list[str]:
    compressions = args.compression.split(",")
    closure = prepare_closure(args.libs, Spec(args.mib, args.files), compressions)
    scratch = _fresh_scratch()
    lines = [
        "| compression | nix copy (closure) | tvix, read in turn | with prefetch"
        f" {args.prefetch} | prefetch / without | with prefetch / nix"
        " | daemon peak RSS without / with prefetch |",
        "|---|---|---|---|---|---|---|",
    ]
    for compression in compressions:
        times: dict[str, list[float]] = {"nix": [], "tvix": [], "prefetch": []}
        peaks = {"tvix": 0, "prefetch": 0}
        for rep in range(args.reps):
            order = ["nix", "tvix", "prefetch"]
            order = order[rep % 3 :] + order[: rep % 3]  # each goes first in turn
            for which in order:
                if which == "nix":
                    times["nix"].append(time_nix_copy_closure(closure, compression, scratch))
                    continue
                seconds, peak_kb = time_tvix_closure(
                    closure, compression, scratch, args.prefetch if which == "prefetch" else 0
                )
                times[which].append(seconds)
                peaks[which] = max(peaks[which], peak_kb)
            print(
                f"{compression} rep {rep}: "
                + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()),
                file=sys.stderr,
            )
        nix, plain, fetched = (statistics.median(times[k]) for k in ("nix", "tvix", "prefetch"))
        lines.append(
            f"| {compression} | {nix:.2f} s | {plain:.2f} s | {fetched:.2f} s"
            f" | {fetched / plain:.2f}x | {fetched / nix:.2f}x"
            f" | {peaks['tvix'] / 1024:.0f} MB / {peaks['prefetch'] / 1024:.0f} MB |"
        )
    shutil.rmtree(scratch, ignore_errors=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=100)
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--compression", default="xz,zstd")
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--closure", action="store_true", help="a program's closure instead")
    parser.add_argument("--libs", type=int, default=16)
    parser.add_argument("--prefetch", type=int, default=4)
    parser.add_argument(
        "--whatif",
        default="",
        metavar="PATCH,...",
        help="also tvix-mountd with these benchmarks.whatif patches, side by side",
    )
    args = parser.parse_args()
    if args.closure:
        what = f"{args.libs} libraries, {args.files} files, {args.mib} MiB in all"
        lines = _header(what, load_average())
        _emit("\n".join([*lines, *closure_table(args)]), args.markdown)
        return
    spec = Spec(args.mib, args.files)
    compressions = args.compression.split(",")
    load = load_average()
    data = prepare(spec, compressions)
    scratch = _fresh_scratch()
    whatif = tuple(whatif_mod.parse(args.whatif))
    tvixes = {"tvix": (), **({"what-if": whatif} if whatif else {})}
    lines = [
        *_header(f"{spec.files} files, {spec.mib} MiB", load),
        *([f"what-if: tvix-mountd with `{','.join(whatif)}`  ", ""] if whatif else []),
        "| compression | nix copy | "
        + " | ".join(f"{name} first access (lookup+ingest / +full read) | ratio" for name in tvixes)
        + " | daemon RSS before / peak |",
        "|---|---|" + "---|---|" * len(tvixes) + "---|",
    ]
    for compression in compressions:
        nix_times: list[float] = []
        runs: dict[str, list[TvixRun]] = {name: [] for name in tvixes}
        for rep in range(args.reps):
            # Rotate which goes first, so none always finds the caches warmer.
            order = ["nix", *tvixes]
            order = order[rep % len(order) :] + order[: rep % len(order)]
            for which in order:
                if which == "nix":
                    nix_times.append(time_nix_copy(data, compression, scratch))
                else:
                    runs[which].append(time_tvix_mount(data, compression, scratch, tvixes[which]))
            print(
                f"{compression} rep {rep}: nix {nix_times[-1]:.2f} s, "
                + ", ".join(
                    f"{name} {r[-1].lookup:.2f} + {r[-1].total - r[-1].lookup:.2f} s"
                    f" (peak {r[-1].peak_kb / 1024:.1f} MB)"
                    for name, r in runs.items()
                ),
                file=sys.stderr,
            )
        nix = statistics.median(nix_times)
        cells = []
        for tvix_runs in runs.values():
            lookup = statistics.median(r.lookup for r in tvix_runs)
            total = statistics.median(r.total for r in tvix_runs)
            cells.append(f"{lookup:.2f} s / {total:.2f} s | {total / nix:.2f}x")
        every = [r for tvix_runs in runs.values() for r in tvix_runs]
        before = statistics.median(r.rss_before_kb for r in every) / 1024
        peak = max(r.peak_kb for r in every) / 1024
        lines.append(
            f"| {compression} | {nix:.2f} s | {' | '.join(cells)}"
            f" | {before:.0f} MB / {peak:.0f} MB |"
        )
    _emit("\n".join(lines), args.markdown)
    shutil.rmtree(scratch, ignore_errors=True)


def _header(what: str, load: float) -> list[str]:
    """The lines above a table: the command, the date, the load, the data."""
    return [
        f"Command: `python -m benchmarks.nixcache {' '.join(sys.argv[1:])}`  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())};"
        f" load average at start {load:.2f}; {what}  ",
        "",
    ]


def _fresh_scratch() -> Path:
    """An empty directory for the runs' stores (removed again at the end)."""
    scratch = WORK / "scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    return scratch


def _emit(table: str, markdown: Path | None) -> None:
    print(table)
    if markdown is not None:
        markdown.write_text(table + "\n")


if __name__ == "__main__":
    main()
