"""The `bntool` command line: parses options, calls the library, renders the report. Nothing else.

torch and onnx are imported inside the commands so that `bntool --help` stays instant.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated, Optional

import typer

from ._version import __version__
from .errors import BntoolError, CheckFailed, InputError

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

Ckpt = Annotated[Path, typer.Argument(help="Checkpoint: state_dict (.pt/.pth/.bin/.safetensors), training "
                                           "checkpoint dict, pickled module, or TorchScript archive.")]
Arch = Annotated[Optional[str], typer.Option("--arch", help="Model factory for state_dicts, 'module.path:callable' "
                                                             "(e.g. torchvision.models:resnet18).")]
ArchKwargs = Annotated[Optional[str], typer.Option("--arch-kwargs", help="JSON object of keyword arguments for "
                                                                          "--arch, e.g. '{\"num_classes\": 10}'.")]
Key = Annotated[Optional[str], typer.Option("--key", help="Key of the state_dict inside a training checkpoint.")]
TrustPickle = Annotated[bool, typer.Option("--trust-pickle", help="Allow loading pickled modules (runs code from the "
                                                                   "file: only for files you trust).")]
InputShape = Annotated[Optional[list[str]], typer.Option(
    "--input-shape", help="Example input shape, e.g. 1,3,224,224; repeat for several inputs.")]
Dtype = Annotated[Optional[str], typer.Option("--dtype", help="Input dtype (default: the model's floating dtype).")]
Output = Annotated[Path, typer.Option("-o", "--output", help="Where to write the result.")]
Force = Annotated[bool, typer.Option("--force", help="Overwrite an existing output file.")]
InPlace = Annotated[bool, typer.Option("--in-place", help="Allow the output to be the input file.")]
Json = Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or tables; errors only.")]
Seed = Annotated[int, typer.Option("--seed", help="Seed for random inputs.")]


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


def _load(ckpt: Path, arch, arch_kwargs, key, trust_pickle):
    from .checkpoint import load_checkpoint

    return load_checkpoint(ckpt, arch=arch, arch_kwargs=arch_kwargs, key=key, trust_pickle=trust_pickle)


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        raise InputError(f"--input-shape {text!r}: expected comma-separated positive integers "
                         "like 1,3,224,224") from None
    if not dims or any(d <= 0 for d in dims):
        raise InputError(f"--input-shape {text!r}: expected comma-separated positive integers like 1,3,224,224")
    return dims


def _example_inputs(model, shapes: list[str] | None, dtype: str | None, seed: int = 0, required: bool = True):
    import torch

    from .folding import model_dtype

    if not shapes:
        if required:
            raise InputError("--input-shape is required, e.g. --input-shape 1,3,224,224")
        return None
    if dtype is None:
        torch_dtype = model_dtype(model)
    else:
        torch_dtype = getattr(torch, dtype, None)
        if not isinstance(torch_dtype, torch.dtype):
            raise InputError(f"--dtype {dtype!r}: not a torch dtype (float32, float16, bfloat16, float64, int64, …)")
    g = torch.Generator().manual_seed(seed)
    inputs = []
    for text in shapes:
        shape = parse_shape(text)
        if torch_dtype.is_floating_point:
            inputs.append(torch.randn(shape, generator=g).to(torch_dtype))
        else:
            inputs.append(torch.randint(0, 2, shape, generator=g).to(torch_dtype))
    return tuple(inputs)


def _print_json(report) -> None:
    from .report import dumps

    print(dumps(report))


def _require_eager(ckpt, operation: str) -> None:
    from .errors import UnsupportedError

    if ckpt.kind == "torchscript":
        raise UnsupportedError(f"{ckpt.path}: {operation} is not supported for TorchScript archives; "
                               "pass the state_dict with --arch instead")


# ---------------------------------------------------------------- commands


@app.command()
def inspect(
    ckpt: Ckpt,
    arch: Arch = None,
    arch_kwargs: ArchKwargs = None,
    key: Key = None,
    trust_pickle: TrustPickle = False,
    input_shape: InputShape = None,
    dtype: Dtype = None,
    json_output: Json = False,
) -> None:
    """Show every BatchNorm layer, its statistics and health; with --input-shape, what `fold` would do."""
    from .inspection import inspect as inspect_model

    loaded = _load(ckpt, arch, arch_kwargs, key, trust_pickle)
    inputs = None
    if input_shape and loaded.kind != "torchscript":
        inputs = _example_inputs(loaded.model, input_shape, dtype)
    report = _fit_errors(lambda: inspect_model(loaded.model, inputs), input_shape)
    _show(report, json_output, "render_inspect")


@app.command()
def fold(
    ckpt: Ckpt,
    output: Output,
    input_shape: InputShape = None,
    arch: Arch = None,
    arch_kwargs: ArchKwargs = None,
    key: Key = None,
    trust_pickle: TrustPickle = False,
    dtype: Dtype = None,
    samples: Annotated[int, typer.Option("--samples", help="Random inputs checked besides the example.")] = 4,
    seed: Seed = 0,
    rtol: Annotated[Optional[float], typer.Option("--rtol", help="Relative tolerance (of the largest output); "
                                                                 "default by dtype, 1e-4 for float32.")] = None,
    atol: Annotated[Optional[float], typer.Option("--atol", help="Absolute tolerance; default by dtype.")] = None,
    skip: Annotated[Optional[list[str]], typer.Option("--skip", help="BN layer names or glob patterns to leave as "
                                                                      "they are; repeatable.")] = None,
    force: Force = False,
    in_place: InPlace = False,
    json_output: Json = False,
) -> None:
    """Fold each BatchNorm into the conv/linear next to it; check against the original; write the result.

    The output is the same kind of file as the input. A folded state_dict loads with
    bntool.load_model(path, arch=...) (its structure differs from --arch).
    """
    from .checkpoint import check_output_path, save_checkpoint
    from .folding import fold as fold_model

    check_output_path(output, ckpt, force=force, in_place=in_place)
    loaded = _load(ckpt, arch, arch_kwargs, key, trust_pickle)
    _require_eager(loaded, "fold")
    inputs = _example_inputs(loaded.model, input_shape, dtype, seed)
    try:
        folded, report = _fit_errors(
            lambda: fold_model(loaded.model, inputs, samples=samples, seed=seed, rtol=rtol, atol=atol, skip=skip or ()),
            input_shape)
    except CheckFailed as e:
        if hasattr(e, "report"):
            _show(e.report, json_output, "render_fold")
        raise CheckFailed(f"{e}; nothing written") from e
    save_checkpoint(loaded, folded, output, fold_layout=report.layout, force=force, in_place=in_place)
    _show(report, json_output, "render_fold")
    if not json_output:
        _console().print(f"Wrote {output}")


def _show(report, json_output: bool, renderer: str) -> None:
    """Print a report as JSON, or with the Rich renderer of that name in bntool.report."""
    if json_output:
        _print_json(report)
    else:
        from . import report as render

        getattr(render, renderer)(report, _console())


def _fit_errors(run, input_shape):
    """Turn a model that rejects the example input into a one-line input error."""
    try:
        return run()
    except BntoolError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        shapes = " ".join(input_shape or [])
        raise InputError(f"the model does not accept --input-shape {shapes}: {message[:300]}") from e


def _floats(text: str | None, option: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"{option} {text!r}: expected comma-separated numbers like 0.485,0.456,0.406") from None
    return values


def _open_data(data, loader, loader_kwargs, input_key, npz_key, batch_size, workers, image_size, resize,
               center_crop, mean, std, strict, seed):
    from .data import IMAGENET_MEAN, IMAGENET_STD, ImageOptions, open_source

    options = ImageOptions(image_size=image_size, resize=resize, center_crop=center_crop,
                           mean=_floats(mean, "--mean") or IMAGENET_MEAN, std=_floats(std, "--std") or IMAGENET_STD)
    return open_source(data, loader=loader, loader_kwargs=loader_kwargs, batch_size=batch_size, num_workers=workers,
                       image=options, npz_key=npz_key, input_key=input_key, strict=strict, seed=seed)


DataPath = Annotated[Optional[Path], typer.Option("--data", help="Calibration data: a folder of images (recursive), "
                                                                 "or a .npy/.npz/.pt tensor file.")]
LoaderSpec = Annotated[Optional[str], typer.Option("--loader", help="Your own data: 'module.path:callable' returning "
                                                                    "an iterable of batches (e.g. a DataLoader).")]
LoaderKwargs = Annotated[Optional[str], typer.Option("--loader-kwargs", help="JSON keyword arguments for --loader.")]
InputKey = Annotated[Optional[str], typer.Option("--input-key", help="Key of the input in dict batches.")]
NpzKey = Annotated[Optional[str], typer.Option("--npz-key", help="Array to use from an .npz file.")]
BatchSize = Annotated[int, typer.Option("--batch-size", "-b", help="Batch size for --data.")]
Workers = Annotated[int, typer.Option("--workers", help="DataLoader worker processes for image folders.")]
ImageSize = Annotated[int, typer.Option("--image-size", help="Image side after the crop.")]
Resize = Annotated[Optional[int], typer.Option("--resize", help="Shorter side before the crop "
                                                                "(default image-size*256/224).")]
CenterCrop = Annotated[bool, typer.Option("--center-crop/--no-center-crop", help="Resize then center-crop, or "
                                                                                 "resize straight to the size.")]
Mean = Annotated[Optional[str], typer.Option("--mean", help="Per-channel mean to subtract (default ImageNet "
                                                             "0.485,0.456,0.406).")]
Std = Annotated[Optional[str], typer.Option("--std", help="Per-channel std (default ImageNet 0.229,0.224,0.225).")]
Strict = Annotated[bool, typer.Option("--strict", help="Fail on an unreadable image instead of skipping it.")]


@app.command()
def recalibrate(
    ckpt: Ckpt,
    output: Output,
    data: DataPath = None,
    loader: LoaderSpec = None,
    loader_kwargs: LoaderKwargs = None,
    arch: Arch = None,
    arch_kwargs: ArchKwargs = None,
    key: Key = None,
    trust_pickle: TrustPickle = False,
    mode: Annotated[str, typer.Option("--mode", help="cumulative (exact pooled average, train-mode "
                                                     "normalization), ema (as training does) or exact "
                                                     "(eval-mode statistics, batch-size independent).")] = "cumulative",
    momentum: Annotated[float, typer.Option("--momentum", help="EMA momentum for --mode ema.")] = 0.1,
    reset: Annotated[bool, typer.Option("--reset/--no-reset", help="--mode ema: start from 0/1 statistics or "
                                                                   "from the current ones.")] = True,
    batch_size: BatchSize = 32,
    num_batches: Annotated[Optional[int], typer.Option("--num-batches", help="Use at most this many batches.")] = None,
    num_samples: Annotated[Optional[int], typer.Option("--num-samples", help="Use at most this many samples.")] = None,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:1 or mps.")] = "cpu",
    amp: Annotated[bool, typer.Option("--amp", help="Autocast (bfloat16 on CPU, float16 on CUDA).")] = False,
    channels_last: Annotated[bool, typer.Option("--channels-last", help="Run in channels_last memory format.")] = False,
    workers: Workers = 2,
    image_size: ImageSize = 224,
    resize: Resize = None,
    center_crop: CenterCrop = True,
    mean: Mean = None,
    std: Std = None,
    input_key: InputKey = None,
    npz_key: NpzKey = None,
    strict: Strict = False,
    seed: Seed = 0,
    force: Force = False,
    in_place: InPlace = False,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Also draw the per-layer statistics shift "
                                                                "(PNG/SVG/PDF; needs matplotlib).")] = None,
    json_output: Json = False,
    quiet: Quiet = False,
    prior: Annotated[Optional[float], typer.Option(
        "--prior", help="cumulative/exact: blend with the checkpoint's statistics as N source samples "
                        "(Schneider et al. 2020); helps with few calibration images.")] = None,
    cache_budget: Annotated[Optional[str], typer.Option(
        "--cache-budget", help="--mode exact: memory for cached activations, e.g. 4G, 512M, 0 for none "
                               "(default: half the free memory of the device).")] = None,
) -> None:
    """Re-estimate BatchNorm running statistics over calibration data; only BN layers gather statistics.

    Under torchrun, each process takes its share of the batches, statistics are merged exactly across
    processes, and rank 0 alone writes the output.
    """
    from .distributed import process_group, rank_device

    with process_group(device) as rank:
        _recalibrate(ckpt, output, data, loader, loader_kwargs, arch, arch_kwargs, key, trust_pickle, mode,
                     momentum, reset, batch_size, num_batches, num_samples, rank_device(device, rank), amp,
                     channels_last, workers, image_size, resize, center_crop, mean, std, input_key, npz_key,
                     strict, seed, force, in_place, json_output, quiet, rank, plot, cache_budget, prior)


def _recalibrate(ckpt, output, data, loader, loader_kwargs, arch, arch_kwargs, key, trust_pickle, mode, momentum,
                 reset, batch_size, num_batches, num_samples, device, amp, channels_last, workers, image_size, resize,
                 center_crop, mean, std, input_key, npz_key, strict, seed, force, in_place, json_output, quiet,
                 rank, plot, cache_budget=None, prior=None) -> None:
    import torch

    from .checkpoint import check_output_path, save_checkpoint
    from .data import IMAGENET_MEAN, IMAGENET_STD, ImageOptions, open_source
    from .recalibration import recalibrate as recalibrate_model
    from .segments import parse_bytes

    check_output_path(output, ckpt, force=force, in_place=in_place)
    if plot is not None:
        check_output_path(plot, force=True)
    budget = None if cache_budget is None else parse_bytes(cache_budget, "--cache-budget")
    torch.manual_seed(seed)
    options = ImageOptions(image_size=image_size, resize=resize, center_crop=center_crop,
                           mean=_floats(mean, "--mean") or IMAGENET_MEAN, std=_floats(std, "--std") or IMAGENET_STD)
    source = open_source(data, loader=loader, loader_kwargs=loader_kwargs, batch_size=batch_size,
                         num_workers=workers, image=options, npz_key=npz_key, input_key=input_key, strict=strict,
                         seed=seed, rank=rank.rank, world_size=rank.world_size)
    loaded = _load(ckpt, arch, arch_kwargs, key, trust_pickle)
    _require_eager(loaded, "recalibrate")
    total = source.num_samples if num_samples is None else min(num_samples, source.num_samples or num_samples)
    quiet = quiet or not rank.is_main
    with _progress(quiet or json_output, total) as progress:
        report = recalibrate_model(loaded.model, source, mode=mode, momentum=momentum, reset=reset,
                                   num_batches=num_batches, num_samples=num_samples, device=device, amp=amp,
                                   channels_last=channels_last, prior=prior, cache_budget=budget,
                                   progress=progress)
    if source.skipped:
        print(f"warning: rank {rank.rank}: skipped {len(source.skipped)} unreadable images "
              f"(first: {source.skipped[0]})" if rank.world_size > 1 else
              f"warning: skipped {len(source.skipped)} unreadable images (first: {source.skipped[0]})",
              file=sys.stderr)
    if not rank.is_main:
        return
    save_checkpoint(loaded, loaded.model, output, force=force, in_place=in_place)
    if plot is not None:
        from .plot import plot_recalibration

        plot_recalibration(report, plot)
    if json_output:
        _print_json(report)
    elif not quiet:
        from .report import render_recalibrate

        render_recalibrate(report, _console())
        _console().print(f"Wrote {output}")


class _progress:
    """A Rich progress bar with samples/s, fed by the library's progress callback."""

    def __init__(self, disabled: bool, total: int | None):
        self.disabled, self.total = disabled, total
        self.bar = self.task = None
        self.current_pass = 0

    def __enter__(self):
        if self.disabled:
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


