"""Folding: coverage, accuracy and speed, bntool vs torch.fx fuse vs torch.jit.freeze, on popular architectures.

    python benchmarks/bench_fold.py [--quick]

With timm installed, its models join the coverage and affine tables, and their latency is measured on one
thread at batch 1, 128² (BN+act layers: folded vs unfolded vs the floor that deletes only the BN math).

Coverage: batch_norm ops left per forward. Accuracy: max error vs a float64 reference, folded float32 divided
by unfolded float32 (≤ 1.5 is the target). Speed: eager CPU latency, unfolded / folded, next to the floor
(every BN deleted: the same convs with nothing in between, numerically wrong but the fastest possible).
"""

from __future__ import annotations

import argparse
import copy
import time
from collections import Counter

import archs
import torch
from common import fmt_ratio, interleaved_times, setup_threads, show
from torch import nn

from bntool.folding import fold, plan_fold
from bntool.graph import trace
from bntool.layers import FoldedNormAct, bn_modules, is_frozen_bn, norm_act_parts


def norm_ops(model, x) -> int:
    flow, _ = trace(model, (x,))
    frozen = sum(len(flow.calls_of(m)) for m in model.modules() if is_frozen_bn(m))
    return flow.count("batch_norm") + frozen


def fx_fuse(model, x):
    from torch.fx.experimental.optimization import fuse

    try:
        fused = fuse(copy.deepcopy(model))
        return fused, norm_ops(fused, x)
    except Exception as e:
        return None, f"fails ({type(e).__name__})"


def jit_freeze(model, x):
    try:
        frozen = torch.jit.freeze(torch.jit.trace(copy.deepcopy(model), (x,), check_trace=False).eval())
        graph = str(frozen.graph)
        return frozen, graph.count("aten::batch_norm")
    except Exception as e:
        return None, f"fails ({type(e).__name__})"


def max_err(model, x, ref) -> float:
    with torch.no_grad():
        out = model(x)
    return float((out.double() - ref).abs().max())


def without_bn(model):
    """The floor: the math of every BN deleted (Identity; a BN+act layer keeps its drop and act). Same convs
    and activations; what folding can at best reach."""
    floor = copy.deepcopy(model)
    for name, bn in bn_modules(floor):
        parent, _, child = name.rpartition(".")
        parts = norm_act_parts(bn)
        setattr(floor.get_submodule(parent) if parent else floor, child,
                FoldedNormAct(nn.Identity(), *parts) if parts else nn.Identity())
    return floor


def never_slower(t: dict[str, float]) -> str:
    """The fold's promise, per model: the folded model's median is not above the unfolded one's."""
    ratio = t["folded"] / t["unfolded"]
    return "yes" if ratio <= 1.0 else f"≈ ({ratio:.2f}×, timing noise)" if ratio <= 1.03 else f"NO ({ratio:.2f}×)"


def affine_summary(decisions) -> list:
    """Affines left and why (each reason with its count), and what replaced the BN modules."""
    reasons = Counter(d.reason for d in decisions if d.action == "affine")
    paths = Counter(d.replaced_by for d in decisions if d.replaced_by)
    why = "; ".join(f"{n}× {r}" for r, n in reasons.most_common(3)) or "-"
    if len(reasons) > 3:
        why += f"; {sum(reasons.values()) - sum(n for _, n in reasons.most_common(3))}× other"
    return [sum(reasons.values()), why, ", ".join(f"{p} {n}" for p, n in sorted(paths.items()))]


def affine_table(names) -> None:
    """The affine count per model with reasons, from the plan alone (fast: one traced forward per model)."""
    rows = []
    for name in names:
        model, x = archs.build(name)
        plan = plan_fold(model, x)
        rows.append([name, len(plan.decisions), *affine_summary(plan.decisions)])
        print(f"{name}: planned", flush=True)
    show("Affines left after folding, and why", ["model", "BN layers", "affines", "reasons", "BN modules became"],
         rows, "fold_affines")


def timm_latency(reps: int) -> None:
    """timm's BN+act models, 1 thread, batch 1, 128²: unfolded / folded / floor (BN math deleted, act kept)."""
    names = [n for n in archs.timm_architectures() if n.split("/")[1] in
             ("efficientnet_b0", "mobilenetv3_large_100", "resnet50d", "mixnet_m")]
    if not names:
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    for name in names:
        model, x = archs.build(name)
        folded, _ = fold(model, x)
        with torch.inference_mode():
            variants = {"unfolded": model, "folded": folded, "floor": without_bn(model)}
            t = interleaved_times({k: (lambda m=m, x=x: m(x)) for k, m in variants.items()}, reps=reps, warmup=3)
        rows.append([name, f"{t['unfolded'] * 1e3:.2f}", f"{t['folded'] * 1e3:.2f}", f"{t['floor'] * 1e3:.2f}",
                     fmt_ratio(t["unfolded"] / t["folded"]), fmt_ratio(t["folded"] / t["floor"]),
                     never_slower(t)])
        print(f"{name}: timed", flush=True)
    torch.set_num_threads(threads)
    show(f"timm models, eager CPU latency at batch 1, 128², 1 thread (median of {reps})",
         ["model", "unfolded ms", "folded ms", "floor (BN math deleted, act kept) ms", "speed-up", "folded / floor",
          "folded never slower than unfolded"],
         rows, "fold_speed_timm")


