"""The fold math: pure float64 functions from arrays to arrays, touching no module (like torch's
`fuse_conv_bn_weights`), so a PyTorch model and an ONNX graph fold with the same rules, written once.

An eval-mode BN is y = (x - μ)·γ/√(σ²+ε) + β = x·s + t per channel. Folded into the layer that produces x:
    W'[o] = W[o]·s[o]        b'[o] = b[o]·s[o] + t[o]
and into a layer that consumes y (no zero padding in between, so every input element is a BN output):
    W'[:, i] = W[:, i]·s[i]  b' = b + Σ_i,k W[:, i, k]·t[i]
Every function takes any float dtype and returns float64; the caller casts once (`cast_flushing_subnormals`).

The fold functions take torch tensors (the PyTorch path) or numpy arrays (the ONNX path, which then never
imports torch): they use only what both offer, and the few operations spelled differently go through `_ops`.
Elementwise results are bit-identical either way (IEEE float64); a sum over many terms (the consumer fold's
bias) is added in each library's own order, so the two can differ in the last bits of a float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

Array = Any  # a torch.Tensor or a numpy.ndarray: the fold functions return the kind they are given

_NUMPY = SimpleNamespace(
    float64=lambda a: np.asarray(a, dtype=np.float64),
    rsqrt=lambda a: 1.0 / np.sqrt(a),  # == torch.rsqrt in float64: one rounded sqrt, one rounded division
    sqrt=np.sqrt,
    isfinite=np.isfinite,
    index=lambda like, values, dtype: np.asarray(values, dtype=np.int64 if dtype == "long" else np.bool_),
    zeros=lambda like, n: np.zeros(n, dtype=np.float64),
    where=np.where,
)


def _ops(a: Array) -> SimpleNamespace:
    """The operations the math spells differently in numpy and torch, for `a`'s library."""
    if isinstance(a, np.ndarray):
        return _NUMPY
    import torch

    return SimpleNamespace(
        float64=lambda t: t.detach().to(torch.float64),
        rsqrt=torch.rsqrt,
        sqrt=torch.sqrt,
        isfinite=torch.isfinite,
        index=lambda like, values, dtype: torch.tensor(values, dtype=torch.long if dtype == "long" else torch.bool,
                                                       device=like.device),
        zeros=lambda like, n: torch.zeros(n, dtype=torch.float64, device=like.device),
        where=torch.where,
    )


def float64(t: Array) -> Array:
    return _ops(t).float64(t)


def bn_scale_shift(mean: Array, var: Array, weight: Array | None, bias: Array | None, eps: float
                   ) -> tuple[Array, Array]:
    """(scale, shift) in float64 with F.batch_norm(x, mean, var, weight, bias, False, _, eps) == x·scale + shift.

    Args:
        mean, var: the running statistics, one value per channel.
        weight, bias: γ and β, or None where the BN has no affine (γ = 1, β = 0).
        eps: added to var before the square root.
    """
    mean, var = float64(mean), float64(var)
    scale = _ops(var).rsqrt(var + eps)
    if weight is not None:
        scale = scale * float64(weight)
    shift = -mean * scale
    if bias is not None:
        shift = shift + float64(bias)
    return scale, shift


def mean_in_stds(mean: Array, var: Array, eps: float) -> float:
    """max |μ| / √(σ² + ε): how far statistics sit from zero, in standard deviations. A number that decisions
    compare with a threshold, so computed in numpy for both kinds of input: torch's vectorized float64 division
    can differ from numpy's in the last bit, and a PyTorch model and its ONNX file must decide alike."""
    mean, var = numpy64(mean), numpy64(var)
    return float((np.abs(mean) / np.sqrt(var + eps)).max()) if mean.size else 0.0


def numpy64(a: Array) -> np.ndarray:
    """A tensor (any device and dtype, bfloat16 included) or array as a float64 numpy array."""
    if isinstance(a, np.ndarray):
        return a.astype(np.float64, copy=False)
    return a.detach().cpu().double().numpy()


def statistics_problem(mean: Array, var: Array, weight: Array | None, bias: Array | None, eps: float) -> str:
    """Why these BN tensors cannot be folded ("" where they can): NaN/Inf anywhere, or σ² + ε ≤ 0."""
    tensors = [mean, var] + [t for t in (weight, bias) if t is not None]
    if any(not _ops(t).isfinite(t).all() for t in tensors):
        return "statistics or affine parameters contain NaN/Inf"
    if (float64(var) + float(eps) <= 0).any():
        return "running_var + eps <= 0"
    return ""


def select_channels(scale: Array, shift: Array, channels: list[int], takes_shift: list[bool]
                    ) -> tuple[Array, Array | None]:
    """The BN's scale and shift in a target layer's channel order (`channels[c]`: the BN channel of the layer's
    channel c); the shift only where `takes_shift[c]` (the terms of a sum share one shift), None where no
    channel takes it."""
    ops = _ops(scale)
    idx = ops.index(scale, channels, "long")
    if not any(takes_shift):
        return scale[idx], None
    mask = ops.index(scale, takes_shift, "bool")
    return scale[idx], ops.where(mask, shift[idx], ops.zeros(scale, len(channels)))


