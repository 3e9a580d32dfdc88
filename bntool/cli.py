"""The `bntool` command line: parses options, calls the library, renders the report. Nothing else.

torch and onnx are imported inside the commands so that `bntool --help` stays instant.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer
import typer.core

from ._version import __version__
from .choices import AffineAs, Exporter, Provider, RecalibrationMode
from .errors import BntoolError, CheckFailed, InputError
from .options import (
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


class _Command(typer.core.TyperCommand):
    """Usage lines as man pages write them: `bntool fold [OPTIONS] CKPT` (Typer writes a required
    argument as `{CKPT}`)."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        return [p[1:-1] if p.startswith("{") and p.endswith("}") else p for p in super().collect_usage_pieces(ctx)]


app = typer.Typer(
    name="bntool",
    help="BatchNorm surgery and calibration for PyTorch models: inspect, recalibrate, fold, export-onnx, verify.",
    epilog="Exit codes: 0 success, 1 a check failed, 2 bad usage or input, 3 internal error (rerun with --debug), "
    "130 interrupted.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# ---------------------------------------------------------------- shared options

ExporterOption = Annotated[Exporter, typer.Option("--exporter", help="auto (dynamo, falling back to legacy), dynamo "
                                                                     "or legacy (TorchScript-based).")]
Samples = Annotated[int, typer.Option("--samples", help="Random inputs checked per batch size besides the example.")]
NumCheckBatches = Annotated[int, typer.Option("--num-batches", help="Batches of --data to check.")]


def _version(value: bool) -> None:
    if value:
        print(f"bntool {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Show the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors.")] = False,
) -> None:
    """BatchNorm surgery and calibration for PyTorch models."""


def _console(stderr: bool = False):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # Logs and pipes get wide tables instead of Rich's 80-column default, unless COLUMNS says otherwise.
    columns = os.environ.get("COLUMNS", "")
    width = None if stream.isatty() else (int(columns) if columns.isdigit() and int(columns) > 0 else 160)
    return Console(stderr=stderr, highlight=False, width=width)


_json_printed: list[bool] = []  # a JSON document is on stdout already: an error adds none after it


def _print_json(report, context: dict | None = None) -> None:
    from .report import dumps

    print(dumps(report, context))
    _json_printed.append(True)


def _context(model: ModelSource | None = None, source=None, loaded=None) -> dict:
    """What a JSON report ran on: the checkpoint, the arch, the versions, the data."""
    from .report import versions

    context: dict = {}
    if model is not None:
        context.update(checkpoint=str(model.ckpt), arch=model.arch)
    if loaded is not None and loaded.notes:
        context["notes"] = list(loaded.notes)
    context["versions"] = versions()
    if source is not None:
        context["data"] = source.to_dict()
    return context


def _tell(display: Display, loaded=None, source=None) -> None:
    """Notes, the `data:` line and data warnings with the human output on stdout; with --json or -q only the
    warnings, on stderr (the JSON has them all under "notes" and "data")."""
    notes = getattr(loaded, "notes", None) or []
    warnings = getattr(source, "warnings", None) or []
    if display.json_output or display.quiet:
        for warning in warnings:
            _say(f"warning: {warning}")
        return
    from rich.markup import escape

    console = _console()
    for note in notes:
        console.print(f"note: {note}", markup=False)
    if source is not None:
        console.print(f"data: {source.summary()}", markup=False)
    for warning in warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}")


def _require_eager(ckpt, operation: str) -> None:
    from .errors import UnsupportedError

    if ckpt.kind == "torchscript":
        raise UnsupportedError(f"{ckpt.path}: {operation} is not supported for TorchScript archives; "
                               "pass the state_dict with --arch instead")


def _show(report, display: Display, render: Callable[..., None], context: dict | None = None, **options) -> None:
    """Print a report as JSON (after `context`), or with `render(report, console, **options)`, one of
    bntool.report's renderers (nothing with -q)."""
    if display.json_output:
        _print_json(report, context)
    elif not display.quiet:
        render(report, _console(), **options)


