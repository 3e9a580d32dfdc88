"""The `bntool` command line: parses options, calls the library, renders the report. Nothing else.

torch and onnx are imported inside the commands so that `bntool --help` stays instant.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer

from ._version import __version__
from .choices import Exporter, Provider, RecalibrationMode
from .errors import BntoolError, CheckFailed
from .options import (
    DataOptions,
    Display,
    ExampleInputs,
    FileOutput,
    ImagePreprocessing,
    ModelSource,
    Tolerances,
    grouped,
)

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

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or tables; errors only.")]
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
    # Logs and pipes get wide tables instead of Rich's 80-column default.
    width = None if stream.isatty() else 160
    return Console(stderr=stderr, highlight=False, width=width)


def _print_json(report) -> None:
    from .report import dumps

    print(dumps(report))


def _require_eager(ckpt, operation: str) -> None:
    from .errors import UnsupportedError

    if ckpt.kind == "torchscript":
        raise UnsupportedError(f"{ckpt.path}: {operation} is not supported for TorchScript archives; "
                               "pass the state_dict with --arch instead")


def _show(report, json_output: bool, renderer: str) -> None:
    """Print a report as JSON, or with the Rich renderer of that name in bntool.report."""
    if json_output:
        _print_json(report)
    else:
        from . import report as render

        getattr(render, renderer)(report, _console())


def _outputs(*inputs: tuple[Path | None, str]):
    """The command's outputs, to be planned against these inputs (path, what it is)."""
    from .files import Outputs

    outputs = Outputs()
    for path, what in inputs:
        outputs.add_input(path, what)
    return outputs


# ---------------------------------------------------------------- commands


@app.command()
@grouped()
def inspect(model: ModelSource, example: ExampleInputs, display: Display) -> None:
    """Show every BatchNorm layer, its statistics and health; with --input-shape, what `fold` would do."""
    from .inspection import inspect as inspect_model

    loaded = model.load()
    inputs = None
    if example.input_shape and loaded.kind != "torchscript":
        inputs = example.build(loaded.model)
    report = inspect_model(loaded.model, inputs)
    _show(report, display.json_output, "render_inspect")


@app.command()
@grouped()
def fold(
    model: ModelSource,
    out: FileOutput,
    example: ExampleInputs,
    tolerances: Tolerances,
    display: Display,
    samples: Annotated[int, typer.Option("--samples", help="Random inputs checked besides the example.")] = 4,
    skip: Annotated[Optional[list[str]], typer.Option("--skip", help="BN layer names or glob patterns to leave as "
                                                                      "they are; repeatable.")] = None,
) -> None:
    """Fold each BatchNorm into the conv/linear next to it; check against the original; write the result.

    The output is the same kind of file as the input. A folded state_dict loads with
    bntool.load_model(path, arch=...) (its structure differs from --arch).
    """
    from .checkpoint import write_checkpoint
    from .files import OutputKind
    from .folding import fold as fold_model

    outputs = _outputs((model.ckpt, "the input checkpoint"))
    outputs.add(out.output, OutputKind.CHECKPOINT, force=out.force, in_place=out.in_place, what="-o")
    outputs.check()
    loaded = model.load()
    _require_eager(loaded, "fold")
    inputs = example.build(loaded.model)
    try:
        folded, report = fold_model(loaded.model, inputs, samples=samples, seed=example.seed, rtol=tolerances.rtol,
                                    atol=tolerances.atol, skip=skip or ())
    except CheckFailed as e:
        if e.report is not None:
            _show(e.report, display.json_output, "render_fold")
        raise CheckFailed(f"{e.message}; nothing written", report=e.report) from e
    with outputs:
        write_checkpoint(loaded, folded, out.output, lambda writer: outputs.write(out.output, writer))
        outputs.commit()
    _show(report, display.json_output, "render_fold")
    if not display.json_output:
        _console().print(f"Wrote {out.output}")