def fold_into_producer(weight: Array, bias: Array | None, scale: Array, shift: Array | None, *, groups: int = 1,
                       transposed: bool = False) -> tuple[Array, Array | None]:
    """layer(x)·scale + shift per output channel, as the layer's new (weight, bias) in float64.

    Args:
        weight: conv (out, in/groups, *k), linear (out, in), or transposed conv (in, out/groups, *k).
        bias: the layer's bias, or None.
        scale, shift: per output channel; `shift` None: scale only (another term of a sum takes the shift).
        groups: the conv's groups (depthwise: groups == channels).
        transposed: `weight` is a transposed conv's, whose output channel g·(out/groups)+j sits in dim 1.

    Returns:
        (weight, bias): bias None only where both `bias` and `shift` are None.
    """
    w = float64(weight)
    if transposed:
        grouped = w.reshape(groups, w.shape[0] // groups, w.shape[1], *w.shape[2:])
        new_w = (grouped * scale.reshape(groups, 1, w.shape[1], *[1] * (w.ndim - 2))).reshape(w.shape)
    else:
        new_w = w * scale.reshape(-1, *[1] * (w.ndim - 1))
    if bias is None and shift is None:
        return new_w, None
    b = float64(bias) if bias is not None else _ops(scale).zeros(scale, scale.shape[0])
    return new_w, b * scale + (shift if shift is not None else 0)


def fold_into_consumer(weight: Array, bias: Array | None, scale: Array, shift: Array, *, groups: int = 1
                       ) -> tuple[Array, Array]:
    """layer(x·scale + shift) with scale/shift per input channel, as the layer's new (weight, bias) in float64.

    Args:
        weight: conv (out, in/groups, *k) or linear (out, in). The layer must not zero-pad its input (a
            padded zero would take the shift too).
        bias: the layer's bias, or None (one is returned in any case).
        scale, shift: per input channel.
        groups: the conv's groups.
    """
    w = float64(weight)
    b = float64(bias) if bias is not None else _ops(w).zeros(w, w.shape[0])
    if w.ndim == 2:  # linear
        return w * scale.reshape(1, -1), b + w @ shift
    out, per_group = w.shape[0], w.shape[1]
    grouped = w.reshape(groups, out // groups, per_group, *w.shape[2:])
    ones = [1] * (w.ndim - 2)
    new_w = (grouped * scale.reshape(groups, 1, per_group, *ones)).reshape(w.shape)
    # A constant input t per channel contributes Σ_i,k W[o,i,k]·t[i] to every output (no padding).
    added = (grouped * shift.reshape(groups, 1, per_group, *ones)).sum(axis=tuple(range(2, grouped.ndim))).reshape(out)
    return new_w, b + added


def affine_with_center(scale: Array, shift: Array, mean: Array) -> tuple[Array, Array]:
    """(x - μ)·s + shift' == x·s + shift: the shift of an affine that subtracts the mean first, which keeps full
    precision when μ sits far from zero (x·s + t would cancel two large terms)."""
    return scale, shift + float64(mean) * scale


# ---------------------------------------------------------------- casting and value ranges


def is_subnormal(t: torch.Tensor) -> torch.Tensor:
    """Elementwise: nonzero and below the smallest normal number of t's own (floating) dtype."""
    import torch

    return (t != 0) & (t.abs() < torch.finfo(t.dtype).tiny)


def cast_flushing_subnormals(value: torch.Tensor, dtype: torch.dtype, before: torch.Tensor | None = None
                             ) -> tuple[torch.Tensor, int]:
    """`value` cast once to `dtype`, with the subnormals the fold made set to zero; and how many there were.

    A subnormal is nonzero and below `dtype`'s smallest normal (float32 1.2e-38, float16 6.1e-5): many CPU
    paths and runtimes compute on them several times slower. Only what the fold made subnormal is flushed:
    an element of `before` (the tensor as it was, same shape) that was already subnormal stays.
    """
    import torch

    cast = value.to(dtype)
    if not cast.is_floating_point() or dtype == torch.float64:
        return cast, 0
    made = is_subnormal(cast)
    if before is not None:
        made &= ~is_subnormal(before.to(dtype))
    count = int(made.sum())
    return (cast.masked_fill(made, 0) if count else cast), count


@dataclass(frozen=True)
class ValueRange:
    """The smallest nonzero and the largest magnitude among a fold's values, in float64."""

    smallest: float  # inf where every value is zero
    largest: float

    def subnormal_in(self, dtype: torch.dtype) -> bool:
        """Some nonzero value would be subnormal (or underflow) once cast to `dtype`."""
        import torch

        return self.smallest < torch.finfo(dtype).tiny

    def overflows(self, dtype: torch.dtype) -> bool:
        """Some value would be ±inf once cast to `dtype` (float16 max 65504)."""
        import torch

        return not self.largest <= torch.finfo(dtype).max


def fold_value_range(scale: torch.Tensor, shift: torch.Tensor | None = None, weight: torch.Tensor | None = None,
                     bias: torch.Tensor | None = None) -> ValueRange:
    """The range of values a fold would write, for a check before folding (inspect's subnormal/overflow flags).

    Args:
        scale, shift: the BN's (from `bn_scale_shift`), per channel.
        weight, bias: the producer layer's (out channels first, as a conv or linear weight); without them, the
            range of the scale and shift themselves (what an affine replacement holds).

    Returns:
        ValueRange over W·s (or s) and b·s + t (or t); NaN-free inputs assumed.
    """
    import torch

    if weight is not None:
        w, b = fold_into_producer(weight, bias, float64(scale), None if shift is None else float64(shift))
        values = [w.flatten()] + ([b] if b is not None else [])
    else:
        values = [float64(scale).flatten()] + ([float64(shift).flatten()] if shift is not None else [])
    flat = torch.cat(values).abs()
    nonzero = flat[flat != 0]
    smallest = float(nonzero.min()) if nonzero.numel() else float("inf")
    largest = float(flat.max()) if flat.numel() else 0.0
    return ValueRange(smallest, largest)
