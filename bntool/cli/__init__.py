"""The `bntool` command line: parses options, calls the library, renders the report. Nothing else.

One module per command (`inspect`, `fold`, `recalibrate`, `export` for export-onnx, `verify`, `demo`), on `app`
(the Typer app) and `shared` (rendering, input checks, flags); `runner` runs a command and maps errors to exit
codes. torch and onnx are imported inside the commands so that `bntool --help` stays instant.
"""

from __future__ import annotations

# Importing a command's module registers it on `app`, in the order `bntool --help` lists them.
# isort: off
from . import inspect, fold, recalibrate, export, verify, demo  # noqa: F401
# isort: on
from .app import app
from .runner import entry, main
from .shared import flag_name

__all__ = ["app", "entry", "flag_name", "main"]
