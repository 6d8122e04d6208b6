"""Medians, ratios and targets: the table, as text for the terminal and as Markdown.

Two kinds of target: DESIGN's, as ratios to native (the rows it names), and
issue 10's, as ratios to the fastest C peer of the same run (bindfs or
squashfuse_ll, whichever is faster on that row); a row issue 10 gives no
number must be "no worse than today". A table also says the daemons' memory
after each workload.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from benchmarks import interpreter
from benchmarks.data import DataSpec
from benchmarks.workloads import CONCURRENT_READERS

PEER_LABELS: Final = {
    "native": "native",
    "bindfs": "bindfs",
    "squashfuse": "squashfuse_ll",
    "tvix": "tvix-mountd",
    "tvix-supervised": "tvix-mountd supervised",
    "tvix-whatif": "tvix-mountd what-if",
}
SHORT: Final = {
    "native": "native",
    "bindfs": "bindfs",
    "squashfuse": "sqfs",
    "tvix": "tvix",
    "tvix-supervised": "supervised",
    "tvix-whatif": "what-if",
}


# DESIGN's bound on a daemon's memory on this data ("RSS after the walks").
RSS_BOUND_MB: Final = 60.0


@dataclass(frozen=True)
class Row:
    key: str  # "<workload>_<cold|warm>" or "rss"
    workload: str
    phase: str
    target: float | None  # DESIGN's: ratio to native; for rss, MB; None: DESIGN names none
    design_ref: str  # the reference ratios in DESIGN.md (bindfs / squashfuse_ll)
    # Issue 10's: ratio to the fastest C peer; None: "no worse than today".
    target_best_c: float | None = None


ROWS: Final = (
    Row("read_cold", "read", "cold", 2.0, "4.6x / 2.8x"),
    Row("read_warm", "read", "warm", 2.0, "2.0x / 2.4x"),
    Row("walk_cold", "walk", "cold", 2.0, "4.3x / 2.1x"),
    Row("walk_warm", "walk", "warm", 2.0, "1.7x / 1.8x"),
    Row("ls_cold", "ls", "cold", 2.0, "1.2x / 0.5x", 2.0),
    Row("ls_warm", "ls", "warm", 2.0, "1.4x / 0.8x"),
    Row("lsl_cold", "lsl", "cold", None, "-"),
    Row("lsl_warm", "lsl", "warm", None, "-"),
    Row("find_cold", "find", "cold", None, "-", 2.0),
    Row("cat_cold", "cat", "cold", 1.5, "3.0x / 1.0x", 1.0),
    Row("cat4_cold", "cat4", "cold", None, "-"),
    Row("copy_cold", "copy", "cold", None, "-"),
    Row("startup_cold", "startup", "cold", None, "-", 1.2),
    Row("startup_warm", "startup", "warm", None, "-", 1.2),
    Row("rss", "walk", "rss", RSS_BOUND_MB, "20 MB / 3 MB"),
)


def workload_label(workload: str, spec: DataSpec) -> str:
    big = (
        f"{spec.big_bytes >> 30} GiB"
        if spec.big_bytes % (1 << 30) == 0
        else f"{spec.big_bytes >> 20} MiB"
    )
    labels = {
        "read": f"{big} sequential read",
        "walk": f"stat walk of {_count(spec.small_files)} files",
        "ls": f"`ls -f` of a {_count(spec.wide_files)}-entry directory",
        "lsl": f"`ls -lU` of the {_count(spec.wide_files)}-entry directory",
        "cat": f"cat every one of {_count(spec.small_files)} small files",
        "find": f"`find -type f` over {_count(spec.small_files)} files",
        "cat4": f"cat of {_count(spec.small_files)} small files by"
        f" {CONCURRENT_READERS} processes at once",
        "copy": f"copy-read of {_count(spec.small_files)} small files (list, then read)",
        "startup": f"python3.11 start-up importing {len(interpreter.IMPORTS)} stdlib modules",
    }
    return labels[workload]


def row_label(row: Row, spec: DataSpec) -> str:
    if row.key == "rss":
        return "daemon peak RSS (VmHWM) after the walks"
    return f"{workload_label(row.workload, spec)}, {row.phase}"


def _count(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else f"{n:,}"


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


@dataclass(frozen=True)
class Cell:
    value: float | None  # seconds, or MB for rss
    spread: tuple[float, float] | None  # (min, max)
    n: int


def summarize(samples: list[dict[str, Any]], peers: list[str]) -> dict[str, dict[str, Cell]]:
    """row key -> peer -> median cell, from the raw samples."""
    table: dict[str, dict[str, Cell]] = {}
    for row in ROWS:
        cells: dict[str, Cell] = {}
        for peer in peers:
            values: list[float] = []
            for s in samples:
                if s["workload"] != row.workload or s["peer"] != peer:
                    continue
                if row.key == "rss":
                    if s.get("vmhwm_kb") is not None:
                        values.append(s["vmhwm_kb"] / 1024)
                elif s.get(row.phase) is not None:
                    values.append(s[row.phase]["seconds"])
            cells[peer] = Cell(
                median(values), (min(values), max(values)) if values else None, len(values)
            )
        if any(c.value is not None for c in cells.values()):
            table[row.key] = cells
    return table


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds:.2f} s"


def _fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


TVIX_PEERS: Final = ("tvix", "tvix-supervised", "tvix-whatif")
C_PEERS: Final = ("bindfs", "squashfuse")


def table_rows(
    table: dict[str, dict[str, Cell]], peers: list[str], spec: DataSpec
) -> tuple[list[str], list[list[str]]]:
    """Header and rows: absolute medians per peer, ratios to native and to
    bindfs, tvix-mountd against the fastest C peer, both targets and whether each is met."""
    fuse_peers = [p for p in peers if p != "native"]
    header = ["workload", *(PEER_LABELS[p] for p in peers)]
    ratio_native = fuse_peers if "native" in peers else []
    ratio_bindfs = [p for p in fuse_peers if p != "bindfs"] if "bindfs" in peers else []
    header += [f"{SHORT[p]}/native" for p in ratio_native]
    header += [f"{SHORT[p]}/bindfs" for p in ratio_bindfs]
    c_peers = [p for p in C_PEERS if p in peers]
    tvix_peers = [p for p in TVIX_PEERS if p in peers]
    if c_peers:
        header += [f"{SHORT[p]}/best C" for p in tvix_peers]
    header.append("target/native")
    header += ["met" if p == "tvix" else f"met ({SHORT[p]})" for p in tvix_peers]
    if c_peers:
        header.append("target/best C")
        header += ["met/best C" if p == "tvix" else f"met/best C ({SHORT[p]})" for p in tvix_peers]
    header.append("DESIGN ref bindfs/sqfs")

    rows: list[list[str]] = []
    for row in ROWS:
        cells = table.get(row.key)
        if cells is None:
            continue
        out = [row_label(row, spec)]
        rss = row.key == "rss"
        if rss:
            out += [_fmt_mb(cells[p].value) for p in peers]
            out += ["-"] * (len(ratio_native) + len(ratio_bindfs))
        else:
            out += [_fmt_time(cells[p].value) for p in peers]
            native = cells["native"].value if "native" in cells else None
            bindfs = cells["bindfs"].value if "bindfs" in cells else None
            out += [_fmt_ratio(_ratio(cells[p].value, native)) for p in ratio_native]
            out += [_fmt_ratio(_ratio(cells[p].value, bindfs)) for p in ratio_bindfs]
        best = _best(cells, c_peers)
        if c_peers:
            out += [_fmt_ratio(_ratio(cells[p].value, best)) for p in tvix_peers]
        if row.target is None:
            out.append("-")
            out += ["-"] * len(tvix_peers)
        else:
            out.append(f"<= {row.target:.0f} MB" if rss else f"<= {row.target:.1f}x")
            for p in tvix_peers:
                value = cells[p].value if rss else _ratio(cells[p].value, native)
                out.append(_fmt_met(_at_most(value, row.target)))
        if c_peers:
            if rss:
                out.append("-")
                out += ["-"] * len(tvix_peers)
            elif row.target_best_c is None:
                out.append("no worse")
                out += ["-"] * len(tvix_peers)
            else:
                out.append(f"<= {row.target_best_c:.1f}x")
                out += [
                    _fmt_met(_at_most(_ratio(cells[p].value, best), row.target_best_c))
                    for p in tvix_peers
                ]
        out.append(row.design_ref)
        rows.append(out)
    return header, rows


def _at_most(value: float | None, target: float) -> bool | None:
    return None if value is None else value <= target


def _fmt_mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} MB"


def _median_mb(samples: list[dict[str, Any]], workload: str, peer: str, field: str) -> float | None:
    """The median of a KiB figure of the samples of (workload, peer), in MB."""
    values = [
        s[field] / 1024
        for s in samples
        if s["workload"] == workload and s["peer"] == peer and s.get(field) is not None
    ]
    return median(values)


def memory_rows(
    samples: list[dict[str, Any]], peers: list[str], spec: DataSpec
) -> tuple[list[str], list[list[str]]]:
    """Header and rows: each daemon's memory after each workload (its cold and warm
    runs on a fresh daemon): VmRSS then, and VmHWM, the peak since it started
    (medians, MB), with DESIGN's bound on the peak."""
    daemons = [p for p in peers if p != "native"]
    tvix_peers = [p for p in TVIX_PEERS if p in peers]
    header = ["daemon memory after", *(f"{PEER_LABELS[p]} RSS / peak" for p in daemons)]
    header += ["bound (peak)"]
    header += ["met" if p == "tvix" else f"met ({SHORT[p]})" for p in tvix_peers]
    rows: list[list[str]] = []
    for workload in dict.fromkeys(s["workload"] for s in samples):  # in the order run
        out = [workload_label(workload, spec)]
        for p in daemons:
            rss = _median_mb(samples, workload, p, "vmrss_kb")
            peak = _median_mb(samples, workload, p, "vmhwm_kb")
            out.append("-" if rss is None or peak is None else f"{rss:.1f} / {peak:.1f} MB")
        out.append(f"<= {RSS_BOUND_MB:.0f} MB")
        out += [
            _fmt_met(_at_most(_median_mb(samples, workload, p, "vmhwm_kb"), RSS_BOUND_MB))
            for p in tvix_peers
        ]
        rows.append(out)
    return header, rows


