"""Directories of the embedded store's files (blob roots, sqlite files)."""

from __future__ import annotations

import os


def fsync_dir(path: str) -> None:
    """Make the entries of directory `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: str, mode: int, *, durable: bool = False) -> None:
    """Create directory `path` and its missing parents, every one with `mode`
    (os.makedirs gives only the last one the mode asked for); `durable`: each
    new entry fsynced into its parent. Another process creating one of them
    at the same time is fine."""
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    for directory in reversed(missing):
        try:
            os.mkdir(directory, mode)
        except FileExistsError:
            if not os.path.isdir(directory):
                raise
            continue
        if durable:
            fsync_dir(os.path.dirname(directory))
