"""Re-estimate the BatchNorm statistics inside an ONNX file by running it in onnxruntime (exact mode).

Exact mode, as recalibration.py does it for PyTorch: the input of every BatchNormalization node is normalized
over the data given the final statistics of the BNs before it. A BN's level is 1 + the highest level of the BNs
upstream of its input; level k's inputs depend only on levels < k, so one pass per level measures them exactly.

Each pass runs a segment, not the whole graph: pass k's graph takes as inputs the tensors pass k-1 cached (its
"boundary": the final tensors that later nodes still read) and outputs the inputs of level k's BNs plus its own
boundary, which replaces the cache. Every node thus runs about once over all passes. What does not fit the byte
budget is not cached, and the next pass starts from the model input instead (said in the report).

Each batch's per-channel mean and variance are computed in onnxruntime next to the tensor (two passes, as
torch.var_mean: float32, or float64 for a float64 model) and pooled in float64 with Chan's formula, as PyTorch's
exact mode pools them; written back as initializers of the file's own dtype; an initializer another node also
reads is copied, not changed. The given ModelProto changes only once every level is measured.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch

from .errors import InputError, param
from .recalibration import ChannelStats, LayerShift, ProgressFn, RecalibrationReport, _Batches
from .segments import default_cache_budget

BN_OP = "BatchNormalization"
_SUBGRAPH_OPS = ("If", "Loop", "Scan")


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
    input_name = _data_input(graph)
    levels = _assign_levels(graph, usable)
    depth = max(levels.values())
    budget = default_cache_budget(torch.device("cpu")) if cache_budget is None else int(cache_budget)
    batches = _Batches(data, first_input, input_key, torch.device("cpu"), num_batches, num_samples, False)
    runner = _SegmentRunner(model, input_name, _input_spec(graph, input_name), provider)
    report = RecalibrationReport(mode="exact", cache_budget_bytes=budget)
    started = time.perf_counter()
    new_stats: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # BN name → (mean, var) in float64
    cache: list[dict[str, np.ndarray]] | None = None  # per batch: the previous pass's boundary tensors
    boundaries = _boundaries(graph, input_name, levels, depth)
    for level in range(1, depth + 1):
        members = [b for b in usable if b.level == level]
        keep = boundaries[level] if level < depth and budget > 0 else set()
        runner.stats = dict(new_stats)
        stats, cache = _measure_level(runner, members, keep, cache, batches, budget, report, level, depth, progress)
        for b in members:
            if stats[b.name].count > 0:
                new_stats[b.name] = (stats[b.name].mean.numpy(), stats[b.name].unbiased_var.numpy())
            batches.values_per_channel[b.name] = int(stats[b.name].count)
        report.passes += 1
    del cache
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
    from .onnx_model import OnnxFile, load_onnx, plan_onnx_output, save_onnx

    source = path if isinstance(path, OnnxFile) else load_onnx(path)
    outputs = Outputs()
    plan_onnx_output(outputs, out, source, force=force, in_place=in_place)
    outputs.check()
    model, report = recalibrate_onnx(source.model, data, **options)
    with outputs:
        save_onnx(model, out, outputs, source)
        outputs.commit()
    return report


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


def _subgraphs(node):
    from onnx import AttributeProto

    for a in node.attribute:
        if a.type == AttributeProto.GRAPH:
            yield a.g
        elif a.type == AttributeProto.GRAPHS:
            yield from a.graphs


def _all_nodes(graph):
    for node in graph.node:
        yield node
        for sub in _subgraphs(node):
            yield from _all_nodes(sub)


def _node_inputs(node) -> list[str]:
    """The tensors a node reads, including those its If/Loop/Scan bodies read from the outer graph."""
    names = [i for i in node.input if i]
    for sub in _subgraphs(node):
        local = {i.name for i in sub.input} | {i.name for i in sub.initializer}
        for n in _all_nodes(sub):
            local.update(n.output)
        names += [i for n in _all_nodes(sub) for i in n.input if i and i not in local]
    return names


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


def _dynamic_tensors(graph, input_name: str) -> set[str]:
    """Tensors that depend on the model input (the others are constants, recomputed wherever needed)."""
    dynamic = {input_name}
    for node in graph.node:
        if any(i in dynamic for i in _node_inputs(node)):
            dynamic.update(o for o in node.output if o)
    return dynamic


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
        d = max((level.get(t, 0) for t in _node_inputs(node)), default=0)
        bn = by_node.get(i)
        if bn is not None:
            bn.level = level.get(bn.x, 0) + 1
            d = max(d, bn.level)
        for o in node.output:
            if o:
                level[o] = d
    return level


def _boundaries(graph, input_name: str, levels: dict[str, int], depth: int) -> dict[int, set[str]]:
    """Pass k → the tensors it caches for pass k+1. During pass k only tensors of level < k are right (level k's
    statistics are being measured); pass k+1 needs those that a node of level ≥ k reads (level k's BN inputs
    among them). Everything pass k+1 computes comes from them: a node of level k reads only such tensors and
    tensors of level k."""
    dynamic = _dynamic_tensors(graph, input_name)
    out: dict[int, set[str]] = {k: set() for k in range(1, depth + 1)}
    for node in graph.node:
        reads = [t for t in _node_inputs(node) if t in dynamic]
        node_level = max((levels.get(o, 0) for o in node.output if o), default=0)
        for t in reads:
            for k in range(levels.get(t, 0) + 1, min(node_level, depth - 1) + 1):
                out[k].add(t)
    return out


# ---------------------------------------------------------------- the passes


class _SegmentRunner:
    """Builds and runs the subgraph from some available tensors to some wanted ones, with the statistics
    measured so far in place of the stored ones."""

    def __init__(self, model, input_name: str, input_spec, provider: str):
        self.model, self.input_name, self.provider = model, input_name, provider
        self.dtype, self.shape = input_spec
        self.producer = {o: i for i, n in enumerate(model.graph.node) for o in n.output if o}
        import onnx

        from .onnx_model import Constants

        constants = Constants(model.graph)  # initializers, and Constant/Identity nodes of them: fixed values
        self.initializers = {i.name: i for i in model.graph.initializer}
        for name in constants.tensors.keys() - self.initializers.keys():  # a Constant's value, an Identity's input
            proto = onnx.TensorProto()
            proto.CopyFrom(constants.proto(name))
            proto.name = name  # a segment holds it as an initializer under the name its readers use
            self.initializers[name] = proto
        self.bn_inputs = {b.name: (b.mean, b.var) for b in find_batchnorms(model) if not b.skipped}
        self.stats: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # BN name → measured (mean, var)
        self.replaced: dict[str, tuple[Any, Any]] = {}  # BN name → TensorProtos of its measured mean and var
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)

    def session(self, available: dict[str, tuple[np.dtype, int]], wanted: list[str], measured: list[str]):
        """An onnxruntime session computing `wanted` and the statistics of `measured` (`_statistics_nodes`) from
        the `available` tensors (name → dtype, rank); the names of the inputs it takes and of its outputs."""
        import onnxruntime as ort

        model, inputs = self._segment(available, wanted, measured)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        # onnxruntime's threads spin after each run, which starves the statistics computed between runs
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = (["CUDAExecutionProvider", "CPUExecutionProvider"] if self.provider == "cuda"
                     else ["CPUExecutionProvider"])
        try:
            session = ort.InferenceSession(model.SerializeToString(), sess_options=options, providers=providers)
        except Exception as e:
            raise InputError(f"onnxruntime cannot run the model: {_first_line(e)}") from e
        return session, inputs, [o.name for o in model.graph.output]

    def _segment(self, available, wanted: list[str], measured: list[str]):
        """The nodes between `available` and `wanted`/`measured` (in the graph's topological order), and the
        statistics of `measured`, as a model of its own."""
        import onnx
        from onnx import helper

        graph = self.model.graph
        available = {self.input_name: (self.dtype, len(self.shape) or None), **available}
        needed: set[int] = set()
        inputs: list[str] = []
        used: set[str] = set()
        stack, seen = list(wanted) + list(measured), set()
        while stack:
            t = stack.pop()
            if t in seen:
                continue
            seen.add(t)
            if t in available:
                inputs.append(t)
            elif t in self.initializers:
                used.add(t)
            elif t in self.producer and self.producer[t] not in needed:
                needed.add(self.producer[t])
                stack.extend(_node_inputs(graph.node[self.producer[t]]))
        self._update_replaced()
        nodes: list[Any] = []  # NodeProtos and TensorProtos
        initializers: list[Any] = []
        for i in sorted(needed):
            node = graph.node[i]
            own = self.replaced.get(node.name or node.output[0]) if node.op_type == BN_OP else None
            if own is not None:  # its own copy of the statistics: an initializer may be shared
                node = _with_inputs(node, {3: own[0].name, 4: own[1].name})
                initializers += own
            nodes.append(node)
        read = {t for node in nodes for t in _node_inputs(node)}
        initializers += [self.initializers[n] for n in sorted(used & read)]
        value_infos = [_value_info(n, *available[n]) for n in inputs]
        stat_nodes, stat_inits, stat_outputs = _statistics_nodes(measured, self.opset, self.dtype)
        seg = helper.make_graph(nodes + stat_nodes, "segment", value_infos,
                                [onnx.ValueInfoProto(name=w) for w in wanted + stat_outputs],
                                initializers + stat_inits)
        model = helper.make_model(seg, opset_imports=self.model.opset_import, functions=self.model.functions)
        model.ir_version = self.model.ir_version
        return model, inputs

    def _update_replaced(self) -> None:
        """Each measured BN's statistics as initializers of its own (converted once, named apart from the graph's
        names), so BNs sharing a statistics initializer each see their own in the segments."""
        from onnx import numpy_helper

        for name, (mean, var) in self.stats.items():
            if name in self.replaced:
                continue
            protos: list[Any] = []
            for init_name, values, what in zip(self.bn_inputs[name], (mean, var), ("mean", "var")):
                old = self.initializers[init_name]
                array = values.astype(numpy_helper.to_array(old).dtype).reshape(tuple(old.dims))
                protos.append(numpy_helper.from_array(array, f"bntool.measured.{what}.{name}"))
            self.replaced[name] = tuple(protos)


def _with_inputs(node, replace: dict[int, str]):
    from onnx import NodeProto

    copy = NodeProto()
    copy.CopyFrom(node)
    for slot, name in replace.items():
        copy.input[slot] = name
    return copy


STATS = "bntool.statistics"


def _statistics_nodes(measured: list[str], opset: int, dtype) -> tuple[list, list, list[str]]:
    """Nodes that give, for each measured tensor seen as (N, C, positions): a per-channel centre c (its mean,
    summed in float32: only a centre) and the float64 sums of x - c and of its square over the batch and the
    positions, plus the shape. `_accumulate` turns them into the mean and the centred sum of squares without
    E[x²] - E[x]² cancellation or a long float32 sum (whose rounding grows with the count). No copy of the
    tensor comes out unless the cache keeps it."""
    from onnx import TensorProto, helper

    flat = helper.make_tensor(f"{STATS}.flat", TensorProto.INT64, [3], [0, 0, -1])  # (N, C, everything else)
    inits = [flat, helper.make_tensor(f"{STATS}.all", TensorProto.INT64, [2], [0, 2])]
    nodes, outputs = [], []

    def reduce(op, x, y, axes):
        since = 13 if op == "ReduceSum" else 18  # when `axes` became an input
        if opset >= since:
            return helper.make_node(op, [x, f"{STATS}.{axes}"], [y], keepdims=1)
        return helper.make_node(op, [x], [y], axes=[0, 2], keepdims=1)

    wide = np.dtype(dtype) == np.float64
    for i, x in enumerate(measured):
        p = f"{STATS}.{i}"
        nodes.append(helper.make_node("Reshape", [x, f"{STATS}.flat"], [f"{p}.x"]))
        if not wide:  # half-precision activations are centred in float32
            nodes.append(helper.make_node("Cast", [f"{p}.x"], [f"{p}.xf"], to=TensorProto.FLOAT))
        xf = f"{p}.x" if wide else f"{p}.xf"
        nodes += [reduce("ReduceMean", xf, f"{p}.centre", "all"),
                  helper.make_node("Sub", [xf, f"{p}.centre"], [f"{p}.d32"]),
                  helper.make_node("Cast", [f"{p}.d32"], [f"{p}.d"], to=TensorProto.DOUBLE),
                  reduce("ReduceSum", f"{p}.d", f"{p}.s1", "all"),
                  reduce("ReduceSumSquare", f"{p}.d", f"{p}.s2", "all"),
                  helper.make_node("Shape", [f"{p}.x"], [f"{p}.shape"])]
        outputs += [f"{p}.centre", f"{p}.s1", f"{p}.s2", f"{p}.shape"]
    return nodes, inits, outputs


def _value_info(name: str, dtype, rank: int | None):
    from onnx import helper

    shape = None if rank is None else [f"{name}_d{i}" for i in range(rank)]
    return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), shape)


def _measure_level(runner, members, keep, cache, batches, budget, report, level, passes, progress):
    """Pass `level`: the input statistics of `members`, from the previous pass's cached tensors where there are
    any (else from the model input); returns them and this pass's cache for the next (None if not kept)."""
    available = {n: (a.dtype, a.ndim) for n, a in cache[0].items()} if cache else {}
    measured = list(dict.fromkeys(b.x for b in members))
    outputs = [t for t in sorted(keep) if t not in available and t != runner.input_name]
    session, inputs, names = runner.session(available, outputs, measured)
    stats = {b.name: ChannelStats(b.channels, torch.device("cpu")) for b in members}
    new_cache: list[dict[str, np.ndarray]] | None = [] if keep else None
    held = done = 0
    if progress is not None:
        progress(0, level, passes)
    for i, (index, x) in enumerate(_model_batches(batches, runner)):
        feeds = dict(cache[i]) if cache else {}
        if runner.input_name in inputs or runner.input_name in keep:
            feeds[runner.input_name] = _as_input(x, runner, index)
        values = dict(feeds)
        values.update(zip(names, _run_chunk(session, names, {k: feeds[k] for k in inputs}, x, index)))
        for b in members:
            _accumulate(stats[b.name], values, f"{STATS}.{measured.index(b.x)}")
        if new_cache is not None:
            kept = {t: values[t] for t in keep}
            held += sum(a.nbytes for a in kept.values())
            if held > budget:
                new_cache = None
                report.cache_over_budget += 1
            else:
                new_cache.append(kept)
        if cache:
            cache[i] = {}  # freed as we go
        done += len(x)
        if progress is not None:
            progress(done, level, passes)
    if cache:
        report.segment_replays += len(cache)
    if new_cache is not None:
        report.cache_peak_bytes = max(report.cache_peak_bytes, held)
    return stats, new_cache


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