Exporter = Annotated[str, typer.Option("--exporter", help="auto (dynamo, falling back to legacy), dynamo or "
                                                         "legacy (TorchScript-based).")]
Samples = Annotated[int, typer.Option("--samples", help="Random inputs checked per batch size besides the example.")]


def _data_batches(data, loader, loader_kwargs, input_key, npz_key, batch_size, num_batches, dtype_of):
    """Real calibration data for a numerical check: at most num_batches batches, in the model's dtype."""
    if data is None and loader is None:
        return None
    source = _open_data(data, loader, loader_kwargs, input_key, npz_key, batch_size, 0, 224, None, True, None, None,
                        False, 0)
    batches = []
    for x in source:
        if len(batches) >= num_batches:
            break
        batches.append(x.to(dtype_of))
    return batches


@app.command("export-onnx")
def export_onnx(
    ckpt: Ckpt,
    output: Output,
    input_shape: InputShape = None,
    arch: Arch = None,
    arch_kwargs: ArchKwargs = None,
    key: Key = None,
    trust_pickle: TrustPickle = False,
    dtype: Dtype = None,
    fold: Annotated[bool, typer.Option("--fold/--no-fold", help="Fold BatchNorm before exporting.")] = True,
    exporter: Exporter = "auto",
    opset: Annotated[Optional[int], typer.Option("--opset", help="ONNX opset (default: the exporter's).")] = None,
    dynamic_batch: Annotated[bool, typer.Option(
        "--dynamic-batch", help="Make axis 0 of inputs and outputs dynamic; checked at several batch sizes.")] = False,
    input_name: Annotated[Optional[list[str]], typer.Option("--input-name", help="Input names, one per input.")] = None,
    output_name: Annotated[Optional[list[str]], typer.Option("--output-name", help="Output names.")] = None,
    samples: Samples = 4,
    seed: Seed = 0,
    data: DataPath = None,
    loader: LoaderSpec = None,
    loader_kwargs: LoaderKwargs = None,
    input_key: InputKey = None,
    npz_key: NpzKey = None,
    batch_size: BatchSize = 8,
    num_batches: Annotated[int, typer.Option("--num-batches", help="Batches of --data to check.")] = 4,
    rtol: Annotated[float, typer.Option("--rtol", help="Elementwise relative tolerance.")] = 1e-4,
    atol: Annotated[Optional[float], typer.Option("--atol", help="Elementwise absolute tolerance (default: 1e-4 "
                                                                 "of each output's largest magnitude).")] = None,
    provider: Annotated[str, typer.Option("--provider", help="onnxruntime provider: cpu or cuda.")] = "cpu",
    strict: Annotated[bool, typer.Option("--strict", help="Remove the ONNX file if verification fails.")] = False,
    force: Force = False,
    json_output: Json = False,
) -> None:
    """Export to ONNX (BatchNorm folded first) and prove it matches PyTorch with onnxruntime."""
    from .onnx_export import export_onnx as export_model

    loaded = _load(ckpt, arch, arch_kwargs, key, trust_pickle)
    if loaded.kind == "torchscript" and fold:
        _require_eager(loaded, "export-onnx with folding (use --no-fold)")
    inputs = _example_inputs(loaded.model, input_shape, dtype, seed)
    batches = _data_batches(data, loader, loader_kwargs, input_key, npz_key, batch_size, num_batches, inputs[0].dtype)
    try:
        report = _fit_errors(lambda: export_model(
            loaded.model, inputs, output, fold=fold, exporter=exporter, opset=opset, dynamic_batch=dynamic_batch,
            input_names=input_name, output_names=output_name, samples=samples, seed=seed, data=batches, rtol=rtol,
            atol=atol, provider=provider, strict=strict, force=force), input_shape)
    except CheckFailed as e:
        if hasattr(e, "report"):
            _show(e.report, json_output, "render_export")
        raise
    _show(report, json_output, "render_export")


