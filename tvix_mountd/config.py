"""The config file (TOML), validated with pydantic.

The key names are a contract (see DESIGN.md). Every problem is reported at
once, each with its field path, before anything is mounted.
"""

from __future__ import annotations

import posixpath
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Final, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from tvix_mountd.castore.addr import (
    BLOB_SCHEMES,
    DIRECTORY_SCHEMES,
    MAX_PREFETCH_REFERENCES,
    PATH_INFO_SCHEMES,
    parse_address,
    prefetch_problem,
)
from tvix_mountd.castore.errors import AddressError

DEFAULT_DATA_DIR = "/var/lib/tvix-mountd"
DEFAULT_STATE_DIR = "/run/tvix-mountd"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _absolute(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"must be an absolute path, got {value!r}")
    return posixpath.normpath(value)


def _name(value: str) -> str:
    if not _NAME_RE.match(value):
        raise ValueError(
            f"{value!r} is not a valid name (letters, digits, '_', '.', '-'; at most 64)"
        )
    return value


AbsolutePath = Annotated[str, AfterValidator(_absolute)]
Name = Annotated[str, AfterValidator(_name)]


def _check_listen(value: str) -> str:
    if value.startswith("unix:"):
        _absolute(value.removeprefix("unix:"))
        return value
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT or unix:/abs/path, got {value!r}")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SupervisorConfig(_Strict):
    state_dir: AbsolutePath = DEFAULT_STATE_DIR
    health_listen: Annotated[str, AfterValidator(_check_listen)] = "127.0.0.1:9137"
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Store paths never change: keep this many resolved root nodes per store.
    rootcache_entries: int = Field(default=100_000, ge=0)
    # "Not found" answers are kept this long (seconds), so a path added to the
    # store shows up soon after.
    rootcache_negative_ttl: float = Field(default=1.0, ge=0)
    # A mount that crashes this often within restart_window seconds is failed.
    max_restarts: int = Field(default=5, ge=1)
    restart_window: float = Field(default=60.0, gt=0)


class StoreConfig(_Strict):
    blob_service_addr: str
    directory_service_addr: str
    path_info_service_addr: str
    # Seconds a backend call may make no progress before it fails (EIO).
    backend_timeout: float = Field(default=10.0, gt=0, le=3600)
    # A Nix binary cache only: references of fetched paths prefetched at once
    # in the background (their closure, so programs find it local); 0: none.
    prefetch_references: int = Field(default=0, ge=0, le=MAX_PREFETCH_REFERENCES)

    @field_validator("blob_service_addr")
    @classmethod
    def _blob_addr(cls, v: str) -> str:
        return _check_addr(v, BLOB_SCHEMES)

    @field_validator("directory_service_addr")
    @classmethod
    def _directory_addr(cls, v: str) -> str:
        return _check_addr(v, DIRECTORY_SCHEMES)

    @field_validator("path_info_service_addr")
    @classmethod
    def _path_info_addr(cls, v: str) -> str:
        return _check_addr(v, PATH_INFO_SCHEMES)

    @model_validator(mode="after")
    def _prefetch_needs_a_cache(self) -> StoreConfig:
        problem = prefetch_problem(self.path_info_service_addr, self.prefetch_references)
        if problem:
            raise ValueError(problem)
        return self


# Settings of a store that only the rootcache uses: a change restarts the
# rootcache, and hands no mount over to a new worker.
ROOTCACHE_ONLY_STORE_KEYS: Final = {"prefetch_references"}


def serves_differently(a: StoreConfig, b: StoreConfig) -> bool:
    """Whether a mount of store `a` must be handed over to serve store `b`."""
    return a.model_dump(exclude=ROOTCACHE_ONLY_STORE_KEYS) != b.model_dump(
        exclude=ROOTCACHE_ONLY_STORE_KEYS
    )


def _check_addr(value: str, schemes: frozenset[str]) -> str:
    try:
        parse_address(value, schemes)
    except AddressError as e:
        raise ValueError(e.reason) from None
    return value


class MountConfig(_Strict):
    name: Name
    store: str
    mountpoint: AbsolutePath
    list_root: bool = False
    show_xattr: bool = True
    # Listings without attributes where nobody stats them (plain READDIR):
    # `ls -f` and `find -type f` of large directories faster, stat walks a
    # little slower (benchmarks/RESULTS.md). Fixed for the life of a mount.
    plain_listings: bool = False
    # Read ahead the files and directories that come next when they are used
    # in name order (workers/prefetch.py, dirahead.py). Off: each is asked
    # for only when needed (a store billed per request, a link to spare).
    read_ahead: bool = True
    allow_other: bool = False
    # Seconds the worker may answer nothing to the supervisor's probe (a
    # statfs through the kernel) before it counts as hung and is replaced.
    hang_timeout: float = Field(default=10.0, gt=0, le=3600)


