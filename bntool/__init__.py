"""bntool: BatchNorm surgery and calibration for PyTorch.

    import bntool
    folded, report = bntool.fold(model, example_input)
    report = bntool.recalibrate(model, batches)
    report = bntool.inspect(model)

Attributes are imported on first use so that the command line starts without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:  # what editors and type checkers see; at run time each name is imported on first use
    from .checkpoint import Checkpoint, load_checkpoint, load_model, save_checkpoint, state_dict_of
    from .data import ImageOptions, open_data
    from .errors import (
        BntoolError,
        BrokenStatistics,
        CheckFailed,
        CorruptFileError,
        InputError,
        UnsupportedError,
        UserCodeError,
    )
    from .folding import FoldPlan, FoldReport, fold, plan_fold
    from .inspection import InspectReport, inspect
    from .layers import ChannelAffine
    from .layout import FoldLayout
    from .onnx_export import ExportReport, export_onnx
    from .onnx_fold import fold_onnx, inspect_onnx
    from .onnx_recalibration import recalibrate_onnx, recalibrate_onnx_file
    from .recalibration import RecalibrationReport, recalibrate
    from .verification import verify
    from .verification_onnx import VerifyReport

_EXPORTS = {
    "inspect": "inspection",
    "InspectReport": "inspection",
    "fold": "folding",
    "FoldReport": "folding",
    "plan_fold": "folding",
    "FoldPlan": "folding",
    "FoldLayout": "layout",
    "recalibrate": "recalibration",
    "RecalibrationReport": "recalibration",
    "recalibrate_onnx": "onnx_recalibration",
    "recalibrate_onnx_file": "onnx_recalibration",
    "export_onnx": "onnx_export",
    "fold_onnx": "onnx_fold",
    "inspect_onnx": "onnx_fold",
    "ExportReport": "onnx_export",
    "verify": "verification",
    "VerifyReport": "verification_onnx",
    "load_checkpoint": "checkpoint",
    "load_model": "checkpoint",
    "save_checkpoint": "checkpoint",
    "state_dict_of": "checkpoint",
    "Checkpoint": "checkpoint",
    "ChannelAffine": "layers",
    "open_data": "data",
    "ImageOptions": "data",
    "BntoolError": "errors",
    "InputError": "errors",
    "CheckFailed": "errors",
    "UnsupportedError": "errors",
    "UserCodeError": "errors",
    "CorruptFileError": "errors",
    "BrokenStatistics": "errors",
}

__all__ = [  # literal, so that linters and editors see the names imported under TYPE_CHECKING
    "__version__", "inspect", "InspectReport", "fold", "FoldReport", "plan_fold", "FoldPlan", "FoldLayout",
    "recalibrate", "RecalibrationReport", "recalibrate_onnx", "recalibrate_onnx_file", "export_onnx", "ExportReport",
    "fold_onnx", "inspect_onnx",
    "verify", "VerifyReport", "load_checkpoint", "load_model", "save_checkpoint", "state_dict_of", "Checkpoint",
    "ChannelAffine", "open_data", "ImageOptions", "BntoolError", "InputError", "CheckFailed", "UnsupportedError",
    "UserCodeError", "CorruptFileError", "BrokenStatistics",
]
assert set(__all__) == {"__version__", *_EXPORTS}
# Entry points whose arguments are checked against their type hints (utils.checked_arguments): a wrong type is an
# InputError naming the parameter, not a TypeError from deep inside.
_CHECKED = {"inspect", "fold", "plan_fold", "recalibrate", "recalibrate_onnx", "recalibrate_onnx_file", "export_onnx",
            "verify", "load_checkpoint", "load_model", "save_checkpoint", "open_data"}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        if name in _CHECKED:
            from .utils import checked_arguments

            value = checked_arguments(value)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'bntool' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
