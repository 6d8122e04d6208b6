"""Fewer requests per file: what the kernel no longer asks the daemon, counted
at the daemon (its /metrics, through the supervisor), on a real mount."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mounting import KERNEL_CACHES
from tests.supervising import DaemonRequests, World, world
from tvix_mountd.workers.filesystem import READS_WITHOUT_OPEN

# Counting what the kernel does not ask because it caches: not alongside a
# test that drops the kernel's caches (machine-wide).
pytestmark = [pytest.mark.fuse, pytest.mark.xdist_group(KERNEL_CACHES)]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[World, DaemonRequests]]:
    with world(tmp_path, mounts=("a",)) as w:
        w.svc.start()
        yield w, DaemonRequests(w.svc, "a", w.path("a"))


@pytest.mark.skipif(not READS_WITHOUT_OPEN, reason="needs the pyfuse3 patch set (setup.sh)")
def test_files_are_read_without_open_or_release_requests(
    served: tuple[World, DaemonRequests],
) -> None:
    w, requests = served
    directory = w.path("a") / "dir0"
    files = sorted(p for p in os.listdir(directory) if p.startswith("file"))
    assert len(files) >= 3
    first = requests.during(lambda: (directory / files[0]).read_bytes())
    assert first["open"] <= 1 and first["release"] == 0, first  # answered ENOSYS, once
    rest = requests.during(lambda: [(directory / name).read_bytes() for name in files[1:]])
    assert rest["open"] == 0 and rest["release"] == 0, rest
    assert rest["read"] >= len(files) - 1, rest  # the contents did come from the daemon
    source = w.sources[w.names[0]] / "dir0"
    for name in files:
        assert (directory / name).read_bytes() == (source / name).read_bytes()


def test_a_miss_in_a_store_path_is_asked_once_and_one_in_the_root_every_time(
    served: tuple[World, DaemonRequests],
) -> None:
    w, requests = served
    inside = w.path("a") / "dir0" / "no-such-file.so"
    in_root = w.svc.mountpoint("a") / ("0" * 32 + "-not-yet")

    os.stat(inside.parent)  # its directory known, to count only the misses

    def miss(path: Path, times: int) -> None:
        for _ in range(times):
            with pytest.raises(FileNotFoundError) as info:
                os.stat(path)
            assert info.value.errno == errno.ENOENT

    assert requests.during(lambda: miss(inside, 1))["lookup"] == 1
    assert requests.during(lambda: miss(inside, 5))["lookup"] == 0
    assert requests.during(lambda: miss(in_root, 3))["lookup"] == 3
