"""`bntool demo`: the whole workflow on a built-in model and generated data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
import typer.core

from ..choices import Exporter
from ..errors import CheckFailed
from ..options import (
    Display,
    grouped,
)
from .app import ExporterOption, _Command, app
from .shared import (
    _context,
    _show,
)


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
    from ..demo import run_demo
    from ..report import render_demo

    report = run_demo(directory, force=force, exporter=exporter)
    _show(report, display, render_demo, _context())
    if not report.passed:
        raise CheckFailed("the demo's checks failed; nothing written")
