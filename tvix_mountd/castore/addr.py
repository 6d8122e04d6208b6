"""Store addresses, spelled as tvix spells them; an address tvix knows means
here what it means to tvix.

memory://                      in this process only
grpc+unix:///abs/path.sock     a tvix-store (or compatible) on a unix socket
grpc+http://host:port          the same over TCP
objectstore+file:///abs/dir    blobs in tvix's object_store layout (chunked, zstd)
raw+file:///abs/dir            blobs in our raw layout, one plain file per blob (ours)
sqlite:///abs/file.sqlite      embedded directory / path-info store (ours)
nix+https://host[:port][/path] a Nix binary cache as a path-info service, also
nix+http://... / nix+file:///abs/dir   nix+http and (ours) nix+file; each takes
                               ?trusted-public-keys=NAME:KEY%20NAME2:KEY2
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from urllib.parse import SplitResult, unquote, urlsplit

from tvix_mountd.castore.errors import AddressError

BLOB_SCHEMES = frozenset({"memory", "grpc+unix", "grpc+http", "objectstore+file", "raw+file"})
DIRECTORY_SCHEMES = frozenset({"memory", "grpc+unix", "grpc+http", "sqlite"})
NIX_CACHE_SCHEMES = frozenset({"nix+http", "nix+https", "nix+file"})
PATH_INFO_SCHEMES = DIRECTORY_SCHEMES | NIX_CACHE_SCHEMES
_PATH_SCHEMES = frozenset({"grpc+unix", "objectstore+file", "raw+file", "sqlite"})


def is_nix_cache(raw: str) -> bool:
    """Whether a (path-info service) address names a Nix binary cache."""
    return raw.partition("://")[0] in NIX_CACHE_SCHEMES


# References a binary cache prefetches at once, at most (a store's setting).
MAX_PREFETCH_REFERENCES = 64


def prefetch_problem(
    path_info_service_addr: str, prefetch_references: int, name: str = "prefetch_references"
) -> str | None:
    """Why a store cannot prefetch `prefetch_references` references at once,
    if it cannot (`name`: the setting, as the user spelled it)."""
    if not 0 <= prefetch_references <= MAX_PREFETCH_REFERENCES:
        return f"{name} must be from 0 to {MAX_PREFETCH_REFERENCES}"
    if prefetch_references and not is_nix_cache(path_info_service_addr):
        return (
            f"{name} applies to a Nix binary cache (a path-info service nix+http://,"
            f" nix+https:// or nix+file://), not to {path_info_service_addr.partition(':')[0]}"
        )
    return None


@dataclass(frozen=True, slots=True)
class StoreAddress:
    raw: str
    scheme: str
    path: str = ""  # absolute, for grpc+unix / objectstore+file / raw+file / sqlite
    host: str = ""  # for grpc+http
    port: int = 0
    # nix+ caches: where the cache is (http(s)://host[:port]/path/ or a
    # directory), and the keys its narinfos must be signed with (None: any
    # narinfo is accepted, signed or not).
    url: str = ""
    public_keys: tuple[str, ...] | None = None

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
    if scheme in NIX_CACHE_SCHEMES:
        return _nix_cache_address(raw, parts)
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


def _nix_cache_address(raw: str, parts: SplitResult) -> StoreAddress:
    """nix+http(s)://host[:port][/path] or nix+file:///abs/dir, with an optional
    ?trusted-public-keys=... (keys separated by spaces, %20 in a URL)."""
    if parts.fragment:
        raise AddressError(raw, "fragments are not supported")
    public_keys = _trusted_public_keys(raw, parts.query)
    if parts.scheme == "nix+file":
        if parts.netloc:
            raise AddressError(
                raw,
                "nix+file takes an absolute path and no host (three slashes:"
                f" nix+file:///abs/dir); got host {parts.netloc!r}",
            )
        if not parts.path.startswith("/"):
            raise AddressError(raw, "the path must be absolute")
        path = posixpath.normpath(parts.path)
        url = path.rstrip("/") + "/"
        return StoreAddress(raw, parts.scheme, path=path, url=url, public_keys=public_keys)
    if not parts.hostname:
        raise AddressError(
            raw, f"expected {parts.scheme}://HOST[:PORT][/PATH]: the host is missing"
        )
    if parts.username is not None or parts.password is not None:
        raise AddressError(raw, "credentials in the address are not supported")
    path = parts.path.rstrip("/") + "/"
    url = f"{parts.scheme.removeprefix('nix+')}://{parts.netloc}{path}"
    return StoreAddress(
        raw,
        parts.scheme,
        host=parts.hostname,
        port=parts.port or 0,
        url=url,
        public_keys=public_keys,
    )


def _trusted_public_keys(raw: str, query: str) -> tuple[str, ...] | None:
    """The keys of every trusted-public-keys parameter, each checked; None if there is none.

    Decoded with `unquote`, not as a form: `+` is a base64 character in keys,
    so it stays a `+` (a space is %20).
    """
    from tvix_mountd.castore.errors import ValidationError
    from tvix_mountd.castore.narinfo import PublicKey

    keys: list[str] | None = None
    for pair in filter(None, query.split("&")):
        name, _, value = pair.partition("=")
        if unquote(name) != "trusted-public-keys":
            raise AddressError(
                raw, f"unknown parameter {unquote(name)!r}; the only one is trusted-public-keys"
            )
        keys = keys if keys is not None else []
        for word in unquote(value).split():
            try:
                keys.append(str(PublicKey.parse(word)))
            except ValidationError as e:
                raise AddressError(raw, f"trusted-public-keys: {e}") from None
    if keys is not None and not keys:
        raise AddressError(
            raw, "trusted-public-keys is empty (leave it out to accept unsigned paths)"
        )
    return None if keys is None else tuple(keys)
