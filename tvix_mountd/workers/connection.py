"""A FUSE connection that outlives its daemon: /dev/fuse, mounted by its keeper.

The kernel keeps a FUSE connection, and its mount, for as long as any open
descriptor of it lives. So whoever mounts (the supervisor) keeps the
descriptor, and lends it to one worker after another; a worker that dies
leaves the mount in place, and requests wait for the next one. What a
worker needs from the keeper: the descriptor, and the INIT request the
kernel sent once, at mount time, which every worker's libfuse must process
before it answers anything (pyfuse3 as patched, `process_request`).

Requests a dead worker had taken and not answered are handed out again
once someone writes FUSE_NOTIFY_RESEND to the device (Linux 6.9, FUSE
7.40): a new worker does so once it has processed INIT. A kernel without
it offers no FUSE_HAS_RESEND in INIT; such a connection cannot survive its
worker, and its keeper mounts again instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import select
import struct
from dataclasses import dataclass
from typing import Final

from tvix_mountd.libc import libc
from tvix_mountd.workers.mount import MountError, MountOptions, detach, find_mount_id
from tvix_mountd.workers.statefile import StateFile

FUSE_INIT: Final = 26
FUSE_NOTIFY_RESEND: Final = 7
# INIT flags, as one 64-bit word (flags, then flags2 above bit 32).
FUSE_INIT_EXT: Final = 1 << 30
FUSE_HAS_RESEND: Final = 1 << 39
# fuse_in_header, then the start of fuse_init_in.
_IN_HEADER: Final = struct.Struct("<IIQ")  # len, opcode, unique (then nodeid, uid, gid, pid, ...)
_IN_HEADER_SIZE: Final = 40
_INIT_IN: Final = struct.Struct("<IIIII")  # major, minor, max_readahead, flags, flags2
# A notification: fuse_out_header with unique 0 and the code in `error`.
_NOTIFY_RESEND: Final = struct.pack("<IiQ", 16, FUSE_NOTIFY_RESEND, 0)
# The kernel refuses reads into smaller buffers.
_READ_BUFFER: Final = 1 << 20
INIT_TIMEOUT: Final = 5.0

MS_RDONLY: Final = 1
MS_NOSUID: Final = 2
MS_NODEV: Final = 4


@dataclass(frozen=True)
class InitRequest:
    """The kernel's FUSE_INIT, as read from the device."""

    raw: bytes
    major: int
    minor: int
    flags: int

    @classmethod
    def parse(cls, raw: bytes) -> InitRequest:
        if len(raw) < _IN_HEADER_SIZE + _INIT_IN.size:
            raise MountError(f"the kernel's first request has {len(raw)} bytes: not an INIT")
        _, opcode, _ = _IN_HEADER.unpack_from(raw)
        if opcode != FUSE_INIT:
            raise MountError(f"the kernel's first request has opcode {opcode}, not INIT")
        major, minor, _, flags, flags2 = _INIT_IN.unpack_from(raw, _IN_HEADER_SIZE)
        if flags & FUSE_INIT_EXT:
            flags |= flags2 << 32
        return cls(raw, major, minor, flags)

    @property
    def resend(self) -> bool:
        """Whether the kernel can hand out again what a dead worker had taken."""
        return bool(self.flags & FUSE_HAS_RESEND)


def request_resend(fuse_fd: int) -> None:
    """Put every request taken from the connection and not answered back in
    its queue (FUSE_NOTIFY_RESEND): what a dead worker had read arrives again."""
    os.write(fuse_fd, _NOTIFY_RESEND)


class FuseConnection:
    """A mount this process made and keeps: the device descriptor, the state
    file that outlives the workers serving it, and the kernel's INIT."""

    def __init__(
        self,
        mountpoint: str,
        fuse_fd: int,
        state_fd: int,
        init: InitRequest | None,
        *,
        resend: bool,
    ) -> None:
        self.mountpoint = mountpoint
        self.fuse_fd = fuse_fd
        self.state_fd = state_fd
        self.init = init
        # Whether requests a dead worker had taken can be handed out again.
        self.resend = resend
        self.mount_id = find_mount_id(mountpoint)

    @classmethod
    def mount(
        cls, mountpoint: str, options: MountOptions, *, read_init: bool, use_resend: bool = True
    ) -> FuseConnection:
        """Mount a new FUSE connection at `mountpoint` (an empty directory).

        `read_init`: read the kernel's INIT here, for workers that can be fed
        it (`process_request`); otherwise the first worker reads it itself,
        and the connection cannot be handed to a second one. `use_resend`
        false: treat the kernel as one without FUSE_NOTIFY_RESEND.
        """
        fuse_fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        state_fd = -1
        try:
            data = ",".join(
                [
                    f"fd={fuse_fd}",
                    "rootmode=40000",
                    f"user_id={os.getuid()}",
                    f"group_id={os.getgid()}",
                    *sorted(options.kernel_options()),
                ]
            )
            _mount(options.fsname, mountpoint, "fuse.tvix", MS_RDONLY | MS_NOSUID | MS_NODEV, data)
            try:
                init = InitRequest.parse(_read_init(fuse_fd)) if read_init else None
                state_fd = StateFile.create(f"tvix-mountd {options.fsname}")
                resend = use_resend and init is not None and init.resend
                return cls(mountpoint, fuse_fd, state_fd, init, resend=resend)
            except BaseException:
                detach(mountpoint)
                raise
        except BaseException:
            os.close(fuse_fd)
            if state_fd >= 0:
                os.close(state_fd)
            raise

    def is_mounted(self) -> bool:
        """Whether our mount is still the one at the mountpoint."""
        return find_mount_id(self.mountpoint) == self.mount_id

    def close(self) -> None:
        """Unmount (lazily: users may still be inside) and let the connection go.

        Once every descriptor is closed the kernel ends the connection: what
        still waits on it fails instead of waiting forever.
        """
        if self.is_mounted():
            with contextlib.suppress(OSError):
                detach(self.mountpoint)
        for fd in (self.fuse_fd, self.state_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fuse_fd = self.state_fd = -1


def _mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    result = libc().mount(
        os.fsencode(source), os.fsencode(target), fstype.encode(), flags, data.encode()
    )
    if result != 0:
        err = ctypes.get_errno()
        raise MountError(f"cannot mount {target}: {os.strerror(err)}")


def _read_init(fuse_fd: int) -> bytes:
    # The kernel queues INIT before mount(2) returns; the deadline only guards
    # against a kernel that does not. The descriptor stays blocking, as
    # libfuse expects it in the workers.
    poller = select.poll()
    poller.register(fuse_fd, select.POLLIN)
    if not poller.poll(INIT_TIMEOUT * 1000):
        raise MountError(f"the kernel sent no FUSE INIT within {INIT_TIMEOUT:g} s")
    try:
        return os.read(fuse_fd, _READ_BUFFER)
    except OSError as e:
        if e.errno == errno.ENODEV:
            raise MountError("the mount went away before its INIT was read") from None
        raise
