"""The passes of an ONNX file's exact-mode recalibration: one onnxruntime session per BN level on a segment of the
graph, and the per-channel statistics computed next to each measured tensor (onnx_recalibration.py drives them).

Each pass runs a segment, not the whole graph: pass k's graph takes as inputs the tensors pass k-1 cached (its
"boundary": the final tensors that later nodes still read) and outputs the inputs of level k's BNs plus its own
boundary, which replaces the cache. Every node thus runs about once over all passes, and the data are read once
while the cache holds (the cached chunks stand for the batches). What does not fit the byte budget is not cached,
and the next pass starts from the model input instead.

Statistics: each sample's rows (one per channel, its positions) get their float32 mean m and the sums of
e = x - m and e² in onnxruntime (the row's own mean as the centre, so values far from zero or from the rest of
the plane cost no digits); the rows are pooled in float64 (Chan's formula, exact), as PyTorch's exact mode pools
its batches. Only the per-row values leave the session. A graph with a fixed batch size gets its data in chunks
of that size, the last one padded with copies of its own samples whose rows are dropped, so padding changes no
statistic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .errors import InputError
from .recalibration_passes import ChannelStats, RecalibrationReport
from .tempfiles import current_session

BN_OP = "BatchNormalization"


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


def node_inputs(node) -> list[str]:
    """The tensors a node reads, including those its If/Loop/Scan bodies read from the outer graph."""
    names = [i for i in node.input if i]
    for sub in _subgraphs(node):
        local = {i.name for i in sub.input} | {i.name for i in sub.initializer}
        for n in _all_nodes(sub):
            local.update(n.output)
        names += [i for n in _all_nodes(sub) for i in n.input if i and i not in local]
    return names



def _dynamic_tensors(graph, input_name: str) -> set[str]:
    """Tensors that depend on the model input (the others are constants, recomputed wherever needed)."""
    dynamic = {input_name}
    for node in graph.node:
        if any(i in dynamic for i in node_inputs(node)):
            dynamic.update(o for o in node.output if o)
    return dynamic



def boundaries(graph, input_name: str, levels: dict[str, int], depth: int) -> dict[int, set[str]]:
    """Pass k → the tensors it caches for pass k+1. During pass k only tensors of level < k are right (level k's
    statistics are being measured); pass k+1 needs those that a node of level ≥ k reads (level k's BN inputs
    among them). Everything pass k+1 computes comes from them: a node of level k reads only such tensors and
    tensors of level k."""
    dynamic = _dynamic_tensors(graph, input_name)
    out: dict[int, set[str]] = {k: set() for k in range(1, depth + 1)}
    for node in graph.node:
        reads = [t for t in node_inputs(node) if t in dynamic]
        node_level = max((levels.get(o, 0) for o in node.output if o), default=0)
        for t in reads:
            for k in range(levels.get(t, 0) + 1, min(node_level, depth - 1) + 1):
                out[k].add(t)
    return out


# ---------------------------------------------------------------- the passes


class SegmentRunner:
    """Builds and runs the subgraph from some available tensors to some wanted ones, with the statistics
    measured so far in place of the stored ones."""

    def __init__(self, model, input_name: str, input_spec, provider: str, bn_inputs: dict[str, tuple[str, str]]):
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
        self.bn_inputs = bn_inputs  # BN name → the names of its mean and variance initializers
        self.stats: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # BN name → measured (mean, var)
        self.replaced: dict[str, tuple[Any, Any]] = {}  # BN name → TensorProtos of its measured mean and var
        self.shapes = _shapes(model)
        self.shared_arena = False  # the sessions use onnxruntime's registered CPU arena (`register_shared_arena`)
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)

    def session(self, available: dict[str, tuple[np.dtype, int]], wanted: list[str], measured: list[str]):
        """An onnxruntime session computing `wanted` and the statistics of `measured` (`_statistics_nodes`) from
        the `available` tensors (name → dtype, rank); the names of the inputs it takes and of its outputs."""
        import onnxruntime as ort

        model, inputs = self._segment(available, wanted, measured)
        options = ort.SessionOptions()
        options.log_severity_level = 4  # its errors come back as exceptions (one line): no log of its own
        # onnxruntime's threads spin after each run, which starves the statistics computed between runs
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if self.shared_arena:
            options.add_session_config_entry("session.use_env_allocators", "1")
        providers = (["CUDAExecutionProvider", "CPUExecutionProvider"] if self.provider == "cuda"
                     else ["CPUExecutionProvider"])
        try:
            session = ort.InferenceSession(model.SerializeToString(), sess_options=options, providers=providers)
        except Exception as e:
            raise InputError(f"onnxruntime cannot run the model: {first_line(e)}") from e
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
                stack.extend(node_inputs(graph.node[self.producer[t]]))
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
        read = {t for node in nodes for t in node_inputs(node)}
        initializers += [self.initializers[n] for n in sorted(used & read)]
        value_infos = [_value_info(n, *available[n]) for n in inputs]
        cuts = [(m, _row_cut(self.shapes.get(m))) for m in measured]
        stat_nodes, stat_inits, stat_outputs = _statistics_nodes(cuts, self.opset, self.dtype)
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


_ARENA: list[bool] = []  # whether the shared arena is registered (decided once per process)


def register_shared_arena() -> bool:
    """Registers onnxruntime's process-wide CPU arena (once per process), which the sessions that ask for it
    share. Each pass has a session of its own, and a session's own arena starts empty, so every pass wrote its
    tensors into fresh pages (a page fault per page, an munmap when its session went): 40 % of EfficientNet-B0's
    and MobileNetV2's recalibration. onnxruntime replaces an allocator the process registered before, so only
    a caller that owns the process asks for it (the CLI: `recalibrate_onnx(shared_arena=True)`). What it holds
    free after the passes is given back (`release_shared_arena`). False where onnxruntime refuses it (the
    passes then use their own arenas)."""
    if not _ARENA:
        import onnxruntime as ort

        try:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))  # onnxruntime's defaults
            _ARENA.append(True)
        except Exception:
            _ARENA.append(False)
    return _ARENA[0]


def release_shared_arena() -> None:
    """Give the shared arena's free memory back to the system: one run of a one-node graph with onnxruntime's
    arena shrinkage on (it frees every region no tensor uses)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "release",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.add_session_config_entry("session.use_env_allocators", "1")
    run_options = ort.RunOptions()
    run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    session = ort.InferenceSession(model.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"])
    session.run(None, {"x": np.zeros(1, np.float32)}, run_options)


def _shapes(model) -> dict[str, list[int | None]]:
    """Tensor → its shape (None for a symbolic dimension) where ONNX shape inference knows its rank: on a copy
    without the large weights (0.35 s → 0.02 s on ResNet-50)."""
    import onnx

    from .onnx_model import without_large_tensors

    try:
        inferred = onnx.shape_inference.infer_shapes(without_large_tensors(model, None)).graph
    except Exception:  # a model shape inference cannot read (over 2 GB, unknown ops): shapes unknown
        return {}
    return {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
            for v in [*inferred.value_info, *inferred.input] if v.type.tensor_type.HasField("shape")}


def _row_cut(shape: list[int | None] | None) -> str:
    """How the statistics cut a BN input in rows, each summed in float32 (short enough to keep its digits) and
    the rows pooled in float64: an image's rows of W, or its whole plane where W is too short for onnxruntime to
    reduce it quickly and the plane small (≤ 1024 values); any other tensor (rank < 4, unknown) value by value."""
    if shape is None or len(shape) < 4:
        return "values"
    height, width = shape[2], shape[3]
    if len(shape) == 4 and height is not None and width is not None and width < 32 and height * width <= 1024:
        return "plane"
    return "rows"


def _with_inputs(node, replace: dict[int, str]):
    from onnx import NodeProto

    copy = NodeProto()
    copy.CopyFrom(node)
    for slot, name in replace.items():
        copy.input[slot] = name
    return copy


STATS = "bntool.statistics"


def _statistics_nodes(measured: list[tuple[str, str]], opset: int, dtype) -> tuple[list, list, list[str]]:
    """Nodes that give, for each measured (tensor, `_row_cut`) seen as (N, C, rows, row length): each short row's
    float32 mean m, and the sums of e and e² for e = x - m (no cast of the tensor), and the shape. The row's own
    mean is a centre as close to its values as float32 allows, wherever they lie (a first row, a first column or
    a whole plane far from the rest costs no digits); the sums of e correct that centre's rounding exactly, so
    one pass over e loses nothing (M2 = Σe² - (Σe)²/W). `_accumulate` pools the rows in float64. Only these
    per-row values come out (a row-length-th of the tensor), no copy of the tensor unless the cache keeps it.
    The tensor is read three times and e written once (the two-pass form read it four times and wrote twice)."""
    from onnx import TensorProto, helper

    def const(name, values):
        return helper.make_tensor(f"{STATS}.{name}", TensorProto.INT64, [len(values)], values)

    inits = [const("rows", [0, 0, -1, 0]), const("plane", [0, 0, 1, -1]), const("values", [0, 0, -1, 1]),
             const("axis3", [3])]
    nodes, outputs = [], []

    def reduce(op, x, y):
        since = 13 if op == "ReduceSum" else 18  # when `axes` became an input
        if opset >= since:
            return helper.make_node(op, [x, f"{STATS}.axis3"], [y], keepdims=1)
        return helper.make_node(op, [x], [y], axes=[3], keepdims=1)

    cast = np.dtype(dtype) not in (np.float32, np.float64)  # half precision is measured in float32
    for i, (x, cut) in enumerate(measured):
        p = f"{STATS}.{i}"
        nodes.append(helper.make_node("Reshape", [x, f"{STATS}.{cut}"], [f"{p}.x"]))
        if cast:
            nodes.append(helper.make_node("Cast", [f"{p}.x"], [f"{p}.xf"], to=TensorProto.FLOAT))
        xf = f"{p}.xf" if cast else f"{p}.x"
        nodes += [reduce("ReduceMean", xf, f"{p}.m"),
                  helper.make_node("Sub", [xf, f"{p}.m"], [f"{p}.e"]),
                  reduce("ReduceSum", f"{p}.e", f"{p}.s"),
                  reduce("ReduceSumSquare", f"{p}.e", f"{p}.q"),
                  helper.make_node("Shape", [f"{p}.x"], [f"{p}.shape"])]
        outputs += [f"{p}.m", f"{p}.s", f"{p}.q", f"{p}.shape"]
    return nodes, inits, outputs


def _accumulate(stats: ChannelStats, values: dict[str, np.ndarray], prefix: str, chunk: Chunk, bn: str) -> None:
    """One chunk's per-channel count, mean and centred sum of squares from `_statistics_nodes`' rows, pooled
    exactly in float64: per row of W values, mean = m + S/W and M2 = Q - S²/W; per channel, mean = the mean of the
    row means, M2 = Σ row M2 + W · Σ (row mean - mean)²; merged into `stats` with Chan's formula. A padded chunk's
    padding is left out."""
    n_rows, channels, rows, width = (int(v) for v in values[f"{prefix}.shape"])
    kept = _real_rows(n_rows, chunk, bn)

    def per_row(name: str) -> np.ndarray:
        return values[f"{prefix}.{name}"].reshape(n_rows, channels, rows)[:kept].astype(np.float64)

    s = per_row("s")
    row_mean = per_row("m") + s / width
    row_m2 = np.maximum(per_row("q") - s * s / width, 0.0)  # ≥ 0: a constant row may round a hair below
    mean = row_mean.mean(axis=(0, 2))
    m2 = row_m2.sum(axis=(0, 2)) + width * np.square(row_mean - mean[:, None]).sum(axis=(0, 2))
    stats.add(kept * rows * width, torch.from_numpy(mean), torch.from_numpy(m2))


def _real_rows(n_rows: int, chunk: Chunk, bn: str) -> int:
    """How many of a BN input's leading rows come from the chunk's real samples: all of them, unless the chunk
    is padded; then the rows are taken as batch-major (the batch dimension, or one flattened with others behind
    it, as a Reshape of (N, L, C) to (N·L, C) gives), so the real samples' rows come first."""
    if chunk.samples == chunk.size:
        return n_rows
    if n_rows % chunk.size:
        raise InputError(f"{bn}: its input has {n_rows} rows for a fixed batch of {chunk.size}, so the padding of "
                         f"the last {chunk.samples} samples cannot be left out: give a number of samples that is a "
                         f"multiple of {chunk.size}")
    return n_rows // chunk.size * chunk.samples


def _value_info(name: str, dtype, rank: int | None):
    from onnx import helper

    shape = None if rank is None else [f"{name}_d{i}" for i in range(rank)]
    return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), shape)


