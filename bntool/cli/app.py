"""The Typer app, its root options and the flags several commands share without an option group."""

from __future__ import annotations

from typing import Annotated

import typer
import typer.core

from .._version import __version__
from ..choices import Exporter


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
