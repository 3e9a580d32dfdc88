"""The ONNX fold's check: the folded file in onnxruntime against the original, at both optimisation levels, on the
example and random inputs (shapes from the graph), with the float64 arbiter (the original graph run in double by
onnx.reference) for an output over tolerance. Memory: one model in onnxruntime at a time."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .compare import Tolerance, compare_arrays, numpy_generator, random_array
from .errors import InputError, first_line, param
from .onnx_model import load_onnx
from .onnx_save import give_memory_back

# ---------------------------------------------------------------- inputs


def example_inputs(model, input_shapes: Sequence[Sequence[int]] | None, seed: int, path) -> tuple[np.ndarray, ...]:
    """Random inputs for the graph's inputs (those that are not initializers), as numpy arrays (no torch: an ONNX
    file is folded and checked without it): shapes from the graph, symbolic dimensions from `input_shapes` (one
    full shape per input, in order): `compare.random_array` from numpy's generator seeded with `seed`.

    Raises:
        InputError: a symbolic dimension without `input_shapes` (naming the input), or shapes that do not fit.
    """
    from onnx import helper

    specs = graph_inputs(model)
    if input_shapes is not None and len(input_shapes) != len(specs):
        raise InputError(f"{path}: has {len(specs)} inputs {[s.name for s in specs]}, but {param('example_inputs')} "
                         f"gives {len(input_shapes)} shapes", param="example_inputs")
    shapes = []
    for i, spec in enumerate(specs):
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                for d in spec.type.tensor_type.shape.dim]
        shapes.append(_input_shape(spec.name, dims, None if input_shapes is None else tuple(input_shapes[i]), path))
    rng = numpy_generator(seed)
    dtypes = [np.dtype(helper.tensor_dtype_to_np_dtype(spec.type.tensor_type.elem_type)) for spec in specs]
    return tuple(random_array(rng, shape, dtype) for shape, dtype in zip(shapes, dtypes))


def graph_inputs(model) -> list:
    """The graph's inputs that are not initializers (those a caller feeds)."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _input_shape(name: str, dims: list, given: tuple | None, path) -> tuple[int, ...]:
    if given is None:
        symbolic = [d for d in dims if not isinstance(d, int) or d <= 0]
        if symbolic:
            raise InputError(f"{path}: input {name!r} has shape {dims} with symbolic dimensions "
                             f"{', '.join(map(str, symbolic))}; give its shape with {param('example_inputs')}",
                             param="example_inputs")
        return tuple(dims)
    if len(given) != len(dims) or any(isinstance(d, int) and d > 0 and d != s for d, s in zip(dims, given)):
        raise InputError(f"{path}: input {name!r} has shape {dims}, but {param('example_inputs')} gives "
                         f"{list(given)}", param="example_inputs")
    return given


# ---------------------------------------------------------------- the runs


class OriginalRuns:
    """The original file in onnxruntime as it is written (ORT_DISABLE_ALL: no fusion of its own): the check's
    reference outputs. The session is made on first use and given back by `close()`."""

    def __init__(self, path: Path, provider: str, inputs: tuple):
        self.path, self.provider, self.inputs = path, provider, inputs
        self.session = None
        self.float64: Any = None  # onnx.reference.ReferenceEvaluator, made on first use

    def open(self):
        from .onnx_check import check_signature, ort_session

        if self.session is None:
            self.session = ort_session(self.path, self.provider, "ORT_DISABLE_ALL")
            check_signature(self.session, self.inputs, self.path)
        return self.session

    def close(self) -> None:
        """Give the session back, and its memory to the system before the folded file's sessions are made."""
        self.session = None
        give_memory_back()

    def get_inputs(self) -> list:
        """The original's graph inputs as onnxruntime describes them (the folded file keeps them)."""
        return self.open().get_inputs()

    def __call__(self, label: str, xs: tuple) -> list:
        session = self.open()
        feed = {i.name: x for i, x in zip(session.get_inputs(), xs)}
        try:
            return session.run(None, feed)
        except Exception as e:
            raise InputError(f"{self.path}: onnxruntime cannot run it on the {label} input "
                             f"({type(e).__name__}: {first_line(e)})") from e

    def float64_outputs(self, xs: tuple) -> dict[str, np.ndarray]:
        """The original graph run in float64 (onnx.reference on a copy with every float tensor made double)."""
        from onnx.reference import ReferenceEvaluator

        if self.float64 is None:
            self.float64 = ReferenceEvaluator(as_float64(load_onnx(self.path, check=False).model))
        feed = {i: x.astype(np.float64) if np.issubdtype(x.dtype, np.floating) else x
                for i, x in zip(self.float64.input_names, xs)}
        return dict(zip(self.float64.output_names, self.float64.run(None, feed)))


def as_float64(model):
    """The model with float32/float16/bfloat16 tensors, inputs, outputs, casts and constants made float64."""
    from onnx import TensorProto, numpy_helper

    floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16}
    g = model.graph
    for info in [*g.input, *g.output, *g.value_info]:
        if info.type.tensor_type.elem_type in floats:
            info.type.tensor_type.elem_type = TensorProto.DOUBLE
    for i, t in enumerate(g.initializer):
        if t.data_type in floats:
            g.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name))
    for node in g.node:
        for a in node.attribute:
            if node.op_type == "Cast" and a.name == "to" and a.i in floats:
                a.i = TensorProto.DOUBLE
            if a.name == "value" and a.HasField("t") and a.t.data_type in floats:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float64), a.t.name))
    return model


def check_against_original(original: OriginalRuns, staged: Path, inputs, tolerance, samples, seed, provider):
    """onnxruntime on the folded file against the original, level by level; a comparison over tolerance is
    re-judged against the original run in float64."""
    from .onnx_check import compare_runs

    exact_only = Tolerance(0.0, 0.0, atol_relative=False)

    def arbitrate(c, xs, ref, out, name) -> None:
        if not math.isfinite(c.max_abs):
            return
        exact = original.float64_outputs(xs).get(name)
        if exact is None:
            return
        c.float64_error_original = compare_arrays(c.input, name, exact, ref, exact_only).max_abs
        c.float64_error_candidate = compare_arrays(c.input, name, exact, out, exact_only).max_abs
        c.passed = c.float64_error_candidate <= 1.5 * c.float64_error_original + 0.01 * c.threshold

    try:
        return compare_runs(original, "the original file", staged, inputs, tolerance, samples=samples, seed=seed,
                            provider=provider, candidate_check=arbitrate, inputs_like=original)
    except InputError as e:
        if str(original.path) in str(e):
            raise
        raise RuntimeError(f"the folded file does not load in onnxruntime: {e}") from e  # bntool's bug: exit 3
