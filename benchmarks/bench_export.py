"""ONNX: export + verify time, bntool vs the same steps by hand (torch.onnx + onnxruntime) and polygraphy if
installed; equivalence of folded and unfolded exports; onnxruntime latency folded vs unfolded.

    python benchmarks/bench_export.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import archs
import numpy as np
import torch
from common import interleaved_times, setup_threads, show

from bntool.onnx_check import ort_session
from bntool.onnx_export import export_onnx
from bntool.verification import verify


def by_hand(model, x, path: Path) -> float:
    """What a user writes without bntool: export, load in onnxruntime, compare one output."""
    import onnxruntime as ort

    start = time.perf_counter()
    torch.onnx.export(model, (x,), str(path), input_names=["input"], output_names=["output"], dynamo=True,
                      external_data=False, verbose=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(x).numpy()
    got = session.run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)
    return time.perf_counter() - start


def float32_floor(model, x) -> float:
    """PyTorch float32's own error against the model run in float64, as a share of the output's magnitude:
    two float32 runtimes cannot be expected to agree more closely than each agrees with the exact result."""
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
        err = (model(x).double() - ref).abs().max()
    return float(err / ref.abs().max())


def polygraphy_time(path: Path, shape) -> str:
    exe = shutil.which("polygraphy")
    if exe is None:
        return "not installed"
    start = time.perf_counter()
    out = subprocess.run([exe, "run", str(path), "--onnxrt", "--input-shapes", f"input:{list(shape)}"],
                         capture_output=True, text=True)
    return f"{time.perf_counter() - start:.1f} s" if out.returncode == 0 else "fails"


def verify_vs_export(model, x, tmp: Path, reps: int) -> list:
    """`verify` against `export-onnx` alone, interleaved, as the CLI runs them (4 random inputs). `verify --onnx
    FILE` (health, fold and ONNX checks of a file export-onnx wrote) does the work export-onnx does, less the
    export. Plain `verify` exports itself, with a dynamic batch axis, and so also compares at batch 4:
    `export-onnx --dynamic-batch` is the export it contains. verify plans and folds once, exports that fold, and
    its ONNX check reuses the fold check's PyTorch outputs (the example and the random inputs at batch 1)."""
    exported = tmp / "exported.onnx"
    export_onnx(model, x, exported, samples=0)  # the file `verify --onnx` checks (no dynamic axis)

    def run_verify(onnx_path=None):
        assert verify(model, x, samples=4, onnx_path=onnx_path).passed

    def run_export(dynamic_batch: bool):
        export_onnx(model, x, tmp / "verify-vs-export.onnx", samples=4, dynamic_batch=dynamic_batch)

    t = interleaved_times({"verify": run_verify, "verify_file": lambda: run_verify(exported),
                           "export": lambda: run_export(False), "dynamic": lambda: run_export(True)},
                          reps=reps, warmup=1)
    return [f"{t['export']:.1f} s", f"{t['verify_file']:.1f} s", f"{t['verify_file'] / t['export']:.2f}×",
            f"{t['dynamic']:.1f} s", f"{t['verify']:.1f} s", f"{t['verify'] / t['dynamic']:.2f}×"]


VERIFY_COLUMNS = ["model", "export-onnx", "verify --onnx FILE", "verify --onnx / export-onnx",
                  "export-onnx --dynamic-batch", "verify (exports itself)", "verify / export-onnx --dynamic-batch"]
VERIFY_NOTES = ("verify plans and folds once; its ONNX check reuses the fold check's PyTorch outputs. `verify --onnx "
                "FILE` checks the file export-onnx wrote (batch 1). Plain verify exports the fold its fold check "
                "made, with a dynamic batch axis, and compares at batch 1 and 4, as export-onnx --dynamic-batch "
                "does: the batch-4 comparisons (PyTorch and onnxruntime at two optimisation levels on 4× the "
                "images) are most of its gap to plain export-onnx.")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", nargs="*", default=["resnet50", "mobilenet_v2", "efficientnet_b0"])
    parser.add_argument("--verify-only", action="store_true", help="only the verify vs export-onnx table")
    args = parser.parse_args()
    setup_threads()
    reps = 5 if args.quick else 20
    if args.verify_only:
        with tempfile.TemporaryDirectory() as tmp:
            rows = [[name, *verify_vs_export(*archs.build(name), Path(tmp), 1 if args.quick else 3)]
                    for name in args.models]
        show("verify vs export-onnx alone (CPU, medians, interleaved)", VERIFY_COLUMNS, rows, "verify_timing",
             notes=VERIFY_NOTES)
        return
    timing, latency, verifying = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in args.models:
            model, x = archs.build(name)
            rows = {}
            for fold in (True, False):
                for exporter in ("dynamo", "legacy"):
                    path = tmp / f"{name}-{fold}-{exporter}.onnx"
                    start = time.perf_counter()
                    report = export_onnx(model, x, path, fold=fold, exporter=exporter, samples=2, dynamic_batch=True)
                    rows[(fold, exporter)] = (time.perf_counter() - start, report)
            hand = by_hand(model, x, tmp / f"{name}-hand.onnx")
            poly = polygraphy_time(tmp / f"{name}-True-dynamo.onnx", x.shape)
            floor = f"{float32_floor(model, x):.1e}"
            for (fold, exporter), (seconds, report) in rows.items():
                timing.append([name, "folded" if fold else "unfolded", exporter, f"{seconds:.1f} s",
                               len(report.comparisons), f"{report.max_abs_over_scale:.1e}", f"{report.max_abs:.1e}",
                               floor, report.batch_norm_nodes, sum(report.op_counts.values())])
            timing.append([name, "by hand: torch.onnx + ORT, 1 input", "dynamo", f"{hand:.1f} s", 1, "", "", "", "",
                           ""])
            timing.append([name, "polygraphy run --onnxrt", "", poly, 1, "", "", "", "", ""])
            sessions = {k: ort_session(tmp / f"{name}-{k}-dynamo.onnx") for k in (True, False)}
            feed = {"input": x.numpy()}
            t = interleaved_times({k: (lambda s=s, feed=feed: s.run(None, feed)) for k, s in sessions.items()},
                                  reps=reps)
            latency.append([name, f"{t[False] * 1e3:.1f}", f"{t[True] * 1e3:.1f}", f"{t[False] / t[True]:.2f}×"])
            if name == "resnet50" or args.quick:
                verifying.append([name, *verify_vs_export(model, x, tmp, 1 if args.quick else 3)])
            print(f"{name}: done", flush=True)
    show("export-onnx + verify (CPU, batch 1 example; checks at batch 1, 1, 4 and 2 random inputs each)",
         ["model", "what", "exporter", "time", "inputs compared", "ORT vs PyTorch: max error / max |output|",
          "max abs err", "floor: PyTorch fp32 vs fp64, same measure", "BatchNormalization nodes", "nodes"],
         timing, "export_timing",
         notes="polygraphy runs the exported model in onnxruntime alone on one input (its own comparison needs "
               "a second runner); bntool's time includes folding, export, onnx.checker and the comparisons.")
    show(f"onnxruntime CPU latency at batch 1 (median of {reps})",
         ["model", "unfolded export ms", "folded export ms", "speed-up"], latency, "export_latency")
    show("verify vs export-onnx alone (CPU, medians, interleaved)", VERIFY_COLUMNS, verifying, "verify_timing",
         notes=VERIFY_NOTES)


if __name__ == "__main__":
    main()
