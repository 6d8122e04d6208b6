"""Nix's .narinfo files: what a binary cache says about one store path.

A narinfo is `Key: value` lines. The fields that describe the path
(StorePath, NarHash, NarSize, References) are what a signature covers, through
Nix's fingerprint `1;<store path>;<NarHash>;<NarSize>;<references>`; the
others (URL, Compression, FileHash, FileSize) say where the cache keeps the
NAR and how, and are checked against the bytes themselves, not trusted.

Signatures and keys are `NAME:BASE64`: ed25519 signatures (64 bytes) and
public keys (32 bytes), as Nix's `trusted-public-keys` and `Sig:` spell them.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Final

from tvix_mountd.castore import nixbase32
from tvix_mountd.castore.errors import ValidationError
from tvix_mountd.castore.pathinfo import CAHashType, ContentAddress, Signature
from tvix_mountd.castore.storepath import StorePath

# Nix's default when a narinfo has no Compression line.
DEFAULT_COMPRESSION: Final = "bzip2"
COMPRESSIONS: Final = frozenset({"none", "xz", "bzip2", "zstd", "gzip"})
PUBLIC_KEY_LEN: Final = 32
SIGNATURE_LEN: Final = 64
# A NAR's URL is a path below the cache, as Nix writes it (nar/<hash>.nar.xz):
# never absolute, never climbing out (a nix+file:// cache is a directory).
_URL_SEGMENT: Final = re.compile(r"[A-Za-z0-9._+-]+")
_HASH_ALGOS: Final = {"sha256": 32, "sha1": 20, "sha512": 64, "md5": 16}


def _named_base64(text: str, size: int, what: str) -> tuple[str, bytes]:
    """`NAME:BASE64` with `size` decoded bytes, as Nix writes keys and signatures."""
    name, sep, encoded = text.partition(":")
    if not sep:
        raise ValidationError(f"{what} {text!r}: expected NAME:BASE64")
    if not name or any(c.isspace() for c in name):
        raise ValidationError(f"{what} {text!r}: the name before ':' is empty or has spaces")
    try:
        data = base64.b64decode(encoded, validate=True)
    except binascii.Error as e:
        raise ValidationError(f"{what} {text!r}: not base64: {e}") from None
    if len(data) != size:
        raise ValidationError(f"{what} {text!r}: {len(data)} bytes, expected {size}")
    return name, data


def parse_signature(text: str) -> Signature:
    return Signature(*_named_base64(text, SIGNATURE_LEN, "signature"))


@dataclass(frozen=True, slots=True)
class PublicKey:
    """An ed25519 public key a cache's narinfos may be signed with."""

    name: str
    key: bytes

    @classmethod
    def parse(cls, text: str) -> PublicKey:
        """`NAME:BASE64` (what `nix-store --generate-binary-cache-key` writes)."""
        return cls(*_named_base64(text, PUBLIC_KEY_LEN, "public key"))

    def verifies(self, fingerprint: bytes, signature: Signature) -> bool:
        """Whether `signature` is this key's over `fingerprint` (names must match)."""
        # Imported here: only stores with trusted-public-keys pay for it.
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        if signature.name != self.name:
            return False
        try:
            Ed25519PublicKey.from_public_bytes(self.key).verify(signature.data, fingerprint)
        except (InvalidSignature, ValueError):
            return False
        return True

    def __str__(self) -> str:
        return f"{self.name}:{base64.b64encode(self.key).decode()}"


def parse_public_keys(text: str) -> tuple[PublicKey, ...]:
    """Keys separated by whitespace, as in Nix's `trusted-public-keys`."""
    return tuple(PublicKey.parse(word) for word in text.split())


def fingerprint(
    store_path: StorePath, nar_sha256: bytes, nar_size: int, references: tuple[StorePath, ...]
) -> bytes:
    """What a narinfo signature signs (Nix's ValidPathInfo::fingerprint)."""
    refs = ",".join(r.absolute for r in references)
    return (
        f"1;{store_path.absolute};sha256:{nixbase32.encode(nar_sha256)};{nar_size};{refs}"
    ).encode()


def signed_by(
    fingerprint: bytes, signatures: tuple[Signature, ...], keys: tuple[PublicKey, ...]
) -> PublicKey | None:
    """The first of `keys` with a valid signature among `signatures`, or None."""
    for key in keys:
        if any(key.verifies(fingerprint, s) for s in signatures):
            return key
    return None


def decode_hash(text: str, size: int, what: str) -> bytes:
    """A hash digest in any of Nix's spellings: nixbase32, hex or base64."""
    try:
        if len(text) == nixbase32.encoded_len(size):
            return nixbase32.decode(text, size)
        if len(text) == 2 * size:
            return bytes.fromhex(text)
        data = base64.b64decode(text, validate=True)
    except (ValueError, binascii.Error) as e:
        raise ValidationError(f"{what}: cannot decode {text!r}: {e}") from None
    if len(data) != size:
        raise ValidationError(f"{what}: {text!r} is not a {size}-byte hash")
    return data


