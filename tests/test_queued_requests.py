"""Several programs reading one mount at once, through the kernel: the
requests queue in the FUSE device, and the patched pyfuse3 reads them
without waiting on the event loop first (third_party/pyfuse3/
05-read-queued-requests.patch), from a descriptor it made non-blocking."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path
from typing import Final

import pytest

from tests.mounting import backing_store, mounted
from tests.supervising import make_tree, tree_files
from tvix_mountd.workers.mount import block_unless_reading_queued

READERS: Final = 6
DIRECTORIES: Final = 6
FILES: Final = 40
QUEUED_READS_PATCH: Final = "read.queued.requests"


# Each reader process stats and reads every file, starting at its own place
# (some with one read, some in small pieces), and prints what it read.
_READER = """
import hashlib, os, sys
top, start = sys.argv[1], int(sys.argv[2])
names = sorted(
    os.path.relpath(os.path.join(d, f), top) for d, _, files in os.walk(top) for f in files
)
names = names[start:] + names[:start]
for rel in names:
    path = os.path.join(top, rel)
    size = os.stat(path).st_size
    with open(path, "rb") as f:
        data = f.read() if start % 2 else b"".join(iter(lambda: f.read(7), b""))
    assert len(data) == size, (rel, len(data), size)
    print(rel, hashlib.sha256(data).hexdigest())
"""


def _nonblocking_fuse_descriptors(pid: int) -> list[bool]:
    """For each /dev/fuse descriptor of process `pid`: whether it is non-blocking."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "/dev/fuse":
                continue
            fdinfo = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except FileNotFoundError:
            continue
        flags = next(line for line in fdinfo.splitlines() if line.startswith("flags:"))
        found.append(bool(int(flags.split()[1], 8) & os.O_NONBLOCK))
    return found


@pytest.mark.parametrize("store_kind", ["embedded", "grpc"])
def test_concurrent_readers_read_every_file_right(tmp_path: Path, store_kind: str) -> None:
    source = tmp_path / "src" / "tree"
    contents = tree_files(make_tree(source, files=FILES, size=800, subdirs=DIRECTORIES))
    expected = {rel: hashlib.sha256(data).hexdigest() for rel, data in contents.items()}
    with backing_store(store_kind, tmp_path / "store") as store:
        (info,) = store.import_paths([source])
        with mounted(store.addrs, tmp_path) as mount:
            top = mount.path / info.store_path.basename
            readers = [
                subprocess.Popen(
                    [sys.executable, "-c", _READER, str(top), str(i * 37)],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for i in range(READERS)
            ]
            try:
                outputs = [reader.communicate(timeout=120) for reader in readers]
            finally:
                for reader in readers:
                    if reader.poll() is None:
                        reader.kill()
                        reader.wait()
            for reader, (out, err) in zip(readers, outputs, strict=True):
                assert reader.returncode == 0, err
                seen = dict(line.split() for line in out.splitlines())
                assert seen == expected
            descriptors = _nonblocking_fuse_descriptors(mount.process.pid)
            assert descriptors, "the daemon holds no /dev/fuse descriptor"
            if QUEUED_READS_PATCH in importlib.metadata.version("pyfuse3"):
                assert all(descriptors), descriptors


@pytest.mark.parametrize("reads_queued", [True, False])
def test_a_worker_without_the_patch_gets_a_blocking_descriptor(reads_queued: bool) -> None:
    # A pipe stands in for the connection's descriptor: O_NONBLOCK is a flag
    # of the open file, shared by every worker that serves it in turn, and
    # left set by a worker before with patch 05.
    read_end, write_end = os.pipe()
    try:
        os.set_blocking(read_end, False)
        block_unless_reading_queued(read_end, reads_queued)
        assert os.get_blocking(read_end) is not reads_queued
    finally:
        os.close(read_end)
        os.close(write_end)
