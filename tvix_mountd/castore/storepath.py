"""Nix store paths: `<32 nixbase32 chars>-<name>` under /nix/store."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Final

from tvix_mountd.castore import nixbase32
from tvix_mountd.castore.errors import ValidationError

STORE_DIR: Final = "/nix/store"
DIGEST_SIZE: Final = 20
ENCODED_DIGEST_SIZE: Final = nixbase32.encoded_len(DIGEST_SIZE)  # 32
MAX_NAME_LEN: Final = 211
_NAME_CHARS: Final = frozenset(
    b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+-_?=."
)


def validate_name(name: bytes) -> str:
    """Nix's rules for the name part: 1-211 bytes of [a-zA-Z0-9+-_?=.].

    Like Nix since 2.20, names that are `.`/`..` or start with `.-`/`..-`
    are rejected too (they would be ambiguous as path components).
    """
    if not name or len(name) > MAX_NAME_LEN:
        raise ValidationError(f"store path name must be 1 to {MAX_NAME_LEN} bytes")
    for i, c in enumerate(name):
        if c not in _NAME_CHARS:
            raise ValidationError(f"invalid character {chr(c)!r} at {i} in store path name")
    if name in (b".", b"..") or name.startswith((b".-", b"..-")):
        raise ValidationError(f"store path name {name.decode()!r} is not allowed")
    return name.decode("ascii")


@dataclass(frozen=True, slots=True)
class StorePath:
    digest: bytes
    name: str

    def __post_init__(self) -> None:
        if len(self.digest) != DIGEST_SIZE:
            raise ValidationError(f"store path digest must be {DIGEST_SIZE} bytes")
        validate_name(self.name.encode())

    @classmethod
    def parse(cls, basename: str | bytes) -> StorePath:
        """Parse a basename `<hash>-<name>` (no /nix/store prefix)."""
        raw = basename.encode() if isinstance(basename, str) else basename
        if len(raw) < ENCODED_DIGEST_SIZE + 2:
            raise ValidationError(f"store path {raw!r} is too short")
        try:
            digest = nixbase32.decode(raw[:ENCODED_DIGEST_SIZE], DIGEST_SIZE)
        except ValueError as e:
            raise ValidationError(f"store path {raw!r}: {e}") from e
        if raw[ENCODED_DIGEST_SIZE] != ord("-"):
            raise ValidationError(f"store path {raw!r}: missing dash after the hash")
        return cls(digest, validate_name(raw[ENCODED_DIGEST_SIZE + 1 :]))

    @classmethod
    def parse_absolute(cls, path: str) -> StorePath:
        prefix = STORE_DIR + "/"
        if not path.startswith(prefix):
            raise ValidationError(f"{path!r} is not in {STORE_DIR}")
        return cls.parse(path[len(prefix) :])

    @property
    def basename(self) -> str:
        return f"{nixbase32.encode(self.digest)}-{self.name}"

    @property
    def absolute(self) -> str:
        return f"{STORE_DIR}/{self.basename}"

    def __str__(self) -> str:
        return self.basename


def compress_hash(data: bytes, size: int) -> bytes:
    """Nix's XOR-folding of a hash to `size` bytes."""
    out = bytearray(size)
    for i, b in enumerate(data):
        out[i % size] ^= b
    return bytes(out)


def make_store_path(kind: str, inner_digest: bytes, name: str) -> StorePath:
    """Nix's makeStorePath: fingerprint `kind:sha256:<hex>:/nix/store:<name>`."""
    validate_name(name.encode())
    fingerprint = f"{kind}:sha256:{inner_digest.hex()}:{STORE_DIR}:{name}"
    return StorePath(compress_hash(hashlib.sha256(fingerprint.encode()).digest(), 20), name)


def source_store_path(nar_sha256: bytes, name: str) -> StorePath:
    """The path `nix-store --add` gives a tree: recursive sha256, no references."""
    return make_store_path("source", nar_sha256, name)
