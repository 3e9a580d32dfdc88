"""Checking an ONNX file: onnx.checker and op counts, onnxruntime sessions at each optimisation level, and the
comparison of onnxruntime's outputs with a reference (PyTorch's, or another file's) on the same inputs."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .choices import Provider
from .compare import (
    RANDOM_STREAM,
    ComparedReport,
    Comparison,
    RecordedRuns,
    Tolerance,
    compare_arrays,
    numpy_generator,
    random_array,
    random_like,
    random_stream,
    to_numpy,
)
from .errors import CheckFailed, InputError, param, user_code, without_ansi
from .utils import iter_tensors

if TYPE_CHECKING:  # torch is imported where a run needs it: ONNX files are read and checked without it
    import torch
    from torch import nn

# Without atol, the absolute tolerance is this share of each output's largest magnitude: onnxruntime and
# PyTorch sum in different orders, and through a deep float32 network that differs by ~1e-6 of the scale.
DEFAULT_TOLERANCE = Tolerance(rtol=1e-4, atol=1e-4, atol_relative=True)


@dataclass
class OnnxCheck(ComparedReport):
    """onnxruntime against PyTorch on the same inputs: one Comparison per input and output."""

    provider: str
    comparisons: list[Comparison] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(self.comparisons)


def error_line(e: BaseException) -> str:
    """An exception as one line: its type and the first line that says something (exporters and onnxruntime
    raise many-line errors)."""
    lines = [line.strip() for line in without_ansi(str(e)).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("For more information", "Traceback", "File "))]
    text = (useful or [type(e).__name__])[0]
    return f"{type(e).__name__}: {text[:300]}"


def load_checked(path: str | os.PathLike):
    """onnx.load + onnx.checker, with one-line errors for files that are not valid ONNX."""
    import onnx

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir() or path.stat().st_size == 0:
        raise InputError(f"{path}: not an ONNX file (empty or a directory)")
    try:
        model = onnx.load(str(path), load_external_data=False)
        onnx.checker.check_model(str(path))
    except Exception as e:
        raise InputError(f"{path}: corrupt or invalid ONNX model ({error_line(e)})") from e
    return model


def opset_of(model) -> int | None:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return None


def op_counts(model) -> Counter:
    """Node types in the graph, its subgraphs and its local functions."""
    counts: Counter = Counter()

    def walk(graph):
        for node in graph.node:
            counts[node.op_type] += 1
            for attr in node.attribute:
                if attr.g is not None and attr.g.node:
                    walk(attr.g)
                for g in attr.graphs:
                    walk(g)

    walk(model.graph)
    for fn in model.functions:
        for node in fn.node:
            counts[node.op_type] += 1
    return counts


def check_provider(provider: str, given: str | None = None) -> None:
    """Before any work: `provider` is one onnxruntime has here. `given`: how the error names the choice (a
    command whose flag is --device says so), by default the `provider` parameter and its value."""
    import onnxruntime as ort

    if provider not in Provider.values():
        raise InputError(f"{param('provider')} {provider!r}: choose one of {', '.join(Provider.values())}",
                         param="provider")
    available = ort.get_available_providers()
    if provider == Provider.CUDA and "CUDAExecutionProvider" not in available:
        raise InputError(f"{given or param('provider') + ' cuda'}: onnxruntime has no CUDA provider here "
                         f"(available: {available})", param="provider")


# onnxruntime's default level fuses Conv+BN and more when it loads a file; with optimisations off it runs the graph
# as written, as TensorRT, OpenVINO or a mobile converter receive it. The check runs both.
OPTIMIZATION_LEVELS = ("ORT_ENABLE_ALL", "ORT_DISABLE_ALL")
UNOPTIMIZED_LABEL = "{} ({})"  # an input's label at a level other than the default: words only, never parsed


def ort_session(path: str | os.PathLike, provider: str = "cpu", optimization: str = "ORT_ENABLE_ALL"):
    """An onnxruntime session on `path` with `provider` at graph optimisation level `optimization`."""
    import onnxruntime as ort

    check_provider(provider)
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if provider == Provider.CUDA else \
        ["CPUExecutionProvider"]
    options = ort.SessionOptions()
    options.log_severity_level = 4  # errors come back as exceptions, said in one line: no log of its own
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, optimization)
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as e:
        raise InputError(f"{path}: onnxruntime cannot load it ({error_line(e)})") from e


def check_signature(session, inputs: Sequence[torch.Tensor | np.ndarray], path) -> None:
    """The ONNX inputs must match the given inputs (tensors or arrays) in number, rank and fixed sizes."""
    ort_inputs = session.get_inputs()
    if len(ort_inputs) != len(inputs):
        raise InputError(f"{path}: has {len(ort_inputs)} inputs {[i.name for i in ort_inputs]}, "
                         f"but {len(inputs)} were given ({param('example_inputs')})", param="example_inputs")
    for spec, x in zip(ort_inputs, inputs):
        shape = spec.shape
        if len(shape) != len(x.shape) or any(isinstance(d, int) and d != s for d, s in zip(shape, x.shape)):
            raise InputError(f"{path}: input {spec.name!r} has shape {shape}, but {param('example_inputs')} gives "
                             f"{list(x.shape)}", param="example_inputs")


def _batch_sizes(session, inputs) -> tuple[int | None, list[int | None], list[bool]]:
    """(the example's batch size, the batch sizes checked, which inputs take them): several sizes where the first
    input's axis 0 is symbolic, for it and every input whose axis 0 is the same symbol (an input with a symbol of
    its own, a rank-0 input, keeps its shape); None where the first input has no axis 0."""
    dims = [i.shape[0] if i.shape else 0 for i in session.get_inputs()]
    example = inputs[0].shape[0] if inputs and len(inputs[0].shape) else None
    batched = [example is not None and not isinstance(dims[0], int) and d == dims[0] for d in dims]
    return example, (sorted({1, example, example + 3}) if example is not None and batched[0] else [example]), batched


def compare_with_onnxruntime(
    model: nn.Module,
    path: str | os.PathLike,
    inputs: Sequence[torch.Tensor],
    tolerance: Tolerance = DEFAULT_TOLERANCE,
    *,
    samples: int = 4,
    seed: int = 0,
    data: Iterable[torch.Tensor] | None = None,
    provider: str = "cpu",
    reference_runs: RecordedRuns | None = None,
) -> OnnxCheck:
    """Run the same inputs through PyTorch and onnxruntime and compare every output.

    Args:
        model: the PyTorch reference (run as it is: put it in eval mode first).
        path: the ONNX file.
        inputs: example inputs; `samples` random inputs of the same shapes are added, at several batch sizes
            when the file's batch axis is dynamic, and every batch of `data`.
        tolerance: the elementwise rule.
        reference_runs: `model`'s outputs already computed (bntool.compare.RecordedRuns): reused on the same
            inputs, and the new runs kept there.

    Returns:
        An OnnxCheck with one Comparison per input and output (a runner failure is a failed Comparison).

    Raises:
        InputError: onnxruntime cannot load the file, or its inputs do not match `inputs`.
    """
    import torch

    runs = reference_runs if reference_runs is not None else RecordedRuns()

    def reference(label: str, xs: tuple) -> list:
        with torch.no_grad(), user_code(f"the model's forward on the {label} input"):
            output = runs(model, xs)
        return [to_numpy(t) for t in iter_tensors(output)]

    return compare_runs(reference, "PyTorch", path, inputs, tolerance, samples=samples, seed=seed, data=data,
                        provider=provider)


def compare_runs(
    reference,
    reference_name: str,
    path: str | os.PathLike,
    inputs: Sequence[torch.Tensor | np.ndarray],
    tolerance: Tolerance = DEFAULT_TOLERANCE,
    *,
    samples: int = 4,
    seed: int = 0,
    data: Iterable[torch.Tensor] | None = None,
    provider: str = "cpu",
    candidate_check=None,
    inputs_like=None,
) -> OnnxCheck:
    """onnxruntime on `path`, at each optimisation level, against `reference(label, inputs)` (a list of arrays:
    PyTorch's outputs, or another ONNX file's in onnxruntime) on the example, random and data inputs. The
    reference runs once per input, before the levels; then `reference.close()`, if it has one (an onnxruntime
    reference gives its memory back before the candidate's sessions are made). `candidate_check(comparison,
    inputs, reference_array, candidate_array, output_name)` may re-judge a failed comparison (the float64 arbiter
    of an ONNX fold). `inputs_like`: something with `get_inputs()` describing `path`'s inputs as a session does
    (a fold's original file, whose inputs the folded file keeps): no session on `path` is made just to read them.
    Comparisons are listed input by input, the default level first. `inputs` are torch tensors (the random
    inputs drawn as the PyTorch fold check draws them) or numpy arrays (an ONNX file's check: numpy's generator,
    and no torch imported)."""
    # One session at a time, level by level: a large model is held once by onnxruntime, not once per level.
    session = ort_session(path, provider, OPTIMIZATION_LEVELS[0]) if inputs_like is None else None
    described = session if session is not None else inputs_like
    result = OnnxCheck(provider=session.get_providers()[0] if session is not None else provider)
    check_signature(described, inputs, path)
    cases: list[tuple[str, tuple]] = [("example", tuple(inputs))]
    draw = _random_inputs(inputs, seed)
    example_batch, sizes, batched = _batch_sizes(described, inputs)
    for b in sizes:
        for i in range(samples):
            # At the example's batch size every input keeps its own shape (a mask, a 1-D parameter input); at
            # another one, only the inputs whose axis 0 is the batch's symbol change (`_batch_sizes`).
            shapes = [(b, *x.shape[1:]) if b != example_batch and on else tuple(x.shape)
                      for x, on in zip(inputs, batched)]
            cases.append((f"random {'' if b is None else f'b={b} '}#{i + 1}", draw(shapes)))
    for i, batch in enumerate(data or []):
        cases.append((f"data batch {i + 1}", (batch.to(inputs[0].device),)))
    if hasattr(reference, "close"):  # another onnxruntime model: hold one model at a time, not two
        session = None
    expected = {label: reference(label, xs) for label, xs in cases}
    if hasattr(reference, "close"):
        reference.close()
    by_case: dict[str, list[Comparison]] = {label: [] for label, _ in cases}
    for level in OPTIMIZATION_LEVELS:
        if session is None:
            session = ort_session(path, provider, level)
            check_signature(session, inputs, path)
            result.provider = session.get_providers()[0]
        names = [i.name for i in session.get_inputs()]
        for label, xs in cases:
            by_case[label].extend(_compare_case(session, names, label, xs, level, expected[label], reference_name,
                                                path, tolerance, candidate_check, result))
        session = None
    result.comparisons = [c for label, _ in cases for c in by_case[label]]
    for level in OPTIMIZATION_LEVELS:
        mine = [c for c in result.comparisons if c.optimization == level]
        failed = sum(not c.passed for c in mine)
        result.notes.append(f"onnxruntime {level}: {len(mine) - failed} of {len(mine)} comparisons passed")
    return result


def _random_inputs(inputs, seed: int):
    """shapes → one random input per example input, in its dtype (and device): floats standard normal; for
    numpy inputs `compare.random_array`'s others; a tensor's other inputs (token ids, masks) are the example's
    own values, its samples repeated or cut to another batch size (values the model is known to take). The
    generator is seeded once, so the draws follow one stream."""
    if all(isinstance(x, np.ndarray) for x in inputs):
        rng = numpy_generator(seed + RANDOM_STREAM)
        return lambda shapes: tuple(random_array(rng, shape, x.dtype) for shape, x in zip(shapes, inputs))

    g = random_stream(seed)
    return lambda shapes: random_like(tuple(_resized(x, shape) for shape, x in zip(shapes, inputs)), g)


def _resized(x, shape: tuple):
    """The tensor `x` at `shape` (another size of axis 0 only): its samples repeated or cut."""
    if tuple(x.shape) == shape:
        return x
    import torch

    return x[torch.arange(shape[0], device=x.device) % x.shape[0]]


def _compare_case(session, names, label, xs, level, expected, reference_name, path, tolerance, candidate_check,
                  result: OnnxCheck) -> list[Comparison]:
    """One input at one optimisation level: each output against the reference's."""
    # Labels of the default level stay as they are; the unoptimised run says so.
    level_label = label if level == OPTIMIZATION_LEVELS[0] else UNOPTIMIZED_LABEL.format(label, level)
    try:
        got = session.run(None, {n: x if isinstance(x, np.ndarray) else x.detach().cpu().numpy()
                                 for n, x in zip(names, xs)})
    except Exception as e:
        message = f"onnxruntime failed: {error_line(e)}"
        result.notes.append(f"{level_label}: {message}")
        failure = Comparison.failure(level_label, "*", message)
        failure.optimization = level
        return [failure]
    out_names = [o.name for o in session.get_outputs()]
    if len(got) != len(expected):
        raise CheckFailed(f"{path}: returns {len(got)} outputs, {reference_name} returns {len(expected)}")
    comparisons = []
    for name, ref, out in zip(out_names, expected, got):
        c = compare_arrays(level_label, name, ref, out, tolerance)
        c.optimization = level
        if not c.passed and candidate_check is not None:
            candidate_check(c, xs, ref, out, name)
        comparisons.append(c)
    return comparisons
