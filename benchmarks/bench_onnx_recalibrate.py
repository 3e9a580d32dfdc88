"""Recalibration of an ONNX file in onnxruntime (exact mode): its time as a multiple of one onnxruntime eval pass
over the same data (target ≤ 3×), and its statistics against PyTorch's exact mode on the same model and batches.

    python benchmarks/bench_onnx_recalibrate.py [--quick] [--models resnet50 ...]

The ONNX files are exported from torchvision's architectures (random weights, BN statistics from random data,
nothing downloaded) with the legacy exporter, BNs kept as BatchNormalization nodes, a dynamic batch. The eval
pass: one onnxruntime session on the whole file (default optimisation level) and one run per batch, session
creation included as in the recalibration. Both are run in turn, `--reps` times; the best of each is kept.
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


def eval_pass(proto_bytes: bytes, data) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(proto_bytes, sess_options=options, providers=["CPUExecutionProvider"])
    for x in data:
        session.run(None, {"x": x.numpy()})


def worst_difference(proto, model) -> float:
    """Max over BNs and channels of |Δmean|/σ and |Δvar|/σ², σ² = var + eps (what the BN divides by)."""
    inits = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in proto.graph.initializer}
    nodes = [n for n in proto.graph.node if n.op_type == "BatchNormalization"]
    worst = 0.0
    for node, (_, bn) in zip(nodes, bn_modules(model), strict=True):
        mean, var = inits[node.input[3]], inits[node.input[4]]
        ref_mean, ref_var = bn.running_mean.double().numpy(), bn.running_var.double().numpy()
        scale = ref_var + bn.eps
        worst = max(worst, float((np.abs(mean - ref_mean) / np.sqrt(scale)).max()),
                    float((np.abs(var - ref_var) / scale).max()))
    return worst


def measure(name: str, batches: int, batch: int, size: int | None, reps: int) -> list:
    model, x = archs.build(name)
    shape = (batch, *x.shape[1:-2], size, size) if size else (batch, *x.shape[1:])
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(shape, generator=g) for _ in range(batches)]
    proto = export_with_bn(model, data[0][:1])
    proto_bytes = proto.SerializeToString()
    bn_nodes = sum(n.op_type == "BatchNormalization" for n in proto.graph.node)
    eval_times, recal_times, report, result = [], [], None, None
    for _ in range(reps):  # in turn, so drift in the machine's speed hits both alike
        start = time.perf_counter()
        eval_pass(proto_bytes, data)
        eval_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        result, report = recalibrate_onnx(copy.deepcopy(proto), data)
        recal_times.append(time.perf_counter() - start)
    reference = copy.deepcopy(model)
    recalibrate(reference, data, mode="exact")
    diff = worst_difference(result, reference)
    ratio = min(recal_times) / min(eval_times)
    return [name, f"{batches}×{tuple(shape)}", bn_nodes, report.passes, f"{min(eval_times):.2f} s",
            f"{min(recal_times):.2f} s", fmt_ratio(ratio), report.segment_replays,
            f"{report.cache_peak_bytes / 2**20:.0f} MiB", f"{diff:.1e}"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smaller images, fewer batches, one repetition")
    parser.add_argument("--models", nargs="*", default=["resnet50", "mobilenet_v2", "efficientnet_b0"])
    parser.add_argument("--reps", type=int, default=None)
    args = parser.parse_args()
    threads = setup_threads()
    batches, batch, size = (2, 8, 128) if args.quick else (4, 16, None)
    reps = args.reps or (1 if args.quick else 2)
    rows = [measure(name, batches, batch, size, reps) for name in args.models]
    show("bntool recalibrate model.onnx (onnxruntime, exact mode) vs one onnxruntime eval pass",
         ["model", "data", "BN nodes", "levels", "eval pass", "recalibrate", "ratio (target ≤ 3×)",
          "segment replays", "cache peak", "max rel. diff vs PyTorch exact (target ≤ 1e-5)"],
         rows, "onnx_recalibrate",
         notes=f"CPU, onnxruntime's default threads, torch {threads} thread(s); best of {reps} runs each, in turn. "
               "Relative difference: |Δmean|/σ and |Δvar|/σ², σ² = var + eps, the worst over all BNs and channels.")


if __name__ == "__main__":
    main()