@app.command()
@grouped()
def recalibrate(
    model: ModelSource,
    out: FileOutput,
    data: DataOptions,
    images: ImagePreprocessing,
    display: Display,
    mode: Annotated[RecalibrationMode, typer.Option(
        "--mode", help="cumulative (exact pooled average, train-mode normalization), ema (as training does) or "
                       "exact (eval-mode statistics, batch-size independent).")] = RecalibrationMode.CUMULATIVE,
    momentum: Annotated[float, typer.Option("--momentum", help="EMA momentum for --mode ema.")] = 0.1,
    reset: Annotated[bool, typer.Option("--reset/--no-reset", help="--mode ema: start from 0/1 statistics or "
                                                                   "from the current ones.")] = True,
    num_batches: Annotated[Optional[int], typer.Option("--num-batches", help="Use at most this many batches.")] = None,
    num_samples: Annotated[Optional[int], typer.Option("--num-samples", help="Use at most this many samples.")] = None,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:1 or mps.")] = "cpu",
    amp: Annotated[bool, typer.Option("--amp", help="Autocast (bfloat16 on CPU, float16 on CUDA).")] = False,
    channels_last: Annotated[bool, typer.Option("--channels-last", help="Run in channels_last memory format.")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed for data order and random choices.")] = 0,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Also draw the per-layer statistics shift "
                                                                "(PNG/SVG/PDF; needs matplotlib).")] = None,
    quiet: Quiet = False,
) -> None:
    """Re-estimate BatchNorm running statistics over calibration data; only BN layers gather statistics.

    Under torchrun, each process takes its share of the batches, statistics are merged exactly across
    processes, and rank 0 alone writes the output.
    """
    from .distributed import process_group, rank_device

    settings = RecalibrationSettings(mode=mode, momentum=momentum, reset=reset, num_batches=num_batches,
                                     num_samples=num_samples, device=device, amp=amp, channels_last=channels_last,
                                     seed=seed, plot=plot, quiet=quiet)
    with process_group(device) as rank:
        settings.device = rank_device(device, rank)
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


def _recalibrate(model: ModelSource, out: FileOutput, data: DataOptions, images: ImagePreprocessing,
                 display: Display, settings: RecalibrationSettings, rank) -> None:
    import torch

    from .checkpoint import write_checkpoint
    from .files import OutputKind
    from .recalibration import recalibrate as recalibrate_model

    outputs = _outputs((model.ckpt, "the input checkpoint"), (data.data, "the --data file"))
    outputs.add(out.output, OutputKind.CHECKPOINT, force=out.force, in_place=out.in_place, what="-o")
    if settings.plot is not None:
        from .plot import check_can_plot

        outputs.add(settings.plot, OutputKind.PLOT, force=out.force, what="--plot", precheck=check_can_plot)
    outputs.check()
    torch.manual_seed(settings.seed)
    source = data.open(images.image_options(), workers=images.workers, strict=images.strict, seed=settings.seed,
                       rank=rank.rank, world_size=rank.world_size)
    loaded = model.load()
    _require_eager(loaded, "recalibrate")
    num_samples = settings.num_samples
    total = source.num_samples if num_samples is None else min(num_samples, source.num_samples or num_samples)
    quiet = settings.quiet or not rank.is_main
    with _progress(quiet or display.json_output, total) as progress:
        report = recalibrate_model(loaded.model, source, mode=settings.mode, momentum=settings.momentum,
                                   reset=settings.reset, num_batches=settings.num_batches, num_samples=num_samples,
                                   device=settings.device, amp=settings.amp, channels_last=settings.channels_last,
                                   progress=progress)
    if source.skipped:
        print(f"warning: rank {rank.rank}: skipped {len(source.skipped)} unreadable images "
              f"(first: {source.skipped[0]})" if rank.world_size > 1 else
              f"warning: skipped {len(source.skipped)} unreadable images (first: {source.skipped[0]})",
              file=sys.stderr)
    if not rank.is_main:
        return
    recalibrated = loaded.model.to("cpu")
    if settings.channels_last:
        recalibrated = recalibrated.to(memory_format=torch.contiguous_format)
    with outputs:
        write_checkpoint(loaded, recalibrated, out.output, lambda writer: outputs.write(out.output, writer))
        if settings.plot is not None:
            from .plot import plot_recalibration

            outputs.write(settings.plot, lambda tmp: plot_recalibration(report, tmp))
        outputs.commit()
    if display.json_output:
        _print_json(report)
    elif not quiet:
        from .report import render_recalibrate

        render_recalibrate(report, _console())
        _console().print(f"Wrote {out.output}")


class _progress:
    """A Rich progress bar with samples/s, fed by the library's progress callback."""

    def __init__(self, disabled: bool, total: int | None):
        self.disabled, self.total = disabled, total
        self.bar = self.task = None
        self.current_pass = 0

    def __enter__(self):
        if self.disabled or not sys.stderr.isatty():  # in a log the bar is noise and leaves a blank line
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[rate]} samples/s"), TimeElapsedColumn(),
                            console=_console(stderr=True), transient=True)
        self.bar.__enter__()
        self.task = self.bar.add_task("pass 1", total=self.total, rate="-")
        return self.update

    def update(self, done: int, pass_number: int, _passes: int) -> None:
        if pass_number != self.current_pass:
            self.current_pass = pass_number
            self.bar.reset(self.task, total=self.total, description=f"pass {pass_number}")
        task = self.bar.tasks[0]
        rate = f"{task.speed:,.0f}" if task.speed else "-"
        self.bar.update(self.task, completed=done, rate=rate)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
        return False


