"""Re-estimate the BatchNorm statistics inside an ONNX file by running it in onnxruntime (exact mode).

Exact mode, as recalibration.py does it for PyTorch: the input of every BatchNormalization node is normalized
over the data given the final statistics of the BNs before it. A BN's level is 1 + the highest level of the BNs
upstream of its input; level k's inputs depend only on levels < k, so one pass per level measures them exactly.
The passes run segments of the graph in onnxruntime (onnx_segments.py), each level from the previous one's cached
boundary tensors, and pool the statistics in float64 as PyTorch's exact mode pools them. They are written back as
initializers of the file's own dtype; an initializer another node also reads is copied, not changed. The given
ModelProto changes only once every level is measured.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch

from .errors import InputError
from .onnx_segments import (
    BN_OP,
    Chunk,
    SegmentRunner,
    boundaries,
    measure_level,
    node_inputs,
    register_shared_arena,
    release_shared_arena,
)
from .recalibration_passes import Batches, LayerShift, ProgressFn, RecalibrationReport
from .segments import default_cache_budget


@dataclass
class _BN:
    """One BatchNormalization node of the main graph and where its statistics live."""

    name: str
    x: str  # the input whose statistics are measured
    mean: str
    var: str
    eps: float
    channels: int = 0
    level: int = 0
    skipped: str = ""


def recalibrate_onnx(
    model: Any,
    data: Iterable[Any],
    *,
    num_batches: int | None = None,
    num_samples: int | None = None,
    input_key: str | None = None,
    cache_budget: int | None = None,
    provider: str = "cpu",
    progress: ProgressFn | None = None,
    shared_arena: bool = False,
):
    """Re-estimate the running statistics of every BatchNormalization node of an ONNX model (exact mode).

    Args:
        model: an `onnx.ModelProto` or `onnx_model.OnnxFile` (its proto updated in place, only once every level
            is measured), or the path of an ONNX file (loaded with its external data, checked).
        data: re-iterable batches (tensors, (input, label) tuples or dicts) for the model's one input, the same
            batches on every pass; a graph with a fixed batch size gets them in chunks of that size.
        num_batches, num_samples: use at most this many batches / samples per pass.
        input_key: the model input's key in dict batches.
        cache_budget: bytes of activations kept between passes (default: half the free memory; 0: none, so every
            pass runs from the model input up to its level).
        provider: onnxruntime's execution provider, "cpu" or "cuda".
        progress: called as progress(samples done in this pass, pass number, number of passes).
        shared_arena: the passes share onnxruntime's CPU arena (1.3–1.6× faster: each pass's own arena starts
            empty, so its tensors land in fresh pages), registered process-wide: it replaces an allocator the
            process registered with onnxruntime.create_and_register_allocator. Only with a cache (a
            `cache_budget` of 0 keeps memory lowest without it). The CLI asks for it.

    Returns:
        (the ModelProto with the new statistics, a RecalibrationReport with mode "exact").

    Raises:
        InputError: no BN with stored statistics, data that does not fit the graph's input or holds NaN/Inf, a
            graph onnxruntime cannot run, statistics that overflow. Nothing is changed then.
    """
    import onnx

    from .data import first_input
    from .onnx_model import OnnxFile, load_onnx

    if isinstance(model, (str, os.PathLike)):
        model = load_onnx(model)
    path = model.path if isinstance(model, OnnxFile) else None
    if isinstance(model, OnnxFile):
        model = model.model
    if not isinstance(model, onnx.ModelProto):
        raise InputError(f"expected an onnx.ModelProto or the path of an ONNX file, got {type(model).__name__}")
    if cache_budget is not None and cache_budget < 0:
        raise InputError(f"cache_budget {cache_budget}: must be >= 0 bytes")
    if iter(data) is data:
        raise InputError("exact mode passes over the data several times: give a re-iterable (list, DataLoader)")
    graph = model.graph
    bns = find_batchnorms(model)
    usable = [b for b in bns if not b.skipped]
    if not bns:
        raise InputError("the ONNX model has no BatchNormalization node: nothing to recalibrate")
    if not usable:
        raise InputError(f"no BatchNormalization node has stored statistics ({bns[0].name}: {bns[0].skipped}): "
                         "nothing to recalibrate")
    _refuse_what_onnxruntime_refuses(model, path, provider)
    input_name = _data_input(graph)
    levels = _assign_levels(graph, usable)
    depth = max(levels.values())
    budget = default_cache_budget(torch.device("cpu")) if cache_budget is None else int(cache_budget)
    batches = Batches(data, first_input, input_key, torch.device("cpu"), num_batches, num_samples, False)
    runner = SegmentRunner(model, input_name, _input_spec(graph, input_name), provider,
                           {b.name: (b.mean, b.var) for b in usable})
    runner.shared_arena = shared_arena and budget > 0 and register_shared_arena()
    report = RecalibrationReport(mode="exact", cache_budget_bytes=budget)
    started = time.perf_counter()
    new_stats: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # BN name → (mean, var) in float64
    cache: list[Chunk] | None = None  # per chunk of data: the previous pass's boundary tensors
    kept = boundaries(graph, input_name, levels, depth)
    try:
        for level in range(1, depth + 1):
            members = [b for b in usable if b.level == level]
            keep = kept[level] if level < depth and budget > 0 else set()
            runner.stats = dict(new_stats)
            stats, cache = measure_level(runner, members, keep, cache, batches, budget, report, level, depth,
                                         progress)
            for b in members:
                if stats[b.name].count > 0:
                    new_stats[b.name] = (stats[b.name].mean.numpy(), stats[b.name].unbiased_var.numpy())
                batches.values_per_channel[b.name] = int(stats[b.name].count)
            report.passes += 1
    finally:
        cache = None
        if runner.shared_arena:
            release_shared_arena()  # the passes' sessions shared one arena: its memory goes back now
    report.cache_note = _cache_note(report, budget, depth)
    _check_finite(usable, new_stats)
    report.layers = [_shift(b, _initializer_array(graph, b.mean), _initializer_array(graph, b.var),
                            new_stats.get(b.name), batches.values_per_channel.get(b.name, 0)) for b in bns]
    write_statistics(model, usable, new_stats)
    report.seconds = time.perf_counter() - started
    report.samples, report.batches = batches.samples_per_pass, batches.batches_per_pass
    return model, report


def recalibrate_onnx_file(
    path: Any,
    out: str | os.PathLike,
    data: Iterable[Any],
    *,
    force: bool = False,
    in_place: bool = False,
    **options: Any,
) -> RecalibrationReport:
    """`recalibrate_onnx` from the ONNX file `path` (or its loaded onnx_model.OnnxFile) to the file `out`
    (external data beside it when the input had some): the output path checked before any work, written
    atomically once every level is measured, nothing written on any failure; `in_place`: `out` may be the input.
    `options` are recalibrate_onnx's."""
    from .files import Outputs
    from .onnx_model import OnnxFile, load_onnx
    from .onnx_save import plan_onnx_output, save_onnx

    source = path if isinstance(path, OnnxFile) else load_onnx(path)
    outputs = Outputs()
    plan_onnx_output(outputs, out, source, force=force, in_place=in_place)
    outputs.check()
    model, report = recalibrate_onnx(source, data, **options)
    with outputs:
        save_onnx(model, out, outputs, source)
        outputs.commit()
    return report