def _outputs(*inputs: tuple[Path | None, str]):
    """The command's outputs, to be planned against these inputs (path, what it is)."""
    from .files import Outputs

    outputs = Outputs()
    for path, what in inputs:
        outputs.add_input(path, what)
    return outputs


# ---------------------------------------------------------------- commands


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
    from .inspection import inspect as inspect_model
    from .report import render_inspect

    if _onnx_input(model):
        from .onnx_fold import inspect_onnx

        report = inspect_onnx(model.ckpt, _input_shapes(example))
        return _show(report, display, render_inspect, _context(model), wide=wide)
    where = device.resolve()
    loaded = model.load()
    inputs = None
    if loaded.kind != "torchscript":  # with --input-shape (or a timm model's own size), what fold would do
        inputs = example.build(loaded.model, required=False, notes=loaded.notes)
    _tell(display, loaded)
    report = inspect_model(loaded.model, inputs, device=where)
    _show(report, display, render_inspect, _context(model, loaded=loaded), wide=wide)
    if display.quiet and not display.json_output:
        from .report import few_updates_warning

        warning = few_updates_warning(report)
        if warning:
            _say(f"warning: {warning}")


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
    affine_as: Annotated[AffineAs, typer.Option(
        "--affine-as", help="ONNX files: a BN that folds into no neighbour becomes Mul+Add (mul) or a depthwise "
                            "1x1 Conv (conv).")] = AffineAs.MUL,
) -> None:
    """Fold each BatchNorm into the conv/linear next to it; check against the original; write the result.

    The output is the same kind of file as the input. A folded state_dict loads with
    bntool.load_model(path, arch=...) (its structure differs from --arch). An ONNX file (by content) needs no
    --arch; it is checked in onnxruntime against the original.
    """
    from .checkpoint import write_checkpoint
    from .files import OutputKind
    from .folding import fold as fold_model
    from .report import render_fold

    if _onnx_input(model):
        return _fold_onnx(model, out, example, tolerances, display, samples, skip, affine_as, merge)
    if model.ckpt.exists():  # a missing input is named by the loader, not blamed on -o
        _refuse_onnx_name(out.output, "fold writes a PyTorch checkpoint for a PyTorch input; bntool export-onnx "
                                      "writes ONNX")
    if affine_as != AffineAs.MUL:
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


def _onnx_input(model: ModelSource) -> bool:
    """Whether the command's input is an ONNX file (by content); an ONNX file takes no --arch/--key."""
    from .onnx_model import is_onnx_file

    if not is_onnx_file(model.ckpt):
        if model.ckpt.suffix.lower() == ".onnx" and model.ckpt.is_file():
            from .files import looks_like_checkpoint

            if not looks_like_checkpoint(model.ckpt):
                raise InputError(f"{model.ckpt}: not an ONNX model (named .onnx, but its content is neither ONNX nor "
                                 "a PyTorch checkpoint)")
        return False
    given = [flag for flag, value in (("--arch", model.arch), ("--arch-kwargs", model.arch_kwargs),
                                      ("--key", model.key)) if value]
    if given:
        raise InputError(f"{given[0]}: {model.ckpt} is an ONNX file, which carries its own graph; drop {given[0]}")
    return True


def _refuse_onnx_name(out: Path, why: str) -> None:
    if out.suffix.lower() == ".onnx":
        raise InputError(f"-o {out}: named .onnx, but {why}")


def _input_shapes(example: ExampleInputs):
    from .options import parse_shape

    return [parse_shape(text) for text in example.input_shape] if example.input_shape else None