def _as_input(x: torch.Tensor, runner: _SegmentRunner, index: int) -> np.ndarray:
    shape = runner.shape
    if shape and (x.dim() != len(shape) or any(d is not None and d != s for d, s in zip(shape[1:], x.shape[1:]))):
        raise InputError(f"calibration batch {index + 1} has shape {tuple(x.shape)}, but the model input "
                         f"{runner.input_name!r} has shape {_shape_text(shape)}")
    return x.detach().cpu().numpy().astype(runner.dtype, copy=False)


def _model_batches(batches, runner):
    """The data batches as the graph takes them: a graph with a fixed batch size gets chunks of that size
    (each chunk is a batch of its own for the cache; the statistics do not depend on the split)."""
    fixed = runner.shape[0] if runner.shape else None
    for index, x in enumerate(batches):
        if fixed is None or len(x) == fixed:
            yield index, x
            continue
        if len(x) % fixed:
            raise InputError(f"the model input {runner.input_name!r} has a fixed batch size {fixed}; calibration "
                             f"batch {index + 1} has {len(x)} samples: use a {param('batch_size')} that is a "
                             f"multiple of {fixed}")
        for start in range(0, len(x), fixed):
            yield index, x[start:start + fixed]


def _run_chunk(session, wanted, feeds, x, index) -> list[np.ndarray]:
    try:
        return session.run(wanted, feeds)
    except Exception as e:
        raise InputError(f"onnxruntime failed on calibration batch {index + 1} of shape {tuple(x.shape)}: "
                         f"{_first_line(e)}") from e


def _accumulate(stats: ChannelStats, values: dict[str, np.ndarray], prefix: str) -> None:
    """One batch's per-channel count, mean and centred sum of squares from `_statistics_nodes`' float64 sums
    about the centre c: mean = c + S1/n, M2 = S2 - S1²/n (c is near the mean, so S1 is small);
    merged into `stats` with Chan's formula."""
    n_batch, _, positions = (int(v) for v in values[f"{prefix}.shape"])
    n = n_batch * positions
    centre = values[f"{prefix}.centre"].reshape(-1).astype(np.float64)
    s1, s2 = values[f"{prefix}.s1"].reshape(-1), values[f"{prefix}.s2"].reshape(-1)
    stats.add(n, torch.from_numpy(centre + s1 / n), torch.from_numpy(np.maximum(s2 - s1 * s1 / n, 0.0)))


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
    for b in usable:
        if b.name not in stats:
            continue
        for slot, name, values in ((3, b.mean, stats[b.name][0]), (4, b.var, stats[b.name][1])):
            old = inits.get(name) or constants.proto(name)  # an Identity of an initializer: written as a copy
            array = values.astype(numpy_helper.to_array(old).dtype).reshape(tuple(old.dims))
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


def _shape_text(shape) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
