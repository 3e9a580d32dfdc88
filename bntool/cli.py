"""The `bntool` command line: parses options, calls the library, renders the report. Nothing else.

torch and onnx are imported inside the commands so that `bntool --help` stays instant.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Annotated, Optional

import click
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

    return Console(stderr=stderr, highlight=False)


def _load(ckpt: Path, arch, arch_kwargs, key, trust_pickle):
    from .checkpoint import load_checkpoint

    return load_checkpoint(ckpt, arch=arch, arch_kwargs=arch_kwargs, key=key, trust_pickle=trust_pickle)


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        raise InputError(f"--input-shape {text!r}: expected comma-separated positive integers like 1,3,224,224") from None
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


# ---------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the exit code instead of raising (tests call this)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or bool(os.environ.get("BNTOOL_DEBUG"))
    try:
        app(args=argv, prog_name="bntool", standalone_mode=False)
        return 0
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.exceptions.Abort:
        print("interrupted: nothing written", file=sys.stderr)
        return 130
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except BntoolError as e:
        if debug:
            traceback.print_exc()
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted: nothing written", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            traceback.print_exc()
        print(f"error: internal error: {type(e).__name__}: {_one_line(e)} (a bug: rerun with --debug and report it)",
              file=sys.stderr)
        return 3


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def entry() -> None:
    sys.exit(main())