def _fold_onnx(model, out, example, tolerances, display, samples, skip, affine_as, merge) -> None:
    from .onnx_fold import fold_onnx
    from .report import render_fold

    if out.output.suffix.lower() in (".pt", ".pth", ".bin", ".safetensors", ".ckpt"):
        raise InputError(f"-o {out.output}: a PyTorch checkpoint name for the folded ONNX file; name it .onnx")
    context = _context(model)
    try:
        report = fold_onnx(model.ckpt, out.output, input_shapes=_input_shapes(example), samples=samples,
                           seed=example.seed, rtol=tolerances.rtol, atol=tolerances.atol, skip=skip or (),
                           affine_as=affine_as.value, force=out.force, in_place=out.in_place,
                           merge=merge)
    except CheckFailed as e:
        if e.report is not None:
            _show(e.report, display, render_fold, context)
        raise
    _wrote(display, report, render_fold, context, out.output, [])


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
    from .distributed import process_group, rank_device
    from .options import parse_shape

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

    from .checkpoint import write_checkpoint
    from .files import OutputKind
    from .recalibration import recalibrate as recalibrate_model
    from .report import render_recalibrate
    from .segments import parse_bytes

    outputs = _outputs((model.ckpt, "the input checkpoint"), (data.data, "the --data file"))
    outputs.add(out.output, OutputKind.CHECKPOINT, force=out.force, in_place=out.in_place, what="-o")
    if settings.plot is not None:
        from .plot import check_can_plot

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
            from .plot import plot_recalibration

            outputs.write(settings.plot, lambda tmp: plot_recalibration(report, tmp))
        outputs.commit()
    _wrote(display, report, render_recalibrate, _context(model, source, loaded), out.output,
           _left_out(loaded, out.output), quiet=quiet)


def _skipped_line(source) -> str:
    from .utils import plural

    return f"skipped {plural(len(source.skipped), 'unreadable image')} (first: {source.skipped[0]})"


def _warn_skipped(source) -> None:
    """Unreadable images met while reading the check data, as a data warning (shown with the others, in JSON)."""
    if source is not None and source.skipped:
        source.warnings.append(_skipped_line(source))


def _recalibrate_onnx(model: ModelSource, out: FileOutput, data: DataOptions, images: ImagePreprocessing,
                      device: Device, display: Display, *, input_shape, cache_budget, seed, plot, strict,
                      **options) -> None:
    """recalibrate on an ONNX file: onnxruntime on the device's provider; an image folder is resized to
    --input-shape, else to the graph's own fixed input size."""
    from .files import OutputKind, Outputs
    from .onnx_export import check_provider
    from .onnx_model import load_onnx, plan_onnx_output, save_onnx
    from .onnx_recalibration import onnx_input_shape, recalibrate_onnx
    from .report import render_recalibrate
    from .segments import parse_bytes

    where = str(device.resolve())
    provider = "cuda" if where.startswith("cuda") else "cpu"
    if where.split(":")[0] not in ("cpu", "cuda"):
        raise InputError(f"--device {where}: an ONNX file runs in onnxruntime, on cpu or cuda")
    check_provider(provider)
    budget = None if cache_budget is None else parse_bytes(cache_budget, "--cache-budget")
    onnx_file = load_onnx(model.ckpt)
    outputs = Outputs()
    plan_onnx_output(outputs, out.output, onnx_file, force=out.force, in_place=out.in_place)
    if plot is not None:
        from .plot import check_can_plot

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
            from .plot import plot_recalibration

            outputs.write(plot, lambda tmp: plot_recalibration(report, tmp))
        outputs.commit()
    _wrote(display, report, render_recalibrate, _context(model, source), out.output, [], quiet=display.quiet)


def _left_out(loaded, out: Path, keep_training_state: bool = True) -> list[str]:
    """What of a training checkpoint the written file does not hold, and why (bntool.checkpoint.write_checkpoint)."""
    from .checkpoint import output_format, training_state_keys
    from .utils import short_list

    if loaded.kind != "wrapped":
        return []
    if output_format(loaded, out) == "safetensors":
        others = [str(k) for k in loaded.container or {} if k != loaded.key]
        return [f"{out} holds the weights only (safetensors stores tensors): the training checkpoint's "
                f"{short_list(others)} are not in it"] if others else []
    dropped = [] if keep_training_state else training_state_keys(loaded)
    return [f"left out {', '.join(dropped)}: optimizer state for parameters the fold removed, so resuming from it "
            "would fail (--keep-extra keeps it)"] if dropped else []


