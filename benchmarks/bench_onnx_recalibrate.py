"""Recalibration of an ONNX file in onnxruntime (exact mode): its time as a multiple of one onnxruntime eval pass
over the same data (target ≤ 3×), and its statistics against PyTorch's exact mode on the same model and batches.

    python benchmarks/bench_onnx_recalibrate.py [--quick] [--models resnet50 ...] [--batches 4 --batch-size 16 --size S]

The ONNX files are exported from torchvision's architectures (random weights, BN statistics from random data,
nothing downloaded) with the legacy exporter, BNs kept as BatchNormalization nodes, a dynamic batch. The eval
pass: one onnxruntime session on the whole file (default optimisation level) and one run per batch, session
creation included as in the recalibration. Both are run in turn, `--reps` times; the best of each is kept.
"unfused eval pass": the same pass with onnxruntime's graph optimisations off, as a multiple of the eval pass.
"BN inputs exposed": the same pass on the file with every BN input also a graph output. Exact mode must read every
BN's input in full, so no BN can be fused into its conv and each is written out (and, in onnxruntime's blocked
layout, reordered): that pass is its floor before any statistics or levels.
"""

from __future__ import annotations

import argparse
import copy
import io
import time
import warnings

import archs
import numpy as np
import onnx
import torch
from common import fmt_ratio, setup_threads, show
from onnx import numpy_helper

from bntool.layers import bn_modules
from bntool.onnx_recalibration import recalibrate_onnx
from bntool.recalibration import recalibrate


def export_with_bn(model, x) -> onnx.ModelProto:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buf, dynamo=False, training=torch.onnx.TrainingMode.PRESERVE,
                          do_constant_folding=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    return onnx.load_from_string(buf.getvalue())


def eval_pass(proto_bytes: bytes, data, level: str = "ORT_ENABLE_ALL") -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    session = ort.InferenceSession(proto_bytes, sess_options=options, providers=["CPUExecutionProvider"])
    for x in data:
        session.run(None, {"x": x.numpy()})


def with_bn_inputs_as_outputs(proto) -> bytes:
    """The file with every BN's input also a graph output: one pass of it (default optimisation level) does what
    exact mode cannot avoid, each BN input written out in full so no BN fuses into its conv, without the levels
    and the statistics."""
    exposed = copy.deepcopy(proto)
    names = {o.name for o in exposed.graph.output}
    for node in exposed.graph.node:
        if node.op_type == "BatchNormalization" and node.input[0] not in names:
            exposed.graph.output.append(onnx.ValueInfoProto(name=node.input[0]))
            names.add(node.input[0])
    return exposed.SerializeToString()


def onnx_statistics(proto) -> list[tuple[np.ndarray, np.ndarray]]:
    inits = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in proto.graph.initializer}
    return [(inits[n.input[3]], inits[n.input[4]]) for n in proto.graph.node if n.op_type == "BatchNormalization"]


def torch_statistics(model) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(bn.running_mean.double().numpy(), bn.running_var.double().numpy()) for _, bn in bn_modules(model)]


def worst_difference(stats, reference, eps: list[float]) -> float:
    """Max over BNs and channels of |Δmean|/σ and |Δvar|/σ², σ² = var + eps of the reference (what the BN
    divides by)."""
    worst = 0.0
    for (mean, var), (ref_mean, ref_var), e in zip(stats, reference, eps, strict=True):
        scale = ref_var + e
        worst = max(worst, float((np.abs(mean - ref_mean) / np.sqrt(scale)).max()),
                    float((np.abs(var - ref_var) / scale).max()))
    return worst


def accuracy(model, proto, batch) -> tuple[float, float, float]:
    """On one batch: onnxruntime vs PyTorch exact mode (float32), both vs PyTorch exact mode in float64 (the
    float32 floor: how far float32 arithmetic itself is from the exact statistics)."""
    ort_stats = onnx_statistics(recalibrate_onnx(copy.deepcopy(proto), [batch])[0])
    f32, f64 = copy.deepcopy(model), copy.deepcopy(model).double()
    recalibrate(f32, [batch], mode="exact")
    recalibrate(f64, [batch.double()], mode="exact")
    eps = [bn.eps for _, bn in bn_modules(model)]
    ref32, ref64 = torch_statistics(f32), torch_statistics(f64)
    return (worst_difference(ort_stats, ref32, eps), worst_difference(ort_stats, ref64, eps),
            worst_difference(ref32, ref64, eps))


