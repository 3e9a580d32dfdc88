"""`bntool fold`: fold BatchNorm into its neighbours, check, write (a PyTorch checkpoint or an ONNX file)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
import typer.core

from ..choices import AffineAs
from ..errors import CheckFailed, InputError
from ..options import (
    Device,
    Display,
    ExampleInputs,
    FileOutput,
    ModelSource,
    Tolerances,
    grouped,
)
from .app import _Command, app
from .shared import (
    _context,
    _input_shapes,
    _left_out,
    _onnx_input,
    _onnx_provider,
    _outputs,
    _refuse_onnx_name,
    _require_eager,
    _show,
    _tell,
    _wrote,
)


@app.command(cls=_Command)
@grouped()
def fold(
    model: ModelSource,
    out: FileOutput,
    example: ExampleInputs,
    tolerances: Tolerances,
    device: Device,
    display: Display,
    samples: Annotated[int, typer.Option("--samples", help="Random inputs checked besides the example.")] = 4,
    skip: Annotated[Optional[list[str]], typer.Option("--skip", help="BN layer names or glob patterns to leave as "
                                                                      "they are; repeatable.")] = None,
    keep_extra: Annotated[bool, typer.Option(
        "--keep-extra", help="Keep a training checkpoint's optimizer/scheduler state (dropped by default: it "
                             "refers to parameters the fold removes, so resuming from it fails).")] = False,
    merge: Annotated[bool, typer.Option(
        "--merge/--no-merge", help="After folding, merge summed linear branches that read one tensor (RepVGG, "
                                   "MobileOne, ACNet, DBB blocks) into one conv where exact.")] = True,
    affine_as: Annotated[Optional[AffineAs], typer.Option(
        "--affine-as", help="ONNX files: a BN that folds into no neighbour becomes a depthwise 1x1 Conv (conv), "
                            "Mul+Add (mul), or by default (auto) the Conv on a float32 tensor of rank 3-5 (as "
                            "onnxruntime runs a BN there) and Mul+Add elsewhere.")] = None,
) -> None:
    """Fold each BatchNorm into the conv/linear next to it; check against the original; write the result.

    The output is the same kind of file as the input. A folded state_dict loads with
    bntool.load_model(path, arch=...) (its structure differs from --arch). An ONNX file (by content) needs no
    --arch; it is checked in onnxruntime against the original.
    """
    if _onnx_input(model):  # before the PyTorch path's imports: an ONNX file's fold imports no torch module
        return _fold_onnx(model, out, example, tolerances, display, samples, skip, affine_as or AffineAs.AUTO,
                          merge, _onnx_provider(device, example))
    from ..checkpoint import write_checkpoint
    from ..files import OutputKind
    from ..folding import fold as fold_model
    from ..report import render_fold

    if model.ckpt.exists():  # a missing input is named by the loader, not blamed on -o
        _refuse_onnx_name(out.output, "fold writes a PyTorch checkpoint for a PyTorch input; bntool export-onnx "
                                      "writes ONNX")
    if affine_as is not None:
        raise InputError("--affine-as: applies to ONNX files only (a PyTorch fold keeps an affine as a module)")
    outputs = _outputs((model.ckpt, "the input checkpoint"))
    outputs.add(out.output, OutputKind.CHECKPOINT, force=out.force, in_place=out.in_place, what="-o")
    outputs.check()
    where = device.resolve()
    loaded = model.load()
    _require_eager(loaded, "fold")
    inputs = example.build(loaded.model, notes=loaded.notes)
    _tell(display, loaded)
    try:
        folded, report = fold_model(loaded.model, inputs, samples=samples, seed=example.seed, rtol=tolerances.rtol,
                                    atol=tolerances.atol, skip=skip or (), device=where, merge=merge)
    except CheckFailed as e:
        if e.report is not None:
            _show(e.report, display, render_fold, _context(model, loaded=loaded))
        raise CheckFailed(f"{e.message}; nothing written", report=e.report) from e
    with outputs:
        write_checkpoint(loaded, folded, out.output, lambda writer: outputs.write(out.output, writer),
                         keep_training_state=keep_extra)
        outputs.commit()
    _wrote(display, report, render_fold, _context(model, loaded=loaded), out.output,
           _left_out(loaded, out.output, keep_training_state=keep_extra))


def _fold_onnx(model, out, example, tolerances, display, samples, skip, affine_as, merge, provider) -> None:
    from ..onnx_fold import fold_onnx
    from ..report import render_fold

    if out.output.suffix.lower() in (".pt", ".pth", ".bin", ".safetensors", ".ckpt"):
        raise InputError(f"-o {out.output}: a PyTorch checkpoint name for the folded ONNX file; name it .onnx")
    context = _context(model)
    try:
        report = fold_onnx(model.ckpt, out.output, input_shapes=_input_shapes(example), samples=samples,
                           seed=example.seed, rtol=tolerances.rtol, atol=tolerances.atol, skip=skip or (),
                           affine_as=affine_as.value, force=out.force, in_place=out.in_place,
                           merge=merge, provider=provider)
    except CheckFailed as e:
        if e.report is not None:
            _show(e.report, display, render_fold, context)
        raise
    _wrote(display, report, render_fold, context, out.output, [])
