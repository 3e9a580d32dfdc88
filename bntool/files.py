"""Every file a command writes: output-path checks before any work, atomic writes, file modes and fsync.

A command plans its outputs with `Outputs` (`add` each path with its kind, `check` them all before work),
writes each through `write` (or `temp_path` for writers that need a file name) and calls `commit` last.
`atomic_write` and `check_output_path` are the single-file forms the library uses directly.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from .errors import InputError, param

TEMP_SUFFIX = ".tmp"


class OutputKind(str, Enum):
    """What an output file holds (a file of one kind must not silently replace another kind)."""

    CHECKPOINT = "checkpoint"
    ONNX = "onnx"
    PLOT = "plot"
    REPORT = "report"  # JUnit XML, JSON, Markdown summaries


def parent_dir(path: Path) -> Path:
    """The directory a path lives in ('.' for a bare file name)."""
    return path.parent if str(path.parent) else Path(".")


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
        InputError: the directory is missing or not writable, `out` is a directory, exists without `force`,
            or is the input without `in_place`. The error has `param` set to the parameter at fault.

    Side effects: creates and removes a probe file in `out`'s directory.
    """
    out = Path(out)
    parent = parent_dir(out)
    if not parent.exists():
        raise InputError(f"{out}: output directory {parent} does not exist")
    if not parent.is_dir():
        raise InputError(f"{out}: {parent} is not a directory")
    if out.is_dir():
        raise InputError(f"{out}: is a directory; give a file name")
    if source is not None and out.exists() and Path(source).exists() and os.path.samefile(out, source):
        if not in_place:
            raise InputError(f"{out}: is the input file; pass {param('in_place')} to overwrite it", param="in_place")
    elif out.exists() and not force:
        raise InputError(f"{out}: already exists; pass {param('force')} to overwrite it", param="force")
    _probe_writable(out, parent)
    return out


def _probe_writable(out: Path, parent: Path) -> None:
    """Create and remove a temp file: the only reliable test (root, read-only mounts, /proc, quotas)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".probe", dir=parent)
    except OSError as e:
        raise InputError(f"{out}: cannot write to {parent} ({e.strerror or e})") from e
    os.close(fd)
    os.unlink(probe)


def new_temp(path: Path) -> Path:
    """An empty temp file next to `path` (same file system, so the final rename is atomic)."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=parent_dir(path))
    except OSError as e:
        raise InputError(f"{path}: cannot write ({e.strerror})") from e
    os.close(fd)
    return Path(tmp)


def finish_temp(tmp: Path, path: Path) -> None:
    """fsync `tmp`, give it the mode a plain open() would (or that of the file replaced), rename onto `path`."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, new_file_mode(path))
    os.replace(tmp, path)
    fsync_dir(parent_dir(path))


def remove_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Write `path` through a temp file in the same directory, fsync, then rename.

    Args:
        path: the file to write.
        write: called with the temp file's name; writes the content there.

    Returns:
        `path` as a Path.

    Side effects: readers see all or nothing; a failure or Ctrl-C in `write` leaves no partial file and the
    old file (if any) as it was.
    """
    path = Path(path)
    tmp = new_temp(path)
    try:
        write(str(tmp))
        finish_temp(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise
    return path


def new_file_mode(path: Path) -> int:
    """The mode a plain open() would give (mkstemp makes files private), or that of the file replaced."""
    with contextlib.suppress(OSError):
        return stat.S_IMODE(path.stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclass
class PlannedOutput:
    path: Path
    kind: OutputKind
    force: bool = False
    in_place: bool = False
    temp: Path | None = None  # written, not yet committed


@dataclass
class Outputs:
    """The outputs of one command: planned and checked before any work, written to temp files, committed last.

    `add` each output, `check()` before the work starts, `write` (or `temp_path` + your own writer) during it,
    and `commit()` once everything succeeded; `discard()` (also on leaving a `with` block with an exception)
    removes whatever was written. Until `commit`, nothing exists at any output path.
    """

    inputs: list[Path] = field(default_factory=list)  # the first may be replaced by an output with in_place
    planned: list[PlannedOutput] = field(default_factory=list)

    def add(self, path: str | os.PathLike, kind: OutputKind, *, force: bool = False,
            in_place: bool = False) -> Path:
        """Plan an output; return its Path."""
        planned = PlannedOutput(Path(path), OutputKind(kind), force=force, in_place=in_place)
        self.planned.append(planned)
        return planned.path

    def check(self) -> None:
        """Check every planned output (see `check_output_path`) and that no two outputs are the same file.

        Raises:
            InputError: an output cannot or must not be written.
        """
        seen: dict[str, Path] = {}
        for p in self.planned:
            real = os.path.realpath(p.path)
            if real in seen:
                raise InputError(f"{p.path}: given as two outputs (also {seen[real]})")
            seen[real] = p.path
            for other in self.inputs[1:]:
                if p.path.exists() and other.exists() and os.path.samefile(p.path, other):
                    raise InputError(f"{p.path}: is an input file")
            check_output_path(p.path, self.inputs[0] if self.inputs else None, force=p.force, in_place=p.in_place)

    def _find(self, path: str | os.PathLike) -> PlannedOutput:
        for p in self.planned:
            if p.path == Path(path):
                return p
        raise KeyError(f"{path} was not planned with Outputs.add")

    def temp_path(self, path: str | os.PathLike) -> Path:
        """A temp file next to a planned output, to write into; `commit` moves it into place."""
        p = self._find(path)
        if p.temp is None:
            p.temp = new_temp(p.path)
        return p.temp

    def write(self, path: str | os.PathLike, write: Callable[[str], None]) -> Path:
        """Write a planned output to its temp file now (`write` gets the temp file's name)."""
        tmp = self.temp_path(path)
        write(str(tmp))
        return Path(path)

    def commit(self) -> list[Path]:
        """Move every written output into place (fsync'd, normal file mode); return the paths committed."""
        done = []
        for p in self.planned:
            if p.temp is not None:
                finish_temp(p.temp, p.path)
                p.temp = None
                done.append(p.path)
        return done

    def discard(self) -> None:
        """Remove every temp file written so far; output paths stay as they were."""
        for p in self.planned:
            if p.temp is not None:
                remove_quietly(p.temp)
                p.temp = None

    def __enter__(self) -> Outputs:
        return self

    def __exit__(self, *exc) -> bool:
        self.discard()
        return False