@dataclass
class Chunk:
    """One run's worth of a calibration batch: `samples` real samples (the rest of the graph's fixed batch is
    padding), and the boundary tensors a pass cached for the next."""

    index: int  # the calibration batch it comes from
    samples: int
    size: int  # samples in the run: more than `samples` where a fixed batch size is padded
    shape: tuple[int, ...]  # of the model input, for messages
    tensors: dict[str, np.ndarray] = field(default_factory=dict)


def measure_level(runner, members, keep, cache, batches, budget, report: RecalibrationReport, level, passes,
                  progress):
    """Pass `level`: the input statistics of `members`, from the previous pass's cached chunks where there are
    any (the data are not read again then), else from the model input; returns them and this pass's cached chunks
    for the next (None if not kept)."""
    available = {n: (a.dtype, a.ndim) for n, a in cache[0].tensors.items()} if cache else {}
    measured = list(dict.fromkeys(b.x for b in members))
    outputs = [t for t in sorted(keep) if t not in available and t != runner.input_name]
    session, inputs, names = runner.session(available, outputs, measured)
    stats = {b.name: ChannelStats(b.channels, torch.device("cpu")) for b in members}
    slots = {b.name: f"{STATS}.{measured.index(b.x)}" for b in members}
    needs_input = runner.input_name in inputs or runner.input_name in keep
    chunks = _cached_chunks(cache) if cache and not needs_input else _data_chunks(batches, runner, cache)
    new_cache: list[Chunk] | None = [] if keep else None
    held = done = 0
    if progress is not None:
        progress(0, level, passes)
    session_state = current_session()
    for chunk, x in chunks:
        if session_state.interrupted:  # a Ctrl-C swallowed on the way: stop now, not after every level
            raise KeyboardInterrupt
        feeds = dict(chunk.tensors)
        if x is not None:
            feeds[runner.input_name] = x
        values = dict(feeds)
        values.update(zip(names, _run_chunk(session, names, {k: feeds[k] for k in inputs}, chunk)))
        for b in members:
            _accumulate(stats[b.name], values, slots[b.name], chunk, b.name)
        chunk.tensors = {}  # freed as we go
        if new_cache is not None:
            kept = Chunk(chunk.index, chunk.samples, chunk.size, chunk.shape, {t: values[t] for t in keep})
            held += sum(a.nbytes for a in kept.tensors.values())
            if held > budget:
                new_cache = None
                report.cache_over_budget += 1
            else:
                new_cache.append(kept)
        done += chunk.samples
        if progress is not None:
            progress(done, level, passes)
    if cache:
        report.segment_replays += len(cache)
    if new_cache is not None:
        report.cache_peak_bytes = max(report.cache_peak_bytes, held)
    return stats, new_cache


