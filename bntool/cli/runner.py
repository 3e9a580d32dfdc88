"""Running a command: exit codes from errors, the one `error:` line, --json's error object, and Ctrl-C or
SIGTERM unwound with a truthful message about what was written."""

from __future__ import annotations

import functools
import importlib
import os
import signal
import sys
import threading
import traceback
import warnings
from typing import TYPE_CHECKING

import typer
import typer.core

from ..errors import BntoolError, CheckFailed
from .app import app
from .shared import Run, _one_line, _say, flag_name
from .verify import _ci_reports_of_unparsed_verify

if TYPE_CHECKING:
    from ..tempfiles import InterruptAt


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a CI runner cancelling the job), unwound like Ctrl-C: temp files removed, a commit finished."""


def _on_sigterm(run: Run, signum, frame) -> None:
    run.terminated_by = signum
    run.writes.interrupted = True
    raise _Terminated


def _on_sigint(run: Run, signum, frame) -> None:
    """Ctrl-C, remembered: a KeyboardInterrupt raised inside a hook CPython ignores (DataLoader workers forking)
    is dropped, and the run must still end with 130 and write nothing."""
    run.writes.interrupted = True
    raise KeyboardInterrupt


_AT_FORK: list[object] = []  # the at-fork hook, registered once per process


def _reset_signals_in_forked_children() -> None:
    """A process forked during a run (DataLoader workers) gets Python's default handling of Ctrl-C and SIGTERM
    back: `timeout` and a terminal signal the whole process group, and this run's handlers raising inside a
    worker's bootstrap printed its traceback above the one `interrupted:` line."""
    if not _AT_FORK and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_default_handlers)
        _AT_FORK.append(_default_handlers)


def _default_handlers() -> None:
    for signum, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
        handler = signal.getsignal(signum)
        if isinstance(handler, functools.partial) and handler.func in (_on_sigint, _on_sigterm):
            signal.signal(signum, default)


def _quiet_after_interrupt(run: Run, default, unraisable) -> None:
    """CPython's "Exception ignored in …" tracebacks of a Ctrl-C that landed in a hook (an at-fork handler, a
    half-built DataLoader iterator's __del__) are noise above the one `interrupted:` line; others still show."""
    if not (run.writes.interrupted or isinstance(unraisable.exc_value, KeyboardInterrupt)):
        default(unraisable)


def main(argv: list[str] | None = None, interrupt: InterruptAt | None = None) -> int:
    """Run the CLI; return the exit code instead of raising (tests call this). SIGTERM unwinds like Ctrl-C
    (exit 143) instead of ending the process where it stands. `interrupt`: a test hook, a real signal at a named
    point of a write (bntool.tempfiles.InterruptAt)."""
    from ..tempfiles import WriteSession

    run = Run(WriteSession(interrupt=interrupt))
    with run.active():
        if threading.current_thread() is not threading.main_thread():
            return _main(argv, run)
        _reset_signals_in_forked_children()
        handlers = {signal.SIGTERM: functools.partial(_on_sigterm, run),
                    signal.SIGINT: functools.partial(_on_sigint, run)}
        previous = {signum: signal.signal(signum, handler) for signum, handler in handlers.items()
                    if signal.getsignal(signum) != signal.SIG_IGN}  # an ignored signal (trap '' INT) stays ignored
        unraisable = sys.unraisablehook
        sys.unraisablehook = functools.partial(_quiet_after_interrupt, run, unraisable)
        try:
            return _main(argv, run)
        finally:
            sys.unraisablehook = unraisable
            for signum, handler in previous.items():
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def _main(argv: list[str] | None, run: Run) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or bool(os.environ.get("BNTOOL_DEBUG"))
    exit_types, abort_types, usage_types = _click_exception_types()
    code = _run(argv, run, debug, exit_types, abort_types, usage_types)
    if code not in (0, None) and _wants_json(argv) and not run.json_printed:
        _print_error_json(argv, code, run)
    return code


