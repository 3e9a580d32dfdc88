"""Example 4 — bring your own model and data: the commands a user runs, with --arch and --loader modules.

    python examples/byo_model/run.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from my_models import build  # noqa: E402


def bntool(*args: str) -> None:
    print("$ bntool " + " ".join(args))
    env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    subprocess.run([sys.executable, "-m", "bntool", *args], check=True, env=env)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = f"{tmp}/trained.pt"
        torch.save({"model": build(num_classes=5).state_dict(), "epoch": 90}, ckpt)  # your training checkpoint
        arch = ["--arch", "my_models:build", "--arch-kwargs", '{"num_classes": 5}']
        bntool("inspect", ckpt, *arch, "--input-shape", "1,3,32,32")
        bntool("recalibrate", ckpt, *arch, "--loader", "my_data:calibration_loader", "--loader-kwargs",
               '{"n": 128}', "--input-key", "image", "--mode", "exact", "-o", f"{tmp}/recalibrated.pt")
        bntool("fold", f"{tmp}/recalibrated.pt", *arch, "--input-shape", "1,3,32,32", "-o", f"{tmp}/folded.pt")
        bntool("verify", f"{tmp}/recalibrated.pt", *arch, "--input-shape", "1,3,32,32", "--exporter", "legacy")
        saved = torch.load(f"{tmp}/folded.pt")
        print(f"folded checkpoint keeps your other keys: epoch={saved['epoch']}")


if __name__ == "__main__":
    main()
