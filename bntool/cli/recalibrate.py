"""`bntool recalibrate`: re-estimate BatchNorm statistics over calibration data (PyTorch, torchrun, or
an ONNX file in onnxruntime)."""

from __future__ import annotations

import sys

from ..errors import InputError
from ..options import (
    DataOptions,
    Device,
    Display,
    FileOutput,
    ImagePreprocessing,
    ModelSource,
    RecalibrationOptions,
    grouped,
)
from .app import _Command, app
from .shared import (
    _console,
    _context,
    _left_out,
    _onnx_input,
    _onnx_provider,
    _outputs,
    _require_eager,
    _say,
    _skipped_line,
    _tell,
    _wrote,
)


@app.command(cls=_Command)
@grouped()
def recalibrate(
    model: ModelSource,
    out: FileOutput,
    data: DataOptions,
    images: ImagePreprocessing,
    device: Device,
    display: Display,
    options: RecalibrationOptions,
) -> None:
    """Re-estimate BatchNorm running statistics over calibration data; only BN layers gather statistics.

    Under torchrun, each process takes its share of the batches, statistics are merged exactly across
    processes, and rank 0 alone writes the output. An ONNX file (by content) needs no --arch: it runs in
    onnxruntime, exact mode, and the statistics are written back into a copy of the file.
    """
    from ..distributed import process_group, rank_device

    if _onnx_input(model):
        given = options.torch_only_flags()
        if given:
            raise InputError(f"{given[0]}: {model.ckpt} is an ONNX file, recalibrated in onnxruntime in exact mode "
                             f"only; drop {given[0]}")
        return _recalibrate_onnx(model, out, data, images, device, display, options, options.shape())
    where = str(device.resolve())  # before any work; under torchrun, "cuda" becomes each rank's own GPU
    shape = options.shape()
    with process_group(where) as rank:
        _recalibrate(model, out, data, images, display, options, shape, rank_device(where, rank), rank)


def _recalibrate(model: ModelSource, out: FileOutput, data: DataOptions, images: ImagePreprocessing,
                 display: Display, options: RecalibrationOptions, shape: tuple[int, ...] | None, device: str,
                 rank) -> None:
    import torch

    from ..checkpoint import write_checkpoint
    from ..files import OutputKind
    from ..recalibration import recalibrate as recalibrate_model
    from ..report import render_recalibrate

    outputs = _outputs((model.ckpt, "the input checkpoint"), (data.data, "the --data file"))
    outputs.add(out.output, OutputKind.CHECKPOINT, force=out.force, in_place=out.in_place, what="-o")
    if options.plot is not None:
        from ..plot import check_can_plot

        outputs.add(options.plot, OutputKind.PLOT, force=out.force, what="--plot", precheck=check_can_plot)
    outputs.check()
    settings = options.torch_options()  # --cache-budget parsed here, after the outputs
    torch.manual_seed(options.seed)
    loaded = model.load()
    _require_eager(loaded, "recalibrate")
    source = data.open(images.image_options(), model=loaded.model, input_shape=shape, workers=images.workers,
                       strict=options.strict, seed=options.seed, rank=rank.rank, world_size=rank.world_size)
    quiet = display.quiet or not rank.is_main
    if rank.is_main:
        _tell(display, loaded, source)
    num_samples = options.num_samples
    total = source.num_samples if num_samples is None else min(num_samples, source.num_samples or num_samples)
    if options.num_batches is not None and data.data is not None:  # batches of --batch-size from a file or folder
        limit = options.num_batches * data.batch_size
        total = limit if total is None else min(total, limit)
    progress = _progress(quiet or display.json_output, total)
    with progress as callback:
        report = recalibrate_model(loaded.model, source, **settings, device=device, progress=callback)
    if source.skipped:
        whose = f"rank {rank.rank}: " if rank.world_size > 1 else ""
        _say(f"warning: {whose}{_skipped_line(source)}")
    if not rank.is_main:
        return
    recalibrated = loaded.model  # recalibrate put it back on its device and in its memory format
    with outputs:
        write_checkpoint(loaded, recalibrated, out.output, lambda writer: outputs.write(out.output, writer))
        if options.plot is not None:
            from ..plot import plot_recalibration

            outputs.write(options.plot, lambda tmp: plot_recalibration(report, tmp))
        outputs.commit()
    _wrote(display, report, render_recalibrate, _context(model, source, loaded), out.output,
           _left_out(loaded, out.output), quiet=quiet)


def _recalibrate_onnx(model: ModelSource, out: FileOutput, data: DataOptions, images: ImagePreprocessing,
                      device: Device, display: Display, options: RecalibrationOptions,
                      input_shape: tuple[int, ...] | None) -> None:
    """recalibrate on an ONNX file: onnxruntime on the device's provider; an image folder is resized to
    --input-shape, else to the graph's own fixed input size."""
    from ..files import OutputKind, Outputs
    from ..onnx_model import load_onnx
    from ..onnx_recalibration import onnx_input_shape, recalibrate_onnx
    from ..onnx_save import plan_onnx_output, save_onnx
    from ..report import render_recalibrate

    provider = _onnx_provider(device)
    budget = options.budget()
    onnx_file = load_onnx(model.ckpt)
    outputs = Outputs()
    plan_onnx_output(outputs, out.output, onnx_file, force=out.force, in_place=out.in_place)
    if options.plot is not None:
        from ..plot import check_can_plot

        outputs.add(options.plot, OutputKind.PLOT, force=out.force, what="--plot", precheck=check_can_plot)
    outputs.check()
    shape = input_shape
    if shape is None and data.data is not None and data.data.is_dir():  # the image size the graph fixes, if any
        shape = onnx_input_shape(onnx_file.model)
    source = data.open(images.image_options(), input_shape=shape, workers=images.workers, strict=options.strict,
                       seed=options.seed)
    _tell(display, None, source)
    total, limit = source.num_samples, options.num_samples
    if options.num_batches is not None and data.data is not None:  # batches of --batch-size
        limit = min(limit or options.num_batches * data.batch_size, options.num_batches * data.batch_size)
    total = limit if total is None else min(total, limit or total)
    with _progress(display.quiet or display.json_output, total) as callback:
        recalibrated, report = recalibrate_onnx(onnx_file, source, provider=provider, cache_budget=budget,
                                                progress=callback, num_batches=options.num_batches,
                                                num_samples=options.num_samples, shared_arena=True)  # our process
    if source.skipped:
        _say(f"warning: {_skipped_line(source)}")
    with outputs:
        save_onnx(recalibrated, out.output, outputs, onnx_file)
        if options.plot is not None:
            from ..plot import plot_recalibration

            outputs.write(options.plot, lambda tmp: plot_recalibration(report, tmp))
        outputs.commit()
    _wrote(display, report, render_recalibrate, _context(model, source), out.output, [], quiet=display.quiet)


class _progress:
    """The recalibration progress bar on stderr (bntool.report.RecalibrationProgress), or nothing."""

    def __init__(self, disabled: bool, total: int | None):
        self.disabled, self.total = disabled, total
        self.bar = None

    def __enter__(self):
        if self.disabled or not sys.stderr.isatty():  # in a log the bar is noise and leaves a blank line
            return None
        from ..report import RecalibrationProgress

        self.bar = RecalibrationProgress(_console(stderr=True), self.total).__enter__()
        return self.bar

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
        return False
