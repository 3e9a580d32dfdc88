"""ONNX tools that fold BatchNormalization, on the same files: BN nodes left, standalone affines, max error vs the
original in onnxruntime, time, onnxruntime latency.

    python benchmarks/bench_onnx_fold.py [--quick] [--models resnet18 timm/dpn68 ...]

Files: torchvision and timm architectures (random weights, BN statistics measured on random data then γ/β
randomized, nothing downloaded) exported with the legacy exporter, BNs kept as BatchNormalization nodes,
constant folding off. Tools: the onnxscript rewriter (default rules), onnxoptimizer `fuse_bn_into_conv`,
onnxsim, onnxslim, onnxruntime's offline optimisation (ORT_ENABLE_EXTENDED, optimized_model_filepath), and
`bntool fold` (its time includes its own onnxruntime check). Each tool runs in a forked process: a tool that
crashes or is not installed gives a row that says so. Error: max |Δ| over the outputs of the original and the
rewritten file in onnxruntime with optimisations off, on one random input, as a share of the original's largest
|output|. Latency: onnxruntime (default optimisation level, one thread), batch 1, median.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import archs
import numpy as np
import onnx
import torch
from common import setup_threads, show

from bntool.zoo import randomize_bn

# The files the issue names first (what the tools leave), then the rest; results are saved after each file.
FILES = ["densenet121", "timm/dpn68", "timm/repvgg_a0", "timm/mixnet_s", "timm/levit_128s", "timm/resnetv2_50",
         "timm/mobileone_s0", "timm/fastvit_t8", "resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0",
         "inception_v3", "shufflenet_v2_x1_0", "regnet_y_400mf", "mobilenet_v3_large", "resnext50_32x4d",
         "timm/efficientnet_b0", "timm/mobilenetv3_large_100", "timm/resnet50d", "timm/regnety_008",
         "timm/ghostnet_100", "timm/hrnet_w18_small"]
QUICK = ["resnet18", "mobilenet_v2", "densenet121", "timm/repvgg_a0", "timm/mixnet_s"]
TOOLS = ["onnxscript rewriter", "onnxoptimizer fuse_bn_into_conv", "onnxsim", "onnxslim",
         "onnxruntime offline (extended)", "bntool fold"]
PYTORCH_PATH = "(bntool fold, PyTorch path, same model)"  # a reference row per file, not a tool on the file
SIZE = 128  # image side (LeViT needs 224, Inception 299)


# ---------------------------------------------------------------- the files


def build(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """Random weights, γ/β randomized, BN statistics measured on random data (as after training: random
    statistics would make outputs that are mostly cancellation noise), as benchmarks/archs.py builds them."""
    from bntool.recalibration import recalibrate

    torch.manual_seed(0)
    if name.startswith("timm/"):
        import timm

        model = timm.create_model(name[5:], pretrained=False)
        side = 224 if "levit" in name else SIZE
    else:
        from torchvision import models

        kwargs = {"init_weights": False, "aux_logits": False} if name == "inception_v3" else {}
        model = getattr(models, name)(**kwargs)
        side = 299 if name == "inception_v3" else SIZE
    model = randomize_bn(model, seed=0).eval()
    g = torch.Generator().manual_seed(1)
    recalibrate(model, [torch.randn(4, 3, side, side, generator=g)], mode="cumulative")
    return model.eval(), torch.randn(1, 3, side, side, generator=g)


def export_with_bn(model, x, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=False, training=torch.onnx.TrainingMode.PRESERVE,
                          do_constant_folding=False, input_names=["x"])


# ---------------------------------------------------------------- the tools (each in a forked process)


def run_tool(tool: str, src: Path, dst: Path) -> None:
    """Rewrite `src` into `dst` with `tool`; raises ModuleNotFoundError when the tool is not installed."""
    if tool == "onnxscript rewriter":
        from onnxscript import rewriter

        onnx.save(rewriter.rewrite(onnx.load(str(src))), str(dst))
    elif tool == "onnxoptimizer fuse_bn_into_conv":
        import onnxoptimizer

        onnx.save(onnxoptimizer.optimize(onnx.load(str(src)), ["fuse_bn_into_conv"]), str(dst))
    elif tool == "onnxsim":
        import onnxsim

        model, ok = onnxsim.simplify(onnx.load(str(src)))
        if not ok:
            raise RuntimeError("onnxsim: its own check failed")
        onnx.save(model, str(dst))
    elif tool == "onnxslim":
        import onnxslim

        onnx.save(onnxslim.slim(onnx.load(str(src))), str(dst))
    elif tool == "onnxruntime offline (extended)":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(dst)
        ort.InferenceSession(str(src), sess_options=options, providers=["CPUExecutionProvider"])
    elif tool == "bntool fold":
        from bntool.onnx_fold import fold_onnx

        fold_onnx(src, dst, samples=2)
    else:
        raise ValueError(tool)


def _child(tool: str, src: str, dst: str, result: str) -> None:
    torch.set_num_threads(1)
    start = time.perf_counter()
    try:
        run_tool(tool, Path(src), Path(dst))
        outcome = {"seconds": time.perf_counter() - start}
    except ModuleNotFoundError as e:
        outcome = {"missing": e.name or str(e)}
    except BaseException as e:  # the tool failed: its message is the row
        outcome = {"failed": f"{type(e).__name__}: {' '.join(str(e).split())[:90]}", "trace": traceback.format_exc()}
    Path(result).write_text(json.dumps(outcome))


def rewrite(tool: str, src: Path, dst: Path, timeout: float = 300) -> dict:
    result = dst.with_suffix(".json")
    process = multiprocessing.get_context("fork").Process(target=_child, args=(tool, str(src), str(dst), str(result)))
    process.start()
    process.join(timeout)
    if process.is_alive():
        process.kill()
        process.join()
        return {"failed": f"timed out after {timeout:.0f} s"}
    if not result.exists():
        return {"failed": f"crashed (exit code {process.exitcode})"}
    return json.loads(result.read_text())


# ---------------------------------------------------------------- measuring a file


def session(path: Path, level: str = "ORT_DISABLE_ALL"):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def outputs(path: Path, x: np.ndarray) -> list[np.ndarray]:
    s = session(path)
    return s.run(None, {s.get_inputs()[0].name: x})


def latencies(paths: list[Path], x: np.ndarray, reps: int) -> list[float]:
    """Median onnxruntime latency of each file (default level, one thread), measured interleaved: one run of
    each in turn, `reps` rounds, so that a noisy moment on a shared machine hits every file alike."""
    sessions = [session(p, "ORT_ENABLE_ALL") for p in paths]
    feeds = [{s.get_inputs()[0].name: x} for s in sessions]
    for s, feed in zip(sessions, feeds):
        s.run(None, feed)
    times: list[list[float]] = [[] for _ in paths]
    for _ in range(reps):
        for s, feed, mine in zip(sessions, feeds, times):
            start = time.perf_counter()
            s.run(None, feed)
            mine.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def op_counts(path: Path) -> Counter:
    """Node counts by op type, and "affine": Mul nodes that scale an activation (a tensor that depends on the
    graph input) by a constant, as a BN left as a standalone affine does (not Muls on weights), and depthwise
    1×1 Convs (one weight per channel: what `bntool fold` writes a standalone affine as by default)."""
    model = onnx.load(str(path), load_external_data=False)
    dims = {i.name: list(i.dims) for i in model.graph.initializer}
    dynamic = {i.name for i in model.graph.input if i.name not in dims}
    counts = Counter()
    for node in model.graph.node:
        counts[node.op_type] += 1
        reads = [i in dynamic for i in node.input if i]
        if any(reads):
            dynamic.update(node.output)
            counts["affine"] += (node.op_type == "Mul" and not all(reads)) or _per_channel_conv(node, dims)
    return counts


def _per_channel_conv(node, dims: dict[str, list[int]]) -> bool:
    w = dims.get(node.input[1]) if node.op_type == "Conv" and len(node.input) > 1 else None
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    return w is not None and len(w) > 2 and w[0] == group > 1 and all(d == 1 for d in w[1:])


def measure_file(name: str, tmp: Path, reps: int) -> list[list]:
    model, x = build(name)
    src = tmp / f"{name.replace('/', '_')}.onnx"
    export_with_bn(model, x, src)
    pytorch_row = pytorch_path_row(name, model, x)
    del model
    before = op_counts(src)
    feed = x.numpy()
    reference = outputs(src, feed)
    scale = max(float(np.abs(r).max()) for r in reference) or 1.0
    base_latency = latencies([src], feed, reps)[0]
    rows = [[name, "(exported file)", before["BatchNormalization"], 0, "—", "—",
             f"{base_latency * 1e3:.2f} ms", "1.00×"], pytorch_row]
    for tool in TOOLS:
        dst = tmp / f"{src.stem}.{tool.split()[0]}.onnx"
        outcome = rewrite(tool, src, dst)
        if "missing" in outcome:
            rows.append([name, tool, f"not installed ({outcome['missing']})", "", "", "", "", ""])
            continue
        if "failed" in outcome:
            rows.append([name, tool, f"failed: {outcome['failed']}", "", "", "", "", ""])
            continue
        after = op_counts(dst)
        affines = max(0, after["affine"] - before["affine"])
        try:
            got = outputs(dst, feed)
            error = max(float(np.abs(g.astype(np.float64) - r).max()) for g, r in zip(got, reference)) / scale
            original, lat = latencies([src, dst], feed, reps)  # interleaved: the ratio is this pair's
            rows.append([name, tool, after["BatchNormalization"], affines, f"{error:.1e}",
                         f"{outcome['seconds']:.2f} s", f"{lat * 1e3:.2f} ms", f"{lat / original:.2f}×"])
        except Exception as e:
            rows.append([name, tool, after["BatchNormalization"], affines,
                         f"onnxruntime cannot run it: {' '.join(str(e).split())[:60]}", f"{outcome['seconds']:.2f} s",
                         "", ""])
    return rows


def pytorch_path_row(name: str, model, x) -> list:
    """What `bntool fold` leaves on the same model through the PyTorch path (the issue's yardstick: no more
    standalone affines on the ONNX file): batch_norm ops left and ChannelAffine modules, after branch merging."""
    import bntool
    from bntool.layers import ChannelAffine

    start = time.perf_counter()
    folded, report = bntool.fold(model, x, check=False)
    affines = sum(isinstance(m, ChannelAffine) for m in folded.modules())
    return [name, PYTORCH_PATH, report.batch_norm_ops_after, affines, f"{report.max_abs_over_scale:.1e}",
            f"{time.perf_counter() - start:.2f} s", "", ""]


def summary(rows: list[list], files: int) -> list[list]:
    """Per tool: BN nodes left over all files, files with none left, failures."""
    total = sum(r[2] for r in rows if r[1] == "(exported file)")
    out = []
    for tool in TOOLS:
        mine = [r for r in rows if r[1] == tool]
        ok = [r for r in mine if isinstance(r[2], int)]
        missing = [r for r in mine if str(r[2]).startswith("not installed")]
        if missing and not ok:
            out.append([tool, "not installed", "", "", ""])
            continue
        out.append([tool, f"{sum(r[2] for r in ok)} of {total}", f"{sum(r[2] == 0 for r in ok)} of {files}",
                    sum(isinstance(r[3], int) and r[3] for r in ok), len(mine) - len(ok)])
    return out


FILE_COLUMNS = ["file", "tool", "BN nodes left", "affines", "max error", "time", "ORT latency", "vs file"]
SUMMARY_COLUMNS = ["tool", "BN nodes left", "files with none left", "standalone affines", "crashed/failed"]
NOTES = ("Error: max |Δ| vs the exported file in onnxruntime (optimisations off), one random input, over the "
         "original's largest |output|; latency: onnxruntime default level, 1 thread, batch 1, median, and its "
         "ratio to the exported file's, the two run interleaved (A, B, A, B, …). Affines: Muls of an activation "
         "by a constant, and depthwise 1×1 Convs, added (a BN left as a standalone affine; `bntool fold` writes "
         "one as such a Conv on a float32 4-D tensor); on the PyTorch-path row, ChannelAffine modules "
         "left after branch merging. bntool's time includes its onnxruntime check.")


# ---------------------------------------------------------------- ResNet-50: fold + check time and memory

# The library as a script runs it: imports, then the call; the peak RSS above the process after its imports
# (VmHWM: ru_maxrss would carry the parent's size across fork + exec).
LIBRARY_RUN = """
import os, sys, time
started = time.perf_counter()
import onnx, onnxruntime
import bntool
fold_onnx = bntool.fold_onnx
imported = time.perf_counter()
base = int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
report = fold_onnx(sys.argv[1], sys.argv[2], force=True)
done = time.perf_counter()
peak = [int(line.split()[1]) * 1024 for line in open('/proc/self/status') if line.startswith('VmHWM')][0]
print(imported - started, done - imported, report.fold_seconds, report.check_seconds, peak - base)
"""
# ml_dtypes' own import (numpy already imported): 0.7.0 takes about 0.6 s here, 0.6.0 0.06 s.
ML_DTYPES_IMPORT = ("import time, numpy; started = time.perf_counter(); import ml_dtypes; "
                    "print(time.perf_counter() - started, ml_dtypes.__version__)")
# A child's peak RSS (the CLI's, or an import-only process's), read by a small parent of its own (ru_maxrss
# carries the parent's size across fork + exec: the benchmark's own would count).
CHILD_PEAK = ("import resource, subprocess, sys; subprocess.run([sys.executable, *sys.argv[1:]], check=True, "
              "capture_output=True); "
              "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)")
IMPORTS_ONLY = ("import bntool.cli, bntool.report, bntool.onnx_fold, bntool.onnx_check, onnx, "
                "onnxruntime")  # what `bntool fold model.onnx` holds at its peak (no torch)


def resnet50_cost(tmp: Path, rounds: int) -> list[list]:
    """`bntool fold resnet50.onnx` (the CLI) and `bntool.fold_onnx` (the library, in a fresh process), each with
    its onnxruntime check, timed in interleaved rounds; peak memory above the process after imports, as a
    multiple of the file's size."""
    import subprocess
    import sys

    model, x = build("resnet50")
    src, dst = tmp / "resnet50.onnx", tmp / "resnet50.folded.onnx"
    export_with_bn(model, x, src)
    del model
    size = src.stat().st_size
    tiny, tiny_out = tmp / "one_layer.onnx", tmp / "one_layer.folded.onnx"  # the command's fixed cost
    export_with_bn(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)).eval(), x, tiny)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}

    def child_peak(*argv: str) -> int:
        out = subprocess.run([sys.executable, "-c", CHILD_PEAK, *argv], env=env, check=True, capture_output=True)
        return int(out.stdout.decode().split()[-1])

    library, cli, cli_peaks, import_peaks, tiny_peaks = [], [], [], [], []
    for _ in range(rounds):  # A, B, A, B: a busy moment on a shared machine hits both alike
        out = subprocess.run([sys.executable, "-c", LIBRARY_RUN, str(src), str(dst)], env=env, check=True,
                             capture_output=True, text=True)
        library.append([float(v) for v in out.stdout.split()[-5:]])
        print(f"library: imports, call, fold, check (s), peak above imports (× file): "
              f"{', '.join(f'{v:.2f}' for v in library[-1][:4])}, {library[-1][4] / size:.2f}", flush=True)
        start = time.perf_counter()
        cli_peaks.append(child_peak("-m", "bntool", "fold", str(src), "-o", str(dst), "--force"))
        cli.append(time.perf_counter() - start)
        import_peaks.append(child_peak("-c", IMPORTS_ONLY))
        tiny_peaks.append(child_peak("-m", "bntool", "fold", str(tiny), "-o", str(tiny_out), "--force"))
        above = (cli_peaks[-1] - import_peaks[-1]) / size
        above_tiny = (cli_peaks[-1] - tiny_peaks[-1]) / size
        print(f"CLI: {cli[-1]:.2f} s, peak above an import-only process {above:.2f}×, above the command on a "
              f"one-layer file {above_tiny:.2f}×", flush=True)
    imports, call, fold, check, memory = (statistics.median(c) for c in zip(*library))
    ml_dtypes = subprocess.run([sys.executable, "-c", ML_DTYPES_IMPORT], check=True, capture_output=True,
                               text=True).stdout.split()
    cli_memory = statistics.median(c - i for c, i in zip(cli_peaks, import_peaks))
    cli_model_memory = statistics.median(c - t for c, t in zip(cli_peaks, tiny_peaks))
    return [
        ["bntool.fold_onnx (the call: fold + check)", f"{call:.2f} s (best {min(r[1] for r in library):.2f})",
         "< 2 s"],
        ["  of which the fold / the check", f"{fold:.2f} s / {check:.2f} s", ""],
        ["  imports before it (onnx, onnxruntime, bntool)", f"{imports:.2f} s", ""],
        [f"    of which ml_dtypes {ml_dtypes[1]} (onnx imports it)", f"{float(ml_dtypes[0]):.2f} s", ""],
        ["bntool fold (CLI, the whole process)", f"{statistics.median(cli):.2f} s (best {min(cli):.2f})", "< 2 s"],
        ["peak memory, library (above the process after imports)", f"{memory / size:.2f}× the file", "< 3×"],
        ["peak memory, CLI (above an import-only process)", f"{cli_memory / size:.2f}× the file", "< 3×"],
        ["peak memory, CLI (above the same command on a one-layer file)", f"{cli_model_memory / size:.2f}× the file",
         "< 3×"],
        ["file", f"{size / 2**20:.0f} MiB, {SIZE}² input, batch 1", ""],
    ]


