"""Prometheus metrics shared by the supervisor and its workers.

prometheus_client's multiprocess mode: each process writes its figures to
mmap'ed files in one directory (PROMETHEUS_MULTIPROC_DIR), and the supervisor
merges them at scrape time. The supervisor calls setup_multiprocess_dir before
it forks anything; workers inherit the directory and write their own files.

Counters of a worker that died stay in the directory, so totals survive
restarts; the directory is wiped when the supervisor starts. Figures that live
in another process's memory (the rootcache's) are read at scrape time by a
custom collector, not polled.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    values,
)
from prometheus_client import multiprocess as _multiprocess
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# The request histogram's buckets, shared with the worker's figures.
from tvix_mountd.request_metrics import REQUEST_BUCKETS

log = logging.getLogger(__name__)

ENV_VAR: Final = "PROMETHEUS_MULTIPROC_DIR"


# The rootcache's StoreStats fields (rootcache.proto) and how they are exposed.
ROOTCACHE_COUNTERS: Final = {
    "hits": "Root-node lookups answered from the rootcache's positive cache",
    "negative_hits": "Root-node lookups answered 'not found' from the negative cache",
    "misses": "Root-node lookups that had to ask (or join a question to) the backend",
    "backend_calls": "Root-node questions actually sent to the backend",
    "coalesced": "Root-node misses that joined a backend question already in flight",
    "errors": "Root-node backend questions that failed",
}
ROOTCACHE_GAUGES: Final = {
    "entries": "Root nodes the rootcache holds now",
}


@dataclass(frozen=True, slots=True)
class Metrics:
    """The metric objects; workers write the first seven, the supervisor the rest."""

    requests: Counter
    errors: Counter
    read_bytes: Counter
    request_seconds: Histogram
    files_read_ahead: Counter
    directories_read_ahead: Counter
    inodes: Gauge
    restarts: Counter
    handovers: Counter
    mount_up: Gauge


# Fetching a NAR from a binary cache: from well under a second to many minutes.
INGEST_BUCKETS: Final = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)


@dataclass(frozen=True, slots=True)
class NixCacheMetrics:
    """What Nix binary caches (nix+ path-info services) did, by cache URL.

    Written where NARs are fetched: the rootcache under the supervisor.
    """

    # result: hit (narinfo found and accepted), miss (404/403), refused (bad
    # or missing signature, other store path), error (HTTP or parse failure),
    # local (answered by the local record, no network).
    narinfo_lookups: Counter
    # result: ok or failed
    nar_downloads: Counter
    downloaded_bytes: Counter
    ingested_bytes: Counter
    ingest_seconds: Histogram
    # result: fetched, present (already local), absent (not in the cache,
    # or refused), failed, dropped (the queue was full)
    reference_prefetches: Counter


_directory: str | None = None
_metrics: Metrics | None = None
_nix_cache_metrics: NixCacheMetrics | None = None


def setup_multiprocess_dir(path: str) -> None:
    """Wipe and create `path`, and have every metric of this process and of
    processes forked later write there.

    Metric objects made before this call write elsewhere; metrics() builds
    fresh ones after it.
    """
    global _directory, _metrics, _nix_cache_metrics
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.environ[ENV_VAR] = path
    # prometheus_client picks in-process or mmap'ed values once, when it is
    # first imported; this process may have imported it before the variable
    # was set. A fresh value class also forgets files of an earlier directory.
    close_files = getattr(values, "close_all_multiprocess_files", None)  # not in every 0.2x
    if close_files is not None:
        close_files()
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
    _directory = path
    _metrics = None
    _nix_cache_metrics = None


def metrics() -> Metrics:
    """The metric objects, built on first use (after setup_multiprocess_dir)."""
    global _metrics
    if _metrics is None:
        # registry=None: in multiprocess mode the files are the registry;
        # render() reads them through a fresh CollectorRegistry.
        _metrics = Metrics(
            requests=Counter(
                "tvix_mountd_requests",
                "FUSE requests handled",
                ["mount", "op"],
                registry=None,
            ),
            errors=Counter(
                "tvix_mountd_errors",
                "FUSE requests answered with an error",
                ["mount", "op", "errno"],
                registry=None,
            ),
            read_bytes=Counter(
                "tvix_mountd_read_bytes",
                "Bytes returned by read requests",
                ["mount"],
                registry=None,
            ),
            request_seconds=Histogram(
                "tvix_mountd_request_seconds",
                "Time spent handling a FUSE request in the daemon",
                ["mount", "op"],
                buckets=REQUEST_BUCKETS,
                registry=None,
            ),
            files_read_ahead=Counter(
                "tvix_mountd_files_read_ahead",
                "Small files read ahead and checked (read); of those, stored into the"
                " kernel's page cache (stored) or whose READ was answered from memory"
                " (served)",
                ["mount", "outcome"],
                registry=None,
            ),
            directories_read_ahead=Counter(
                "tvix_mountd_directories_read_ahead",
                "Directories fetched ahead of their first open and given to their inodes",
                ["mount"],
                registry=None,
            ),
            # One worker writes a mount's value at a time; livemax drops a
            # dead worker's, and while a handover overlaps two, shows one.
            inodes=Gauge(
                "tvix_mountd_inodes",
                "Inode numbers a mount's worker answers for: those the kernel holds"
                " (its lookups, and the entries of the listings it keeps)",
                ["mount"],
                multiprocess_mode="livemax",
                registry=None,
            ),
            restarts=Counter(
                "tvix_mountd_restarts",
                "Times the supervisor restarted a mount's worker",
                ["mount"],
                registry=None,
            ),
            handovers=Counter(
                "tvix_mountd_handovers",
                "Times a mount's live FUSE connection went to a new worker, by why",
                ["mount", "reason"],
                registry=None,
            ),
            # The supervisor is the only writer; livesum drops its value with it.
            mount_up=Gauge(
                "tvix_mountd_mount_up",
                "1 while the mount serves, else 0",
                ["mount"],
                multiprocess_mode="livesum",
                registry=None,
            ),
        )
    return _metrics


def nix_cache_metrics() -> NixCacheMetrics:
    """The binary-cache metric objects, built on first use (as `metrics`)."""
    global _nix_cache_metrics
    if _nix_cache_metrics is None:
        _nix_cache_metrics = NixCacheMetrics(
            narinfo_lookups=Counter(
                "tvix_mountd_nix_cache_narinfo_lookups",
                "narinfo lookups of Nix binary caches, by result"
                " (hit, miss, refused, error, local)",
                ["cache", "result"],
                registry=None,
            ),
            nar_downloads=Counter(
                "tvix_mountd_nix_cache_nar_downloads",
                "NAR downloads from Nix binary caches, by result (ok, failed)",
                ["cache", "result"],
                registry=None,
            ),
            downloaded_bytes=Counter(
                "tvix_mountd_nix_cache_downloaded_bytes",
                "Bytes of (compressed) NAR files received from Nix binary caches",
                ["cache"],
                registry=None,
            ),
            ingested_bytes=Counter(
                "tvix_mountd_nix_cache_ingested_bytes",
                "NAR bytes ingested into the local store from Nix binary caches",
                ["cache"],
                registry=None,
            ),
            ingest_seconds=Histogram(
                "tvix_mountd_nix_cache_ingest_seconds",
                "Time from the start of a NAR download to the path being ingested",
                ["cache"],
                buckets=INGEST_BUCKETS,
                registry=None,
            ),
            reference_prefetches=Counter(
                "tvix_mountd_nix_cache_reference_prefetches",
                "References of fetched paths prefetched in the background, by result"
                " (fetched, present, absent, failed, dropped)",
                ["cache", "result"],
                registry=None,
            ),
        )
    return _nix_cache_metrics


def count_restart(mount: str) -> None:
    """The supervisor restarted `mount`'s worker."""
    metrics().restarts.labels(mount).inc()


