"""The client side of the control socket, for the CLI (plain blocking calls)."""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc

from tvix_mountd.proto import control_pb2, control_pb2_grpc
from tvix_mountd.supervisor.state_files import CONTROL_SOCKET, PID_FILE

CALL_TIMEOUT = 60.0  # a reload or restart may stop and start several mounts
STOP_WAIT = 60.0


class ControlError(Exception):
    pass


class ControlClient:
    def __init__(self, state_dir: Path) -> None:
        # Absolute: gRPC reads unix://relative/path as a host name, not a path.
        self.state_dir = state_dir.absolute()
        self.socket = self.state_dir / CONTROL_SOCKET
        if not self.socket.exists():
            raise ControlError(
                f"no tvix-mountd is running with state_dir {state_dir} (no {self.socket})"
            )
        self._channel = grpc.insecure_channel(f"unix://{self.socket}")
        self._stub = control_pb2_grpc.ControlStub(self._channel)

    def _call(self, method: Any, request: Any) -> Any:
        try:
            return method(request, timeout=CALL_TIMEOUT)
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else None
            if code == grpc.StatusCode.UNAVAILABLE:
                raise ControlError(f"tvix-mountd is not answering on {self.socket}") from None
            raise ControlError(f"control call failed: {e}") from None

    def status(self) -> dict[str, Any]:
        response = self._call(self._stub.Status, control_pb2.StatusRequest())
        document: dict[str, Any] = json.loads(response.status_json)
        return document

    def stop(self, wait: bool = True) -> None:
        pid_file = self.state_dir / PID_FILE
        pid = int(pid_file.read_text()) if pid_file.exists() else None
        self._call(self._stub.Stop, control_pb2.StopRequest())
        if not wait or pid is None:
            return
        deadline = time.monotonic() + STOP_WAIT
        while _alive(pid):
            if time.monotonic() > deadline:
                raise ControlError(f"tvix-mountd (pid {pid}) did not stop within {STOP_WAIT:g} s")
            time.sleep(0.05)  # polling another process's exit: no event to wait on

    def reload(self) -> tuple[list[str], list[str]]:
        response = self._call(self._stub.Reload, control_pb2.ReloadRequest())
        return list(response.problems), list(response.changes)

    def restart(self, mounts: list[str]) -> tuple[list[str], list[str]]:
        """(a line per completed handover, a line per mount not handed over)."""
        response = self._call(self._stub.Restart, control_pb2.RestartRequest(mounts=mounts))
        return list(response.done), list(response.problems)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return ""


def _uptime(since: str | None) -> str:
    if not since:
        return "-"
    try:
        start = datetime.fromisoformat(since.replace("Z", "+00:00"))
    except ValueError:
        return "-"
    seconds = int((datetime.now(UTC) - start).total_seconds())
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def format_status(document: dict[str, Any]) -> str:
    """The status document as a table for people."""
    header = ("MOUNT", "STATE", "PID", "RESTARTS", "HANDOVERS", "FOR", "MOUNTPOINT", "STORE")
    rows = [header]
    errors = []
    for m in document.get("mounts", []):
        rows.append(
            (
                m["name"],
                m["state"],
                str(m["pid"] or "-"),
                str(m["restarts"]),
                str(m.get("handovers", 0)),
                _uptime(m.get("since")),
                m["mountpoint"],
                m["store"],
            )
        )
        if m.get("error"):
            errors.append(f"  {m['name']}: {m['error']}")
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    if errors:
        lines += ["", "errors:", *errors]
    rootcache = document.get("rootcache", {})
    lines += [
        "",
        f"rootcache: pid {rootcache.get('pid') or '-'}, restarts {rootcache.get('restarts', 0)}",
    ]
    for store, stats in sorted(rootcache.get("stores", {}).items()):
        figures = ", ".join(f"{k} {v}" for k, v in sorted(stats.items()))
        lines.append(f"  {store}: {figures}")
    return "\n".join(lines)
