"""ONNX files as input of inspect and fold: every BatchNormalization node's health, the fold decisions from the
graph's dataflow, then the surgery in float64 on the initializers (onnx_surgery.py) and the onnxruntime check of
the folded file against the original (onnx_fold_check.py) before anything is written.

The decisions fill the same dataclasses as the PyTorch path (`FoldStep`, `BNDecision`, `FoldTarget`; a target
is an ONNX node name), and the reports are the PyTorch path's (`InspectReport`, `FoldReport`), so JSON reads
alike for both.
"""

from __future__ import annotations

import fnmatch
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .choices import AffineAs, FoldAction
from .compare import Tolerance
from .errors import BrokenStatistics, InputError, broken_layers_text, param
from .files import Outputs
from .onnx_fold_check import OriginalRuns, check_against_original, example_inputs, graph_inputs
from .onnx_graph import OnnxGraph
from .onnx_model import BNNode, OnnxFile, batch_norm_nodes, load_onnx
from .onnx_save import TensorChanges, give_memory_back, plan_onnx_output, save_onnx
from .onnx_surgery import BN_TYPE, OnnxFoldPlan, affine_form, apply_onnx_fold_plan, bn_statistics

__all__ = ["DEFAULT_TOLERANCE", "OnnxFoldPlan", "OriginalRuns", "apply_onnx_fold_plan", "describe_bn_node",
           "example_inputs", "fold_onnx", "inspect_onnx", "plan_onnx_fold"]

DEFAULT_TOLERANCE = Tolerance(rtol=0.0, atol=1e-4)  # the fold check's float32 rule (bntool.folding)


