"""`bntool recalibrate`: re-estimate BatchNorm statistics over calibration data (PyTorch, torchrun, or
an ONNX file in onnxruntime)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer
import typer.core

from ..choices import RecalibrationMode
from ..errors import InputError
from ..options import (
    DataOptions,
    Device,
    Display,
    FileOutput,
    ImagePreprocessing,
    ModelSource,
    grouped,
)
from .app import _Command, app
from .shared import (
    _console,
    _context,
    _left_out,
    _onnx_input,
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
    mode: Annotated[Optional[RecalibrationMode], typer.Option(
        "--mode", show_default=False,
        help="cumulative (exact pooled average, train-mode normalization), ema (as training does) or "
             "exact (eval-mode statistics, batch-size independent); an ONNX file: exact only. "
             "[default: cumulative; exact for an ONNX file]")] = None,
    momentum: Annotated[float, typer.Option("--momentum", help="EMA momentum for --mode ema.")] = 0.1,
    reset: Annotated[bool, typer.Option("--reset/--no-reset", help="--mode ema: start from 0/1 statistics or "
                                                                   "from the current ones.")] = True,
    num_batches: Annotated[Optional[int], typer.Option("--num-batches", help="Use at most this many batches.")] = None,
    num_samples: Annotated[Optional[int], typer.Option("--num-samples", help="Use at most this many samples.")] = None,
    amp: Annotated[bool, typer.Option("--amp", help="Autocast (bfloat16 on CPU, float16 on CUDA).")] = False,
    channels_last: Annotated[bool, typer.Option("--channels-last", help="Run in channels_last memory format.")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed for data order and random choices.")] = 0,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Also draw the per-layer statistics shift "
                                                                "(PNG/SVG/PDF; needs matplotlib).")] = None,
    input_shape: Annotated[Optional[str], typer.Option(
        "--input-shape", help="The model's input shape, e.g. 1,3,64,64: the image size (and channels) for an "
                              "image folder; tensor data must fit it.")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Fail on an unreadable image instead of skipping "
                                                          "it.")] = False,
    prior: Annotated[Optional[float], typer.Option(
        "--prior", help="cumulative/exact: blend with the checkpoint's statistics as N source samples "
                        "(Schneider et al. 2020); helps with few calibration images.")] = None,
    cache_budget: Annotated[Optional[str], typer.Option(
        "--cache-budget", help="--mode exact: memory for cached activations, e.g. 4G, 512M, 0 for none "
                               "(default: half the free memory of the device).")] = None,
) -> None:
    """Re-estimate BatchNorm running statistics over calibration data; only BN layers gather statistics.

    Under torchrun, each process takes its share of the batches, statistics are merged exactly across
    processes, and rank 0 alone writes the output. An ONNX file (by content) needs no --arch: it runs in
    onnxruntime, exact mode, and the statistics are written back into a copy of the file.
    """
    from ..distributed import process_group, rank_device
    from ..options import parse_shape

    if _onnx_input(model):
        given = [flag for flag, on in (("--mode", mode not in (None, RecalibrationMode.EXACT)), ("--amp", amp),
                                       ("--channels-last", channels_last), ("--prior", prior is not None)) if on]
        if given:
            raise InputError(f"{given[0]}: {model.ckpt} is an ONNX file, recalibrated in onnxruntime in exact mode "
                             f"only; drop {given[0]}")
        return _recalibrate_onnx(model, out, data, images, device, display, num_batches=num_batches,
                                 num_samples=num_samples, seed=seed, plot=plot, strict=strict,
                                 input_shape=parse_shape(input_shape) if input_shape else None,
                                 cache_budget=cache_budget)
    mode = mode or RecalibrationMode.CUMULATIVE
    where = str(device.resolve())  # before any work; under torchrun, "cuda" becomes each rank's own GPU
    settings = RecalibrationSettings(mode=mode, momentum=momentum, reset=reset, num_batches=num_batches,
                                     num_samples=num_samples, device=where, amp=amp, channels_last=channels_last,
                                     seed=seed, plot=plot, quiet=display.quiet, strict=strict,
                                     input_shape=parse_shape(input_shape) if input_shape else None,
                                     prior=prior, cache_budget=cache_budget)
    with process_group(where) as rank:
        settings.device = rank_device(where, rank)
        _recalibrate(model, out, data, images, display, settings, rank)


@dataclass
class RecalibrationSettings:
    """The options of `recalibrate` that belong to no group."""

    mode: str
    momentum: float
    reset: bool
    num_batches: int | None
    num_samples: int | None
    device: str
    amp: bool
    channels_last: bool
    seed: int
    plot: Path | None
    quiet: bool
    strict: bool = False
    input_shape: tuple[int, ...] | None = None
    prior: float | None = None
    cache_budget: str | None = None


def _recalibrate(model: ModelSource, out: FileOutput, data: DataOptions, images: ImagePreprocessing,
                 display: Display, settings: RecalibrationSettings, rank) -> None:
    import torch

    from ..checkpoint import write_checkpoint
    from ..files import OutputKind
    from ..recalibration import recalibrate as recalibrate_model
    from ..report import render_recalibrate
    from ..segments import parse_bytes

    outputs = _outputs((model.ckpt, "the input checkpoint"), (data.data, "the --data file"))
    outputs.add(out.output, OutputKind.CHECKPOINT, force=out.force, in_place=out.in_place, what="-o")
    if settings.plot is not None:
        from ..plot import check_can_plot

        outputs.add(settings.plot, OutputKind.PLOT, force=out.force, what="--plot", precheck=check_can_plot)
    outputs.check()
    budget = None if settings.cache_budget is None else parse_bytes(settings.cache_budget)
    torch.manual_seed(settings.seed)
    loaded = model.load()
    _require_eager(loaded, "recalibrate")
    source = data.open(images.image_options(), model=loaded.model, input_shape=settings.input_shape,
                       workers=images.workers, strict=settings.strict, seed=settings.seed, rank=rank.rank,
                       world_size=rank.world_size)
    quiet = settings.quiet or not rank.is_main
    if rank.is_main:
        _tell(display, loaded, source)
    num_samples = settings.num_samples
    total = source.num_samples if num_samples is None else min(num_samples, source.num_samples or num_samples)
    if settings.num_batches is not None and data.data is not None:  # batches of --batch-size from a file or folder
        limit = settings.num_batches * data.batch_size
        total = limit if total is None else min(total, limit)
    progress = _progress(quiet or display.json_output, total)
    with progress as callback:
        report = recalibrate_model(loaded.model, source, mode=settings.mode, momentum=settings.momentum,
                                   reset=settings.reset, num_batches=settings.num_batches, num_samples=num_samples,
                                   device=settings.device, amp=settings.amp, channels_last=settings.channels_last,
                                   prior=settings.prior, cache_budget=budget, progress=callback)
    if source.skipped:
        whose = f"rank {rank.rank}: " if rank.world_size > 1 else ""
        _say(f"warning: {whose}{_skipped_line(source)}")
    if not rank.is_main:
        return
    recalibrated = loaded.model  # recalibrate put it back on its device and in its memory format
    with outputs:
        write_checkpoint(loaded, recalibrated, out.output, lambda writer: outputs.write(out.output, writer))
        if settings.plot is not None:
            from ..plot import plot_recalibration

            outputs.write(settings.plot, lambda tmp: plot_recalibration(report, tmp))
        outputs.commit()
    _wrote(display, report, render_recalibrate, _context(model, source, loaded), out.output,
           _left_out(loaded, out.output), quiet=quiet)


def _recalibrate_onnx(model: ModelSource, out: FileOutput, data: DataOptions, images: ImagePreprocessing,
                      device: Device, display: Display, *, input_shape, cache_budget, seed, plot, strict,
                      **options) -> None:
    """recalibrate on an ONNX file: onnxruntime on the device's provider; an image folder is resized to
    --input-shape, else to the graph's own fixed input size."""
    from ..files import OutputKind, Outputs
    from ..onnx_export import check_provider
    from ..onnx_model import load_onnx, plan_onnx_output, save_onnx
    from ..onnx_recalibration import onnx_input_shape, recalibrate_onnx
    from ..report import render_recalibrate
    from ..segments import parse_bytes

    where = str(device.resolve())
    provider = "cuda" if where.startswith("cuda") else "cpu"
    if where.split(":")[0] not in ("cpu", "cuda"):
        raise InputError(f"--device {where}: an ONNX file runs in onnxruntime, on cpu or cuda")
    check_provider(provider)
    budget = None if cache_budget is None else parse_bytes(cache_budget, "--cache-budget")
    onnx_file = load_onnx(model.ckpt)
    outputs = Outputs()
    plan_onnx_output(outputs, out.output, onnx_file, force=out.force)
    if plot is not None:
        from ..plot import check_can_plot

        outputs.add(plot, OutputKind.PLOT, force=out.force, what="--plot", precheck=check_can_plot)
    outputs.check()
    shape = input_shape
    if shape is None and data.data is not None and data.data.is_dir():  # the image size the graph fixes, if any
        shape = onnx_input_shape(onnx_file.model)
    source = data.open(images.image_options(), input_shape=shape, workers=images.workers, strict=strict, seed=seed)
    _tell(display, None, source)
    total, limit = source.num_samples, options["num_samples"]
    if options["num_batches"] is not None and data.data is not None:  # batches of --batch-size
        limit = min(limit or options["num_batches"] * data.batch_size, options["num_batches"] * data.batch_size)
    total = limit if total is None else min(total, limit or total)
    with _progress(display.quiet or display.json_output, total) as callback:
        recalibrated, report = recalibrate_onnx(onnx_file, source, provider=provider, cache_budget=budget,
                                                progress=callback, **options)
    if source.skipped:
        _say(f"warning: {_skipped_line(source)}")
    with outputs:
        save_onnx(recalibrated, out.output, outputs, onnx_file)
        if plot is not None:
            from ..plot import plot_recalibration

            outputs.write(plot, lambda tmp: plot_recalibration(report, tmp))
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
