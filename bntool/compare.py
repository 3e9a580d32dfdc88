"""Numerical comparison of a candidate's outputs with a reference: one result type and one tolerance rule
for the fold check, the ONNX check and `verify`, plus the random-input stream and the float64 reference.

The rule, everywhere: an element passes when |candidate − reference| ≤ atol + rtol·|reference|
(numpy.allclose), where atol is either absolute or a share of the output's largest finite magnitude
(`Tolerance.atol_relative`). A NaN or Inf in the candidate where the reference is finite always fails.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import InputError, param
from .utils import iter_tensors

# Random check inputs come from this offset of the seed, so they differ from an example made with the seed.
RANDOM_STREAM = 1_000_003


@dataclass(frozen=True)
class Tolerance:
    """Elementwise |Δ| ≤ atol + rtol·|reference|; with `atol_relative`, atol is a share of max|reference|.

    Args:
        rtol: relative tolerance, per element.
        atol: absolute tolerance, or (with `atol_relative`) its share of the output's largest magnitude.
        atol_relative: scale atol by each output's largest finite magnitude (the default when the user
            gives no atol: summation order differs by about 1e-6 of the scale through a float32 network).
    """

    rtol: float
    atol: float
    atol_relative: bool = True

    def __post_init__(self) -> None:
        for name, value in (("rtol", self.rtol), ("atol", self.atol)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise InputError(f"{param(name)} {value!r}: must be a finite number ≥ 0", param=name)

    @classmethod
    def resolve(cls, rtol: float | None, atol: float | None, default: Tolerance) -> Tolerance:
        """The user's rtol/atol over `default`; an atol the user gives is absolute."""
        return cls(default.rtol if rtol is None else rtol, default.atol if atol is None else atol,
                   default.atol_relative if atol is None else False)

    def atol_for(self, scale: float) -> float:
        """The absolute tolerance applied to an output whose largest finite magnitude is `scale`."""
        return self.atol * scale if self.atol_relative else self.atol

    def describe(self) -> str:
        """The rule as text, e.g. '|Δ| ≤ 1e-04·max|ref| + 1e-04·|ref|'."""
        atol = f"{self.atol:.0e}·max|ref|" if self.atol_relative else f"{self.atol:g}"
        return f"|Δ| ≤ {atol} + {self.rtol:g}·|ref|"

    def to_dict(self) -> dict[str, Any]:
        return {"rtol": self.rtol, "atol": self.atol, "atol_relative": self.atol_relative, "rule": self.describe()}


@dataclass
class Comparison:
    """One candidate output against its reference on one input (polygraphy's OutputCompareResult).

    `max_abs` is max|Δ|; `max_abs_over_scale` is max|Δ| / max|reference| (the error relative to the output's
    magnitude); `max_rel_elementwise` is max |Δ|/|reference| over elements where |reference| > atol;
    `mismatched_fraction` is the share of elements over tolerance; `worst_index` where |Δ| is largest;
    `threshold` the absolute tolerance applied (atol as a number: the rule is |Δ| ≤ threshold + rtol·|reference|).
    Truthy when it passed.
    """

    input: str
    output: str
    passed: bool
    max_abs: float = 0.0
    max_abs_over_scale: float = 0.0
    max_rel_elementwise: float = 0.0
    mean_abs: float = 0.0
    mismatched_fraction: float = 0.0
    worst_index: list[int] = field(default_factory=list)
    scale: float = 0.0
    threshold: float = 0.0
    note: str = ""
    # Set by the fold check where the float32 figures are over tolerance: the errors of the original and the
    # candidate against the original run in float64.
    float64_error_original: float | None = None
    float64_error_candidate: float | None = None
    optimization: str | None = None  # ONNX checks: the onnxruntime graph optimisation level it ran at

    def __bool__(self) -> bool:
        return self.passed

    @classmethod
    def failure(cls, input: str, output: str, note: str) -> Comparison:
        """A comparison that could not be made (shapes differ, the runner failed): failed, infinite error."""
        inf = math.inf
        return cls(input, output, False, inf, inf, inf, inf, 1.0, note=note)


