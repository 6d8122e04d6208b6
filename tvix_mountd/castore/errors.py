"""The error types of the store layer.

Every failure a backend can cause is a `StoreError`, so callers (the
filesystem, the CLI) can turn any of them into EIO or a clear message without
catching everything.
"""

from __future__ import annotations


class StoreError(Exception):
    """A store operation failed (backend unreachable, timed out, or lying)."""


class ValidationError(StoreError):
    """Data breaks the castore rules (names, sorting, digests, sizes)."""


class IntegrityError(ValidationError):
    """Data does not hash to the digest it was asked for."""


class BackendUnavailable(StoreError):
    """The backend could not be reached, or did not answer in time."""


class AddressError(ValueError):
    """A store address is malformed or names something that cannot be used."""

    def __init__(self, addr: str, reason: str) -> None:
        super().__init__(f"invalid store address {addr!r}: {reason}")
        self.addr = addr
        self.reason = reason


def first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """What a failed pipeline of tasks raises: a KeyboardInterrupt if there is
    one (the user asked to stop, whatever else failed meanwhile), else the
    first error in its nursery's group (the one that made the nursery cancel
    the other tasks), else the group itself (a cancellation from outside,
    which trio's cancel scopes take apart)."""
    for kind in (KeyboardInterrupt, Exception):
        matched, _ = group.split(kind)
        if matched is not None:
            first: BaseException = matched
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            return first
    return group