@app.command("export-onnx")
@grouped(batch_size=8)
def export_onnx(
    model: ModelSource,
    out: FileOutput,
    example: ExampleInputs,
    data: DataOptions,
    tolerances: Tolerances,
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

    protect = [p for p in (model.ckpt, data.data) if p is not None]
    check_provider(provider)
    plan_outputs(out.output, False, out.force, keep_failed, protect)  # before loading; the export plans again
    loaded = model.load()
    if loaded.kind == "torchscript" and fold:
        _require_eager(loaded, "export-onnx with folding (use --no-fold)")
    inputs = example.build(loaded.model)
    batches = data.batches(num_batches, inputs[0].dtype)
    try:
        report = export_model(
            loaded.model, inputs, out.output, fold=fold, exporter=exporter, opset=opset, dynamic_batch=dynamic_batch,
            input_names=input_name, output_names=output_name, samples=samples, seed=example.seed, data=batches,
            rtol=tolerances.rtol, atol=tolerances.atol, provider=provider, force=out.force, keep_failed=keep_failed,
            protect=protect)
    except CheckFailed as e:
        if e.report is not None:
            _show(e.report, display.json_output, "render_export")
        raise
    _show(report, display.json_output, "render_export")


@app.command()
@grouped(batch_size=8)
def verify(
    model: ModelSource,
    example: ExampleInputs,
    data: DataOptions,
    tolerances: Tolerances,
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
    junit_xml: Annotated[Optional[Path], typer.Option("--junit-xml", help="Also write JUnit XML here.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing --junit-xml file.")] = False,
) -> None:
    """CI checks: BN health, folded vs original, ONNX vs PyTorch. Exit 0 only if all pass, 1 if any fails.

    --rtol/--atol apply to the fold check, --onnx-rtol/--onnx-atol to the ONNX check; both mean: an element
    passes when |Δ| ≤ atol + rtol·|reference|.
    """
    from .files import OutputKind
    from .verification import to_junit_xml
    from .verification import verify as verify_model

    outputs = _outputs((model.ckpt, "the input checkpoint"), (data.data, "the --data file"), (onnx, "the --onnx file"))
    if junit_xml is not None:
        outputs.add(junit_xml, OutputKind.REPORT, force=force, what="--junit-xml")
    outputs.check()
    loaded = model.load()
    _require_eager(loaded, "verify")
    inputs = example.build(loaded.model)
    batches = data.batches(num_batches, inputs[0].dtype)
    report = verify_model(
        loaded.model, inputs, onnx_path=onnx, onnx=not skip_onnx, exporter=exporter, samples=samples,
        seed=example.seed, rtol=tolerances.rtol, atol=tolerances.atol, onnx_rtol=onnx_rtol, onnx_atol=onnx_atol,
        data=batches)
    if junit_xml is not None:
        xml = to_junit_xml(report)
        with outputs:
            outputs.write(junit_xml, lambda tmp: Path(tmp).write_text(xml))
            outputs.commit()
    _show(report, display.json_output, "render_verify")
    if not report.passed:
        failed = ", ".join(c.name for c in report.checks if not c.passed)
        raise CheckFailed(f"verification failed: {failed}")


@app.command()
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

    report = run_demo(directory, force=force, exporter=exporter)
    _show(report, display.json_output, "render_demo")
    if not report.passed:
        raise CheckFailed("the demo's checks failed; nothing written")


# ---------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the exit code instead of raising (tests call this)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or bool(os.environ.get("BNTOOL_DEBUG"))
    exit_types, abort_types, usage_types = _click_exception_types()
    from .files import forget_committed

    forget_committed()
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
        return _usage_error(e)
    except BntoolError as e:
        if debug:
            traceback.print_exc()
        _say(f"error: {_one_line(e.render(flag_name))}")
        return e.exit_code
    except KeyboardInterrupt:
        return _interrupted()
    except Exception as e:
        if debug:
            traceback.print_exc()
        _say(f"error: internal error: {type(e).__name__}: {_one_line(e)} (a bug: rerun with --debug and report it)")
        return 3


def _interrupted() -> int:
    """Ctrl-C: say truthfully which files were put in place (a commit is never cut short)."""
    from .files import committed

    written = committed()
    if written:
        _say(f"interrupted: wrote {', '.join(str(p) for p in written)} (complete); nothing else written")
    else:
        _say("interrupted: nothing written")
    return 130


def _usage_error(e) -> int:
    """click's usage block (usage line, hint, error) as one error line; `bntool` alone still prints help."""
    if type(e).__name__ == "NoArgsIsHelpError":
        e.show()
        return 0
    context = getattr(e, "ctx", None)
    command = context.command_path if context is not None else "bntool"
    _say(f"error: {_one_line(e.format_message())} (see {command} --help)")
    return e.exit_code


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