class ComparedReport:
    """Summary figures over `self.comparisons`, for the reports that hold comparisons."""

    comparisons: list[Comparison]

    @property
    def max_abs(self) -> float:
        return _max(c.max_abs for c in self.comparisons)

    @property
    def max_abs_over_scale(self) -> float:
        return _max(c.max_abs_over_scale for c in self.comparisons)

    @property
    def max_rel_elementwise(self) -> float:
        return _max(c.max_rel_elementwise for c in self.comparisons)

    @property
    def mismatched_fraction(self) -> float:
        return _max(c.mismatched_fraction for c in self.comparisons)

    @property
    def comparison_notes(self) -> list[str]:
        """'input: note' of every comparison with a note (NaN in the reference, a runner that failed)."""
        return [f"{c.input}: {c.note}" for c in self.comparisons if c.note]

    @property
    def first_note(self) -> str:
        return next(iter(self.comparison_notes), "")

    @property
    def atol_at_worst(self) -> float:
        """The absolute tolerance (a number) of the comparison with the largest error (0 without any)."""
        worst = max(self.comparisons, key=lambda c: c.max_abs, default=None)
        return worst.threshold if worst is not None else 0.0

    def summary_figures(self) -> dict[str, float]:
        return {"max_abs": self.max_abs, "atol_at_worst": self.atol_at_worst,
                "max_abs_over_scale": self.max_abs_over_scale,
                "max_rel_elementwise": self.max_rel_elementwise, "mismatched_fraction": self.mismatched_fraction}


def _max(values: Iterable[float]) -> float:
    """max() that keeps NaN (Python's max drops it when it is not first)."""
    result = 0.0
    for v in values:
        if math.isnan(v):
            return math.inf
        result = max(result, v)
    return result


def to_numpy(x: Any) -> np.ndarray:
    """A tensor or array as a numpy array (float tensors as float64, so bfloat16 converts)."""
    if isinstance(x, np.ndarray):
        return x
    t = x.detach().cpu()
    return (t.double() if t.is_floating_point() else t).numpy()


def compare_arrays(input: str, output: str, reference: Any, candidate: Any, tolerance: Tolerance) -> Comparison:
    """Compare one output (tensor or array) elementwise under `tolerance`.

    Returns:
        A Comparison; failed where shapes differ, where any element is over tolerance, where the candidate
        is NaN/Inf and the reference is not, or where the reference is NaN everywhere (nothing to compare).
        Matching NaNs elsewhere pass with a note saying how many; equal infinities pass.
    """
    ref, cand = to_numpy(reference), to_numpy(candidate)
    if ref.shape != cand.shape:
        return Comparison.failure(input, output, f"shape {list(cand.shape)}, expected {list(ref.shape)}")
    if ref.size == 0:
        return Comparison(input, output, True)
    exact = not (np.issubdtype(ref.dtype, np.floating) or np.issubdtype(cand.dtype, np.floating))
    r, c = ref.astype(np.float64), cand.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(r - c)
    same = (r == c) | (np.isnan(r) & np.isnan(c))  # also equal infinities, whose difference is NaN
    diff = np.where(same, 0.0, np.where(np.isnan(diff), np.inf, diff))
    finite = np.abs(r[np.isfinite(r)])
    scale = float(finite.max()) if finite.size else 0.0
    atol = 0.0 if exact else tolerance.atol_for(scale)
    rtol = 0.0 if exact else tolerance.rtol
    over = diff > atol + rtol * np.abs(np.where(np.isfinite(r), r, 0.0))
    significant = np.abs(r) > atol
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = float((diff[significant] / np.abs(r[significant])).max()) if significant.any() else 0.0
    max_abs = float(diff.max())
    worst = [int(i) for i in np.unravel_index(int(np.argmax(diff)), diff.shape)] if diff.ndim else []
    nans = int(np.isnan(r).sum())
    if nans == r.size:  # NaN everywhere in both: nothing was compared, and no healthy model outputs that
        return Comparison.failure(input, output, "the reference output is NaN everywhere: nothing to compare")
    note = f"{nans} of {r.size} reference elements are NaN" if nans else ""
    return Comparison(input, output, not bool(over.any()), max_abs, max_abs / scale if scale > 0 else max_abs,
                      rel, float(diff.mean()), float(over.mean()), worst, scale, atol, note=note)


def compare_outputs(input: str, reference: Any, candidate: Any, tolerance: Tolerance,
                    names: Sequence[str] | None = None) -> list[Comparison]:
    """Compare every tensor of two (nested) model outputs, one Comparison each.

    Raises:
        InputError: the two return different numbers of tensors.
    """
    refs, cands = list(iter_tensors(reference)), list(iter_tensors(candidate))
    if len(refs) != len(cands):
        raise InputError(f"{input}: the candidate returns {len(cands)} tensors, the reference {len(refs)}")
    names = list(names) if names is not None else (["output"] if len(refs) == 1 else
                                                   [f"output_{i}" for i in range(len(refs))])
    return [compare_arrays(input, n, r, c, tolerance) for n, r, c in zip(names, refs, cands)]


