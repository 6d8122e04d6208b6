"""The kernel's forgets, honoured on a real mount: what a worker keeps is what
the kernel keeps, counted at the daemon (its /metrics, through the
supervisor)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.mounting import FORGETS_OVERTAKEN, KERNEL_CACHES
from tests.supervising import World, parse_metrics, sample, world

# Drops the kernel's caches (machine-wide): not beside a test counting what
# the kernel caches.
pytestmark = [pytest.mark.fuse, pytest.mark.xdist_group(KERNEL_CACHES)]


def _live_inodes(w: World) -> float | None:
    return sample(parse_metrics(w.svc.http("/metrics")[1]), "tvix_mountd_inodes", mount="a")


def test_a_walk_under_a_directory_the_kernel_keeps_is_given_back_when_it_forgets(
    tmp_path: Path,
) -> None:
    """A stat walk under a directory the kernel keeps (a store path, open
    here), then the kernel forgets the rest: the worker is left with that
    directory and the entries its cached listing names, not the tree below
    them (whose directories' own listings the kernel forgot with them)."""
    with world(tmp_path, mounts=("a",), trees=1, files=5, subdirs=3) as w:
        w.svc.start()
        top = w.path("a")
        fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)  # keeps it, and its listing
        try:
            entries = sorted(os.listdir(top))
            walked = 1 + len(entries)
            for name in entries:
                if (top / name).is_dir():
                    for child in os.listdir(top / name):
                        os.lstat(top / name / child)
                        walked += 1
            assert walked == 1 + 4 + 3 * 5
            w.svc.wait_for(lambda: _live_inodes(w) == walked, "the walk's inodes in /metrics")
            # Mode 2: the kernel drops the dentries and inodes nothing uses,
            # and sends FORGET for each; queued forgets may be overtaken by
            # a few requests, and a STATFS is one that creates no inode.
            Path("/proc/sys/vm/drop_caches").write_text("2\n")
            for _ in range(FORGETS_OVERTAKEN + 1):
                os.statvfs(top)
            kept = 1 + len(entries)
            w.svc.wait_for(
                lambda: _live_inodes(w) == kept,
                f"{kept} inodes left in /metrics",
            )
            # What is kept reads as before.
            assert sorted(os.listdir(top)) == entries
        finally:
            os.close(fd)
