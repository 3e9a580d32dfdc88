"""Every file a command writes: planned and checked before any work, written to temp files, committed last.

A command plans its outputs with `Outputs` (`add` each path with its kind, `check` them all before work: paths
resolved through symlinks and hard links, none an input or another output, parent writable, existing only with
`force`, never a report or ONNX file over a checkpoint), writes each through `write` (or `temp_path` for writers
that need a file name) and calls `commit` last. The commit is a critical section: Ctrl-C is held until every
file is in place, then raised, and the run's `WriteSession` records truthfully what was written.

`check_output_path` is the single-file form the library uses directly; temp files and atomic writes are in
`tempfiles`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Literal

from .errors import InputError, param
from .tempfiles import (  # noqa: F401  # TEMP_PREFIX, atomic_write, clean_stale_temps, test_point: re-exported
    TEMP_PREFIX,
    WriteSession,
    atomic_write,
    clean_stale_temps,
    current_session,
    fsync_dir,
    fsync_file,
    new_file_mode,
    new_temp,
    new_temp_dir,
    parent_dir,
    remove_quietly,
    signals_held,
    test_point,
)


class OutputKind(str, Enum):
    """What an output file holds (a file of one kind must not silently replace another kind)."""

    CHECKPOINT = "checkpoint"
    ONNX = "onnx"
    PLOT = "plot"
    REPORT = "report"  # JUnit XML, JSON, Markdown summaries
    DEMO = "demo"  # the files `bntool demo` writes

    @property
    def noun(self) -> str:
        """How a message names a file of this kind: "an ONNX file", "a plot"."""
        return _KIND_NOUNS[self]


_KIND_NOUNS = {OutputKind.CHECKPOINT: "a checkpoint", OutputKind.ONNX: "an ONNX file", OutputKind.PLOT: "a plot",
               OutputKind.REPORT: "a report", OutputKind.DEMO: "a demo file"}










# ---------------------------------------------------------------- identity and checks


@dataclass(frozen=True)
class FileIdentity:
    """Where a path really points: its resolved path, and (if it exists) its device and inode, which also
    catch hard links."""

    real: str
    dev_ino: tuple[int, int] | None

    @classmethod
    def of(cls, path: str | os.PathLike) -> FileIdentity:
        try:
            st = os.stat(path)
            dev_ino = (st.st_dev, st.st_ino)
        except OSError:
            dev_ino = None
        return cls(os.path.realpath(path), dev_ino)

    def same(self, other: FileIdentity) -> bool:
        return self.real == other.real or (self.dev_ino is not None and self.dev_ino == other.dev_ino)


def shown_path(path: str | os.PathLike, limit: int = 120) -> str:
    """A path for a one-line message: whole when short, else its start and end around an ellipsis."""
    text = str(path)
    return text if len(text) <= limit else f"{text[:limit // 2]}…{text[-(limit // 2):]}"


_NON_REGULAR = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
                (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                (stat.S_ISSOCK, "a socket"))


def check_input_file(path: Path, expected: str) -> os.stat_result:
    """A regular, readable file at `path`, or InputError saying what is there instead (nothing missing,
    no directory, device or FIFO read as if it were `expected`, e.g. "a checkpoint file"). Never opens it:
    opening a FIFO would wait for a writer."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise InputError(f"{shown_path(path)}: no such file") from None
    except OSError as e:  # ENAMETOOLONG, ELOOP, EACCES on a parent: the path cannot be used as given
        raise InputError(f"{shown_path(path)}: cannot be read ({e.strerror or e})") from e
    for is_kind, noun in _NON_REGULAR:
        if is_kind(st.st_mode):
            raise InputError(f"{shown_path(path)}: is {noun}, not a regular file; expected {expected}")
    if not os.access(path, os.R_OK):
        raise InputError(f"{shown_path(path)}: not readable (permission denied)")
    return st


def name_max(directory: Path) -> int:
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return os.pathconf(directory, "PC_NAME_MAX")
    return 255