COST_COLUMNS = ["measure", "value", "target"]
COST_NOTES = ("ResNet-50 (torchvision, random weights, BN statistics set) exported with its BNs kept; each run a "
              "fresh process, {rounds} rounds with the library and the CLI interleaved, medians; default check "
              "(4 random inputs + the example, onnxruntime at ORT_DISABLE_ALL and ORT_ENABLE_ALL). The CLI's "
              "peak memory is taken above two baselines: a process that only imports what the command holds at "
              "its peak (bntool, onnx, onnxruntime; no torch), and the same command on a one-layer Conv+BN file (its "
              "code, onnxruntime's start and Typer's, so the rest is what the model costs). Load average during "
              "the run: {load}.")


def save_partial(rows: list[list], names: list[str]) -> None:
    """The tables so far, as show() saves them (a long run cut short still leaves its figures)."""
    from common import RESULTS

    files = [r[0] for r in rows if r[1] == "(exported file)"]
    partial = f"Files: {', '.join(files)} (so far: {len(files)} of {len(names)}). "
    RESULTS.mkdir(exist_ok=True)
    for name, title, columns, table, notes in (
            ("onnx_fold_files", "ONNX BatchNorm folding: each tool on the same files", FILE_COLUMNS, rows, NOTES),
            ("onnx_fold", f"ONNX BatchNorm folding over {len(files)} files", SUMMARY_COLUMNS,
             summary(rows, len(files)), partial + NOTES)):
        (RESULTS / f"{name}.json").write_text(json.dumps({"title": title, "columns": columns, "rows": table,
                                                          "notes": notes, "torch": torch.__version__,
                                                          "threads": torch.get_num_threads()}, indent=1, default=str))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help=f"five files: {', '.join(QUICK)}")
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--resnet50", action="store_true", help="only the ResNet-50 fold + check time and memory")
    args = parser.parse_args()
    setup_threads()
    if not archs.have_torchvision():
        raise SystemExit("this benchmark exports torchvision and timm architectures: install torchvision and timm")
    if args.resnet50:
        rounds = 3
        with tempfile.TemporaryDirectory() as tmp:
            rows = resnet50_cost(Path(tmp), rounds)
        load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
        show("ResNet-50 .onnx: fold with its check, time and peak memory", COST_COLUMNS, rows, "onnx_fold_resnet50",
             notes=COST_NOTES.format(rounds=rounds, load=load))
        return
    names = args.models or (QUICK if args.quick else FILES)
    if not archs.have_timm():
        names = [n for n in names if not n.startswith("timm/")]
    reps = 5 if args.quick else 10
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            started = time.perf_counter()
            try:
                file_rows = measure_file(name, Path(tmp), reps)
            except Exception as e:  # the export itself failed: say so, go on
                file_rows = [[name, "(export)", f"failed: {' '.join(str(e).split())[:90]}", "", "", "", "", ""]]
            rows += file_rows
            print(f"{name}: {time.perf_counter() - started:.0f} s", flush=True)
            save_partial(rows, names)
            for f in Path(tmp).iterdir():
                os.remove(f)
    files = [r[0] for r in rows if r[1] == "(exported file)"]
    show("ONNX BatchNorm folding: each tool on the same files", FILE_COLUMNS, rows, "onnx_fold_files", notes=NOTES)
    show(f"ONNX BatchNorm folding over {len(files)} files", SUMMARY_COLUMNS, summary(rows, len(files)), "onnx_fold",
         notes=f"Files: {', '.join(files)}. " + NOTES)


if __name__ == "__main__":
    main()
