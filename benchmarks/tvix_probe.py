"""Run `tvix-mountd` with its FUSE handlers counted and timed; for benchmarks.profile only.

`python -m benchmarks.tvix_probe mount ...` is `tvix-mountd mount ...` with
every request handler of StoreFilesystem wrapped: calls, wall time inside the
handler (awaits included), read sizes, forget counts. At exit (the daemon
exits normally on SIGTERM) the numbers go to the JSON file named by
$TVIX_PROBE_OUT. Nothing in tvix_mountd changes: the wrapping happens on the
class, in this process, before the CLI starts. The wrapper costs about a
microsecond per request, so timed runs never use it.

SIGUSR1 writes a snapshot of the counts so far to $TVIX_PROBE_OUT.<n> (n = 1,
2, ...) and starts counting afresh, so a caller can bracket exactly one run.
"""

from __future__ import annotations

import atexit
import collections
import functools
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

from tvix_mountd import cli
from tvix_mountd.workers.filesystem import StoreFilesystem

OPS: Final = (
    "lookup",
    "getattr",
    "forget",
    "opendir",
    "readdir",
    "releasedir",
    "open",
    "read",
    "release",
    "flush",
    "readlink",
    "getxattr",
    "listxattr",
    "statfs",
)

calls: collections.Counter[str] = collections.Counter()
seconds: collections.defaultdict[str, float] = collections.defaultdict(float)
read_sizes: collections.Counter[int] = collections.Counter()
forgotten = 0
readdir_entries = 0
# Handler times in buckets of powers of two microseconds (bucket b holds
# calls of [2**(b-1), 2**b) us): whether a few slow calls (a cold disk)
# or every call make an op's total.
durations: collections.defaultdict[str, collections.Counter[int]] = collections.defaultdict(
    collections.Counter
)


def _wrap(name: str, fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    perf_counter = time.perf_counter

    @functools.wraps(fn)
    async def wrapper(*args: Any) -> Any:
        global forgotten
        if name == "read":
            read_sizes[args[3]] += 1
        elif name == "forget":
            forgotten += len(args[1])
        started = perf_counter()
        try:
            return await fn(*args)
        finally:
            took = perf_counter() - started
            seconds[name] += took
            calls[name] += 1
            durations[name][int(took * 1e6).bit_length()] += 1

    return wrapper


def _count_readdir_entries() -> None:
    import pyfuse3

    original = pyfuse3.readdir_reply

    def readdir_reply(*args: Any) -> bool:
        global readdir_entries
        taken = bool(original(*args))
        readdir_entries += taken
        return taken

    setattr(pyfuse3, "readdir_reply", readdir_reply)  # noqa: B010 - typed stub differs


_snapshots = 0
_cpu_at_reset = 0.0


def _snapshot() -> dict[str, Any]:
    return {
        "calls": dict(calls),
        "handler_seconds": dict(seconds),
        "read_sizes": {str(k): v for k, v in sorted(read_sizes.items())},
        "forgotten_inodes": forgotten,
        "readdir_entries": readdir_entries,
        "duration_buckets": {op: dict(sorted(c.items())) for op, c in durations.items()},
        "cpu_seconds": time.process_time() - _cpu_at_reset,
    }


def _write(path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_snapshot(), f, indent=2)
    os.replace(tmp, path)


def _reset() -> None:
    global forgotten, readdir_entries, _cpu_at_reset
    calls.clear()
    seconds.clear()
    read_sizes.clear()
    durations.clear()
    forgotten = readdir_entries = 0
    _cpu_at_reset = time.process_time()


def _on_usr1(signum: int, frame: object) -> None:
    global _snapshots
    out = os.environ.get("TVIX_PROBE_OUT")
    _snapshots += 1
    if out:
        _write(f"{out}.{_snapshots}")
    _reset()


def _dump() -> None:
    out = os.environ.get("TVIX_PROBE_OUT")
    if out:
        _write(out)


def main() -> int:
    from benchmarks import whatif

    whatif.apply_from_env()
    for op in OPS:
        setattr(StoreFilesystem, op, _wrap(op, getattr(StoreFilesystem, op)))
    _count_readdir_entries()
    atexit.register(_dump)
    signal.signal(signal.SIGUSR1, _on_usr1)
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
