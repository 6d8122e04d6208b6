"""Store addresses, spelled as tvix spells them; an address tvix knows means
here what it means to tvix.

memory://                      in this process only
grpc+unix:///abs/path.sock     a tvix-store (or compatible) on a unix socket
grpc+http://host:port          the same over TCP
objectstore+file:///abs/dir    blobs in tvix's object_store layout (chunked, zstd)
raw+file:///abs/dir            blobs in our raw layout, one plain file per blob (ours)
sqlite:///abs/file.sqlite      embedded directory / path-info store (ours)
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from urllib.parse import urlsplit

from tvix_mountd.castore.errors import AddressError

BLOB_SCHEMES = frozenset({"memory", "grpc+unix", "grpc+http", "objectstore+file", "raw+file"})
DIRECTORY_SCHEMES = frozenset({"memory", "grpc+unix", "grpc+http", "sqlite"})
PATH_INFO_SCHEMES = DIRECTORY_SCHEMES
_PATH_SCHEMES = frozenset({"grpc+unix", "objectstore+file", "raw+file", "sqlite"})


@dataclass(frozen=True, slots=True)
class StoreAddress:
    raw: str
    scheme: str
    path: str = ""  # absolute, for grpc+unix / objectstore+file / raw+file / sqlite
    host: str = ""  # for grpc+http
    port: int = 0

    @property
    def grpc_target(self) -> str:
        """The target string grpcio expects for this address."""
        if self.scheme == "grpc+unix":
            return f"unix://{self.path}"
        if self.scheme == "grpc+http":
            host = f"[{self.host}]" if ":" in self.host else self.host
            return f"{host}:{self.port}"
        raise AddressError(self.raw, "not a gRPC address")

    def __str__(self) -> str:
        return self.raw


def parse_address(
    raw: str, allowed: frozenset[str] = BLOB_SCHEMES | DIRECTORY_SCHEMES
) -> StoreAddress:
    """Parse and check `raw`; every problem is an AddressError naming it."""
    if "://" not in raw:
        raise AddressError(raw, "expected <scheme>://..., e.g. memory:// or sqlite:///abs/file")
    try:
        parts = urlsplit(raw)
        port = parts.port
    except ValueError as e:
        raise AddressError(raw, str(e)) from e
    scheme = parts.scheme
    if scheme not in allowed:
        raise AddressError(
            raw, f"unsupported scheme {scheme!r} here; expected one of {', '.join(sorted(allowed))}"
        )
    if parts.query or parts.fragment:
        raise AddressError(raw, "query strings and fragments are not supported")
    if scheme == "memory":
        if parts.netloc or parts.path:
            raise AddressError(raw, "memory:// takes no host or path")
        return StoreAddress(raw, scheme)
    if scheme in _PATH_SCHEMES:
        if parts.netloc:
            raise AddressError(
                raw,
                f"{scheme} takes an absolute path and no host (three slashes:"
                f" {scheme}:///abs/path); got host {parts.netloc!r}",
            )
        if not parts.path.startswith("/"):
            raise AddressError(raw, "the path must be absolute")
        path = posixpath.normpath(parts.path)
        if path == "/":
            raise AddressError(raw, "the path must name a file or directory, not /")
        return StoreAddress(raw, scheme, path=path)
    # grpc+http
    if not parts.hostname or port is None:
        raise AddressError(raw, "expected grpc+http://host:port")
    if parts.path not in ("", "/") or parts.username or parts.password:
        raise AddressError(raw, "expected grpc+http://host:port with no path or credentials")
    return StoreAddress(raw, scheme, host=parts.hostname, port=port)
