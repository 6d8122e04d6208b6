"""A worker's per-request figures, gathered in plain numbers and written to
the shared metrics (tvix_mountd.metrics) now and then.

Apart from tvix_mountd.metrics so that a worker does not import
prometheus_client before it serves (see RequestMetrics).
"""

from __future__ import annotations

import errno
import time
from bisect import bisect_left
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, NamedTuple

import trio

if TYPE_CHECKING:
    from tvix_mountd.metrics import Metrics

# A FUSE request takes ~50 us in the daemon; backend calls reach seconds, and
# backend_timeout (default 10 s) bounds the slowest.
REQUEST_BUCKETS: Final = (
    0.00001,
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class ReadAheadCounts(NamedTuple):
    """What the read-aheads did so far (workers/prefetch.py, dirahead.py),
    as running totals."""

    files_read: int = 0  # small files read ahead and checked; of those:
    files_stored: int = 0  # stored into the kernel's page cache
    files_served: int = 0  # whose READ was answered from memory
    directories: int = 0  # directories given ahead of their first open


def errno_label(error_errno: int) -> str:
    return errno.errorcode.get(error_errno, str(error_errno))


class _OpFigures:
    """What one op gathered since the last flush."""

    __slots__ = ("buckets", "count", "sum")

    def __init__(self) -> None:
        self.count = 0
        self.sum = 0.0
        # One slot per bucket bound, +Inf last, as Histogram keeps them.
        self.buckets = [0] * (len(REQUEST_BUCKETS) + 1)


class RequestMetrics:
    """Per-request figures of one mount, written by its worker.

    Writing prometheus_client's mmap'ed values costs ~2-3 us each (a lock, a
    getpid() and a struct write), 8-11 us per request for a counter and a
    histogram; a FUSE request costs ~50 us in the daemon. So observe() only adds
    to plain Python numbers, and flush() writes them out: at least every
    FLUSH_INTERVAL while requests come in, from `flush_periodically` for the
    tail after the last request, and at exit. A worker that is killed loses at
    most the last FLUSH_INTERVAL of figures.

    prometheus_client itself is imported at the first flush, not before: a
    worker taking a mount over starts serving ~19 ms sooner (the client
    waits for that), and the import is paid once it serves.

    For one thread (the worker's trio thread); not thread-safe.
    """

    FLUSH_INTERVAL: Final = 1.0
    FLUSH_AFTER: Final = 10_000  # observations, whatever the time

    __slots__ = (
        "_ahead_flushed",
        "_ahead_source",
        "_children",
        "_errors",
        "_inodes_flushed",
        "_inodes_source",
        "_last_flush",
        "_metrics",
        "_mount",
        "_ops",
        "_pending",
        "_read_bytes",
    )

    def __init__(self, mount: str) -> None:
        self._mount = mount
        self._metrics: Metrics | None = None  # at the first flush
        self._ops: dict[str, _OpFigures] = {}
        # op -> its (requests counter, seconds histogram) children.
        self._children: dict[str, tuple[Any, Any]] = {}
        self._errors: dict[tuple[str, int], int] = {}
        self._read_bytes = 0
        self._pending = 0
        self._last_flush = time.monotonic()
        self._ahead_source: Callable[[], ReadAheadCounts] | None = None
        self._ahead_flushed = ReadAheadCounts()
        self._inodes_source: Callable[[], int] | None = None
        self._inodes_flushed = -1

    def watch_read_ahead(self, source: Callable[[], ReadAheadCounts]) -> None:
        """Write what `source` counts (running totals) at every flush."""
        self._ahead_source = source

    def watch_inodes(self, source: Callable[[], int]) -> None:
        """Write the number of live inodes `source` gives at every flush."""
        self._inodes_source = source

    def observe(
        self, op: str, seconds: float, error_errno: int | None, read_bytes: int = 0
    ) -> None:
        try:
            figures = self._ops[op]
        except KeyError:
            figures = self._ops[op] = _OpFigures()
        figures.count += 1
        figures.sum += seconds
        # Histogram's rule: the first bound >= the value.
        figures.buckets[bisect_left(REQUEST_BUCKETS, seconds)] += 1
        if error_errno is not None:
            key = (op, error_errno)
            self._errors[key] = self._errors.get(key, 0) + 1
        if read_bytes:
            self._read_bytes += read_bytes
        self._pending += 1
        if (
            self._pending >= self.FLUSH_AFTER
            or time.monotonic() - self._last_flush >= self.FLUSH_INTERVAL
        ):
            self.flush()

    def flush(self) -> None:
        """Write what was observed since the last flush to the shared files."""
        self._last_flush = time.monotonic()
        # The read-aheads' threads go on counting after the last request.
        ahead = self._ahead_source() if self._ahead_source is not None else self._ahead_flushed
        # The kernel's forgets change it after the last request too.
        inodes = self._inodes_source() if self._inodes_source is not None else -1
        if not self._pending and ahead == self._ahead_flushed and inodes == self._inodes_flushed:
            return
        self._pending = 0
        shared = self._metrics
        if shared is None:
            from tvix_mountd.metrics import metrics

            shared = self._metrics = metrics()
        if ahead != self._ahead_flushed:
            before = self._ahead_flushed
            for outcome, now, then in (
                ("read", ahead.files_read, before.files_read),
                ("stored", ahead.files_stored, before.files_stored),
                ("served", ahead.files_served, before.files_served),
            ):
                if now != then:
                    shared.files_read_ahead.labels(self._mount, outcome).inc(now - then)
            if ahead.directories != before.directories:
                shared.directories_read_ahead.labels(self._mount).inc(
                    ahead.directories - before.directories
                )
            self._ahead_flushed = ahead
        if inodes != self._inodes_flushed:
            shared.inodes.labels(self._mount).set(inodes)
            self._inodes_flushed = inodes
        for op, figures in self._ops.items():
            if not figures.count:
                continue
            children = self._children.get(op)
            if children is None:
                children = self._children[op] = (
                    shared.requests.labels(self._mount, op),
                    shared.request_seconds.labels(self._mount, op),
                )
            requests, histogram = children
            requests.inc(figures.count)
            # Histogram has no public way to add many observations at once;
            # its child keeps a value for the sum and one per bucket (not
            # cumulative) in every prometheus_client release we allow.
            histogram._sum.inc(figures.sum)
            for i, n in enumerate(figures.buckets):
                if n:
                    histogram._buckets[i].inc(n)
                    figures.buckets[i] = 0
            figures.count = 0
            figures.sum = 0.0
        for (op, error_errno), n in self._errors.items():
            shared.errors.labels(self._mount, op, errno_label(error_errno)).inc(n)
        self._errors.clear()
        if self._read_bytes:
            shared.read_bytes.labels(self._mount).inc(self._read_bytes)
            self._read_bytes = 0

    async def flush_periodically(self) -> None:
        """Flush every FLUSH_INTERVAL until cancelled, and once more then.

        Run in the worker's nursery, so that figures of the last requests
        before an idle spell show up too.
        """
        try:
            while True:
                await trio.sleep(self.FLUSH_INTERVAL)
                self.flush()
        finally:
            self.flush()
