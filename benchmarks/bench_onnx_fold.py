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


def latency(path: Path, x: np.ndarray, reps: int) -> float:
    s = session(path, "ORT_ENABLE_ALL")
    feed = {s.get_inputs()[0].name: x}
    s.run(None, feed)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        s.run(None, feed)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def op_counts(path: Path) -> Counter:
    """Node counts by op type, and "affine": Mul nodes that scale an activation (a tensor that depends on the
    graph input) by a constant, as a BN left as a standalone affine does (not Muls on weights)."""
    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    dynamic = {i.name for i in model.graph.input if i.name not in inits}
    counts = Counter()
    for node in model.graph.node:
        counts[node.op_type] += 1
        reads = [i in dynamic for i in node.input if i]
        if any(reads):
            dynamic.update(node.output)
            counts["affine"] += node.op_type == "Mul" and not all(reads)
    return counts


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
    base_latency = latency(src, feed, reps)
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
            lat = latency(dst, feed, reps)
            rows.append([name, tool, after["BatchNormalization"], affines, f"{error:.1e}",
                         f"{outcome['seconds']:.2f} s", f"{lat * 1e3:.2f} ms", f"{lat / base_latency:.2f}×"])
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
         "ratio to the exported file's. Affines: Muls of an activation by a constant added (a BN left as "
         "a standalone affine); on the PyTorch-path row, ChannelAffine modules left after branch merging. "
         "bntool's time includes its onnxruntime check.")


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
    args = parser.parse_args()
    setup_threads()
    if not archs.have_torchvision():
        raise SystemExit("this benchmark exports torchvision and timm architectures: install torchvision and timm")
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
