"""The benchmark data: built once, cached under benchmarks/work/, reused while complete.

One tree, four parts, each its own store path when imported:

    big/big.bin                    one file of incompressible pseudo-random bytes
    small/dNNNN/fNNNNNN            many small files (1-4 KiB, all different) in ~1,000 dirs
    wide/eNNNNNN                   one directory of many small files
    startup/bin/python3.11         Debian's python3.11 and its standard library
    startup/lib/python3.11/...     (benchmarks.interpreter; left out, with the start-up
                                   row, on a machine without /usr/bin/python3.11)

The tree exists three times: as a plain directory (native, bindfs), as a
squashfs image (squashfuse_ll) and in an embedded tvix store (raw+file
blobs, sqlite directories and path infos) imported with `tvix-mountd import`.

Every stage is complete only once its marker file `<stage>.done` exists (written
last, holding what the stage produced); an interrupted stage is redone from
scratch on the next run, and a rebuilt tree invalidates the image and the store.
The cache directory is named after DATA_VERSION and the spec, so a change to
either builds new data next to the old.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Final

import blake3

from benchmarks import interpreter

# Bump when the layout or the contents of the generated data change.
# 2: the startup part. 3: the store written with packs (small blobs packed).
DATA_VERSION: Final = 3

BIG: Final = "big"
SMALL: Final = "small"
WIDE: Final = "wide"
STARTUP: Final = "startup"
PARTS: Final = (BIG, SMALL, WIDE, STARTUP)  # every part; DataSet.parts: those built
BIG_FILE_NAME: Final = "big.bin"

# Uncompressed everything (inodes, data, fragments, xattrs): the read path is a
# plain pread of the image, like the other peers read plain files. 128 KiB
# blocks and no fragment packing: every file's data is its own block, read with
# one pread and no fragment cache in between. Measured here (full data, median
# of 3): 128 KiB with or without fragments equal within noise on every
# workload; 1 MiB blocks 1.5x slower on the warm 1 GiB read (see RESULTS.md).
DEFAULT_SQUASHFS_OPTIONS: Final = (
    "-noI",
    "-noD",
    "-noF",
    "-noX",
    "-no-xattrs",
    "-all-root",
    "-b",
    "131072",
    "-no-fragments",
)

_WRITE_CHUNK: Final = 64 << 20
_POOL_SIZE: Final = 4 << 20


@dataclass(frozen=True)
class DataSpec:
    """How much data to build; every file name and byte follows from it."""

    name: str
    big_bytes: int
    small_files: int
    small_dirs: int
    wide_files: int
    min_size: int = 1024
    max_size: int = 4096
    seed: int = 20251122

    def __post_init__(self) -> None:
        if self.small_files % self.small_dirs:
            raise ValueError("small_files must be a multiple of small_dirs")

    @property
    def files_per_dir(self) -> int:
        return self.small_files // self.small_dirs

    def small_relpaths(self) -> Iterator[str]:
        """The small files, relative to the `small` part, in name order."""
        per_dir = self.files_per_dir
        for d in range(self.small_dirs):
            for i in range(d * per_dir, (d + 1) * per_dir):
                yield f"d{d:04d}/f{i:06d}"

    def wide_names(self) -> Iterator[str]:
        for i in range(self.wide_files):
            yield f"e{i:06d}"

    def describe(self) -> str:
        return (
            f"{self.name}: {_size(self.big_bytes)} file, {self.small_files:,} small files"
            f" in {self.small_dirs:,} dirs, {self.wide_files:,} entries in one dir"
        )


FULL: Final = DataSpec("full", 1 << 30, 100_000, 1_000, 50_000)
QUICK: Final = DataSpec("quick", 64 << 20, 5_000, 50, 5_000)


def _size(n: int) -> str:
    if n >= 1 << 30 and n % (1 << 30) == 0:
        return f"{n >> 30} GiB"
    return f"{n >> 20} MiB"


@dataclass(frozen=True)
class DataSet:
    """A complete, built data set."""

    spec: DataSpec
    root: Path
    small_bytes: int  # total bytes of the small files (for checking cat)
    # Modules loaded by the reference start-up (for checking it); None: no
    # startup part on this machine.
    startup_modules: int | None
    store_paths: dict[str, str]  # part -> /nix/store/<hash>-<part>
    squashfs_options: tuple[str, ...]

    @property
    def parts(self) -> tuple[str, ...]:
        """The parts this data set holds."""
        return tuple(p for p in PARTS if p != STARTUP or self.startup_modules is not None)

    @property
    def tree(self) -> Path:
        return self.root / "tree"

    @property
    def image(self) -> Path:
        return self.root / "image.sqfs"

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def blob_service_addr(self) -> str:
        return f"raw+file://{self.store}/blobs"

    @property
    def directory_service_addr(self) -> str:
        return f"sqlite://{self.store}/directories.sqlite"

    @property
    def path_info_service_addr(self) -> str:
        return f"sqlite://{self.store}/pathinfo.sqlite"


Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_marker(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _write_file(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def _small_contents(spec: DataSpec) -> Iterator[tuple[str, bytes]]:
    """(path relative to the tree, contents) of every small file, small then wide.

    Contents are windows of an incompressible pool at random offsets, each
    prefixed with its own path, so no two files are equal (tvix-mountd shares
    an inode between equal files; the peers do not).
    """
    pool = blake3.blake3(f"pool-{spec.seed}".encode()).digest(length=_POOL_SIZE)
    rng = random.Random(spec.seed)
    names = [f"{SMALL}/{rel}" for rel in spec.small_relpaths()]
    names += [f"{WIDE}/{name}" for name in spec.wide_names()]
    for rel in names:
        size = rng.randint(spec.min_size, spec.max_size)
        header = rel.encode() + b"\n"
        offset = rng.randrange(_POOL_SIZE - size)
        yield rel, header + pool[offset : offset + size - len(header)]


def _build_tree(spec: DataSpec, tree: Path, log: Log) -> dict[str, Any]:
    started = time.perf_counter()
    big_dir = tree / BIG
    big_dir.mkdir(parents=True)
    log(f"data: writing {_size(spec.big_bytes)} of pseudo-random bytes")
    seed = blake3.blake3(f"big-{spec.seed}".encode())
    fd = os.open(big_dir / BIG_FILE_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC)
    try:
        for offset in range(0, spec.big_bytes, _WRITE_CHUNK):
            n = min(_WRITE_CHUNK, spec.big_bytes - offset)
            block = memoryview(seed.digest(length=n, seek=offset))
            while block:
                block = block[os.write(fd, block) :]
    finally:
        os.close(fd)

    log(f"data: writing {spec.small_files + spec.wide_files:,} small files")
    for d in range(spec.small_dirs):
        (tree / SMALL / f"d{d:04d}").mkdir(parents=True)
    (tree / WIDE).mkdir()
    small_bytes = 0
    root = str(tree)
    for rel, contents in _small_contents(spec):
        _write_file(f"{root}/{rel}", contents)
        if rel.startswith(SMALL + "/"):
            small_bytes += len(contents)

    startup_modules = None
    why_not = interpreter.missing()
    if why_not is None:
        log(f"data: copying {interpreter.SOURCE_BINARY} and {interpreter.SOURCE_LIBRARY}")
        startup_modules = interpreter.build(tree / STARTUP)
        log(f"data: the reference start-up loads {startup_modules} modules")
    else:
        log(f"data: no {STARTUP} part, and no start-up row: {why_not}")
    os.sync()
    log(f"data: tree written in {time.perf_counter() - started:.1f} s")
    return {"small_bytes": small_bytes, "startup_modules": startup_modules}


def _build_image(tree: Path, image: Path, options: tuple[str, ...], log: Log) -> None:
    started = time.perf_counter()
    log(f"data: mksquashfs {' '.join(options)}")
    tmp = image.with_suffix(".tmp")
    _remove(tmp)
    subprocess.run(
        ["mksquashfs", str(tree), str(tmp), "-noappend", "-quiet", "-no-progress", *options],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    os.replace(tmp, image)
    os.sync()
    log(f"data: image built in {time.perf_counter() - started:.1f} s")


def tvix_mountd_command() -> list[str]:
    """How to run the `tvix-mountd` console script of this venv."""
    script = Path(sys.executable).with_name("tvix-mountd")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "tvix_mountd.cli"]


def _build_store(data: DataSet, log: Log) -> dict[str, str]:
    started = time.perf_counter()
    data.store.mkdir()
    config = data.store / "import.toml"
    config.write_text(
        "[stores.bench]\n"
        f'blob_service_addr = "{data.blob_service_addr}"\n'
        f'directory_service_addr = "{data.directory_service_addr}"\n'
        f'path_info_service_addr = "{data.path_info_service_addr}"\n'
    )
    log("data: tvix-mountd import (one store path per part)")
    result = subprocess.run(
        [
            *tvix_mountd_command(),
            "--log-level",
            "warning",
            "import",
            "--config",
            str(config),
            "--store",
            "bench",
            *(str(data.tree / part) for part in data.parts),
        ],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    lines = result.stdout.split()
    if len(lines) != len(data.parts) or not all(line.startswith("/nix/store/") for line in lines):
        raise RuntimeError(f"tvix-mountd import printed {result.stdout!r}")
    os.sync()
    log(f"data: store imported in {time.perf_counter() - started:.1f} s")
    return dict(zip(data.parts, lines, strict=True))


def prepare_tree(
    spec: DataSpec, work_dir: Path, *, rebuild: bool = False, log: Log = _stderr
) -> tuple[Path, dict[str, Any]]:
    """The tree stage alone: the data set's root (the tree is `root/"tree"`)
    and what building the tree recorded. A rebuilt tree invalidates the
    stages built from it."""
    root = work_dir / f"data-v{DATA_VERSION}-{spec.name}"
    root.mkdir(parents=True, exist_ok=True)
    # A new interpreter (or one installed since) means a new startup part.
    startup_python = None if interpreter.missing() else interpreter.source_version()
    key = {"version": DATA_VERSION, "spec": asdict(spec), "startup_python": startup_python}
    tree_marker = root / "tree.done"
    later_markers = (root / "image.done", root / "store.done")
    if rebuild:
        for marker in (tree_marker, *later_markers):
            _remove(marker)
    tree_info = _read_marker(tree_marker)
    if tree_info is None or tree_info.get("key") != key:
        log(f"data: building {spec.describe()} under {root}")
        for marker in (tree_marker, *later_markers):
            _remove(marker)  # whatever was built from an old tree is stale
        _remove(root / "tree")
        tree_info = {"key": key, **_build_tree(spec, root / "tree", log)}
        _write_marker(tree_marker, tree_info)
    return root, tree_info


def prepare(
    spec: DataSpec,
    work_dir: Path,
    *,
    squashfs_options: tuple[str, ...] = DEFAULT_SQUASHFS_OPTIONS,
    rebuild: bool = False,
    log: Log = _stderr,
) -> DataSet:
    """The data set for `spec`: reused if complete, otherwise built (stage by stage)."""
    root, tree_info = prepare_tree(spec, work_dir, rebuild=rebuild, log=log)
    image_marker = root / "image.done"
    store_marker = root / "store.done"

    image_info = _read_marker(image_marker)
    if image_info is None or image_info.get("options") != list(squashfs_options):
        _remove(image_marker)
        _remove(root / "image.sqfs")
        _build_image(root / "tree", root / "image.sqfs", squashfs_options, log)
        image_info = {"options": list(squashfs_options)}
        _write_marker(image_marker, image_info)

    data = DataSet(
        spec=spec,
        root=root,
        small_bytes=int(tree_info["small_bytes"]),
        startup_modules=tree_info["startup_modules"],
        store_paths={},
        squashfs_options=squashfs_options,
    )
    store_info = _read_marker(store_marker)
    if store_info is None or sorted(store_info.get("store_paths", {})) != sorted(data.parts):
        _remove(store_marker)
        _remove(data.store)
        store_info = {"store_paths": _build_store(data, log)}
        _write_marker(store_marker, store_info)
    return replace(data, store_paths=dict(store_info["store_paths"]))