def count_handover(mount: str, reason: str) -> None:
    """`mount`'s connection went to a new worker (reason: crash, hang, restart, reload)."""
    metrics().handovers.labels(mount, reason).inc()


def set_mount_up(mount: str, up: bool) -> None:
    metrics().mount_up.labels(mount).set(1 if up else 0)


def mark_process_dead(pid: int) -> None:
    """Forget the live gauges of a process that exited (its counters stay)."""
    if _directory is not None:
        _multiprocess.mark_process_dead(pid, _directory)  # type: ignore[no-untyped-call]


RootcacheStats = Mapping[str, Mapping[str, float]]


class RootcacheCollector(Collector):
    """The rootcache's figures, asked for at scrape time.

    `stats` returns {store: {field: value}} with rootcache.proto's StoreStats
    field names; None (or an exception) means the rootcache did not answer,
    and then the rootcache series are left out of the scrape.
    """

    def __init__(self, stats: Callable[[], RootcacheStats | None]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        try:
            stats = self._stats()
        except Exception as e:  # a scrape must still show the workers' figures
            log.debug("rootcache figures unavailable: %s", e)
            return
        if stats is None:
            return
        for name, help_text in ROOTCACHE_COUNTERS.items():
            counter = CounterMetricFamily(
                f"tvix_mountd_rootcache_{name}", help_text, labels=["store"]
            )
            for store, fields in sorted(stats.items()):
                if name in fields:
                    counter.add_metric([store], fields[name])
            yield counter
        for name, help_text in ROOTCACHE_GAUGES.items():
            gauge = GaugeMetricFamily(f"tvix_mountd_rootcache_{name}", help_text, labels=["store"])
            for store, fields in sorted(stats.items()):
                if name in fields:
                    gauge.add_metric([store], fields[name])
            yield gauge


def rootcache_collector(stats: Callable[[], RootcacheStats | None]) -> RootcacheCollector:
    return RootcacheCollector(stats)


# A process's metrics file starts with this header (prometheus_client's mmap_dict).
_HEADER_BYTES: Final = 8


class _ProcessFiles(Collector):
    """prometheus_client's multiprocess collector over the files a process
    has finished creating: a worker that is starting has created its file
    but not yet sized it, and merging an empty file fails the whole scrape
    (struct.error). Such a process has counted nothing yet."""

    def __init__(self, directory: str) -> None:
        self._directory = directory

    def collect(self) -> Iterable[Metric]:
        files = []
        for entry in os.scandir(self._directory):
            with contextlib.suppress(FileNotFoundError):  # a file removed meanwhile
                if entry.name.endswith(".db") and entry.stat().st_size >= _HEADER_BYTES:
                    files.append(entry.path)
        merged: Iterable[Metric] = _multiprocess.MultiProcessCollector.merge(  # type: ignore[no-untyped-call]
            files, accumulate=True
        )
        return merged


def render(extra_collectors: Iterable[Collector] = ()) -> tuple[bytes, str]:
    """The exposition for a scrape: every process's files, plus `extra_collectors`."""
    registry = CollectorRegistry()
    if _directory is not None:
        registry.register(_ProcessFiles(_directory))
    for collector in extra_collectors:
        registry.register(collector)
    return generate_latest(registry), CONTENT_TYPE_LATEST
