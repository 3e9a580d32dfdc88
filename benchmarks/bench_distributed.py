"""Recalibration across processes (torch.distributed, gloo on CPU): throughput from 1 to 2 processes,
and the merged statistics against a single-process run.

    python benchmarks/bench_distributed.py [--quick]

On this 2-core machine: 1 process × 2 threads vs 2 processes × 1 thread. Times are the library's own
(from the JSON report: model load and process start-up excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import show

HERE = Path(__file__).resolve().parent


def run(cmd, threads, tmp):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), BENCH_THREADS=str(threads),
               PYTHONPATH=f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout[out.stdout.index("{"):])


def statistics_difference(a, b, key) -> float:
    """Mean differences in standard deviations, variance differences relative to the variance."""
    var = a[key.replace("running_mean", "running_var")].double()
    scale = var.sqrt() if key.endswith("running_mean") else var
    return float(((a[key].double() - b[key].double()).abs() / scale.clamp(min=1e-12)).max())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    n = 64 if args.quick else 256
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        np.save(tmp / "x.npy", np.random.default_rng(0).standard_normal((n, 3, 112, 112)).astype(np.float32))
        for arch in ("archs:ResNet", "archs:mobilenet_v2"):
            sys.path.insert(0, str(HERE))
            import archs

            torch.manual_seed(0)
            factory = getattr(archs, arch.split(":")[1])
            torch.save(factory().state_dict(), tmp / "m.pt")
            results, outputs = {}, {}
            for mode in ("cumulative", "exact"):
                for procs in (1, 2):
                    out = tmp / f"{mode}-{procs}.pt"
                    common = ["recalibrate", "m.pt", "--arch", arch, "--data", "x.npy", "-b", "16", "--mode", mode,
                              "-o", str(out), "--json", "--force"]
                    if procs == 1:
                        cmd = [sys.executable, "-m", "bntool", *common]
                    else:
                        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               "-m", "bntool", *common]
                    report = run(cmd, 2 // procs, tmp)
                    results[(mode, procs)] = report
                    outputs[(mode, procs)] = torch.load(out)
                a, b = outputs[(mode, 1)], outputs[(mode, 2)]
                diff = max(statistics_difference(a, b, k) for k in a if k.endswith(("running_mean", "running_var")))
                one, two = results[(mode, 1)], results[(mode, 2)]
                rows.append([arch.split(":")[1], mode, f"{one['samples_per_second']:.0f}",
                             f"{two['samples_per_second']:.0f}",
                             f"{two['samples_per_second'] / one['samples_per_second']:.2f}×", two["passes"],
                             f"{diff:.1e}"])
    show(f"Recalibration over 1 vs 2 CPU processes (gloo), {n} images 112×112, batch 16",
         ["model", "mode", "1 process × 2 threads, samples/s", "2 processes × 1 thread, samples/s", "scaling",
          "passes", "max difference of statistics (mean in σ, var relative)"], rows, "distributed")


if __name__ == "__main__":
    main()