def _wrote(display: Display, report, render: Callable[..., None], context: dict, out: Path, notes: list[str],
           quiet: bool = False) -> None:
    """The report of a command that wrote `out`, with what the file leaves out (also under "notes" in JSON)."""
    context["notes"] = [*context.get("notes", []), *notes]
    _show(report, display, render, context)
    if display.json_output or display.quiet or quiet:
        return
    console = _console()
    for note in notes:
        console.print(f"note: {note}", markup=False)
    console.print(f"Wrote {out}")


class _progress:
    """The recalibration progress bar on stderr (bntool.report.RecalibrationProgress), or nothing."""

    def __init__(self, disabled: bool, total: int | None):
        self.disabled, self.total = disabled, total
        self.bar = None

    def __enter__(self):
        if self.disabled or not sys.stderr.isatty():  # in a log the bar is noise and leaves a blank line
            return None
        from .report import RecalibrationProgress

        self.bar = RecalibrationProgress(_console(stderr=True), self.total).__enter__()
        return self.bar

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
        return False


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
    each output's largest magnitude.
    """
    from .onnx_export import check_provider, plan_outputs
    from .onnx_export import export_onnx as export_model
    from .onnx_model import is_onnx_file
    from .report import render_export

    if is_onnx_file(model.ckpt):
        raise InputError(f"{model.ckpt}: is already an ONNX file; to fold its BatchNorm nodes run "
                         f"`bntool fold {model.ckpt} -o folded.onnx`")
    protect = [p for p in (model.ckpt, data.data) if p is not None]
    check_provider(provider)
    plan_outputs(out.output, False, out.force, keep_failed, protect)  # before loading; the export plans again
    where = device.resolve()
    loaded = model.load()
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
            rtol=tolerances.rtol, atol=tolerances.atol, provider=provider, force=out.force, keep_failed=keep_failed,
            protect=protect, device=where)
    except CheckFailed as e:
        if e.report is not None:
            _show(e.report, display, render_export, context)
        raise
    _show(report, display, render_export, context)


@app.command(cls=_Command)
@grouped(batch_size=8)
def verify(
    model: ModelSource,
    example: ExampleInputs,
    data: DataOptions,
    images: ImagePreprocessing,
    tolerances: Tolerances,
    device: Device,
    display: Display,
    onnx: Annotated[Optional[Path], typer.Option("--onnx", help="Check this ONNX file, not a fresh export.")] = None,
    skip_onnx: Annotated[bool, typer.Option("--skip-onnx", help="Do not check ONNX at all.")] = False,
    exporter: ExporterOption = Exporter.AUTO,
    samples: Samples = 4,
    num_batches: NumCheckBatches = 4,
    onnx_rtol: Annotated[Optional[float], typer.Option("--onnx-rtol", help="ONNX check's --rtol (default "
                                                                           "1e-4).")] = None,
    onnx_atol: Annotated[Optional[float], typer.Option("--onnx-atol", help="ONNX check's --atol (default: 1e-4 "
                                                                           "of the output's largest "
                                                                           "magnitude).")] = None,
    junit_xml: Annotated[Optional[Path], typer.Option(
        "--junit-xml", help="Also write JUnit XML here, also when verify cannot run (an errored test case).")] = None,
    summary_md: Annotated[Optional[Path], typer.Option(
        "--summary-md", help="Also write a Markdown table of the checks here (it is also appended to "
                             "$GITHUB_STEP_SUMMARY when that is set).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing --junit-xml or --summary-md file "
                                                        "that is not an earlier report of its kind (those are "
                                                        "replaced, as pytest's --junitxml does).")] = False,
    reference: Annotated[Optional[Path], typer.Option(
        "--reference", help="ONNX files: the ONNX file this one must match in onnxruntime (e.g. the file before "
                            "a graph rewrite).")] = None,
) -> None:
    """CI checks: BN health, folded vs original, ONNX vs PyTorch. Exit 0 only if all pass, 1 if any fails.

    --rtol/--atol apply to the fold check, --onnx-rtol/--onnx-atol to the ONNX check; both mean: an element
    passes when |Δ| ≤ atol + rtol·|reference|.
    """
    from .report import render_verify
    from .verification import junit_error_xml, markdown_error, to_junit_xml, to_markdown

    outputs = _outputs((model.ckpt, "the input checkpoint"), (data.data, "the --data file"), (onnx, "the --onnx file"),
                       (reference, "the --reference file"))
    _plan_ci_reports(outputs, junit_xml, summary_md, force)
    outputs.check()
    step_summary = os.environ.get("GITHUB_STEP_SUMMARY")
    try:
        if _onnx_input(model):
            report, context = _verify_onnx(model, example, data, tolerances, onnx, reference, samples, onnx_rtol,
                                           onnx_atol)
        else:
            if reference is not None:
                raise InputError("--reference: compares two ONNX files; for a PyTorch checkpoint use --onnx")
            checks = VerifyChecks(tolerances, onnx, skip_onnx, exporter, samples, num_batches, onnx_rtol, onnx_atol)
            report, context = _verify(model, example, data, images, checks, device, display)
    except Exception as e:  # the CI dashboard must say why verify could not run
        message = _one_line(e.render(flag_name) if isinstance(e, BntoolError) else
                            f"internal error: {type(e).__name__}: {e}")
        _write_ci_reports(outputs, junit_xml, junit_error_xml(message), summary_md, step_summary,
                          markdown_error(message))
        raise
    _write_ci_reports(outputs, junit_xml, to_junit_xml(report), summary_md, step_summary, to_markdown(report))
    _show(report, display, render_verify, context)
    if not report.passed:
        failed = ", ".join(c.name for c in report.checks if not c.passed)
        raise CheckFailed(f"verification failed: {failed}")


def _plan_ci_reports(outputs, junit_xml: Path | None, summary_md: Path | None, force: bool) -> None:
    """Plan verify's report files; an earlier report of the same kind (by content) is replaced without --force."""
    from .files import OutputKind, is_junit_xml, is_markdown_report

    if junit_xml is not None:
        outputs.add(junit_xml, OutputKind.REPORT, force=force, what="--junit-xml", same_kind=is_junit_xml)
    if summary_md is not None:
        outputs.add(summary_md, OutputKind.REPORT, force=force, what="--summary-md", same_kind=is_markdown_report)