@app.command()
def verify(
    ckpt: Ckpt,
    input_shape: InputShape = None,
    arch: Arch = None,
    arch_kwargs: ArchKwargs = None,
    key: Key = None,
    trust_pickle: TrustPickle = False,
    dtype: Dtype = None,
    onnx: Annotated[Optional[Path], typer.Option("--onnx", help="Check this ONNX file, not a fresh export.")] = None,
    skip_onnx: Annotated[bool, typer.Option("--skip-onnx", help="Do not check ONNX at all.")] = False,
    exporter: Exporter = "auto",
    samples: Samples = 4,
    seed: Seed = 0,
    data: DataPath = None,
    loader: LoaderSpec = None,
    loader_kwargs: LoaderKwargs = None,
    input_key: InputKey = None,
    npz_key: NpzKey = None,
    batch_size: BatchSize = 8,
    num_batches: Annotated[int, typer.Option("--num-batches", help="Batches of --data to check.")] = 4,
    rtol: Annotated[Optional[float], typer.Option("--rtol", help="Fold check relative tolerance "
                                                                 "(default by dtype).")] = None,
    atol: Annotated[Optional[float], typer.Option("--atol", help="Fold check absolute tolerance.")] = None,
    onnx_rtol: Annotated[float, typer.Option("--onnx-rtol", help="ONNX elementwise relative tolerance.")] = 1e-4,
    onnx_atol: Annotated[Optional[float], typer.Option("--onnx-atol", help="ONNX elementwise absolute tolerance "
                                                                           "(default: 1e-4 of the output's largest "
                                                                           "magnitude).")] = None,
    junit_xml: Annotated[Optional[Path], typer.Option("--junit-xml", help="Also write JUnit XML here.")] = None,
    json_output: Json = False,
) -> None:
    """CI checks: BN health, folded vs original, ONNX vs PyTorch. Exit 0 only if all pass, 1 if any fails."""
    from .checkpoint import atomic_write, check_output_path
    from .verification import to_junit_xml
    from .verification import verify as verify_model

    if junit_xml is not None:
        check_output_path(junit_xml, force=True)
    loaded = _load(ckpt, arch, arch_kwargs, key, trust_pickle)
    _require_eager(loaded, "verify")
    inputs = _example_inputs(loaded.model, input_shape, dtype, seed)
    batches = _data_batches(data, loader, loader_kwargs, input_key, npz_key, batch_size, num_batches, inputs[0].dtype)
    report = _fit_errors(lambda: verify_model(
        loaded.model, inputs, onnx_path=onnx, onnx=not skip_onnx, exporter=exporter, samples=samples, seed=seed,
        rtol=rtol, atol=atol, onnx_rtol=onnx_rtol, onnx_atol=onnx_atol, data=batches), input_shape)
    if junit_xml is not None:
        xml = to_junit_xml(report)
        atomic_write(junit_xml, lambda tmp: Path(tmp).write_text(xml))
    _show(report, json_output, "render_verify")
    if not report.passed:
        failed = ", ".join(c.name for c in report.checks if not c.passed)
        raise CheckFailed(f"verification failed: {failed}")