def _refuse_what_onnxruntime_refuses(model, path, provider: str) -> None:
    """Before any work: onnxruntime loads the whole graph (the passes run only its segments, which a graph it
    refuses, e.g. a BN with unused outputs named, may still pass; the file written would not load either).
    First its nodes alone, the large weights as inputs (0.03 s where the whole ResNet-50 takes 0.38 s: its node
    checks do not read weight values); only where that is refused does the whole model decide."""
    import onnxruntime as ort

    from .onnx_check import error_line, ort_session
    from .onnx_model import without_large_tensors

    options = ort.SessionOptions()
    options.log_severity_level = 4  # its errors come back as exceptions (one line): no log of its own
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        ort.InferenceSession(without_large_tensors(model, None).SerializeToString(), sess_options=options,
                             providers=["CPUExecutionProvider"])
        return
    except Exception:
        pass  # maybe only the light copy's doing: the whole model says
    if path is not None:
        ort_session(path, provider, "ORT_DISABLE_ALL")
        return
    if model.ByteSize() >= 2**31 - 1:  # no file to read it from, and too large to hand over in memory
        return
    try:
        ort.InferenceSession(model.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise InputError(f"onnxruntime cannot load the model ({error_line(e)})") from e


def onnx_input_shape(model) -> tuple[int, ...] | None:
    """The model input's shape with batch size 1, where every other dimension is fixed (the image size for
    an image folder); None otherwise."""
    graph = model.graph
    _, shape = _input_spec(graph, _data_input(graph))
    if len(shape) < 2 or any(d is None for d in shape[1:]):
        return None
    return (1, *cast(list[int], shape[1:]))  # no None left (checked above)


# ---------------------------------------------------------------- the graph


def find_batchnorms(model) -> list[_BN]:
    """Every BatchNormalization node (onnx_model.batch_norm_nodes), with why it cannot be recalibrated where it
    cannot: only the main graph's, with statistics stored as initializers, in inference mode."""
    from .onnx_model import batch_norm_nodes

    initializers = {i.name for i in model.graph.initializer} - {i.name for i in model.graph.input}
    bns = []
    for node in batch_norm_nodes(model):
        bn = _BN(node.name, node.x, node.inputs.get("mean", ""), node.inputs.get("var", ""), node.epsilon,
                 node.channels)
        bn.skipped = _skip_reason(node, initializers)
        bns.append(bn)
    return bns


def _skip_reason(node, initializers: set[str]) -> str:
    if node.where:
        return f"in {node.where}: left as it is"
    if node.training_mode or node.extra_outputs:
        return "training mode: normalizes with batch statistics"
    if node.values.get("mean") is None or node.values.get("var") is None:
        return "statistics computed at run time, not stored in the file"
    if node.spatial == 0:
        return "spatial=0 (per-element statistics of an old opset)"
    return ""


def _data_input(graph) -> str:
    inits = {i.name for i in graph.initializer}
    inputs = [i.name for i in graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise InputError(f"the ONNX model has {len(inputs)} inputs {inputs}; recalibrate feeds exactly one")
    return inputs[0]


def _input_spec(graph, name: str) -> tuple[np.dtype, list[int | None]]:
    """The input's numpy dtype and shape (None where a dimension is symbolic)."""
    from onnx import helper

    vi = next(i for i in graph.input if i.name == name)
    t = vi.type.tensor_type
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type)) if t.elem_type else np.dtype(np.float32)
    shape = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim] if t.HasField("shape") else []
    return dtype, shape