@dataclass
class VerifyChecks:
    """What verify checks and how closely: its options that belong to no group."""

    tolerances: Tolerances  # the fold check's
    onnx: Path | None  # a file to check instead of a fresh export
    skip_onnx: bool
    exporter: str
    samples: int
    num_batches: int  # of --data, checked besides the random inputs
    onnx_rtol: float | None
    onnx_atol: float | None


def _verify(model: ModelSource, example: ExampleInputs, data: DataOptions, images: ImagePreprocessing,
            checks: VerifyChecks, device: Device, display: Display):
    from .verification import verify as verify_model

    where = device.resolve()
    loaded = model.load()
    _require_eager(loaded, "verify")
    inputs = example.build(loaded.model, notes=loaded.notes)
    batches, source = data.batches(checks.num_batches, inputs[0], model=loaded.model, image=images.image_options(),
                                   workers=images.workers, fixed_batch=checks.onnx is not None)  # a file may be fixed
    _warn_skipped(source)
    _tell(display, loaded, source)
    report = verify_model(
        loaded.model, inputs, onnx_path=checks.onnx, onnx=not checks.skip_onnx, exporter=checks.exporter,
        samples=checks.samples, seed=example.seed, rtol=checks.tolerances.rtol, atol=checks.tolerances.atol,
        onnx_rtol=checks.onnx_rtol, onnx_atol=checks.onnx_atol, data=batches, device=where)
    return report, _context(model, source, loaded)


