"""`bntool inspect`: every BatchNorm layer, its statistics and health, and what fold would do."""

from __future__ import annotations

from typing import Annotated

import typer
import typer.core

from ..options import (
    Device,
    Display,
    ExampleInputs,
    ModelSource,
    grouped,
)
from .app import _Command, app
from .shared import (
    _context,
    _input_shapes,
    _onnx_input,
    _onnx_provider,
    _say,
    _show,
    _tell,
)


@app.command(cls=_Command)
@grouped()
def inspect(
    model: ModelSource,
    example: ExampleInputs,
    device: Device,
    display: Display,
    wide: Annotated[bool, typer.Option("--wide", help="Every column (statistics, γ/β, eps, momentum, tracked "
                                                      "batches), not the view that fits the terminal.")] = False,
) -> None:
    """Show every BatchNorm layer, its statistics and health; with --input-shape, what `fold` would do.

    An ONNX file (by content) needs no --arch: every BatchNormalization node and what fold would do."""
    from ..report import render_inspect

    if _onnx_input(model):
        from ..onnx_fold import inspect_onnx

        _onnx_provider(device, example)  # refused as for a checkpoint; its shapes run on the CPU

        report = inspect_onnx(model.ckpt, _input_shapes(example))
        return _show(report, display, render_inspect, _context(model), wide=wide)
    from ..inspection import inspect as inspect_model

    where = device.resolve()
    loaded = model.load()
    inputs = None
    if loaded.kind != "torchscript":  # with --input-shape (or a timm model's own size), what fold would do
        inputs = example.build(loaded.model, required=False, notes=loaded.notes)
    _tell(display, loaded)
    report = inspect_model(loaded.model, inputs, device=where)
    _show(report, display, render_inspect, _context(model, loaded=loaded), wide=wide)
    if display.quiet and not display.json_output:
        from ..report import few_updates_warning

        warning = few_updates_warning(report)
        if warning:
            _say(f"warning: {warning}")