def _sha256(value: str, what: str) -> bytes:
    algo, sep, digest = value.partition(":")
    if not sep or algo != "sha256":
        raise ValidationError(f"{what}: expected sha256:<hash>, got {value!r}")
    return decode_hash(digest, 32, what)


def _size(value: str, what: str) -> int:
    if not value.isdigit() or not value.isascii():
        raise ValidationError(f"{what}: not a size: {value!r}")
    size = int(value)
    if size >= 2**64:
        raise ValidationError(f"{what}: {value} is out of range")
    return size


def parse_content_address(value: str) -> ContentAddress | None:
    """Nix's `CA:` (text:sha256:H, fixed:r:ALGO:H, fixed:ALGO:H); None for a kind
    castore has no type for (git hashes, say). It is metadata we keep, never
    something we check, so an unknown kind does not refuse the path."""
    parts = value.split(":")
    if parts[0] == "text" and len(parts) == 3 and parts[1] == "sha256":
        kind, algo, digest = "TEXT", parts[1], parts[2]
    elif parts[0] == "fixed" and len(parts) == 4 and parts[1] == "r":
        kind, algo, digest = "NAR", parts[2], parts[3]
    elif parts[0] == "fixed" and len(parts) == 3:
        kind, algo, digest = "FLAT", parts[1], parts[2]
    else:
        return None
    if algo not in _HASH_ALGOS:
        return None
    try:
        hash_type = CAHashType[f"{kind}_{algo.upper()}"]
    except KeyError:
        return None
    return ContentAddress(hash_type, decode_hash(digest, _HASH_ALGOS[algo], "CA"))


def _nar_url(value: str) -> str:
    segments = value.split("/")
    if not all(_URL_SEGMENT.fullmatch(s) and s not in (".", "..") for s in segments):
        raise ValidationError(f"URL: {value!r} is not a relative path below the cache")
    return value


@dataclass(frozen=True, slots=True)
class NarInfo:
    store_path: StorePath
    url: str
    compression: str
    nar_sha256: bytes
    nar_size: int
    references: tuple[StorePath, ...] = ()
    file_sha256: bytes | None = None
    file_size: int | None = None
    deriver: StorePath | None = None
    signatures: tuple[Signature, ...] = ()
    ca: ContentAddress | None = None

    def fingerprint(self) -> bytes:
        return fingerprint(self.store_path, self.nar_sha256, self.nar_size, self.references)

    @classmethod
    def parse(cls, text: str) -> NarInfo:
        """Parse and check a narinfo; ValidationError names what is wrong."""
        fields: dict[str, str] = {}
        signatures: list[Signature] = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line:
                continue
            key, sep, value = line.partition(":")
            if not sep:
                raise ValidationError(f"line {number}: expected 'Key: value', got {line[:80]!r}")
            # One space after the colon; some servers strip an empty value's.
            value = value.removeprefix(" ")
            if key == "Sig":
                signatures.append(parse_signature(value))
            elif key in fields:
                raise ValidationError(f"line {number}: {key} appears twice")
            else:
                fields[key] = value
        for required in ("StorePath", "URL", "NarHash", "NarSize", "References"):
            if required not in fields:
                raise ValidationError(f"{required} is missing")
        compression = fields.get("Compression", DEFAULT_COMPRESSION)
        if compression not in COMPRESSIONS:
            raise ValidationError(f"Compression: {compression!r} is not supported")
        file_sha256 = fields.get("FileHash")
        file_size = fields.get("FileSize")
        try:
            store_path = StorePath.parse_absolute(fields["StorePath"])
            references = tuple(StorePath.parse(r) for r in fields["References"].split())
        except ValidationError as e:
            raise ValidationError(f"StorePath or References: {e}") from None
        return cls(
            store_path=store_path,
            url=_nar_url(fields["URL"]),
            compression=compression,
            nar_sha256=_sha256(fields["NarHash"], "NarHash"),
            nar_size=_size(fields["NarSize"], "NarSize"),
            references=references,
            file_sha256=None if file_sha256 is None else _sha256(file_sha256, "FileHash"),
            file_size=None if file_size is None else _size(file_size, "FileSize"),
            deriver=_deriver(fields.get("Deriver")),
            signatures=tuple(signatures),
            ca=None if "CA" not in fields else parse_content_address(fields["CA"]),
        )


def _deriver(value: str | None) -> StorePath | None:
    """The deriver as tvix keeps it (the .drv suffix dropped), or None.

    Unsigned metadata (caches write "unknown-deriver" and the like), so one
    that does not parse is left out rather than refusing the path.
    """
    if value is None or not value.endswith(".drv"):
        return None
    try:
        return StorePath.parse(value.removesuffix(".drv"))
    except ValidationError:
        return None