def _verify_onnx(model, example, data, tolerances, onnx, reference, samples, onnx_rtol, onnx_atol):
    from .onnx_model import is_onnx_file
    from .verification import verify_onnx

    if onnx is not None or data.data is not None or data.loader is not None:
        flag = "--onnx" if onnx is not None else ("--data" if data.data is not None else "--loader")
        raise InputError(f"{flag}: not used when the input is an ONNX file ({model.ckpt}); "
                         "--reference compares it with another ONNX file")
    if reference is not None and not is_onnx_file(reference):
        raise InputError(f"--reference {reference}: not an ONNX file")
    report = verify_onnx(model.ckpt, reference=reference, input_shapes=_input_shapes(example), samples=samples,
                         seed=example.seed, rtol=tolerances.rtol, atol=tolerances.atol, onnx_rtol=onnx_rtol,
                         onnx_atol=onnx_atol)
    return report, _context(model)


def _write_ci_reports(outputs, junit_xml: Path | None, xml: str, summary_md: Path | None,
                      step_summary: str | None, markdown: str) -> None:
    """Commit the planned JUnit and Markdown reports; $GITHUB_STEP_SUMMARY is appended to, as GitHub expects."""
    with outputs:
        if junit_xml is not None:
            outputs.write(junit_xml, lambda tmp: Path(tmp).write_text(xml))
        if summary_md is not None:
            outputs.write(summary_md, lambda tmp: Path(tmp).write_text(markdown))
        outputs.commit()
    if step_summary:
        _append_step_summary(outputs, step_summary, markdown)


def _append_step_summary(outputs, step_summary: str, markdown: str) -> None:
    """Append to $GITHUB_STEP_SUMMARY, an output like any other: never when it is an input, a file of an input
    folder, another output or a checkpoint (a warning says so; the run's verdict stands)."""
    from .files import looks_like_checkpoint

    role = outputs.role_of(step_summary)
    if not role and looks_like_checkpoint(Path(step_summary)):
        role = "a PyTorch checkpoint"
    if role:
        _say(f"warning: $GITHUB_STEP_SUMMARY ({step_summary}) is {role}; the summary is not appended to it")
        return
    try:
        with open(step_summary, "a") as f:
            f.write(markdown + "\n")
    except OSError as e:
        _say(f"warning: cannot append to $GITHUB_STEP_SUMMARY ({step_summary}): {e.strerror or e}")


@app.command(cls=_Command)
@grouped()
def demo(
    display: Display,
    directory: Annotated[Path, typer.Argument(help="Where to write the demo's files.")] = Path("bntool-demo"),
    exporter: ExporterOption = Exporter.AUTO,
    force: Annotated[bool, typer.Option("--force", help="Write into a directory that is not empty, replacing "
                                                        "files from an earlier demo.")] = False,
) -> None:
    """Run inspect → recalibrate → fold → export-onnx → verify on a built-in model and generated data."""
    from .demo import run_demo
    from .report import render_demo

    report = run_demo(directory, force=force, exporter=exporter)
    _show(report, display, render_demo, _context())
    if not report.passed:
        raise CheckFailed("the demo's checks failed; nothing written")


# ---------------------------------------------------------------- entry point


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a CI runner cancelling the job), unwound like Ctrl-C: temp files removed, a commit finished."""


_terminated: list[int] = []  # set by the SIGTERM handler: the exit code and message say "terminated"


def _on_sigterm(signum, frame) -> None:
    _terminated.append(signum)
    raise _Terminated


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the exit code instead of raising (tests call this). SIGTERM unwinds like Ctrl-C
    (exit 143) instead of ending the process where it stands."""
    _terminated.clear()
    if threading.current_thread() is not threading.main_thread():
        return _main(argv)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _main(argv)
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or bool(os.environ.get("BNTOOL_DEBUG"))
    exit_types, abort_types, usage_types = _click_exception_types()
    from .files import forget_committed
    forget_committed()
    _json_printed.clear()
    code = _run(argv, debug, exit_types, abort_types, usage_types)
    if code not in (0, None) and _wants_json(argv) and not _json_printed:
        _print_error_json(argv, code)
    return code


