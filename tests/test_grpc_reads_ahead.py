"""A mount of a tvix-store over gRPC, walked and read as a program would:
the reads ahead (workers/dirahead.py, workers/prefetch.py) and the opens of
small files without a Stat, through the kernel, against the real test
server."""

from __future__ import annotations

import os
import re
from pathlib import Path

from tests.mounting import backing_store, mounted
from tests.supervising import make_tree, tree_files
from tvix_mountd.castore.digests import B3Digest

DIRECTORIES = 12
FILES = 24


def _tree(root: Path) -> dict[str, bytes]:
    return tree_files(make_tree(root, files=FILES, subdirs=DIRECTORIES))


def test_a_walk_and_read_in_name_order_is_served_ahead_without_stats(tmp_path: Path) -> None:
    """A walk that lists each directory and reads its files in name order (a
    copy, `tar`, `os.walk`) reads back the tree byte for byte; no small file
    costs a Stat, and files read ahead went into the kernel's page cache
    (the daemon counts them at unmount)."""
    source = tmp_path / "src" / "tree"
    contents = _tree(source)
    with backing_store("grpc", tmp_path / "store") as store:
        (info,) = store.import_paths([source])
        assert store.server is not None
        store.server.calls.stats.clear()
        with mounted(store.addrs, tmp_path) as mount:
            top = mount.path / info.store_path.basename
            seen = {}
            for directory, subdirectories, files in os.walk(top):
                subdirectories.sort()
                for name in sorted(files):
                    path = Path(directory) / name
                    seen[str(path.relative_to(top))] = path.read_bytes()
            assert seen == contents
            assert store.server.calls.stats == []
        stored = re.search(r"files stored ahead into the kernel's page cache: (\d+)", mount.log())
        assert stored is not None, mount.log()
        assert int(stored.group(1)) > 0


def test_with_read_ahead_off_only_what_is_read_is_asked_for(tmp_path: Path) -> None:
    """`--read-ahead false` (the `read_ahead` key): files read in name order
    are asked of the store one by one as they are read, nothing more."""
    source = tmp_path / "src" / "tree"
    contents = _tree(source)
    with backing_store("grpc", tmp_path / "store") as store:
        (info,) = store.import_paths([source])
        assert store.server is not None
        reads = store.server.calls.reads
        with mounted(store.addrs, tmp_path, extra_args=("--read-ahead", "false")) as mount:
            top = mount.path / info.store_path.basename
            reads.clear()
            names = sorted(rel for rel in contents if rel.startswith("dir0/"))[:6]
            for rel in names:  # a run in name order: would start the read-ahead
                assert (top / rel).read_bytes() == contents[rel]
        # The daemon has stopped: whatever it asked for has reached the server.
        assert sorted(reads) == sorted(B3Digest.of(contents[rel]) for rel in names)
