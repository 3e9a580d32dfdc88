"""Run every benchmark in turn (about 25-35 minutes on 2 CPU cores); tables print as they finish and are
saved under benchmarks/results/.

    python benchmarks/run_all.py [--quick]
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

if __name__ == "__main__":
    extra = sys.argv[1:]
    for script in ("bench_startup.py", "bench_fold.py", "bench_reparam.py", "bench_recalibrate.py",
                   "bench_export.py", "bench_distributed.py", "bench_onnx_fold.py", "bench_onnx_recalibrate.py"):
        print(f"== {script}", flush=True)
        subprocess.run([sys.executable, str(HERE / script), *([] if script == "bench_startup.py" else extra)],
                       check=True)