def check_output_path(out: str | os.PathLike, source: str | os.PathLike | None = None,
                      force: bool = False, in_place: bool = False) -> Path:
    """Fail before any work if `out` cannot or must not be written.

    Args:
        out: the output file.
        source: the input file; `out` may be it only with `in_place`.
        force: allow replacing an existing file that is not `source`.
        in_place: allow `out` to be `source`.

    Returns:
        `out` as a Path.

    Raises:
        InputError: the directory is missing or not writable, the name is too long, `out` is a directory,
            exists without `force`, or is the input without `in_place`.

    Side effects: creates and removes a probe file in `out`'s directory.
    """
    outputs = Outputs(inputs=[Path(source)] if source is not None else [])
    outputs.add(out, OutputKind.CHECKPOINT, force=force, in_place=in_place, what=param("out"))
    outputs.check()
    return Path(out)


def output_label(what: str, path: Path | str) -> str:
    """How messages name an output: its flag or role, then its path ("-o model.pt")."""
    return f"{what} {path}" if what else str(path)


def _check_location(out: Path, what: str) -> None:
    try:
        _check_location_of(out, what)
    except OSError as e:  # a path beyond PATH_MAX (ENAMETOOLONG), a symlink loop, a parent not searchable
        raise InputError(f"{output_label(what, shown_path(out))}: cannot be written ({e.strerror or e})") from e


def _check_location_of(out: Path, what: str) -> None:
    label = output_label(what, shown_path(out))
    parent = parent_dir(out)
    if not parent.exists():
        raise InputError(f"{label}: output directory {shown_path(parent)} does not exist")
    if not parent.is_dir():
        raise InputError(f"{label}: {shown_path(parent)} is not a directory")
    limit = name_max(parent)
    if len(os.fsencode(out.name)) > limit:
        raise InputError(f"{output_label(what, out.name[:40])}…: the file name is {len(os.fsencode(out.name))} "
                         f"bytes long; this file system allows {limit}")
    if out.is_dir():
        raise InputError(f"{label}: is a directory; give a file name")


def looks_like_checkpoint(path: Path) -> bool:
    """A PyTorch zip archive, a pickle, or a safetensors file (by content, not by name)."""
    try:
        with open(path, "rb") as f:
            head = f.read(10)
    except OSError:
        return False
    if head[:4] == b"PK\x03\x04":
        with contextlib.suppress(Exception):
            with zipfile.ZipFile(path) as zf:
                return any(n.endswith(("data.pkl", "constants.pkl")) for n in zf.namelist())
        return False
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return True
    return len(head) >= 10 and head[8:10] == b'{"'  # safetensors: 8-byte header length, then JSON


def is_junit_xml(path: Path) -> bool:
    """A JUnit XML report (root element <testsuites> or <testsuite>, as pytest and bntool write), read only up
    to its first element; False for anything else, a FIFO or a device included (never opened)."""
    import xml.etree.ElementTree as ET

    if not os.path.isfile(path):
        return False
    try:
        with open(path, "rb") as f:
            for _event, element in ET.iterparse(f, events=("start",)):
                return element.tag in ("testsuites", "testsuite")
    except (OSError, ET.ParseError):
        return False
    return False


MARKDOWN_REPORT_MARK = "### bntool "  # the first line of every Markdown report bntool writes


def is_markdown_report(path: Path) -> bool:
    """A Markdown report bntool wrote: its first line starts with `MARKDOWN_REPORT_MARK`."""
    if not os.path.isfile(path):
        return False
    try:
        with open(path, "rb") as f:
            return f.read(len(MARKDOWN_REPORT_MARK)) == MARKDOWN_REPORT_MARK.encode()
    except OSError:
        return False


def _probe_writable(out: Path, label: str) -> None:
    """Create and remove a temp file: the only reliable test (root, read-only mounts, /proc, quotas)."""
    remove_quietly(new_temp(out, clean=False, label=label))






























# ---------------------------------------------------------------- a command's outputs


@dataclass
class PlannedOutput:
    path: Path
    kind: OutputKind
    force: bool = False
    in_place: bool = False
    what: str = ""  # the flag or role, for messages ("--plot", "-o")
    precheck: Callable[[Path], None] | None = None  # what the writer needs (matplotlib for a plot), checked early
    # an existing file it accepts is an earlier output of the same kind (a JUnit report), replaced without force
    same_kind: Callable[[Path], bool] | None = None
    temp: Path | None = None  # written, not yet committed
    temp_dir: Path | None = None  # removed after the commit (ONNX: the file and its external data)
    replaceable: bool = False  # may replace the first input with `in_place` (a checkpoint always may)