def combine(comparisons: Sequence[Comparison], output: str = "all") -> Comparison:
    """One Comparison for several outputs of one input: worst figures, passed only if all passed."""
    if len(comparisons) == 1:
        return comparisons[0]
    worst = max(comparisons, key=lambda c: c.max_abs, default=None)
    return Comparison(
        comparisons[0].input if comparisons else "", output, all(comparisons),
        _max(c.max_abs for c in comparisons), _max(c.max_abs_over_scale for c in comparisons),
        _max(c.max_rel_elementwise for c in comparisons), _max(c.mean_abs for c in comparisons),
        _max(c.mismatched_fraction for c in comparisons), worst.worst_index if worst else [],
        _max(c.scale for c in comparisons), worst.threshold if worst else 0.0,
        "; ".join(c.note for c in comparisons if c.note))


def random_like(inputs: Sequence[Any], generator) -> tuple[Any, ...]:
    """Random inputs shaped like the example, on its device: standard-normal floats (drawn on the CPU, so a seed
    gives the same inputs on every device); integer inputs are kept as they are."""
    import torch

    out = []
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            out.append(torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device, x.dtype))
        else:
            out.append(x)
    return tuple(out)


def numpy_generator(seed: int) -> np.random.Generator:
    """numpy's generator for any whole-number seed (numpy takes none below 0: -1 is read as 2**64 - 1)."""
    return np.random.default_rng(seed % 2**64)


def random_array(rng, shape, dtype) -> np.ndarray:
    """A numpy input of `shape` and `dtype` from numpy generator `rng`: standard-normal floats (drawn in float32
    and cast, as `random_like` draws them); booleans all True (a mask that keeps everything: a random one may mask
    a whole row, whose softmax is NaN in the original too); other dtypes 0 or 1. No torch: an ONNX file's check
    draws these."""
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.floating) or "float" in dtype.name:  # bfloat16 (ml_dtypes) is no numpy float
        return rng.standard_normal(tuple(shape), dtype=np.float32).astype(dtype)
    if dtype == np.bool_:
        return np.ones(tuple(shape), dtype)
    return rng.integers(0, 2, tuple(shape)).astype(dtype)


def check_samples(samples: int) -> None:
    """`samples`, the number of random inputs checked besides the example: a whole number, 0 or more."""
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
        raise InputError(f"{param('samples')} {samples!r}: must be a whole number ≥ 0 (random inputs besides "
                         "the example)", param="samples")


def random_stream(seed: int):
    """The generator of random check inputs for `seed` (RANDOM_STREAM apart from an example made with it)."""
    import torch

    return torch.Generator().manual_seed(seed + RANDOM_STREAM)


class Float64Reference:
    """A model run in float64, copied on first use (the copy doubles the model's memory), on the model's device,
    or on the CPU where that device has no float64 (MPS).

    Side effects: none on `model`; the copy is in eval mode.
    """

    def __init__(self, model):
        self.model, self.copy, self.device = model, None, None

    def __call__(self, inputs: tuple) -> Any:
        import torch

        from .devices import device_of, float64_device

        if self.copy is None:
            self.device = float64_device(device_of(self.model))
            self.copy = copy.deepcopy(self.model).to(self.device, torch.float64).eval()
        x64 = tuple(x.to(self.device, torch.float64) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                    for x in inputs)
        with torch.no_grad():
            return self.copy(*x64)


class RecordedRuns:
    """A model's outputs on the inputs it already ran, so a later check on the same inputs reuses them instead
    of running the model again (`verify`: the ONNX check reuses the fold check's reference outputs).

    A run is reused only for the same module object, in the same train/eval flags, on tensor inputs equal in
    value, dtype, shape and device to the copies kept at the first run: what it returns is what the model computed
    on exactly those inputs. Inputs that are not all tensors are run and not kept. Call it under `no_grad`.
    """

    def __init__(self) -> None:
        self.runs: list[tuple[Any, tuple[bool, ...], tuple, Any]] = []  # (model, flags, inputs kept, output)
        self.reused = 0

    def __call__(self, model, inputs: Sequence[Any]) -> Any:
        import torch

        if not all(isinstance(x, torch.Tensor) for x in inputs):
            return model(*inputs)
        flags = tuple(m.training for m in model.modules())
        for seen_model, seen_flags, seen_inputs, output in self.runs:
            if seen_model is model and seen_flags == flags and _same_tensors(seen_inputs, inputs):
                self.reused += 1
                return output
        kept = tuple(x.clone() for x in inputs)  # before the forward, which might write into its inputs
        output = model(*inputs)
        self.runs.append((model, flags, kept, output))
        return output


def _same_tensors(a: Sequence[Any], b: Sequence[Any]) -> bool:
    import torch

    return len(a) == len(b) and all((x.dtype, x.shape, x.device) == (y.dtype, y.shape, y.device) and torch.equal(x, y)
                                    for x, y in zip(a, b))
