"""Errors a user can cause, and the parameter each one names. The CLI turns each into one line and an exit code.

Library messages name parameters through `param("name")`; `str(error)` shows the Python parameter name and
`error.render(flag_names)` lets the CLI show its flag instead (`--input-shape` for `example_inputs`, …).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

_MARK = "\x1d"
_PARAM = re.compile(f"{_MARK}([A-Za-z_][A-Za-z0-9_]*){_MARK}")


def param(name: str) -> str:
    """A reference to the parameter `name` inside an error message, rendered by `BntoolError.render`."""
    return f"{_MARK}{name}{_MARK}"


class BntoolError(Exception):
    """Bad usage or bad input: the message names the file, layer, key or parameter at fault and what to do.

    Args:
        message: the message; parameters referred to with `param(name)`.
        param: the parameter at fault, if one is (e.g. "example_inputs"); the CLI names its flag.
    """

    exit_code = 2

    def __init__(self, message: str = "", *, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param

    def render(self, name_of: Callable[[str], str] | None = None) -> str:
        """The message with each parameter reference written as `name_of(parameter)` (default: its name)."""
        name_of = name_of or (lambda name: name)
        return _PARAM.sub(lambda m: name_of(m.group(1)), self.message)

    def __str__(self) -> str:
        return self.render()


class InputError(BntoolError):
    """A file, option or model that cannot be used as given."""


class UnsupportedError(BntoolError):
    """The input is valid but this operation does not support it."""


class CheckFailed(BntoolError):
    """A check ran and failed (e.g. outputs differ beyond tolerance).

    Args:
        message: what failed, with figures.
        report: the report of the check (FoldReport, ExportReport, …), for rendering and JSON.
    """

    exit_code = 1

    def __init__(self, message: str = "", *, report: Any = None, param: str | None = None):
        super().__init__(message, param=param)
        self.report = report