def _run(argv: list[str], run: Run, debug: bool, exit_types, abort_types, usage_types) -> int:
    try:
        with warnings.catch_warnings():
            if not debug:  # torch's and the exporters' warnings are for their developers; --debug shows them
                warnings.simplefilter("ignore")
            # Outside standalone mode Typer returns the code of an Exit (Ctrl-C becomes Exit(130)) instead of raising.
            code = app(args=argv, prog_name="bntool", standalone_mode=False)
        if code == 130 or run.writes.interrupted:  # a Ctrl-C swallowed on the way still ends the run
            return _interrupted(run)
        return code if isinstance(code, int) else 0
    except exit_types as e:
        return e.exit_code
    except abort_types:
        return _interrupted(run)
    except usage_types as e:
        return _usage_error(e, argv, run)
    except BntoolError as e:
        if run.writes.interrupted:  # Ctrl-C turned into the user's code failing (a loader's import)
            return _interrupted(run)
        if debug:
            traceback.print_exc()
        _say(f"error: {_one_line(e.render(flag_name))}")
        run.error = (_error_kind(e), _one_line(e.render(flag_name)))
        return e.exit_code
    except KeyboardInterrupt:
        return _interrupted(run)
    except Exception as e:
        if run.writes.interrupted:  # Ctrl-C turned into another error on its way (onnxruntime's import: ImportError)
            return _interrupted(run)
        if debug:
            traceback.print_exc()
        message = f"internal error: {type(e).__name__}: {_one_line(e)} (a bug: rerun with --debug and report it)"
        _say(f"error: {message}")
        run.error = ("internal", message)
        return 3


def _wants_json(argv: list[str]) -> bool:
    """--json on the command line (before a `--` that ends the options)."""
    options = argv[:argv.index("--")] if "--" in argv else argv
    return "--json" in options


def _error_kind(e: BaseException) -> str:
    """"input", "user_code", "corrupt_file", "unsupported" or "check_failed": the BntoolError kind, as a word."""
    from ..errors import CorruptFileError, UnsupportedError, UserCodeError

    for kind, name in ((CheckFailed, "check_failed"), (CorruptFileError, "corrupt_file"),
                       (UserCodeError, "user_code"), (UnsupportedError, "unsupported")):
        if isinstance(e, kind):
            return name
    return "input"


def _print_error_json(argv: list[str], code: int, run: Run) -> None:
    """With --json, a command that could not run (or was interrupted) still prints one JSON object on stdout:
    {"error": {"exit_code", "kind", "message"}, "command", "versions"}, so a CI step that parses stdout gets
    JSON. Not when the command already printed its report (a failed check prints its report)."""
    import json

    from ..report_json import versions  # no torch: a Ctrl-C may have cut its import short

    kind, message = run.error or (
        "interrupted" if code in (130, 143) else "check_failed" if code == 1 else "usage", "")
    error = {"exit_code": code, "kind": kind, "message": message}
    print(json.dumps({"error": error, "command": _command_named(argv), "versions": versions()}, indent=2))


def _interrupted(run: Run) -> int:
    """Ctrl-C or SIGTERM: say truthfully which files were put in place (a commit is never cut short)."""
    what = "terminated (SIGTERM)" if run.terminated_by else "interrupted"
    written = run.writes.committed
    if written:
        message = f"{what}: wrote {', '.join(str(p) for p in written)} (complete); nothing else written"
    else:
        message = f"{what}: nothing written"
    _say(message)
    run.error = ("interrupted", message)
    return 143 if run.terminated_by else 130


def _usage_error(e, argv: list[str], run: Run) -> int:
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
    run.error = ("usage", message)
    if named == "verify":
        _ci_reports_of_unparsed_verify(argv, message)
    return e.exit_code


def _command_named(argv: list[str]) -> str | None:
    """The subcommand in raw arguments: the first word that is not an option (global options may precede it)."""
    word = next((a for a in argv if not a.startswith("-")), None)
    names = {c.name or c.callback.__name__ for c in app.registered_commands}  # type: ignore[union-attr]  # all have one
    return word if word in names else None


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


def entry() -> None:
    from ..tempfiles import InterruptAt

    code = main(interrupt=InterruptAt.from_env(os.environ))  # the slow tests' hook, read once, here
    # The command is over and has said what it wrote: a Ctrl-C during interpreter shutdown (torch's exit
    # handlers) can change nothing, and must not print a KeyboardInterrupt traceback under that last line.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code)
