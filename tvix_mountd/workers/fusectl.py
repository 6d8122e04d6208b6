"""Aborting a FUSE connection through the kernel's control filesystem (fusectl).

Writing to `/sys/fs/fuse/connections/N/abort` ends connection N as if its
daemon had closed it: every request waiting on it fails (ECONNABORTED), and
so does every wait that hangs on one, such as a page a READ keeps locked.
It is the last resort for a connection whose daemon can neither answer nor
end. Not every system mounts fusectl; it is mounted here for the abort (root
may) and unmounted again, leaving the system as it was.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
from pathlib import Path
from typing import Final

from tvix_mountd.libc import libc
from tvix_mountd.workers.mounttable import find_mount_id

log = logging.getLogger(__name__)

FUSECTL: Final = Path("/sys/fs/fuse/connections")


def abort_connection(connection: int) -> bool:
    """Abort FUSE connection `connection` (the minor number of its mount's
    device); whether it was there to abort. OSError if fusectl cannot be
    reached (not mounted, and not mountable by this process)."""
    mounted_here = False
    if find_mount_id(str(FUSECTL)) is None:
        if libc().mount(b"fusectl", bytes(FUSECTL), b"fusectl", 0, None) != 0:
            err = ctypes.get_errno()
            if err != errno.EBUSY:  # someone else mounted it meanwhile
                raise OSError(err, f"mounting fusectl on {FUSECTL}: {os.strerror(err)}")
        else:
            mounted_here = True
    try:
        try:
            (FUSECTL / str(connection) / "abort").write_text("1")
        except FileNotFoundError:
            return False
        return True
    finally:
        if mounted_here and libc().umount2(bytes(FUSECTL), 0) != 0:
            log.warning(
                "could not unmount fusectl from %s: %s", FUSECTL, os.strerror(ctypes.get_errno())
            )