def checked(model, x, result, left) -> str:
    """ops left, and whether the baseline's output is still the model's (a fold into a shared conv is not)."""
    if result is None:
        return str(left)
    with torch.no_grad():
        expected = model(x)
        error = float((result(x) - expected).abs().max() / expected.abs().max())
    return f"{left} (WRONG: error {error:.0e})" if error > 1e-3 else str(left)


def zoo_coverage() -> None:
    """The hard cases, one per zoo model: where each tool leaves batch_norm ops (or cannot run at all)."""
    from bntool import zoo

    rows = []
    for name, entry in zoo.ZOO.items():
        model, x = zoo.build(name), zoo.example_input(name)
        _, report = fold(model, x, samples=1)
        rows.append([name, entry.description, norm_ops(model, x), report.batch_norm_ops_after,
                     checked(model, x, *fx_fuse(model, x)), checked(model, x, *jit_freeze(model, x))])
    show("Fold coverage on the hard cases (bntool.zoo): batch_norm ops left per forward",
         ["zoo model", "what it has", "before", "after bntool", "after fx.fuse", "after jit.freeze"], rows,
         "fold_zoo")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer timing repetitions")
    parser.add_argument("--only", nargs="*", help="architecture names")
    parser.add_argument("--zoo-only", action="store_true", help="only the coverage table of the zoo's hard cases")
    parser.add_argument("--skip-coverage", action="store_true", help="only the affine and timm latency tables")
    args = parser.parse_args()
    threads = setup_threads()
    everything = [*archs.architectures(), *archs.timm_architectures()]
    if not args.skip_coverage:
        zoo_coverage()
    if args.zoo_only:
        return
    affine_table(args.only or everything)
    reps = 5 if args.quick else 15
    timm_latency(10 if args.quick else 40)
    if args.skip_coverage:
        return
    coverage, speed = [], []
    for name in args.only or everything:
        model, x = archs.build(name)
        bn_count = len(bn_modules(model))
        before = norm_ops(model, x)
        start = time.perf_counter()
        folded, report = fold(model, x, samples=2)
        total_fold = time.perf_counter() - start
        after = report.batch_norm_ops_after
        _, fx_left = fx_fuse(model, x)
        _, jit_left = jit_freeze(model, x)
        ref = copy.deepcopy(model).double()
        with torch.no_grad():
            ref_out = ref(x.double())
        del ref
        err_plain, err_folded = max_err(model, x, ref_out), max_err(folded, x, ref_out)
        c = report.to_dict()["counts"]
        coverage.append([name, bn_count, before, after, fx_left, jit_left,
                         f"{c['folded']}/{c['folded-forward']}/{c['affine']}/{c['refused']}",
                         f"{err_folded / err_plain:.2f}" if err_plain else "exact",
                         f"{report.fold_seconds:.2f} s", f"{total_fold:.2f} s"])
        if name.startswith("timm/"):
            print(f"{name}: done", flush=True)
            continue  # timed on their own, above
        floor = without_bn(model)
        with torch.inference_mode():
            variants = {"unfolded": model, "folded": folded, "floor": floor}
            t = interleaved_times({k: (lambda m=m, x=x: m(x)) for k, m in variants.items()}, reps=reps)
        speed.append([name, f"{t['unfolded'] * 1e3:.1f}", f"{t['folded'] * 1e3:.1f}", f"{t['floor'] * 1e3:.1f}",
                      fmt_ratio(t["unfolded"] / t["folded"]), fmt_ratio(t["folded"] / t["floor"]), never_slower(t)])
        print(f"{name}: done", flush=True)
    source = "torchvision" if archs.have_torchvision() else "built-in replicas"
    show(f"Fold coverage and accuracy ({source}, torch {torch.__version__})",
         ["model", "BN layers", "batch_norm ops before", "after bntool", "after fx.fuse", "after jit.freeze",
          "folded/forward/affine/refused", "error ratio folded/unfolded vs fp64", "fold time", "fold+check time"],
         coverage, "fold_coverage")
    show(f"Eager CPU latency at batch 1 ({threads} threads, median of {reps})",
         ["model", "unfolded ms", "folded ms", "floor (BN deleted) ms", "speed-up", "folded / floor",
          "folded never slower than unfolded"],
         speed, "fold_speed")


if __name__ == "__main__":
    main()
