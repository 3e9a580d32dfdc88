"""`bntool export-onnx`: export to ONNX (BatchNorm folded first) and check it in onnxruntime."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
import typer.core

from ..choices import Exporter, Provider
from ..errors import CheckFailed, InputError
from ..options import (
    DataOptions,
    Device,
    Display,
    ExampleInputs,
    FileOutput,
    ImagePreprocessing,
    ModelSource,
    Tolerances,
    grouped,
)
from .app import ExporterOption, NumCheckBatches, Samples, _Command, app
from .shared import (
    _context,
    _require_eager,
    _show,
    _tell,
    _warn_skipped,
)


@app.command("export-onnx", cls=_Command)
@grouped(batch_size=8)
def export_onnx(
    model: ModelSource,
    out: FileOutput,
    example: ExampleInputs,
    data: DataOptions,
    images: ImagePreprocessing,
    tolerances: Tolerances,
    device: Device,
    display: Display,
    fold: Annotated[bool, typer.Option("--fold/--no-fold", help="Fold BatchNorm before exporting.")] = True,
    exporter: ExporterOption = Exporter.AUTO,
    opset: Annotated[Optional[int], typer.Option("--opset", help="ONNX opset (default: the exporter's).")] = None,
    dynamic_batch: Annotated[bool, typer.Option(
        "--dynamic-batch", help="Make axis 0 of inputs and outputs dynamic; checked at several batch sizes.")] = False,
    input_name: Annotated[Optional[list[str]], typer.Option("--input-name", help="Input names, one per input.")] = None,
    output_name: Annotated[Optional[list[str]], typer.Option("--output-name", help="Output names.")] = None,
    samples: Samples = 4,
    num_batches: NumCheckBatches = 4,
    provider: Annotated[Provider, typer.Option("--provider", help="onnxruntime provider: cpu or cuda.")] = Provider.CPU,
    keep_failed: Annotated[bool, typer.Option(
        "--keep-failed", help="Keep a file that fails the check, as NAME.FAILED.onnx (never at -o).")] = False,
    strict: Annotated[bool, typer.Option("--strict", hidden=True, help="No effect: a file that fails the check is "
                                                                       "never left at -o.")] = False,
) -> None:
    """Export to ONNX (BatchNorm folded first) and prove it matches PyTorch with onnxruntime.

    --rtol/--atol: an element passes when |Δ| ≤ atol + rtol·|PyTorch's|; by default rtol 1e-4 and atol 1e-4 of
    each output's largest magnitude (a float16 model: atol 5e-2 of it).
    """
    from ..files import failed_name
    from ..onnx_export import check_provider, needs_external_data, plan_outputs
    from ..onnx_export import export_onnx as export_model
    from ..onnx_model import is_onnx_file
    from ..report import render_export

    if is_onnx_file(model.ckpt):
        raise InputError(f"{model.ckpt}: is already an ONNX file; to fold its BatchNorm nodes run "
                         f"`bntool fold {model.ckpt} -o folded.onnx`")
    protect = [p for p in (model.ckpt, data.data) if p is not None]
    check_provider(provider)
    plan_outputs(out.output, False, out.force, keep_failed, protect)  # before loading
    where = device.resolve()
    loaded = model.load()
    if needs_external_data(loaded.model):  # its .onnx.data files are outputs too
        plan_outputs(out.output, True, out.force, keep_failed, protect)
    if loaded.kind == "torchscript" and fold:
        _require_eager(loaded, "export-onnx with folding (use --no-fold)")
    inputs = example.build(loaded.model, notes=loaded.notes)
    batches, source = data.batches(num_batches, inputs[0], model=loaded.model, image=images.image_options(),
                                   workers=images.workers, fixed_batch=not dynamic_batch)
    _warn_skipped(source)
    _tell(display, loaded, source)
    context = _context(model, source, loaded)
    try:
        report = export_model(
            loaded.model, inputs, out.output, fold=fold, exporter=exporter, opset=opset, dynamic_batch=dynamic_batch,
            input_names=input_name, output_names=output_name, samples=samples, seed=example.seed, data=batches,
            rtol=tolerances.rtol, atol=tolerances.atol, provider=provider,
            failed_path=failed_name(out.output) if keep_failed else None, device=where)
    except CheckFailed as e:
        if e.report is not None:
            _show(e.report, display, render_export, context)
        raise
    _show(report, display, render_export, context)