_last_error: list[tuple[str, str]] = []  # (kind, message) of the error just said, for the --json error object


def _run(argv: list[str], debug: bool, exit_types, abort_types, usage_types) -> int:
    _last_error.clear()
    try:
        with warnings.catch_warnings():
            if not debug:  # torch's and the exporters' warnings are for their developers; --debug shows them
                warnings.simplefilter("ignore")
            # Outside standalone mode Typer returns the code of an Exit (Ctrl-C becomes Exit(130)) instead of raising.
            code = app(args=argv, prog_name="bntool", standalone_mode=False)
        if code == 130:
            return _interrupted()
        return code if isinstance(code, int) else 0
    except exit_types as e:
        return e.exit_code
    except abort_types:
        return _interrupted()
    except usage_types as e:
        return _usage_error(e, argv)
    except BntoolError as e:
        if debug:
            traceback.print_exc()
        _say(f"error: {_one_line(e.render(flag_name))}")
        _last_error.append((_error_kind(e), _one_line(e.render(flag_name))))
        return e.exit_code
    except KeyboardInterrupt:
        return _interrupted()
    except Exception as e:
        if debug:
            traceback.print_exc()
        message = f"internal error: {type(e).__name__}: {_one_line(e)} (a bug: rerun with --debug and report it)"
        _say(f"error: {message}")
        _last_error.append(("internal", message))
        return 3


def _wants_json(argv: list[str]) -> bool:
    """--json on the command line (before a `--` that ends the options)."""
    options = argv[:argv.index("--")] if "--" in argv else argv
    return "--json" in options


def _error_kind(e: BaseException) -> str:
    """"input", "user_code", "corrupt_file", "unsupported" or "check_failed": the BntoolError kind, as a word."""
    from .errors import CorruptFileError, UnsupportedError, UserCodeError

    for kind, name in ((CheckFailed, "check_failed"), (CorruptFileError, "corrupt_file"),
                       (UserCodeError, "user_code"), (UnsupportedError, "unsupported")):
        if isinstance(e, kind):
            return name
    return "input"


def _print_error_json(argv: list[str], code: int) -> None:
    """With --json, a command that could not run (or was interrupted) still prints one JSON object on stdout:
    {"error": {"exit_code", "kind", "message"}, "command", "versions"}, so a CI step that parses stdout gets
    JSON. Not when the command already printed its report (a failed check prints its report)."""
    import json

    from .report import versions

    kind, message = _last_error[-1] if _last_error else (
        "interrupted" if code in (130, 143) else "check_failed" if code == 1 else "usage", "")
    error = {"exit_code": code, "kind": kind, "message": message}
    print(json.dumps({"error": error, "command": _command_named(argv), "versions": versions()}, indent=2))


def _interrupted() -> int:
    """Ctrl-C or SIGTERM: say truthfully which files were put in place (a commit is never cut short)."""
    from .files import committed

    what = "terminated (SIGTERM)" if _terminated else "interrupted"
    written = committed()
    if written:
        message = f"{what}: wrote {', '.join(str(p) for p in written)} (complete); nothing else written"
    else:
        message = f"{what}: nothing written"
    _say(message)
    _last_error.append(("interrupted", message))
    return 143 if _terminated else 130


def _usage_error(e, argv: list[str]) -> int:
    """click's usage block (usage line, hint, error) as one error line; `bntool` alone still prints help."""
    if type(e).__name__ == "NoArgsIsHelpError":
        e.show()
        return 0
    context = getattr(e, "ctx", None)
    command = context.command_path if context is not None else "bntool"
    named = _command_named(argv)
    if command == "bntool" and named is not None:  # click failed before the command's own context existed
        command = f"bntool {named}"
    message = f"{_one_line(e.format_message())} (see {command} --help)"
    _say(f"error: {message}")
    _last_error.append(("usage", message))
    if named == "verify":
        _ci_reports_of_unparsed_verify(argv, message)
    return e.exit_code