@app.command()
def demo(
    directory: Annotated[Path, typer.Argument(help="Where to write the demo's files.")] = Path("bntool-demo"),
    exporter: Exporter = "auto",
    force: Annotated[bool, typer.Option("--force", help="Overwrite files from an earlier demo.")] = True,
    json_output: Json = False,
) -> None:
    """Run inspect → recalibrate → fold → export-onnx → verify on a built-in model and generated data."""
    from .demo import run_demo

    report = run_demo(directory, force=force, exporter=exporter)
    _show(report, json_output, "render_demo")
    if not report.passed:
        raise CheckFailed("the demo's checks failed")


# ---------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the exit code instead of raising (tests call this)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or bool(os.environ.get("BNTOOL_DEBUG"))
    exit_types, abort_types, usage_types = _click_exception_types()
    try:
        # Outside standalone mode Typer returns the code of an Exit (Ctrl-C becomes Exit(130)) instead of raising.
        code = app(args=argv, prog_name="bntool", standalone_mode=False)
        if code == 130:
            _say("interrupted: nothing written")
        return code if isinstance(code, int) else 0
    except exit_types as e:
        return e.exit_code
    except abort_types:
        _say("interrupted: nothing written")
        return 130
    except usage_types as e:
        e.show()
        return e.exit_code
    except BntoolError as e:
        if debug:
            traceback.print_exc()
        _say(f"error: {_one_line(e)}")
        return e.exit_code
    except KeyboardInterrupt:
        _say("interrupted: nothing written")
        return 130
    except Exception as e:
        if debug:
            traceback.print_exc()
        _say(f"error: internal error: {type(e).__name__}: {_one_line(e)} (a bug: rerun with --debug and report it)")
        return 3


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


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def entry() -> None:
    sys.exit(main())