def _assign_levels(graph, usable: list[_BN]) -> dict[str, int]:
    """Tensor → the highest BN level it depends on; sets each usable BN's level (1 + that of its input).
    Nodes are in topological order, as the ONNX standard requires."""
    by_node = {}
    usable_by_name = {b.name: b for b in usable}
    for i, node in enumerate(graph.node):
        if node.op_type == BN_OP and node.domain in ("", "ai.onnx"):
            by_node[i] = usable_by_name.get(node.name or node.output[0])
    level: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        d = max((level.get(t, 0) for t in node_inputs(node)), default=0)
        bn = by_node.get(i)
        if bn is not None:
            bn.level = level.get(bn.x, 0) + 1
            d = max(d, bn.level)
        for o in node.output:
            if o:
                level[o] = d
    return level


def _cache_note(report: RecalibrationReport, budget: int, depth: int) -> str:
    """Where passes ran from the model input instead of a cached segment boundary (the fallback), and why."""
    if depth <= 1:
        return ""
    if budget == 0:
        return "cache budget 0: every level ran from the model input up to its BNs"
    if report.cache_over_budget:
        return (f"{report.cache_over_budget} of {depth - 1} levels' activations exceeded the cache budget "
                f"({budget:,} bytes): the level after each ran from the model input")
    return ""


