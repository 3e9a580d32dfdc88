"""Temp files and atomic writes: a temp file next to its output, renamed into place with Ctrl-C held.

Temp files are named `.bntool-tmp-<pid>-<random>` plus the output's suffix (short, so a 254-character output
name still works) in the output's directory; those of a process that no longer runs (killed with SIGKILL) are
removed on the next write into that directory. `atomic_write` is the single-file form the library uses directly;
`files.Outputs` plans, checks and commits a command's outputs on these pieces.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import secrets
import shutil
import signal
import stat
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError

TEMP_PREFIX = ".bntool-tmp-"
# The environment variables of the test hook, read once where a process starts (`InterruptAt.from_env`).
TEST_INTERRUPT_ENV = "BNTOOL_TEST_INTERRUPT"
TEST_SIGNAL_ENV = "BNTOOL_TEST_SIGNAL"
HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass(frozen=True)
class InterruptAt:
    """A test hook: a real signal delivered when a write reaches `point`. Points: "before-commit",
    "during-commit" (after the first file is in place), "after-commit", and "check" (export_onnx, before the
    onnxruntime check). SIGTERM is what CI runners send on cancel."""

    point: str
    signum: int = signal.SIGINT

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> InterruptAt | None:
        """The hook that BNTOOL_TEST_INTERRUPT=<point> (and BNTOOL_TEST_SIGNAL=TERM) ask for; None when unset,
        as it always is outside tests."""
        point = environ.get(TEST_INTERRUPT_ENV)
        if not point:
            return None
        return cls(point, signal.SIGTERM if environ.get(TEST_SIGNAL_ENV) == "TERM" else signal.SIGINT)

    def reached(self, point: str) -> None:
        if point == self.point:
            os.kill(os.getpid(), self.signum)


@dataclass
class WriteSession:
    """One run's writes: the files put in place (so a Ctrl-C message says truthfully what was written), the
    directories already swept for stale temp files (once each), and the test hook, if any.

    The CLI makes one per command and activates it (`with session.active():`), so that outputs the library
    commits on its own (export_onnx, fold_onnx, the demo) are recorded too; `Outputs` and `atomic_write` outside
    an active session record into a fresh one, which nothing reads."""

    committed: list[Path] = field(default_factory=list)
    swept: set[str] = field(default_factory=set)
    interrupt: InterruptAt | None = None
    # Ctrl-C or SIGTERM arrived (the CLI's handlers set it): no commit starts after it, even where the
    # KeyboardInterrupt raised was swallowed ("Exception ignored in" an at-fork hook of DataLoader workers).
    interrupted: bool = False

    def reached(self, point: str) -> None:
        """A named point of a write (see `InterruptAt`): the test hook fires here, if it names this point."""
        if self.interrupt is not None:
            self.interrupt.reached(point)

    @contextlib.contextmanager
    def active(self) -> Iterator[WriteSession]:
        """This session is `current_session()` inside the block (in this thread or task only)."""
        token = _active_session.set(self)
        try:
            yield self
        finally:
            _active_session.reset(token)


# The active session: a context variable, set only inside `WriteSession.active()`, so a session never outlives
# its run (another run in the same process, a test, a thread starts without one).
_active_session: contextvars.ContextVar[WriteSession | None] = contextvars.ContextVar("bntool_writes", default=None)


def current_session() -> WriteSession:
    """The active session, or a fresh one."""
    return _active_session.get() or WriteSession()


def test_point(name: str) -> None:
    """A named point of a write in the library (export_onnx's "check"): the active session's test hook."""
    current_session().reached(name)


def parent_dir(path: Path) -> Path:
    """The directory a path lives in ('.' for a bare file name)."""
    return path.parent if str(path.parent) else Path(".")


def _temp_name() -> str:
    return f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"


def _temp_suffix(path: Path) -> str:
    """`path`'s suffix, so writers that choose the format by it (matplotlib's) see the right one; `.tmp` when it
    has none (or a long one): torch.save names its archive after the file name up to the last dot and refuses
    an empty name, which a temp name whose only dot leads would give."""
    return path.suffix if 0 < len(path.suffix) <= 16 else ".tmp"


def new_temp(path: Path, clean: bool = True, label: str = "", session: WriteSession | None = None) -> Path:
    """An empty temp file next to `path` (same file system, so the final rename is atomic), with its suffix
    (`_temp_suffix`). `label` names the output in messages (default: its path)."""
    parent = parent_dir(path)
    label = label or str(path)
    if clean:
        clean_stale_temps(parent, session)
    for _ in range(100):
        tmp = parent / (_temp_name() + _temp_suffix(path))
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        except OSError as e:
            raise InputError(f"{label}: cannot write to {parent} ({e.strerror or e})") from e
        os.close(fd)
        return tmp
    raise InputError(f"{label}: cannot create a temp file in {parent}")


def new_temp_dir(path: Path, session: WriteSession | None = None) -> Path:
    """A private temp directory next to `path`, for writers that produce several files (ONNX + external data)."""
    parent = parent_dir(path)
    clean_stale_temps(parent, session)
    tmp = parent / _temp_name()
    try:
        os.mkdir(tmp, 0o700)
    except OSError as e:
        raise InputError(f"{path}: cannot write to {parent} ({e.strerror or e})") from e
    return tmp


def clean_stale_temps(directory: Path, session: WriteSession | None = None) -> list[Path]:
    """Remove temp files and directories of ours left by processes that no longer run (SIGKILL, power loss).
    Returns what was removed. Once per directory per session (default: the active one)."""
    session = session or current_session()
    key = os.path.realpath(directory)
    if key in session.swept:
        return []
    session.swept.add(key)
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            if not entry.name.startswith(TEMP_PREFIX):
                continue
            pid_text = entry.name[len(TEMP_PREFIX):].split("-", 1)[0]
            if not pid_text.isdigit() or int(pid_text) == os.getpid() or _running(int(pid_text)):
                continue
            with contextlib.suppress(OSError):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else
    return True


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def finish_temp(tmp: Path, path: Path) -> None:
    """fsync `tmp`, give it the mode a plain open() would (or that of the file replaced), rename onto `path`."""
    fsync_file(tmp)
    os.chmod(tmp, new_file_mode(path))
    os.replace(tmp, path)
    fsync_dir(parent_dir(path))


def remove_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError, IsADirectoryError, NotADirectoryError):
        os.unlink(path)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], session: WriteSession | None = None) -> Path:
    """Write `path` through a temp file in the same directory, fsync, then rename.

    Args:
        path: the file to write.
        write: called with the temp file's name; writes the content there.
        session: records the file once it is in place (default: the active session).

    Returns:
        `path` as a Path.

    Side effects: readers see all or nothing; a failure or Ctrl-C in `write` leaves no partial file and the
    old file (if any) as it was.
    """
    path = Path(path)
    session = session or current_session()
    tmp = new_temp(path, session=session)
    try:
        write(str(tmp))
        if session.interrupted:  # a Ctrl-C swallowed on the way: put nothing in place
            raise KeyboardInterrupt
        with signals_held():
            finish_temp(tmp, path)
            if not path.name.startswith(TEMP_PREFIX):  # a writer filling one of our temp files commits nothing
                session.committed.append(path)
    except BaseException:
        remove_quietly(tmp)
        raise
    return path


def new_file_mode(path: Path) -> int:
    """The mode a plain open() would give (temp files are private), or that of the file replaced."""
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


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block is done, then deliver them to the handlers there were (Python's
    KeyboardInterrupt, the CLI's, or the default that ends the process): a commit is never cut short. Only the
    main thread has signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in HELD_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)  # None: set outside Python
    for signum in dict.fromkeys(received):
        signal.raise_signal(signum)
