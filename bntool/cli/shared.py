"""What every command shares: the console, JSON and Rich output of a report, the notes and data lines, the
input checks (ONNX or PyTorch, eager or TorchScript), the one-line error wording and library parameters as flags."""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..errors import InputError
from ..options import (
    Device,
    Display,
    ExampleInputs,
    ModelSource,
)

if TYPE_CHECKING:
    from ..tempfiles import WriteSession


def _console(stderr: bool = False):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # Logs and pipes get wide tables instead of Rich's 80-column default, unless COLUMNS says otherwise.
    columns = os.environ.get("COLUMNS", "")
    width = None if stream.isatty() else (int(columns) if columns.isdigit() and int(columns) > 0 else 160)
    return Console(stderr=stderr, highlight=False, width=width)


@dataclass
class Run:
    """One command line's run (`runner.main` makes one per call): what it wrote, the signal that ended it,
    whether its JSON report is on stdout, and the error it said, for --json's error object."""

    writes: WriteSession
    terminated_by: int | None = None  # SIGTERM: the exit code and the message say "terminated"
    json_printed: bool = False  # a JSON document is on stdout already: an error adds none after it
    error: tuple[str, str] | None = None  # (kind, message) of the error just said

    @contextlib.contextmanager
    def active(self) -> Iterator[Run]:
        """This run is `current_run()`, and its write session the library's, inside the block."""
        token = _current_run.set(self)
        try:
            with self.writes.active():
                yield self
        finally:
            _current_run.reset(token)


# The run in progress: set only inside `Run.active()`, so nothing of one run is seen by the next.
_current_run: contextvars.ContextVar[Run | None] = contextvars.ContextVar("bntool_cli_run", default=None)


def current_run() -> Run:
    """The run in progress; a throwaway one when a command function is called outside `runner.main`."""
    from ..tempfiles import WriteSession

    return _current_run.get() or Run(WriteSession())


def _print_json(report, context: dict | None = None) -> None:
    from ..report import dumps

    print(dumps(report, context))
    current_run().json_printed = True


def _context(model: ModelSource | None = None, source=None, loaded=None) -> dict:
    """What a JSON report ran on: the checkpoint, the arch, the versions, the data."""
    from ..report import versions

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
    from ..errors import UnsupportedError

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
    from ..files import Outputs
    from ..onnx_save import data_files_read

    outputs = Outputs()
    for path, what in inputs:
        outputs.add_input(path, what)
        for data in data_files_read(path):  # an ONNX input's weights are inputs too
            outputs.add_input(data, f"the external data of {what}")
    return outputs


def _onnx_provider(device: Device, example: ExampleInputs | None = None) -> str:
    """onnxruntime's provider for --device (cpu or cuda, checked here before any work); --dtype does not apply to
    an ONNX file (its graph declares its input types): exit 2 rather than ignored."""
    from ..onnx_check import check_provider

    if example is not None and example.dtype is not None:
        raise InputError("--dtype: an ONNX file's inputs have the types its graph declares; drop --dtype")
    where = device.device.strip()
    if where != "cpu" and where.split(":")[0] != "cuda":  # cpu and cuda are onnxruntime's to judge, not torch's
        where = str(device.resolve())
    if where.split(":")[0] not in ("cpu", "cuda"):
        raise InputError(f"--device {where}: an ONNX file runs in onnxruntime, on cpu or cuda")
    provider = "cuda" if where.startswith("cuda") else "cpu"
    check_provider(provider, f"--device {where}")  # this command's flag: --provider is export-onnx's
    return provider


def _onnx_input(model: ModelSource) -> bool:
    """Whether the command's input is an ONNX file (by content); an ONNX file takes no --arch/--key."""
    from ..onnx_model import is_onnx_file

    if not is_onnx_file(model.ckpt):
        if model.ckpt.suffix.lower() == ".onnx" and model.ckpt.is_file():
            from ..files import looks_like_checkpoint

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
    from ..options import parse_shape

    return [parse_shape(text) for text in example.input_shape] if example.input_shape else None


def _skipped_line(source) -> str:
    from ..utils import plural

    return f"skipped {plural(len(source.skipped), 'unreadable image')} (first: {source.skipped[0]})"


def _warn_skipped(source) -> None:
    """Unreadable images met while reading the check data, as a data warning (shown with the others, in JSON)."""
    if source is not None and source.skipped:
        source.warnings.append(_skipped_line(source))


def _left_out(loaded, out: Path, keep_training_state: bool = True) -> list[str]:
    """What of a training checkpoint the written file does not hold, and why (bntool.checkpoint.write_checkpoint)."""
    from ..checkpoint import output_format, training_state_keys
    from ..utils import short_list

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


def _say(line: str) -> None:
    """One line on stderr in one write: under torchrun every rank shares the stream, and print() writes the
    newline separately, so two ranks' lines could run together."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _one_line(e: BaseException | str) -> str:
    return " ".join(str(e).split()) or type(e).__name__


FLAG_NAMES = {"example_inputs": "--input-shape", "input_names": "--input-name", "output_names": "--output-name",
              "onnx_path": "--onnx", "path": "-o", "out": "-o"}


def flag_name(parameter: str) -> str:
    """The command-line flag of a library parameter named in an error message."""
    return FLAG_NAMES.get(parameter, "--" + parameter.replace("_", "-"))
