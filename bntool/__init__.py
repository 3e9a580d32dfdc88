"""bntool: BatchNorm surgery and calibration for PyTorch.

    import bntool
    folded, report = bntool.fold(model, example_input)
    report = bntool.recalibrate(model, batches)
    report = bntool.inspect(model)

Attributes are imported on first use so that the command line starts without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__

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
    "ExportReport": "onnx_export",
    "verify": "verification",
    "VerifyReport": "verification",
    "load_checkpoint": "checkpoint",
    "load_model": "checkpoint",
    "save_checkpoint": "checkpoint",
    "state_dict_of": "checkpoint",
    "Checkpoint": "checkpoint",
    "ChannelAffine": "layers",
    "open_source": "data",
    "ImageOptions": "data",
    "BntoolError": "errors",
    "InputError": "errors",
    "CheckFailed": "errors",
    "UnsupportedError": "errors",
    "UserCodeError": "errors",
    "CorruptFileError": "errors",
}

__all__ = ["__version__", *_EXPORTS]
# Entry points whose arguments are checked against their type hints (utils.checked_arguments): a wrong type is an
# InputError naming the parameter, not a TypeError from deep inside.
_CHECKED = {"inspect", "fold", "plan_fold", "recalibrate", "export_onnx", "verify", "load_checkpoint", "load_model",
            "save_checkpoint", "open_source"}


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