class Config(_Strict):
    supervisor: SupervisorConfig = SupervisorConfig()
    stores: dict[Name, StoreConfig] = {}
    mounts: list[MountConfig] = []

    @model_validator(mode="after")
    def _cross_references(self) -> Config:
        problems = cross_reference_problems(
            set(self.stores), [(m.name, m.store, m.mountpoint) for m in self.mounts]
        )
        if problems:
            raise ValueError("\n".join(problems))
        return self


def cross_reference_problems(stores: set[str], mounts: list[tuple[str, str, str]]) -> list[str]:
    """Problems between entries: unknown stores, duplicate names, shared or nested mountpoints."""
    problems = []
    names: set[str] = set()
    mountpoints: dict[str, str] = {}
    for i, (name, store, mountpoint) in enumerate(mounts):
        if store not in stores:
            known = ", ".join(sorted(stores)) or "none defined"
            problems.append(f"mounts.{i}.store: unknown store {store!r} (stores: {known})")
        if name in names:
            problems.append(f"mounts.{i}.name: duplicate mount name {name!r}")
        names.add(name)
        for other, other_name in mountpoints.items():
            if mountpoint == other:
                problems.append(
                    f"mounts.{i}.mountpoint: {other} is already used by mount {other_name!r}"
                )
            elif _nested(mountpoint, other):
                problems.append(
                    f"mounts.{i}.mountpoint: {mountpoint} and {other}"
                    f" (mount {other_name!r}) are nested"
                )
        mountpoints.setdefault(mountpoint, name)
    return problems


def _nested(a: str, b: str) -> bool:
    return a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


class ConfigError(Exception):
    """A config that cannot be used; `problems` lists each as 'field.path: sentence'."""

    def __init__(self, source: str, problems: list[str]) -> None:
        super().__init__(f"{source}: " + "; ".join(problems))
        self.source = source
        self.problems = problems


def _describe(error: ValidationError) -> list[str]:
    problems = []
    for e in error.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required key is missing"
        for line in msg.splitlines():
            # Cross-reference checks already carry their own field paths.
            problems.append(line if not loc else f"{loc}: {line}")
    return problems


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(str(path), [f"cannot read: {e.strerror}"]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(path), [f"not valid TOML: {e}"]) from None


def parse_config(data: dict[str, Any], source: str = "<config>") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        problems = _describe(e)
    # Field errors stop pydantic before the cross-reference checks; run those on
    # the raw data too, so that one run reports every problem.
    stores, mounts = data.get("stores"), data.get("mounts")
    if isinstance(stores, dict) and isinstance(mounts, list):
        raw_mounts = [
            (str(m.get("name")), str(m.get("store")), posixpath.normpath(str(m.get("mountpoint"))))
            for m in mounts
            if isinstance(m, dict)
        ]
        problems += [
            p for p in cross_reference_problems(set(stores), raw_mounts) if p not in problems
        ]
    raise ConfigError(source, problems)


def load_config(path: Path) -> Config:
    return parse_config(_read_toml(path), str(path))


def load_store_config(path: Path, store: str) -> StoreConfig:
    """Only `[stores.NAME]`: commands such as `import` need nothing else."""
    data = _read_toml(path)
    stores = data.get("stores")
    if not isinstance(stores, dict) or store not in stores:
        known = ", ".join(sorted(stores)) if isinstance(stores, dict) and stores else "none"
        raise ConfigError(str(path), [f"stores.{store}: no such store (defined: {known})"])
    try:
        return StoreConfig.model_validate(stores[store])
    except ValidationError as e:
        raise ConfigError(str(path), [f"stores.{store}.{p}" for p in _describe(e)]) from None


def load_state_dir(path: Path) -> str:
    """Only `supervisor.state_dir`: status, stop and reload need nothing else, and
    must reach the running supervisor even while its config is being edited into
    something invalid (reload then reports why, from the supervisor)."""
    supervisor = _read_toml(path).get("supervisor", {})
    value = supervisor.get("state_dir", DEFAULT_STATE_DIR) if isinstance(supervisor, dict) else None
    try:
        if not isinstance(value, str):
            raise ValueError("must be a string")
        return _absolute(value)
    except ValueError as e:
        raise ConfigError(str(path), [f"supervisor.state_dir: {e}"]) from None


def default_config(data_dir: str = DEFAULT_DATA_DIR) -> Config:
    """What `start` runs without --config: one embedded store, mounted once."""
    return Config(
        stores={
            "local": StoreConfig(
                blob_service_addr=f"raw+file://{data_dir}/blobs",
                directory_service_addr=f"sqlite://{data_dir}/directories.sqlite",
                path_info_service_addr=f"sqlite://{data_dir}/pathinfo.sqlite",
            )
        },
        mounts=[MountConfig(name="store", store="local", mountpoint=f"{data_dir}/mnt/store")],
    )
