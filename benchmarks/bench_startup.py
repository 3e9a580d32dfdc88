"""`bntool --help` wall time, next to a bare `python -c pass` (the floor) and `python -c "import torch"`.

    python benchmarks/bench_startup.py
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import time

from common import show


def wall(cmd: list[str], reps: int = 10) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    bntool = shutil.which("bntool") or "bntool"
    rows = []
    floor = wall([sys.executable, "-c", "pass"])
    for label, cmd in [("python -c pass (floor)", [sys.executable, "-c", "pass"]),
                       ("bntool --help", [bntool, "--help"]),
                       ("bntool fold --help", [bntool, "fold", "--help"]),
                       ("python -c 'import torch'", [sys.executable, "-c", "import torch"])]:
        t = wall(cmd)
        rows.append([label, f"{t * 1e3:.0f} ms", f"{t / floor:.1f}×"])
    show("Start-up time (median of 10)", ["command", "wall time", "vs floor"], rows, "startup")


if __name__ == "__main__":
    main()
