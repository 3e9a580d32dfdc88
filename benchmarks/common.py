"""Timing and table helpers shared by the benchmarks. Benchmarks print; they assert nothing."""

from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
RESULTS = Path(__file__).resolve().parent / "results"


def setup_threads() -> int:
    n = int(os.environ.get("BENCH_THREADS", min(2, os.cpu_count() or 1)))
    torch.set_num_threads(n)
    return n


def median_time(fn, reps: int = 10, warmup: int = 2) -> float:
    """Median wall time of fn() in seconds, after warm-up runs."""
    for _ in range(warmup):
        fn()
    gc.collect()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_times(fns: dict, reps: int = 10, warmup: int = 2) -> dict[str, float]:
    """Median times of several variants run round-robin, so drift in machine speed hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def show(title: str, columns: list[str], rows: list[list], name: str, notes: str = "") -> None:
    """Print a Rich table and a Markdown copy (for the README), and save the rows as JSON."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*[str(v) for v in r])
    console = Console(width=200)
    console.print(table)
    if notes:
        console.print(notes)
    md = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(str(v) for v in r) + " |" for r in rows]
    print("\n".join(md) + "\n")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"title": title, "columns": columns, "rows": rows,
                                                      "notes": notes, "torch": torch.__version__,
                                                      "threads": torch.get_num_threads()}, indent=1, default=str))


def fmt_ratio(x: float) -> str:
    return f"{x:.2f}×"