def _cached_chunks(cache: list[Chunk]):
    for chunk in cache:
        yield chunk, None


def _data_chunks(batches, runner, cache: list[Chunk] | None):
    """The data batches as the graph takes them, with the cached tensors of each chunk where there are any. A
    graph with a fixed batch size gets chunks of that size (the statistics do not depend on the split); a short
    last chunk is padded with copies of its own samples (their rows are left out of the statistics)."""
    fixed = runner.shape[0] if runner.shape else None
    i = 0
    for index, x in enumerate(batches):
        x = _as_input(x, runner, index)
        pieces = [x] if fixed is None or len(x) == fixed else [x[s:s + fixed] for s in range(0, len(x), fixed)]
        for piece in pieces:
            samples = len(piece)
            if fixed is not None and samples < fixed:
                piece = piece[np.arange(fixed) % samples]
            chunk = Chunk(index, samples, len(piece), tuple(x.shape), cache[i].tensors if cache else {})
            if cache:
                cache[i].tensors = {}  # the chunk holds them until its run
            i += 1
            yield chunk, piece


def _as_input(x: torch.Tensor, runner: SegmentRunner, index: int) -> np.ndarray:
    shape = runner.shape
    if shape and (x.dim() != len(shape) or any(d is not None and d != s for d, s in zip(shape[1:], x.shape[1:]))):
        raise InputError(f"calibration batch {index + 1} has shape {tuple(x.shape)}, but the model input "
                         f"{runner.input_name!r} has shape {shape_text(shape)}")
    return x.detach().cpu().numpy().astype(runner.dtype, copy=False)


def _run_chunk(session, wanted, feeds, chunk: Chunk) -> list[np.ndarray]:
    try:
        return session.run(wanted, feeds)
    except Exception as e:
        raise InputError(f"onnxruntime failed on calibration batch {chunk.index + 1} of shape {chunk.shape}: "
                         f"{first_line(e)}") from e


def shape_text(shape) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