def measure(name: str, batches: int, batch: int, size: int | None, reps: int, accuracy_batch: int = 8) -> list:
    model, x = archs.build(name)
    shape = (batch, *x.shape[1:-2], size, size) if size else (batch, *x.shape[1:])
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(shape, generator=g) for _ in range(batches)]
    proto = export_with_bn(model, data[0][:1])
    proto_bytes = proto.SerializeToString()
    bn_nodes = sum(n.op_type == "BatchNormalization" for n in proto.graph.node)
    exposed_bytes = with_bn_inputs_as_outputs(proto)
    eval_times, unfused_times, exposed_times, recal_times, report = [], [], [], [], None
    for _ in range(reps):  # in turn, so drift in the machine's speed hits all alike
        start = time.perf_counter()
        eval_pass(proto_bytes, data)
        eval_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        eval_pass(proto_bytes, data, "ORT_DISABLE_ALL")
        unfused_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        eval_pass(exposed_bytes, data)
        exposed_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        _, report = recalibrate_onnx(copy.deepcopy(proto), data, shared_arena=True)  # as the CLI runs it
        recal_times.append(time.perf_counter() - start)
    vs32, vs64, floor = accuracy(model, proto, data[0][:accuracy_batch])
    ratio = min(recal_times) / min(eval_times)
    return [name, f"{batches}×{tuple(shape)}", bn_nodes, report.passes, f"{min(eval_times):.2f} s",
            f"{min(recal_times):.2f} s", fmt_ratio(ratio), fmt_ratio(min(unfused_times) / min(eval_times)),
            fmt_ratio(min(exposed_times) / min(eval_times)), fmt_ratio(min(recal_times) / min(exposed_times)),
            report.segment_replays,
            f"{report.cache_peak_bytes / 2**20:.0f} MiB", f"{vs32:.1e}", f"{vs64:.1e}", f"{floor:.1e}"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smaller images, fewer batches, one repetition")
    parser.add_argument("--models", nargs="*", default=["resnet50", "mobilenet_v2", "efficientnet_b0"])
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--batches", type=int, default=None, help="batches of data (default 4; --quick 2)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 16; --quick 8")
    parser.add_argument("--size", type=int, default=None, help="image side (default the model's, 224; --quick 128)")
    args = parser.parse_args()
    threads = setup_threads()
    batches, batch, size = (2, 8, 128) if args.quick else (4, 16, None)
    batches, batch, size = args.batches or batches, args.batch_size or batch, args.size or size
    reps = args.reps or (1 if args.quick else 2)
    rows = [measure(name, batches, batch, size, reps) for name in args.models]
    show("bntool recalibrate model.onnx (onnxruntime, exact mode) vs one onnxruntime eval pass",
         ["model", "data", "BN nodes", "levels", "eval pass", "recalibrate", "ratio (target ≤ 3×)",
          "unfused eval pass", "BN inputs exposed", "recalibrate vs BN inputs exposed",
          "segment replays", "cache peak", "rel. diff vs PyTorch exact (target ≤ 1e-5)", "vs float64",
          "PyTorch float32 vs float64"],
         rows, "onnx_recalibrate",
         notes=f"CPU, onnxruntime's default threads, torch {threads} thread(s); best of {reps} runs each, in turn. "
               "Relative difference: |Δmean|/σ and |Δvar|/σ², σ² = var + eps, the worst over all BNs and channels, "
               "on the first 8 samples: onnxruntime vs PyTorch exact mode, vs PyTorch exact mode in float64, and "
               "PyTorch's own float32 distance from float64 (the floor no float32 run can beat). "
               "\"BN inputs exposed\": one pass (default optimisation level) of the file with every BN input also "
               "a graph output, so no BN fuses into its conv and each is written out in full: what exact mode "
               "cannot avoid, without its levels and statistics.")


if __name__ == "__main__":
    main()
