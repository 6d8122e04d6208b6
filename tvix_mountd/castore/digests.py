"""BLAKE3 digests, the addresses of everything in the castore."""

from __future__ import annotations

import base64

import blake3

from tvix_mountd.castore.errors import ValidationError

B3_LEN = 32


class B3Digest(bytes):
    """A 32-byte BLAKE3 digest; prints as ``b3:`` + standard base64, as tvix does.

    A subclass of bytes so it hashes, compares and serialises like the raw
    digest at no cost.
    """

    __slots__ = ()

    def __new__(cls, value: bytes) -> B3Digest:
        if len(value) != B3_LEN:
            raise ValidationError(f"invalid digest length {len(value)}, expected {B3_LEN}")
        return super().__new__(cls, value)

    @classmethod
    def of(cls, data: bytes) -> B3Digest:
        """The digest of `data`."""
        return cls(blake3.blake3(data).digest())

    @classmethod
    def parse(cls, text: str) -> B3Digest:
        """Parse the ``b3:<base64>`` form."""
        prefix, sep, encoded = text.partition(":")
        if prefix != "b3" or not sep:
            raise ValidationError(f"not a b3 digest: {text!r}")
        try:
            raw = base64.b64decode(encoded, validate=True)
        except ValueError as e:
            raise ValidationError(f"not a b3 digest: {text!r}") from e
        return cls(raw)

    def __str__(self) -> str:
        return "b3:" + base64.b64encode(self).decode()

    def __repr__(self) -> str:
        return f"B3Digest({self!s})"


EMPTY_BLOB_DIGEST = B3Digest.of(b"")
