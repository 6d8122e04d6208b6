"""What a client sees when a mount's worker is killed or restarted.

    .venv/bin/python -m benchmarks.handover [--events 20]

Builds a small embedded store under benchmarks/work/handover/, starts the
real supervisor with one mount, and runs a client process that reads a file
(its pages dropped first, so every read reaches the worker) and stats
another, in a loop, logging every operation (start, end, errno). Then, `--events` times each:

- SIGKILL of the worker;
- `tvix-mountd restart` of the mount.

Both first as the service does now (the live connection handed over), then
as it did before: a crash unmounted and mounted again (the path kept for
kernels without FUSE_NOTIFY_RESEND, forced with TVIX_MOUNTD_NO_RESEND=1),
and a changed mount was stopped and started (a reload that changes
allow_other, the one option that still mounts again).

Per event: the client-visible stall (the longest time, around the event,
between two operations that succeeded), the time from the event to the
supervisor reporting a new worker serving, and the client's failed
operations. Prints p50 and max over the events, as a Markdown table.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import os
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.supervised import BIN, free_port, percentile, start, stop

WORK = Path(__file__).resolve().parent / "work" / "handover"
# Before each event, the client must have done this many more operations.
SETTLE_OPS = 200
_RECORD = struct.Struct("<ddi")  # as the client writes them: start, end, errno


def _client(path: str, small: str, log: str, stop_file: str) -> None:  # pragma: no cover
    """The client, in its own process: stdlib only."""
    import errno
    import os
    import struct
    import time

    record = struct.Struct("<ddi")  # start, end, errno (0: success)
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
    count = 0
    while not os.path.exists(stop_file):
        started = time.monotonic()
        error = 0
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.pread(fd, 1 << 16, (count * 4096) % (1 << 20))
            finally:
                os.close(fd)
            os.stat(small)
        except OSError as e:
            error = e.errno or errno.EIO
        count += 1
        os.write(out, record.pack(started, time.monotonic(), error))


@dataclass
class Event:
    kind: str
    at: float
    serving: float  # seconds until a new worker served


def _status(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as r:
        document: dict[str, Any] = json.loads(r.read())
    mount: dict[str, Any] = document["mounts"][0]
    return mount


def _wait_serving(port: int, old: int | None, deadline: float) -> None:
    while True:
        status = _status(port)
        if status["state"] == "serving" and status["pid"] not in (None, old):
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"no new worker serving: {status}")
        time.sleep(0.002)  # polling another process's state: nothing to wait on


def _records(log: Path) -> list[tuple[float, float, int]]:
    data = log.read_bytes()
    size = _RECORD.size
    return [_RECORD.unpack_from(data, i) for i in range(0, len(data) - len(data) % size, size)]


def _client_ops(log: Path) -> int:
    try:
        return log.stat().st_size // _RECORD.size
    except FileNotFoundError:
        return 0


def _wait_ops(log: Path, ops: int) -> None:
    """Until the client has logged `ops` more operations (within a minute)."""
    target = _client_ops(log) + ops
    deadline = time.monotonic() + 60
    while _client_ops(log) < target:
        if time.monotonic() > deadline:
            raise SystemExit("the client made no progress")
        time.sleep(0.01)  # waiting for the client's progress, logged by it


def _config(port: int, allow_other: bool) -> Path:
    data = WORK / "data"
    lines = [
        "[supervisor]",
        f'state_dir = "{WORK / "run"}"',
        f'health_listen = "127.0.0.1:{port}"',
        "[stores.local]",
        f'blob_service_addr = "raw+file://{data}/blobs"',
        f'directory_service_addr = "sqlite://{data}/directories.sqlite"',
        f'path_info_service_addr = "sqlite://{data}/pathinfo.sqlite"',
        "[[mounts]]",
        'name = "a"',
        'store = "local"',
        f'mountpoint = "{WORK / "mnt" / "a"}"',
        f"allow_other = {'true' if allow_other else 'false'}",
    ]
    path = WORK / "mountd.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _import_sample(config: Path) -> str:
    sample = WORK / "sample" / "tree"
    sample.mkdir(parents=True, exist_ok=True)
    (sample / "big.bin").write_bytes(os.urandom(1 << 20))
    (sample / "small").write_text("small\n")
    out = subprocess.run(
        [str(BIN), "import", "--config", str(config), "--store", "local", str(sample)],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip().rsplit("/", 1)[1]


def _run(mode: str, events: int, basename: str) -> list[tuple[Event, float, int]]:
    """`events` kills and `events` restarts in `mode` (handover or remount):
    per event (the event, the client's stall around it, failed operations)."""
    port = free_port()
    allow_other = False
    config = _config(port, allow_other)
    env = dict(os.environ)
    if mode == "remount":
        env["TVIX_MOUNTD_NO_RESEND"] = "1"
    process, _ = start(config, port, WORK / f"supervisor-{mode}.log", env)
    root = WORK / "mnt" / "a" / basename
    log = WORK / f"client-{mode}.log"
    stop_file = WORK / f"stop-{mode}"
    stop_file.unlink(missing_ok=True)
    code = inspect.getsource(_client) + (
        f"\n_client({str(root / 'big.bin')!r}, {str(root / 'small')!r}, {str(log)!r},"
        f" {str(stop_file)!r})\n"
    )
    client = subprocess.Popen([sys.executable, "-c", code])
    happened: list[Event] = []
    try:
        for kind in ("kill", "restart"):
            for _ in range(events):
                _wait_ops(log, SETTLE_OPS)
                old = _status(port)["pid"]
                at = time.monotonic()
                if kind == "kill":
                    os.kill(old, signal.SIGKILL)
                elif mode == "handover":
                    subprocess.run(
                        [str(BIN), "restart", "--config", str(config), "a"],
                        check=True,
                        capture_output=True,
                    )
                else:
                    # Before handover: a changed mount was stopped and started.
                    allow_other = not allow_other
                    _config(port, allow_other)
                    subprocess.run(
                        [str(BIN), "reload", "--config", str(config)],
                        check=True,
                        capture_output=True,
                    )
                _wait_serving(port, old, at + 30)
                happened.append(Event(kind, at, time.monotonic() - at))
        _wait_ops(log, SETTLE_OPS)  # the last event's window has the client in it too
    finally:
        stop_file.touch()
        client.wait(timeout=30)
        stop(process)
    records = _records(log)
    results = []
    for event in happened:
        # From the last success before the event to a second after a new
        # worker served (or the client's last operation, if it stopped
        # before: past that, a gap is not a stall): the longest time between
        # two successes, and what failed.
        end = min(event.at + event.serving + 1.0, records[-1][1])
        window = [r for r in records if r[1] <= end]
        ok_ends = [r[1] for r in window if not r[2]]
        earlier = [t for t in ok_ends if t < event.at]
        ends = [earlier[-1] if earlier else event.at, *(t for t in ok_ends if t >= event.at), end]
        stall = max(b - a for a, b in itertools.pairwise(ends))
        failed = sum(1 for r in window if r[2] and r[0] >= event.at)
        results.append((event, stall, failed))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=20)
    args = parser.parse_args()
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    basename = _import_sample(_config(free_port(), False))
    rows = []
    for mode in ("handover", "remount"):
        results = _run(mode, args.events, basename)
        for kind in ("kill", "restart"):
            mine = [(e, stall, failed) for e, stall, failed in results if e.kind == kind]
            stalls = [stall for _, stall, _ in mine]
            serving = [e.serving for e, _, _ in mine]
            rows.append(
                (
                    mode,
                    kind,
                    statistics.median(stalls),
                    max(stalls),
                    statistics.median(serving),
                    max(serving),
                    sum(failed for _, _, failed in mine),
                    percentile(stalls, 0.9),
                )
            )
    print(f"{args.events} events of each kind; load average {os.getloadavg()[0]:.2f}")
    print(
        "| path | event | stall p50 | stall p90 | stall max | to serving p50 | max"
        " | failed ops |\n|---|---|---:|---:|---:|---:|---:|---:|"
    )
    names = {
        ("handover", "kill"): ("handed over (now)", "SIGKILL"),
        ("handover", "restart"): ("handed over (now)", "`restart`"),
        ("remount", "kill"): ("unmount and mount (before)", "SIGKILL"),
        ("remount", "restart"): ("unmount and mount (before)", "reload of a changed mount"),
    }
    for mode, kind, p50, worst, serve50, serve_max, failed, p90 in rows:
        path, event = names[(mode, kind)]
        print(
            f"| {path} | {event} | {p50 * 1000:.0f} ms | {p90 * 1000:.0f} ms"
            f" | {worst * 1000:.0f} ms | {serve50 * 1000:.0f} ms | {serve_max * 1000:.0f} ms"
            f" | {failed} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
