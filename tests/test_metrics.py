"""Metrics across processes: workers write, the supervisor renders."""

from __future__ import annotations

import errno
import multiprocessing
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio
from prometheus_client import values
from prometheus_client.parser import text_string_to_metric_families

from tvix_mountd import metrics as m
from tvix_mountd import request_metrics
from tvix_mountd.request_metrics import ReadAheadCounts, RequestMetrics, errno_label

_FORK = multiprocessing.get_context("fork")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(body: bytes) -> Samples:
    found: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            found[sample.name, frozenset(sample.labels.items())] = sample.value
    return found


def value(found: Samples, name: str, **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


@pytest.fixture
def metrics_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh multiprocess directory; the process's prometheus state restored after."""
    monkeypatch.delenv(m.ENV_VAR, raising=False)  # restored by monkeypatch
    saved = (values.ValueClass, m._directory, m._metrics)
    path = tmp_path / "metrics"
    m.setup_multiprocess_dir(str(path))
    try:
        yield path
    finally:
        values.close_all_multiprocess_files()  # type: ignore[no-untyped-call]
        values.ValueClass, m._directory, m._metrics = saved


def in_child(target: Callable[[], None]) -> int:
    """Run `target` in a forked child; its pid once it exited with status 0."""
    process = _FORK.Process(target=target)
    process.start()
    try:
        process.join(30)
        assert process.exitcode == 0
    finally:
        if process.is_alive():
            process.kill()
            process.join()
    assert process.pid is not None
    return process.pid


def worker_alpha() -> None:
    requests = RequestMetrics("alpha")
    requests.observe("lookup", 0.00003, None)
    requests.observe("lookup", 0.002, errno.ENOENT)
    requests.observe("read", 0.0001, None, read_bytes=4096)
    requests.observe("read", 0.3, errno.EIO)
    requests.flush()


def test_a_workers_figures_reach_the_supervisors_render(metrics_dir: Path) -> None:
    in_child(worker_alpha)
    body, content_type = m.render()
    assert content_type.startswith("text/plain")
    found = samples(body)
    assert value(found, "tvix_mountd_requests_total", mount="alpha", op="lookup") == 2
    assert value(found, "tvix_mountd_requests_total", mount="alpha", op="read") == 2
    assert value(found, "tvix_mountd_errors_total", mount="alpha", op="lookup", errno="ENOENT") == 1
    assert value(found, "tvix_mountd_errors_total", mount="alpha", op="read", errno="EIO") == 1
    assert value(found, "tvix_mountd_read_bytes_total", mount="alpha") == 4096
    histogram = "tvix_mountd_request_seconds"
    # Cumulative buckets: 30 us falls in le=5e-05, 2 ms in le=0.0025.
    assert value(found, f"{histogram}_bucket", mount="alpha", op="lookup", le="2.5e-05") == 0
    assert value(found, f"{histogram}_bucket", mount="alpha", op="lookup", le="5e-05") == 1
    assert value(found, f"{histogram}_bucket", mount="alpha", op="lookup", le="0.001") == 1
    assert value(found, f"{histogram}_bucket", mount="alpha", op="lookup", le="0.0025") == 2
    assert value(found, f"{histogram}_bucket", mount="alpha", op="lookup", le="+Inf") == 2
    assert value(found, f"{histogram}_count", mount="alpha", op="lookup") == 2
    assert value(found, f"{histogram}_sum", mount="alpha", op="lookup") == pytest.approx(0.00203)
    assert value(found, f"{histogram}_bucket", mount="alpha", op="read", le="0.25") == 1
    assert value(found, f"{histogram}_bucket", mount="alpha", op="read", le="0.5") == 2


def test_a_scrape_while_a_worker_creates_its_file_counts_the_others(metrics_dir: Path) -> None:
    # A worker that is starting has created its metrics file but not yet
    # sized it: the scrape must not fail (it used to answer 500).
    in_child(worker_alpha)
    (metrics_dir / "counter_99999.db").write_bytes(b"")
    found = samples(m.render()[0])
    assert value(found, "tvix_mountd_requests_total", mount="alpha", op="lookup") == 2


def test_totals_outlive_workers_and_dead_workers_lose_live_gauges(metrics_dir: Path) -> None:
    def worker() -> None:
        requests = RequestMetrics("beta")
        requests.observe("getattr", 0.00001, None)
        requests.flush()
        m.set_mount_up("beta", True)  # a live gauge, written by this process

    first = in_child(worker)
    second = in_child(worker)
    found = samples(m.render()[0])
    assert value(found, "tvix_mountd_requests_total", mount="beta", op="getattr") == 2
    assert value(found, "tvix_mountd_mount_up", mount="beta") == 2  # livesum of two files

    m.mark_process_dead(first)
    found = samples(m.render()[0])
    assert value(found, "tvix_mountd_mount_up", mount="beta") == 1
    m.mark_process_dead(second)
    found = samples(m.render()[0])
    assert value(found, "tvix_mountd_mount_up", mount="beta") is None
    assert value(found, "tvix_mountd_requests_total", mount="beta", op="getattr") == 2


def test_supervisor_figures(metrics_dir: Path) -> None:
    m.count_restart("gamma")
    m.count_restart("gamma")
    m.set_mount_up("gamma", True)
    m.set_mount_up("gamma", False)
    found = samples(m.render()[0])
    assert value(found, "tvix_mountd_restarts_total", mount="gamma") == 2
    assert value(found, "tvix_mountd_mount_up", mount="gamma") == 0


def test_setup_wipes_the_directory(metrics_dir: Path) -> None:
    in_child(worker_alpha)
    assert list(metrics_dir.iterdir())
    m.setup_multiprocess_dir(str(metrics_dir))
    assert list(metrics_dir.iterdir()) == []
    assert os.environ[m.ENV_VAR] == str(metrics_dir)
    assert value(samples(m.render()[0]), "tvix_mountd_read_bytes_total", mount="alpha") is None


class FrozenTime:
    @staticmethod
    def monotonic() -> float:
        return 1000.0


def test_observe_writes_out_after_enough_observations(
    metrics_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stopped clock: only the count can cause a write, however slow the machine.
    monkeypatch.setattr(request_metrics, "time", FrozenTime)
    requests = RequestMetrics("delta")
    requests.observe("lookup", 0.00005, None)
    # Buffered in this process, not yet in the files render reads.
    found = samples(m.render()[0])
    assert not value(found, "tvix_mountd_requests_total", mount="delta", op="lookup")
    for _ in range(requests.FLUSH_AFTER - 1):
        requests.observe("lookup", 0.00005, None)
    found = samples(m.render()[0])
    total = value(found, "tvix_mountd_requests_total", mount="delta", op="lookup")
    assert total == requests.FLUSH_AFTER


async def test_flush_periodically_covers_the_idle_tail(
    metrics_dir: Path, autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(request_metrics, "time", FrozenTime)  # observe() itself never writes out
    requests = RequestMetrics("epsilon")

    def total() -> float | None:
        found = samples(m.render()[0])
        return value(found, "tvix_mountd_requests_total", mount="epsilon", op="open")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(requests.flush_periodically)
        requests.observe("open", 0.0001, None)
        assert not total()
        await trio.sleep(requests.FLUSH_INTERVAL * 1.5)
        assert total() == 1
        requests.observe("open", 0.0001, None)
        nursery.cancel_scope.cancel()  # the final flush on the way out
    assert total() == 2


def test_read_ahead_totals_are_written_as_they_grow_even_without_requests(
    metrics_dir: Path,
) -> None:
    requests = RequestMetrics("zeta")
    totals = [0, 0, 0, 0]
    requests.watch_read_ahead(lambda: ReadAheadCounts(*totals))

    def figures() -> tuple[float | None, ...]:
        found = samples(m.render()[0])
        files = [
            value(found, "tvix_mountd_files_read_ahead_total", mount="zeta", outcome=outcome)
            for outcome in ("read", "stored", "served")
        ]
        directories = value(found, "tvix_mountd_directories_read_ahead_total", mount="zeta")
        return (*files, directories)

    requests.flush()  # nothing yet: nothing written
    assert figures() == (None, None, None, None)
    totals[:] = [5, 2, 1, 3]
    requests.flush()  # the read-ahead's threads count on after the last request
    assert figures() == (5, 2, 1, 3)
    totals[:] = [9, 2, 4, 3]
    requests.observe("read", 0.0001, None)
    requests.flush()
    assert figures() == (9, 2, 4, 3)  # running totals, written as what they grew by


def test_rootcache_collector(metrics_dir: Path) -> None:
    stats = {
        "local": {
            "hits": 5,
            "negative_hits": 1,
            "misses": 3,
            "backend_calls": 2,
            "coalesced": 1,
            "errors": 0,
            "entries": 7,
        },
        "remote": {"hits": 9},
    }
    in_child(worker_alpha)
    found = samples(m.render([m.rootcache_collector(lambda: stats)])[0])
    assert value(found, "tvix_mountd_rootcache_hits_total", store="local") == 5
    assert value(found, "tvix_mountd_rootcache_hits_total", store="remote") == 9
    assert value(found, "tvix_mountd_rootcache_negative_hits_total", store="local") == 1
    assert value(found, "tvix_mountd_rootcache_misses_total", store="local") == 3
    assert value(found, "tvix_mountd_rootcache_backend_calls_total", store="local") == 2
    assert value(found, "tvix_mountd_rootcache_coalesced_total", store="local") == 1
    assert value(found, "tvix_mountd_rootcache_errors_total", store="local") == 0
    assert value(found, "tvix_mountd_rootcache_entries", store="local") == 7
    assert value(found, "tvix_mountd_rootcache_misses_total", store="remote") is None
    # The workers' figures are there too.
    assert value(found, "tvix_mountd_read_bytes_total", mount="alpha") == 4096


def test_rootcache_collector_reads_at_scrape_time_and_survives_a_down_rootcache(
    metrics_dir: Path,
) -> None:
    calls = 0

    def down() -> dict[str, dict[str, float]]:
        nonlocal calls
        calls += 1
        raise ConnectionError("rootcache is restarting")

    collector = m.rootcache_collector(down)
    assert calls == 0
    in_child(worker_alpha)
    found = samples(m.render([collector])[0])
    assert calls == 1
    assert not [name for name, _ in found if name.startswith("tvix_mountd_rootcache_")]
    assert value(found, "tvix_mountd_read_bytes_total", mount="alpha") == 4096
    found = samples(m.render([m.rootcache_collector(lambda: None)])[0])
    assert not [name for name, _ in found if name.startswith("tvix_mountd_rootcache_")]


def test_unknown_errno_is_labelled_by_number() -> None:
    assert errno_label(errno.ENOENT) == "ENOENT"
    assert errno_label(4242) == "4242"


def test_observe_cost(metrics_dir: Path) -> None:
    """Prints the cost of one observe(); timing is not asserted (shared machines)."""
    requests = RequestMetrics("bench")
    n = 50_000
    cases = {
        "ok": (None, 0),
        "read": (None, 131072),
        "error": (errno.ENOENT, 0),
    }
    results = {}
    for case, (error, size) in cases.items():
        start = time.perf_counter()
        for _ in range(n):
            requests.observe("lookup", 0.00005, error, size)
        results[case] = (time.perf_counter() - start) / n * 1e6
    child = m.metrics().requests.labels("bench", "direct")
    histogram = m.metrics().request_seconds.labels("bench", "direct")
    start = time.perf_counter()
    for _ in range(n):
        child.inc()
        histogram.observe(0.00005)
    direct = (time.perf_counter() - start) / n * 1e6
    print(
        "observe() cost per call: "
        + ", ".join(f"{case} {us:.2f} us" for case, us in results.items())
        + f"; prometheus_client counter+histogram directly: {direct:.2f} us"
    )
    requests.flush()
    found = samples(m.render()[0])
    assert value(found, "tvix_mountd_requests_total", mount="bench", op="lookup") == 3 * n


def test_a_worker_imports_prometheus_client_only_at_its_first_flush(tmp_path: Path) -> None:
    """A worker taking a mount over serves before it pays for the import."""
    code = (
        "import sys\n"
        "import tvix_mountd.workers.process\n"
        "from tvix_mountd.request_metrics import RequestMetrics\n"
        "r = RequestMetrics('m')\n"
        "r.observe('lookup', 0.001, None)\n"
        "assert 'prometheus_client' not in sys.modules, 'imported before the flush'\n"
        "r.flush()\n"
        "assert 'prometheus_client' in sys.modules\n"
    )
    env = {**os.environ, m.ENV_VAR: str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
