"""Nix's base32: its own alphabet, and bytes taken from the end first."""

from __future__ import annotations

ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"
_DECODE = {c: i for i, c in enumerate(ALPHABET)}


def encoded_len(n: int) -> int:
    return (n * 8 + 4) // 5


def encode(data: bytes) -> str:
    length = encoded_len(len(data))
    value = int.from_bytes(data, "little")
    # Character n (from the left) holds bits [5*(len-1-n), +5) of the
    # little-endian integer: the most significant group comes first.
    return "".join(ALPHABET[(value >> (5 * n)) & 0x1F] for n in reversed(range(length)))


def decode(text: str | bytes, size: int | None = None) -> bytes:
    """Decode; `size` (default: the largest that fits) is the byte length.

    Raises ValueError on a bad character, a wrong length, or set bits beyond
    the byte length (Nix rejects those too).
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError as e:
            raise ValueError("invalid nixbase32 string") from e
    if size is None:
        size = len(text) * 5 // 8
    if encoded_len(size) != len(text):
        raise ValueError(f"invalid nixbase32 length {len(text)} for {size} bytes")
    value = 0
    for c in text:
        digit = _DECODE.get(c)
        if digit is None:
            raise ValueError(f"invalid nixbase32 character {c!r}")
        value = (value << 5) | digit
    if value >> (size * 8):
        raise ValueError("invalid nixbase32 string: trailing bits set")
    return value.to_bytes(size, "little")
