"""Errors a user can cause, and the parameter each one names. The CLI turns each into one line and an exit code.

Library messages name parameters through `param("name")`; `str(error)` shows the Python parameter name and
`error.render(flag_names)` lets the CLI show its flag instead (`--input-shape` for `example_inputs`, …).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import sysconfig
from collections.abc import Callable, Iterator, Sequence
from types import CodeType
from typing import Any

_MARK = "\x1d"
_PARAM = re.compile(f"{_MARK}([A-Za-z_][A-Za-z0-9_]*){_MARK}")


def param(name: str) -> str:
    """A reference to the parameter `name` inside an error message, rendered by `BntoolError.render`."""
    return f"{_MARK}{name}{_MARK}"


MAX_MESSAGE = 300


ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # colours some libraries put in their messages


def without_ansi(text: str) -> str:
    """`text` without terminal escape codes (torch.export colours its errors; an error line is plain text)."""
    return ANSI_ESCAPE.sub("", text)


def first_line(exc: BaseException, limit: int = MAX_MESSAGE) -> str:
    """The first non-empty line of an exception's message (its type name if it has none), cut to `limit`."""
    lines = [line.strip() for line in without_ansi(str(exc)).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:limit]


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


class InputError(BntoolError, ValueError):
    """A file, option or model that cannot be used as given (a ValueError too, as Python code expects)."""


class BrokenStatistics(InputError):
    """BN statistics or affine that no fold can use (NaN/Inf, running_var + eps ≤ 0): the checkpoint is at fault.
    `.broken` lists (layer, problem)."""

    def __init__(self, message: str, broken: list[tuple[str, str]], *, param: str | None = None):
        super().__init__(message, param=param)
        self.broken = broken


def broken_layers_text(broken: Sequence[tuple[str, str]]) -> str:
    """'BatchNorm 'a' (NaN/Inf in running_var), 'b' (…) and 2 more (4 in all)': each named with its own problem."""
    names = ", ".join(f"{name!r} ({problem})" for name, problem in broken[:3])
    more = f" and {len(broken) - 3} more ({len(broken)} in all)" if len(broken) > 3 else ""
    return f"BatchNorm {names}{more}"


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


class UserCodeError(InputError):
    """Code or data that bntool runs on the user's behalf raised: the architecture factory, the model's forward,
    a data loader, or a file decoder. `what` names it; the original exception is the `__cause__`."""

    def __init__(self, message: str = "", *, what: str = "", **kwargs: Any):
        super().__init__(message, **kwargs)
        self.what = what


class CorruptFileError(UserCodeError):
    """A file that cannot be decoded: truncated, byte-flipped, or not the format it claims to be."""


# ---------------------------------------------------------------- the boundary around user code

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_ZOO_FILE = os.path.join(_PACKAGE_DIR, "zoo.py")
_PASS_THROUGH: set[CodeType] = set()


def passes_through(function: Callable) -> Callable:
    """Mark a bntool function that only forwards a call into user code or torch (a TorchFunctionMode
    handler, a hook that calls the original forward): an exception raised below it is not bntool's fault."""
    _PASS_THROUGH.add(function.__code__)
    return function


@contextlib.contextmanager
def user_code(what: str, *, error: type[UserCodeError] = UserCodeError, hint: str = "",
              param: str | None = None) -> Iterator[None]:
    """The boundary between bntool and what the user gave it. An exception raised inside the block by the
    user's code, or by torch/the standard library on the user's model or data, becomes `error` naming `what`
    ("the model's forward", "the --loader", …). One raised by bntool's own code inside the block (a hook, a
    helper) is a bug and passes unchanged, as do BntoolErrors and KeyboardInterrupt.
    """
    try:
        yield
    except (BntoolError, StopIteration):
        raise
    except Exception as e:
        if raised_by_bntool(e):
            raise
        message = f"{what} failed: {type(e).__name__}: {first_line(e)}"
        raise error(message + (f"; {hint}" if hint else ""), what=what, param=param) from e


def raised_by_bntool(e: BaseException) -> bool:
    """Whether the innermost frame that raised `e` below a `user_code` block, skipping torch, the standard
    library, installed packages and pass-through functions, is bntool's own code. The frame holding the block
    does not count: the block is meant to hold just the call into user code."""
    frames = []
    tb = e.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_code)
        tb = tb.tb_next
    boundary = _USER_CODE_BODY
    below = frames[frames.index(boundary) + 2:] if boundary in frames else frames[1:]
    for depth in range(len(below) - 1, -1, -1):
        code = below[depth]
        owner = _owner(code.co_filename)
        if owner == "library" or code in _PASS_THROUGH:
            continue
        if owner == "bntool" and depth + 1 < len(below) and _calls_a_module(below[depth + 1]):
            continue  # bntool code calling a module (the user's model) passes the call through
        return owner == "bntool"
    return False


def _calls_a_module(code: CodeType) -> bool:
    return code.co_name in ("_wrapped_call_impl", "_call_impl") and code.co_filename.endswith(
        os.path.join("torch", "nn", "modules", "module.py"))


def _owner(filename: str) -> str:
    """"bntool", "library" (torch, the standard library, any installed package: torchvision, PIL, numpy …)
    or "user" (the user's own modules)."""
    path = os.path.abspath(filename)
    if path.startswith(_PACKAGE_DIR):
        return "user" if path == _ZOO_FILE else "bntool"  # the zoo's models run as a user's model would
    if filename.startswith("<") or path.startswith(_LIBRARY_DIRS) or any(
            f"{os.sep}{d}{os.sep}" in path for d in ("site-packages", "dist-packages")):
        return "library"
    return "user"


def _library_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    dirs = {os.path.abspath(paths[k]) + os.sep for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    spec = importlib.util.find_spec("torch")
    locations = (spec.submodule_search_locations or []) if spec else []
    dirs.update(os.path.abspath(d) + os.sep for d in locations)
    return tuple(sorted(dirs))


_LIBRARY_DIRS = _library_dirs()
_USER_CODE_BODY = user_code.__wrapped__.__code__  # type: ignore[attr-defined]  # set by contextmanager
