"""What the supervisor tells a worker it starts: the spec, JSON on stdin.

Plain dataclasses read with `json`, not the pydantic config models: a worker
needs a handful of settings that the supervisor has validated already, and
importing pydantic with the config models cost every worker start ~55 ms
(a handover waits for that) and ~9 MB of memory that stays.

Keys a worker does not know are ignored, so that a worker of a newer version
accepts the spec of the supervisor that was running when it was installed
(`restart` after an upgrade); a key it needs and does not get, or one of the
wrong type, is a SpecError.
"""

# No `from __future__ import annotations`: the field types are read at run time.

import dataclasses
import json
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


class SpecError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class WorkerMount:
    """The settings of the mount (a `[[mounts]]` entry) that a worker uses."""

    name: str
    store: str
    mountpoint: str
    list_root: bool
    show_xattr: bool
    allow_other: bool
    plain_listings: bool = False
    read_ahead: bool = True


@dataclasses.dataclass(frozen=True)
class WorkerStore:
    """The settings of the mount's store that a worker uses (path infos are
    the rootcache's)."""

    blob_service_addr: str
    directory_service_addr: str
    backend_timeout: float


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    mount: WorkerMount
    store: WorkerStore
    rootcache_socket: str
    # Where to write why the worker could not serve (shown in status).
    error_file: str
    parent_pid: int
    # The lent connection (see workers/connection.py).
    mount_id: int | None
    fuse_fd: int
    state_fd: int
    log_fd: int | None = None
    log_level: str = "info"
    # The kernel's INIT request, in hex.
    init: str | None = None
    resend: bool = False
    # Whether requests the worker before left in flight count against them:
    # not when it left on request (a handover).
    blame: bool = True
    # The mount's store changed since the kernel last learnt root entries.
    store_changed: bool = False
    # The fork server this worker was forked from (supervisor/forkserver.py);
    # None if it was exec'd.
    fork_server: int | None = None

    @classmethod
    def from_json(cls, raw: bytes) -> "WorkerSpec":
        try:
            data = json.loads(raw)
        except ValueError as e:
            raise SpecError(f"not JSON: {e}") from None
        return _build(cls, data, "spec")


def spec_dict(value: WorkerMount | WorkerStore) -> dict[str, Any]:
    """`value` as the JSON object a worker reads back."""
    return dataclasses.asdict(value)


def _build(cls: type[T], data: object, where: str) -> T:
    if not isinstance(data, dict):
        raise SpecError(f"{where}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        name = f"{where}.{field.name}"
        if field.name not in data:
            if field.default is dataclasses.MISSING:
                raise SpecError(f"{name}: missing")
            continue
        kind = hints[field.name]
        value = data[field.name]
        if isinstance(kind, type) and dataclasses.is_dataclass(kind):
            values[field.name] = _build(kind, value, name)
        elif _is(value, kind):
            values[field.name] = float(value) if kind is float else value
        else:
            raise SpecError(f"{name}: expected {kind}, got {value!r}")
    return cls(**values)


def _is(value: object, kind: object) -> bool:
    if isinstance(kind, types.UnionType):
        return any(_is(value, k) for k in typing.get_args(kind))
    if kind is type(None):
        return value is None
    if isinstance(value, bool):  # a bool is an int to isinstance
        return kind is bool
    if kind is float:
        return isinstance(value, int | float)
    return isinstance(kind, type) and isinstance(value, kind)
