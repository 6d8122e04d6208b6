"""Running the real supervisor for a benchmark: a port, start until ready, stop."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path

BIN = Path(sys.executable).parent / "tvix-mountd"
START_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def start(
    config: Path, port: int, log: Path, env: Mapping[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], float]:
    """`tvix-mountd start --config CONFIG` until /readyz answers 200: (process, seconds)."""
    started = time.perf_counter()
    process = subprocess.Popen(
        [str(BIN), "start", "--config", str(config)], stderr=log.open("ab"), env=env
    )
    deadline = started + START_TIMEOUT
    while not ready(port):
        if process.poll() is not None or time.perf_counter() > deadline:
            process.kill()
            raise SystemExit(f"the supervisor did not become ready; see {log}")
        time.sleep(0.005)  # polling another process's readiness: nothing to wait on
    return process, time.perf_counter() - started


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]