def default_tolerance(model) -> Tolerance:
    """The PyTorch fold check's rule (bntool.folding.default_tolerance) for the lowest float precision among
    the graph's inputs, outputs and BatchNormalization constants: a float16 file gets float16's, as a float16
    model does on the PyTorch path."""
    from onnx import TensorProto

    from .folding.report import default_tolerance as by_dtype

    kinds = {v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
    kinds |= {tensor.dtype for bn in batch_norm_nodes(model) for tensor in bn.values.values() if tensor is not None}
    if TensorProto.FLOAT16 in kinds or np.dtype(np.float16) in kinds:
        return by_dtype("float16")
    if TensorProto.BFLOAT16 in kinds:
        return by_dtype("bfloat16")
    return DEFAULT_TOLERANCE


# ---------------------------------------------------------------- inspect


def inspect_onnx(source: str | os.PathLike | OnnxFile, input_shapes: Sequence[Sequence[int]] | None = None):
    """Every BatchNormalization node: configuration, statistics, health (bntool.inspection's rules) and what
    `fold_onnx` would do with it and why. Returns an InspectReport (the PyTorch path's shape).

    The decisions are fold's: where shape inference leaves a shape the rules need unknown, the same one
    onnxruntime run on random inputs tells it (`input_shapes` for symbolic input dimensions, as for fold).
    Without them, a decision that may depend on such a shape says that fold decides after that run."""
    onnx_file = source if isinstance(source, OnnxFile) else load_onnx(source)
    graph = _fold_graph(onnx_file, input_shapes)
    from .inspection import InspectReport  # imports torch: after the file is known good
    plan = plan_onnx_fold(onnx_file.model, graph=graph)
    steps = {s.decision.name: s for s in plan.steps}
    layers = []
    for bn in batch_norm_nodes(onnx_file.model):
        info = describe_bn_node(bn)
        d = steps[bn.name].decision
        info.fold_action, info.fold_target, info.fold_reason = d.action, d.target, d.reason
        if graph.unknown and d.action != FoldAction.FOLDED and not _refusal(bn, ()):
            info.fold_reason += ("; " if d.reason else "") + UNKNOWN_SHAPES
        layers.append(info)
    graph = onnx_file.model.graph
    total_params = sum(int(np.prod(t.dims)) for t in graph.initializer)
    return InspectReport(layers=layers, total_modules=len(graph.node), total_params=total_params, fold_planned=True)


UNKNOWN_SHAPES = ("fold decides after one onnxruntime run (shapes the graph does not give: the input shapes, "
                  "--input-shape, show its decision here)")


def _fold_graph(onnx_file: OnnxFile, input_shapes: Sequence[Sequence[int]] | None) -> OnnxGraph:
    """The OnnxGraph fold_onnx plans on (shapes from one onnxruntime run where inference leaves them unknown);
    without that run where a symbolic input dimension has no `input_shapes`."""
    model = onnx_file.model
    try:
        inputs = example_inputs(model, input_shapes, 0, onnx_file.path)
    except InputError:
        if input_shapes is not None:
            raise
        return OnnxGraph.of(model)
    specs = graph_inputs(model)
    return OnnxGraph.of(model, {s.name: tuple(x.shape) for s, x in zip(specs, inputs)},
                        dict(zip((s.name for s in specs), inputs)))


def describe_bn_node(bn: BNNode):
    """A BNLayerInfo for one node, its health from the same rules as a PyTorch BN (inspection.health);
    momentum in PyTorch's sense (ONNX's 0.9 keeps 90% of the old statistics: PyTorch's 0.1)."""
    from .inspection import BNLayerInfo, HealthFlag, HealthKind, TensorSummary, health

    values = bn.as_module_values()
    if values.running_mean is None or values.running_var is None:
        flags = [HealthFlag(HealthKind.NO_RUNNING_STATS, "statistics computed at run time (mean/var are not "
                                                         "initializers)")]
    else:
        flags = health(values)
    return BNLayerInfo(
        name=bn.name, type=BN_TYPE, channels=bn.channels, eps=bn.epsilon, momentum=1.0 - bn.momentum, affine=True,
        track_running_stats=values.running_mean is not None, training=bool(bn.training_mode),
        num_batches_tracked=None, running_mean=TensorSummary.of(values.running_mean),
        running_var=TensorSummary.of(values.running_var), weight=TensorSummary.of(values.weight),
        bias=TensorSummary.of(values.bias), health=flags)


# ---------------------------------------------------------------- the plan


def plan_onnx_fold(model, skip: Sequence[str] = (), input_shapes: dict[str, tuple[int, ...]] | None = None,
                   example: dict[str, np.ndarray] | None = None, graph: OnnxGraph | None = None) -> OnnxFoldPlan:
    """Decide, for each BatchNormalization node, where its math goes, with the shared planner's rules
    (bntool.folding.planner) on the ONNX graph: into the layers producing its input (across Add, Concat,
    Reshape, Transpose, …), else into the one layer reading its output, else an exact per-channel affine; left
    as it is, with the reason, when its statistics are not constants or are broken, it runs in training mode, it
    sits in a subgraph or function, or `skip` names it. `input_shapes`: concrete shapes for symbolic input
    dimensions (1 where not given), for the planner's channel mappings; `example` (inputs by name): shapes
    inference cannot tell come from one onnxruntime run on it. `graph`: OnnxGraph.of(model, …) made already (the
    same one can then apply the plan)."""
    graph = graph if graph is not None else OnnxGraph.of(model, input_shapes, example)
    plan = OnnxFoldPlan()
    for bn in batch_norm_nodes(model):
        plan.steps.append(_decide(bn, graph, skip))
    return plan


def _decide(bn: BNNode, graph: OnnxGraph, skip: Sequence[str]):
    """One BN's decision, in the PyTorch path's order: refusal → producer → consumer → affine."""
    from .folding.math import mean_in_stds
    from .folding.planner import MAX_FORWARD_FOLD_MEAN, BNDecision, FoldStep, NoFold, consumer_target, producer_targets

    decision = BNDecision(name=bn.name, type=BN_TYPE, channels=bn.channels, action=FoldAction.REFUSED)
    step = FoldStep(decision=decision)
    decision.reason = _refusal(bn, skip)
    if decision.reason:
        return step
    try:
        step.targets = producer_targets(graph, bn.x, lambda node: node is bn.node, bn.channels)
        decision.action = FoldAction.FOLDED
        decision.target = ", ".join(t.layer for t in step.targets)
        return step
    except NoFold as why:
        decision.reason = str(why)
    stats = bn_statistics(bn)
    far = mean_in_stds(stats["mean"], stats["var"], bn.epsilon)
    if far > MAX_FORWARD_FOLD_MEAN:
        decision.reason += (f"; folding forward would lose precision (|mean| is {far:.0f} stds from 0, limit "
                            f"{MAX_FORWARD_FOLD_MEAN:g})")
    elif bn.y in graph.shapes:
        target, why_not = consumer_target(graph, bn.y)
        if target is not None:
            step.targets, decision.reason = [target], ""
            decision.action, decision.target = FoldAction.FOLDED_FORWARD, target.layer
            return step
        if why_not:
            decision.reason += f"; not forward: {why_not}"
    if graph.ranks.get(bn.x) is None or graph.elem_types.get(bn.x) is None:
        decision.reason += "; its input's rank or type is unknown (no exact affine without it)"
        return step
    # Subtract the mean first where it sits far from zero and the BN reads a graph input (or a constant): exact
    # values, whose precision x·s + t would lose by cancelling two large terms. A computed input carries that
    # rounding already (its own, eps·|μ|), and onnxruntime's BatchNormalization kernel computes x·s + t too.
    step.centered = far > MAX_FORWARD_FOLD_MEAN and graph.producer(bn.x) is None
    form = affine_form(graph, bn.x, AffineAs.AUTO, step.centered)
    decision.action = FoldAction.AFFINE
    decision.replaced_by = "Conv" if form == "conv" else "Sub+Mul+Add" if step.centered else "Mul+Add"
    return step


def _refusal(bn: BNNode, skip: Sequence[str]) -> str:
    """Why a BN node is left as it is ("" when it can be folded or made an affine)."""
    if any(fnmatch.fnmatchcase(bn.name, pattern) for pattern in skip):
        return f"skipped ({param('skip')})"
    if bn.where:
        return f"inside {bn.where}: left as it is"
    if bn.training_mode or bn.extra_outputs:
        return "training mode: its statistics are computed at run time"
    missing = [key for key, value in bn.values.items() if value is None]
    if missing:
        return f"{', '.join(missing)} computed at run time (not an initializer or Constant)"
    if len({v.size for v in bn.values.values()}) != 1:  # type: ignore[union-attr]  # none missing (above)
        return "scale, bias, mean and var have different lengths"
    problem = _statistics_problem(bn)
    return f"{problem}; recalibrate first" if problem else ""


def _statistics_problem(bn: BNNode) -> str:
    """folding.math.statistics_problem on the node's constants ("" when sound, or when not all are constants)."""
    from .folding.math import statistics_problem

    if any(v is None for v in bn.values.values()) or len({v.size for v in bn.values.values()}) != 1:  # type: ignore[union-attr]
        return ""
    t = bn_statistics(bn)
    return statistics_problem(t["mean"], t["var"], t["scale"], t["bias"], bn.epsilon)


def _refuse_unfoldable(onnx_file: OnnxFile, skip: Sequence[str]) -> None:
    """Exit 2 before any work, as for a checkpoint: a BN in training mode (onnxruntime computes it from the batch,
    differently at each optimisation level, so no check could pass) or with broken statistics (NaN/Inf, var +
    eps ≤ 0: the file is broken, not the fold), unless --skip leaves it."""
    broken, advice = [], {}
    for bn in batch_norm_nodes(onnx_file.model):
        if bn.where or any(fnmatch.fnmatchcase(bn.name, pattern) for pattern in skip):
            continue
        if bn.training_mode or bn.extra_outputs:
            broken.append((bn.name, "training_mode=1: normalizes with the batch's statistics"))
            advice["export"] = "export the model in eval mode"  # recalibrate leaves such a BN: nothing stored
        elif problem := _statistics_problem(bn):
            broken.append((bn.name, problem))
            advice["recalibrate"] = "run `bntool recalibrate` first"
    if broken:
        raise BrokenStatistics(f"{onnx_file.path}: {broken_layers_text(broken)}: cannot be folded or checked. "
                               f"{', or '.join(advice.values()).capitalize()}, or leave them with {param('skip')}",
                               broken, param="skip")


# ---------------------------------------------------------------- fold, checked


def fold_onnx(
    source: str | os.PathLike | OnnxFile,
    out: str | os.PathLike | None = None,
    *,
    input_shapes: Sequence[Sequence[int]] | None = None,
    samples: int = 4,
    seed: int = 0,
    rtol: float | None = None,
    atol: float | None = None,
    skip: Sequence[str] = (),
    affine_as: str = "auto",
    provider: str = "cpu",
    force: bool = False,
    check: bool = True,
    in_place: bool = False,
    merge: bool = True,
):
    """Fold every BatchNormalization node of an ONNX file it can, check the result in onnxruntime against the
    original, and write it to `out` only if the check passed.

    Args:
        source: the ONNX file (a path, or an OnnxFile from load_onnx: its model is changed in place).
        out: where to write the folded file (its external data beside it when the input had some); None: check
            only, write nothing.
        input_shapes: one shape per graph input, for symbolic dimensions (a graph with fixed shapes needs none).
        samples, seed: random inputs checked besides the example (at several batch sizes when the batch
            axis is symbolic).
        rtol, atol: |Δ| ≤ atol + rtol·|original|; default atol 1e-4 of each output's largest magnitude. Where
            an output is over it, the original run in float64 (onnx.reference) arbitrates: the folded file passes
            when it is no further from it than 1.5× the original's own float32 error.
        skip: BN node names or glob patterns left as they are.
        affine_as: for BNs that fold into no neighbour: "auto" (a depthwise 1×1 Conv where onnxruntime runs
            a BN as one, a float32 4-D input; Mul + Add elsewhere), "mul" (Mul + Add) or "conv" (the Conv).
        provider: onnxruntime's: "cpu" or "cuda".
        force: replace an existing `out`.
        in_place: `out` may be the input file (replaced atomically after a passing check; external data too).
        merge: after folding, summed branches that read one tensor (RepVGG, MobileOne, FastViT blocks) become
            one Conv where exact (bntool.onnx_merge); `report.merges` lists them.
        check: raise CheckFailed when the check fails (else return the failed report).

    Returns:
        A FoldReport (the PyTorch path's: decisions per BN node, counts, comparisons at both onnxruntime
        optimisation levels).

    Raises:
        InputError / CorruptFileError: the file cannot be used (see load_onnx), onnxruntime cannot run it,
            a symbolic input dimension without `input_shapes`, a bad option, an output that must not be written.
        CheckFailed: with `check`, the folded file's outputs differ beyond tolerance; nothing written.
    """
    from .compare import check_samples
    from .errors import CheckFailed
    from .folding.planner import check_skip_patterns
    from .onnx_check import check_provider

    if affine_as not in AffineAs.values():
        raise InputError(f"{param('affine_as')} {affine_as!r}: choose one of {', '.join(AffineAs.values())}",
                         param="affine_as")
    check_samples(samples)
    check_provider(provider)
    Tolerance.resolve(rtol, atol, DEFAULT_TOLERANCE)  # bad values are refused before any work
    onnx_file = source if isinstance(source, OnnxFile) else load_onnx(source)
    _refuse_unfoldable(onnx_file, skip)
    check_skip_patterns(skip, [bn.name for bn in batch_norm_nodes(onnx_file.model)])  # a typo: before any work
    outputs = Outputs()
    if out is not None:
        plan_onnx_output(outputs, out, onnx_file, force=force, in_place=in_place)
        outputs.check()
    inputs = example_inputs(onnx_file.model, input_shapes, seed, onnx_file.path)
    original = OriginalRuns(onnx_file.path, provider, inputs)
    tolerance = Tolerance.resolve(rtol, atol, default_tolerance(onnx_file.model))
    from .folding.report import FoldReport

    started = time.perf_counter()
    model = onnx_file.model
    report = FoldReport(tolerance=tolerance, batch_norm_ops_before=_bn_count(model),
                        params_before=_param_count(model))
    shapes = {spec.name: tuple(x.shape) for spec, x in zip(graph_inputs(model), inputs)}
    feed = {spec.name: x for spec, x in zip(graph_inputs(model), inputs)}
    graph = OnnxGraph.of(model, shapes, feed)  # once, for the plan and its surgery
    plan = plan_onnx_fold(model, skip, graph=graph)
    check_skip_patterns(skip, [d.name for d in plan.decisions])
    changes = apply_onnx_fold_plan(model, plan, affine_as, graph=graph, merge=merge)
    del graph
    report.decisions, report.merges = plan.decisions, plan.merges
    report.batch_norm_ops_after = _bn_count(model)
    report.params_after = sum(int(np.prod(t.dims)) for t in changes.initializers(model))
    report.ops_left = [f"{d.name}: {d.reason}" for d in plan.decisions if d.action == FoldAction.REFUSED]
    with outputs:
        staged = _stage(model, changes, out, outputs, onnx_file)
        report.fold_seconds = time.perf_counter() - started
        del model, onnx_file, changes  # onnxruntime reads the staged file; the proto is not needed any more
        give_memory_back()
        started = time.perf_counter()
        result = check_against_original(original, staged, inputs, tolerance, samples, seed, provider)
        report.comparisons, report.passed = result.comparisons, result.passed
        report.check_seconds = time.perf_counter() - started
        if report.passed and out is not None:
            outputs.commit()
    if check and not report.passed:
        raise CheckFailed(f"the folded ONNX file's outputs differ from the original's: max abs error "
                          f"{report.max_abs:.3g} ({report.max_abs_over_scale:.3g} of the output's magnitude) over "
                          f"{tolerance.describe()}; nothing written", report=report)
    return report


def _bn_count(model) -> int:
    from .onnx_check import op_counts

    return op_counts(model).get(BN_TYPE, 0)


def _param_count(model) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)


def _stage(model, changes: TensorChanges, out, outputs: Outputs, onnx_file: OnnxFile) -> Path:
    """Write the folded model where the check reads it: the output's temp file (committed after a passing
    check), or a private temp directory when there is no output."""
    import tempfile

    if out is None:
        directory = Path(tempfile.mkdtemp(prefix=".bntool-tmp-"))
        outputs.staging.append(directory)  # removed with the outputs
        target = directory / "folded.onnx"
        plan_onnx_output(outputs, target, onnx_file)
        save_onnx(model, target, outputs, onnx_file, changes)
    else:
        save_onnx(model, out, outputs, onnx_file, changes)
        target = Path(out)
    return next(p.temp for p in outputs.planned if p.path == target)  # type: ignore[return-value]  # set until committed