def _best(cells: dict[str, Cell], peers: Sequence[str]) -> float | None:
    values = [v for p in peers if (v := cells[p].value) is not None]
    return min(values) if values else None


def _fmt_met(met: bool | None) -> str:
    if met is None:
        return "-"
    return "yes" if met else "NO"


def ratios(table: dict[str, dict[str, Cell]]) -> dict[str, dict[str, float | None]]:
    """row key -> {"<peer>/native": ratio, "<peer>/best C": ratio, ...} for the JSON results."""
    out: dict[str, dict[str, float | None]] = {}
    for key, cells in table.items():
        if key == "rss":
            continue
        native = cells["native"].value if "native" in cells else None
        bindfs = cells["bindfs"].value if "bindfs" in cells else None
        best = _best(cells, [p for p in C_PEERS if p in cells])
        out[key] = {}
        for peer, cell in cells.items():
            if peer != "native":
                out[key][f"{peer}/native"] = _ratio(cell.value, native)
            if peer not in ("native", "bindfs"):
                out[key][f"{peer}/bindfs"] = _ratio(cell.value, bindfs)
            if peer in TVIX_PEERS:
                out[key][f"{peer}/best C"] = _ratio(cell.value, best)
    return out


def render_text(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(
            h.ljust(w) if i == 0 else h.rjust(w)
            for i, (h, w) in enumerate(zip(header, widths, strict=True))
        )
    ]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    return "\n".join(lines)


def render_markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|")
    for r in rows:
        lines.append("| " + " | ".join(r) + " |")
    return "\n".join(lines)


def render_spread_markdown(
    table: dict[str, dict[str, Cell]], peers: list[str], spec: DataSpec
) -> str:
    """min / median / max of every cell, to show how stable each median is."""
    header = ["workload", *(PEER_LABELS[p] for p in peers)]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * len(peers) + "|"]
    for row in ROWS:
        cells = table.get(row.key)
        if cells is None:
            continue
        parts = [row_label(row, spec)]
        for p in peers:
            c = cells[p]
            if c.value is None or c.spread is None:
                parts.append("-")
            elif row.key == "rss":
                parts.append(f"{c.spread[0]:.1f} / {c.value:.1f} / {c.spread[1]:.1f} MB (n={c.n})")
            else:
                lo, hi = c.spread
                parts.append(f"{_fmt_time(lo)} / {_fmt_time(c.value)} / {_fmt_time(hi)} (n={c.n})")
        lines.append("| " + " | ".join(parts) + " |")
    return "\n".join(lines)