def _command_named(argv: list[str]) -> str | None:
    """The subcommand in raw arguments: the first word that is not an option (global options may precede it)."""
    word = next((a for a in argv if not a.startswith("-")), None)
    names = {c.name or c.callback.__name__ for c in app.registered_commands}  # type: ignore[union-attr]  # all have one
    return word if word in names else None


def _ci_reports_of_unparsed_verify(argv: list[str], message: str) -> None:
    """A verify whose options did not parse still leaves its errored JUnit case and Markdown summary for the
    CI dashboard, read from the arguments as given; a report that may not be written (exists without --force,
    would replace a checkpoint, ...) is left out: the error line has been said."""
    from .files import Outputs
    from .verification import junit_error_xml, markdown_error

    outputs = Outputs()
    junit_xml, summary_md = _flag_value(argv, "--junit-xml"), _flag_value(argv, "--summary-md")
    for path in _paths_named(argv, skip_values_of=("--junit-xml", "--summary-md")):
        outputs.add_input(path, "an input named on the command line")
    _plan_ci_reports(outputs, junit_xml, summary_md, "--force" in argv)
    try:
        outputs.check()
    except BntoolError:  # no report then; the step summary is still checked against the inputs and reports
        outputs, junit_xml, summary_md = Outputs(outputs.inputs, outputs.planned, outputs.input_names), None, None
    _write_ci_reports(outputs, junit_xml, junit_error_xml(message), summary_md,
                      os.environ.get("GITHUB_STEP_SUMMARY"), markdown_error(message))


def _paths_named(argv: list[str], skip_values_of: tuple[str, ...]) -> list[Path]:
    """Every existing file or folder the raw arguments name (as a word or after `--flag=`), except as the value of
    the `skip_values_of` flags: without parsed options, any of them may be the checkpoint, --data or --onnx."""
    paths = []
    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        if eq and flag.startswith("--"):
            arg = value if flag not in skip_values_of else ""
        elif i > 0 and argv[i - 1] in skip_values_of:
            continue
        if arg and not arg.startswith("-") and os.path.exists(arg):
            paths.append(Path(arg))
    return paths


def _flag_value(argv: list[str], flag: str) -> Path | None:
    """The value of `flag` in raw arguments (`--flag VALUE` or `--flag=VALUE`; the last one counts)."""
    value = None
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg[len(flag) + 1:]
    return Path(value) if value else None


def _say(line: str) -> None:
    """One line on stderr in one write: under torchrun every rank shares the stream, and print() writes the
    newline separately, so two ranks' lines could run together."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _click_exception_types() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """Exit, Abort and ClickException: from click, or from the copy of click newer Typer versions vendor."""
    exits, aborts, usage = {typer.Exit}, {typer.Abort}, set()
    for name in ("typer._click.exceptions", "click.exceptions"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        exits.update(getattr(module, n) for n in ("Exit",) if hasattr(module, n))
        aborts.update(getattr(module, n) for n in ("Abort",) if hasattr(module, n))
        usage.add(module.ClickException)
    return tuple(exits), tuple(aborts), tuple(usage)


def _one_line(e: BaseException | str) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# Library parameters whose flag is not simply --parameter-name.
FLAG_NAMES = {"example_inputs": "--input-shape", "input_names": "--input-name", "output_names": "--output-name",
              "onnx_path": "--onnx", "path": "-o", "out": "-o"}


def flag_name(parameter: str) -> str:
    """The command-line flag of a library parameter named in an error message."""
    return FLAG_NAMES.get(parameter, "--" + parameter.replace("_", "-"))


def entry() -> None:
    code = main()
    # The command is over and has said what it wrote: a Ctrl-C during interpreter shutdown (torch's exit
    # handlers) can change nothing, and must not print a KeyboardInterrupt traceback under that last line.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code)
