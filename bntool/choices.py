"""The named choices of the library's parameters, as str Enums importable without torch (the CLI offers them).

Each member equals its string, so `mode="exact"` and `mode=RecalibrationMode.EXACT` are the same argument.
"""

from __future__ import annotations

from .utils import StrEnum


class RecalibrationMode(StrEnum):
    """How `recalibrate` estimates statistics (see bntool.recalibration)."""

    CUMULATIVE = "cumulative"  # exact pooled average, train-mode normalization
    EMA = "ema"  # exponential moving average, as training does
    EXACT = "exact"  # eval-mode statistics, one pass per BN level, batch-size independent


class Exporter(StrEnum):
    """Which torch.onnx exporter `export_onnx` uses."""

    AUTO = "auto"  # dynamo, falling back to legacy
    DYNAMO = "dynamo"
    LEGACY = "legacy"  # TorchScript-based


class Provider(StrEnum):
    """The onnxruntime execution provider of the ONNX check."""

    CPU = "cpu"
    CUDA = "cuda"


class FoldAction(StrEnum):
    """What `fold` did with one BN."""

    FOLDED = "folded"  # into the layer that feeds it
    FOLDED_FORWARD = "folded-forward"  # into the layer it feeds
    AFFINE = "affine"  # exact per-channel scale and shift, no batch_norm op
    REFUSED = "refused"  # left as it was


class AffineAs(StrEnum):
    """How an ONNX fold writes a BN that folds into no neighbour."""

    AUTO = "auto"  # conv for a float32 4-D (N, C, H, W) input, as onnxruntime itself runs a BN node; else mul
    MUL = "mul"  # a Mul and an Add with per-channel constants
    CONV = "conv"  # one depthwise 1x1 Conv (for backends without broadcasting Mul)


class CheckpointKind(StrEnum):
    """What a checkpoint file held (and how a result is saved back)."""

    STATE_DICT = "state_dict"
    WRAPPED = "wrapped"  # a training checkpoint dict with the state_dict under a key
    MODULE = "module"  # a pickled nn.Module
    TORCHSCRIPT = "torchscript"


class CheckpointFormat(StrEnum):
    """The container format of a checkpoint file."""

    TORCH = "torch"
    SAFETENSORS = "safetensors"
