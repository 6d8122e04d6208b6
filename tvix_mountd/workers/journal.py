"""Which requests were in flight when a worker died, so that one request
cannot kill every worker that the kernel resends it to.

Each request a handler works on is written, as a 64-bit key of its opcode
and arguments, into a slot of the state file (statefile.py) while it runs.
A worker that dies leaves its slots filled. The next one, taking over,
counts each key left behind as a suspect (`take_over`). A resent request
that is a suspect runs alone among suspects (`quarantine`), so that a crash
during it blames it and not an innocent neighbour; a suspect that was in
flight at two crashes is answered with EIO and logged (`convicted`) and the
mount goes on. A suspect that completes is cleared.

A key must mean the same request in the next worker process, a fresh
interpreter with its own hash seed: only ints (whose hash is fixed) and
crc32s of bytes go into it.
"""

from __future__ import annotations

import zlib
from typing import Final

import trio

# Region layout (the state file's journal region, 8-byte words).
IN_FLIGHT_SLOTS: Final = 128
SUSPECT_SLOTS: Final = 64
# A suspect in flight at this many crashes is no longer run.
CONVICTED_AFTER: Final = 2
_MASK: Final = (1 << 64) - 1


def request_key(opcode: int, args: tuple[object, ...]) -> int:
    """A non-zero 64-bit key for a request: its opcode and int or bytes arguments."""
    parts = [opcode]
    for arg in args:
        if type(arg) is int:
            parts.append(arg)
        elif type(arg) is bytes:
            parts.append(zlib.crc32(arg))
    return (hash(tuple(parts)) & _MASK) or 1


class RequestJournal:
    def __init__(self, region: memoryview) -> None:
        words = region.cast("Q")
        if len(words) < IN_FLIGHT_SLOTS + 2 * SUSPECT_SLOTS:
            raise ValueError("journal region too small")
        self._in_flight = words[:IN_FLIGHT_SLOTS]
        # (key, crashes) pairs; key 0 is an empty pair.
        self._suspect_words = words[IN_FLIGHT_SLOTS : IN_FLIGHT_SLOTS + 2 * SUSPECT_SLOTS]
        self._free_slots = list(range(IN_FLIGHT_SLOTS - 1, -1, -1))
        # This process's copy of the suspect table: key -> crashes.
        self.suspects: dict[int, int] = {}
        self._read_suspects()
        self.quarantine = trio.Lock()

    def _read_suspects(self) -> None:
        pairs = self._suspect_words.tolist()
        self.suspects = {pairs[i]: pairs[i + 1] for i in range(0, len(pairs), 2) if pairs[i]}

    def take_over(self, blame: bool) -> list[int]:
        """At a worker's start: count each request left in flight by the one
        before as a suspect (unless it left on request, `blame` false), then
        clear the in-flight slots. Returns the keys left in flight."""
        left = [key for key in self._in_flight.tolist() if key]
        if blame:
            for key in left:
                self.suspects[key] = self.suspects.get(key, 0) + 1
            self._write_suspects()
        for slot in range(IN_FLIGHT_SLOTS):
            self._in_flight[slot] = 0
        return left

    def _write_suspects(self) -> None:
        # The most-blamed first, if there are more than the table holds.
        kept = sorted(self.suspects.items(), key=lambda item: -item[1])[:SUSPECT_SLOTS]
        self.suspects = dict(kept)
        words = self._suspect_words
        for i in range(SUSPECT_SLOTS):
            key, crashes = kept[i] if i < len(kept) else (0, 0)
            # Count before key: a pair is read only once its key is set.
            words[2 * i] = 0
            words[2 * i + 1] = crashes
            words[2 * i] = key

    def begin(self, key: int) -> int:
        """Journal `key` as in flight: the slot to pass to `end` (-1 if none is free)."""
        if not self._free_slots:
            return -1
        slot = self._free_slots.pop()
        self._in_flight[slot] = key
        return slot

    def end(self, slot: int) -> None:
        if slot >= 0:
            self._in_flight[slot] = 0
            self._free_slots.append(slot)

    def convicted(self, key: int) -> bool:
        return self.suspects.get(key, 0) >= CONVICTED_AFTER

    def cleared(self, key: int) -> None:
        """A suspect completed: it did not kill this worker."""
        if self.suspects.pop(key, None) is not None:
            self._write_suspects()
