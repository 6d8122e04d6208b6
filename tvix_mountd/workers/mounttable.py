"""The mount table as this process sees it (/proc/self/mountinfo), and unmounting.

Kept apart from mount.py so that a process that only looks at mounts (the
standalone mount's watchdog) does not load pyfuse3 and trio for it.
"""

from __future__ import annotations

import ctypes
import errno
import os
from typing import Final, NamedTuple

from tvix_mountd.libc import libc

MNT_DETACH: Final = 2


def _mountinfo() -> list[list[str]]:
    with open("/proc/self/mountinfo") as f:
        return [line.split() for line in f]


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal.
    return field.encode().decode("unicode_escape")


class MountEntry(NamedTuple):
    device: str  # major:minor
    fstype: str  # fuse.tvix for ours
    source: str  # tvix-mountd:NAME for ours


def find_mount_id(mountpoint: str) -> int | None:
    """The mount ID of what is mounted at `mountpoint` (the topmost), if anything.

    IDs are not reused while a mount lives, so an ID still at the mountpoint
    is the same mount.
    """
    found = None
    for fields in _mountinfo():
        if _unescape(fields[4]) == mountpoint:
            found = int(fields[0])
    return found


def find_mount(mountpoint: str) -> MountEntry | None:
    """What is mounted at `mountpoint` (the topmost), if anything."""
    found = None
    for fields in _mountinfo():
        if _unescape(fields[4]) == mountpoint:
            sep = fields.index("-")
            found = MountEntry(fields[2], fields[sep + 1], _unescape(fields[sep + 2]))
    return found


def detach(mountpoint: str) -> None:
    """Lazily unmount whatever is at `mountpoint` (umount2 MNT_DETACH)."""
    if libc().umount2(os.fsencode(mountpoint), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):  # not mounted (any more)
            raise OSError(err, f"unmounting {mountpoint}: {os.strerror(err)}")