@dataclass
class Outputs:
    """The outputs of one command: planned and checked before any work, written to temp files, committed last.

    `add` each output, `check()` before the work starts, `write` (or `temp_path` + your own writer) during it,
    and `commit()` once everything succeeded; `discard()` (also on leaving a `with` block with an exception)
    removes whatever was written. Until `commit`, nothing exists at any output path.

    `inputs` are the files the command reads; the first is the one `in_place` lets an output replace. `session`
    (default: the active one) records what `commit` put in place and holds the test hook.
    """

    inputs: list[Path] = field(default_factory=list)
    planned: list[PlannedOutput] = field(default_factory=list)
    input_names: list[str] = field(default_factory=list)  # what each input is, for messages
    staging: list[Path] = field(default_factory=list)  # temp directories, removed after commit or discard
    session: WriteSession = field(default_factory=current_session)  # records what commit put in place
    obsolete: list[Path] = field(default_factory=list)  # removed after the commit (an in-place ONNX's old data)

    def staging_dir(self, path: str | os.PathLike) -> Path:
        """A private temp directory next to `path` for writers that produce several files or need the final
        name (ONNX and its external data); `adopt` files from it; it is removed after commit or discard."""
        directory = new_temp_dir(Path(path), self.session)
        self.staging.append(directory)
        return directory

    def add_input(self, path: str | os.PathLike | None, what: str = "") -> None:
        if path is not None:
            self.inputs.append(Path(path))
            self.input_names.append(what)

    def add(self, path: str | os.PathLike, kind: OutputKind, *, force: bool = False, in_place: bool = False,
            what: str = "", precheck: Callable[[Path], None] | None = None,
            same_kind: Callable[[Path], bool] | None = None, replaceable: bool = False) -> Path:
        """Plan an output; return its Path. `precheck(path)` raises if the writer cannot produce it (a missing
        optional dependency, an unknown format); `check` calls it before any work. An existing file that
        `same_kind(path)` accepts (an earlier report of the same kind, by content) is replaced without `force`,
        as pytest's --junitxml replaces its own file."""
        planned = PlannedOutput(Path(path), OutputKind(kind), force=force, in_place=in_place, what=what,
                                precheck=precheck, same_kind=same_kind, replaceable=replaceable)
        self.planned.append(planned)
        return planned.path

    def check(self) -> None:
        """Check every planned output before any work.

        Raises:
            InputError: the name is too long, the directory is missing or read-only, the output is a directory,
                is an input (other than `-o` over the checkpoint with `in_place`), is another output (also
                through a symlink or hard link), exists without `force`, or is a checkpoint that a file of
                another kind would replace.
        """
        inputs = [FileIdentity.of(p) for p in self.inputs]
        seen: list[tuple[FileIdentity, PlannedOutput]] = []
        for p in self.planned:
            label = output_label(p.what, p.path)
            _check_location(p.path, p.what)
            me = FileIdentity.of(p.path)
            for other_id, other in seen:
                if me.same(other_id):
                    raise InputError(f"{label}: is also {other.what or 'another output'} ({other.path}); "
                                     "give each output its own file")
            seen.append((me, p))
            replaces_input = False
            for i, (identity, path) in enumerate(zip(inputs, self.inputs)):
                if not me.same(identity):
                    continue
                if i == 0 and (p.kind == OutputKind.CHECKPOINT or p.replaceable):
                    if not p.in_place:
                        raise InputError(f"{label}: is the input file; pass {param('in_place')} to overwrite it",
                                         param="in_place")
                    replaces_input = True
                else:
                    name = self.input_names[i] if i < len(self.input_names) and self.input_names[i] else "an input"
                    raise InputError(f"{label}: is {name} ({path}); an output never replaces an input "
                                     "(choose another name)")
            exists = os.path.lexists(p.path)
            for identity, path in zip(inputs, self.inputs):  # a file of an input folder (--data DIR) is input
                folder = identity.real.rstrip(os.sep) + os.sep
                if exists and os.path.isdir(identity.real) and me.real.startswith(folder):
                    raise InputError(f"{label}: is inside the input folder {path}; an output never replaces an "
                                     "input (choose another name)")
            if exists and p.kind != OutputKind.CHECKPOINT and looks_like_checkpoint(p.path):
                raise InputError(f"{label}: is a PyTorch checkpoint; {p.kind.noun} will not replace it "
                                 "(choose another name)")
            earlier_report = p.same_kind is not None and exists and p.same_kind(p.path)
            if exists and not replaces_input and not p.force and not earlier_report:
                raise InputError(f"{label}: already exists; pass {param('force')} to overwrite it", param="force")
            _probe_writable(p.path, label)
            if p.precheck is not None:
                p.precheck(p.path)

    def role_of(self, path: str | os.PathLike) -> str:
        """What `path` already is to this command: an input, a file of an input folder or a planned output
        ("the input checkpoint (m.pt)", "--junit-xml (v.xml)"); "" when none."""
        me = FileIdentity.of(path)
        for i, input_path in enumerate(self.inputs):
            identity = FileIdentity.of(input_path)
            name = self.input_names[i] if i < len(self.input_names) and self.input_names[i] else "an input"
            if me.same(identity):
                return f"{name} ({input_path})"
            if os.path.isdir(identity.real) and me.real.startswith(identity.real.rstrip(os.sep) + os.sep):
                return f"a file of {name} ({input_path})"
        for p in self.planned:
            if me.same(FileIdentity.of(p.path)):
                return f"{p.what or 'another output'} ({p.path})"
        return ""

    def _find(self, path: str | os.PathLike) -> PlannedOutput:
        for p in self.planned:
            if p.path == Path(path):
                return p
        raise KeyError(f"{path} was not planned with Outputs.add")

    def temp_path(self, path: str | os.PathLike) -> Path:
        """A temp file next to a planned output, to write into; `commit` moves it into place."""
        p = self._find(path)
        if p.temp is None:
            p.temp = new_temp(p.path, session=self.session)
        return p.temp

    def adopt(self, path: str | os.PathLike, written: Path, temp_dir: Path | None = None) -> None:
        """Take a file a writer already produced (in a `new_temp_dir` next to the output) as the output's
        content; `temp_dir` is removed after the commit or discard."""
        p = self._find(path)
        p.temp, p.temp_dir = written, temp_dir

    def write(self, path: str | os.PathLike, write: Callable[[str], None]) -> Path:
        """Write a planned output to its temp file now (`write` gets the temp file's name)."""
        tmp = self.temp_path(path)
        write(str(tmp))
        return Path(path)

    def commit(self) -> list[Path]:
        """Move every written output into place and return their paths. Files are fsync'd first; the renames
        run with Ctrl-C held, so either all happen or (on an error) the ones done are in `session.committed`; an
        output replacing the input goes last."""
        ready = sorted((p for p in self.planned if p.temp is not None), key=lambda p: p.in_place)
        for p in ready:
            assert p.temp is not None  # ready: written
            fsync_file(p.temp)
            os.chmod(p.temp, new_file_mode(p.path))
        self.session.reached("before-commit")
        done = []
        if self.session.interrupted:  # a Ctrl-C whose KeyboardInterrupt was swallowed on the way: write nothing
            raise KeyboardInterrupt
        with signals_held():
            for p in ready:
                assert p.temp is not None
                os.replace(p.temp, p.path)
                p.temp = None
                self.session.committed.append(p.path)
                done.append(p.path)
                self.session.reached("during-commit")
            for directory in {parent_dir(p.path) for p in ready}:
                fsync_dir(directory)
            for path in self.obsolete:  # unread by any committed output now; part of the commit's unit
                remove_quietly(path)
        self._remove_temp_dirs()
        self.session.reached("after-commit")
        return done

    def discard(self) -> None:
        """Remove every temp file written so far; output paths stay as they were."""
        for p in self.planned:
            if p.temp is not None:
                remove_quietly(p.temp)
                p.temp = None
        self._remove_temp_dirs()

    def _remove_temp_dirs(self) -> None:
        for p in self.planned:
            if p.temp_dir is not None:
                shutil.rmtree(p.temp_dir, ignore_errors=True)
                p.temp_dir = None
        for directory in self.staging:
            shutil.rmtree(directory, ignore_errors=True)
        self.staging.clear()

    def __enter__(self) -> Outputs:
        return self

    def __exit__(self, *exc) -> Literal[False]:
        self.discard()
        return False


def failed_name(path: Path) -> Path:
    """Where `--keep-failed` keeps an output whose check failed: model.onnx → model.FAILED.onnx."""
    return path.with_name(f"{path.stem}.FAILED{path.suffix}")