# ---------------------------------------------------------------- writing back


def write_statistics(model, usable: list[_BN], stats: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """The new statistics as initializers in their own dtype (cast once from float64); an initializer another
    node also reads (or a graph output) gets a copy under a new name for this BN."""
    from onnx import numpy_helper

    from .onnx_model import Constants, all_names, graph_output_names, readers_of, unique_name

    graph = model.graph
    constants = Constants(graph)
    inits = {i.name: i for i in graph.initializer}
    # Uses, not readers: one node may read a tensor in two slots (a legacy export shares an initializer of ones
    # between a BN's scale and its variance), and only a tensor with a single use may be changed in place.
    readers = {name: sum(list(n.input).count(name) or 1 for n in nodes) for name, nodes in readers_of(graph).items()}
    outputs = graph_output_names(graph)
    nodes = {(n.name or n.output[0]): n for n in graph.node if n.op_type == BN_OP}
    taken = all_names(model)
    planned = []  # every array cast to its file's dtype first: one that overflows it changes nothing
    for b in usable:
        if b.name not in stats:
            continue
        for slot, name, values in ((3, b.mean, stats[b.name][0]), (4, b.var, stats[b.name][1])):
            old = inits.get(name) or constants.proto(name)  # an Identity of an initializer: written as a copy
            dtype = numpy_helper.to_array(old).dtype
            with np.errstate(over="ignore"):
                array = values.astype(dtype).reshape(tuple(old.dims))
            if not np.isfinite(array).all():
                raise InputError(f"recalibrated statistics of {b.name} overflow the file's {dtype} (largest "
                                 f"{np.abs(values).max():.4g}; {dtype} holds at most {np.finfo(dtype).max:.4g}): "
                                 "nothing written")
            planned.append((b, slot, name, old, array))
    for b, slot, name, old, array in planned:
        if name not in inits or readers.get(name, 0) > 1 or name in outputs:
            new_name = unique_name(taken, f"{name}.recalibrated")
            graph.initializer.append(numpy_helper.from_array(array, new_name))
            nodes[b.name].input[slot] = new_name
            readers[name] = readers.get(name, 1) - 1
        else:
            old.CopyFrom(numpy_helper.from_array(array, name))


def _initializer_array(graph, name: str) -> np.ndarray | None:
    from onnx import numpy_helper

    for i in graph.initializer:
        if i.name == name:
            return numpy_helper.to_array(i).astype(np.float64)
    return None


def _check_finite(usable, stats) -> None:
    for b in usable:
        if b.name in stats and not all(np.isfinite(a).all() for a in stats[b.name]):
            raise InputError(f"recalibrated statistics of {b.name} contain NaN/Inf (the activations overflow); "
                             "nothing written")


def _shift(b: _BN, old_mean, old_var, new, values: int) -> LayerShift:
    skip = b.skipped or ("no calibration batch reached it: statistics kept" if new is None else "")
    if skip or old_mean is None or old_var is None:
        return LayerShift(b.name, b.channels, 0, 0.0, 1.0, 1.0, skipped=skip)
    new_mean, new_var = new
    mean_shift = float((np.abs(new_mean - old_mean.reshape(-1)) / np.sqrt(old_var.reshape(-1) + b.eps)).max())
    ratio = (new_var + b.eps) / (old_var.reshape(-1) + b.eps)
    return LayerShift(b.name, b.channels, values, mean_shift, float(ratio.min()), float(ratio.max()))


