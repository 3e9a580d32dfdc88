"""Models from where people keep them: 'module.path:callable', timm's registry, modules in the working directory.

`resolve_factory` turns an architecture string into a callable that builds the model:
- `timm:NAME` (or `timm:NAME.TAG`) goes through timm's model registry, `timm.create_model(NAME, pretrained=False)`:
  the weights come from the checkpoint, nothing is downloaded;
- any other `module.path:callable` is imported with `utils.import_object`, with the working directory on the
  import path as `python -m` has it, so `--arch mymodels:build` finds ./mymodels.py from the console script too;
- a typo gets the closest names (difflib) of the module, attribute or timm model.
"""

from __future__ import annotations

import difflib
import functools
import heapq
import importlib
import os
import pkgutil
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from .errors import InputError, param

TIMM_PREFIX = "timm:"


@dataclass
class Factory:
    """What an architecture string resolved to: the callable, and notes worth telling the user."""

    spec: str
    build: Callable[..., Any]
    source: str  # "import" | "timm registry"
    notes: list[str] = field(default_factory=list)


def resolve_factory(spec: str, what: str = param("arch")) -> Factory:
    """Resolve an architecture string to a callable; InputError naming `what`, with close matches, if it cannot be.

    Side effect: the working directory is appended to `sys.path` when it is not there (as `python -m` has it,
    though after the installed packages, so a local file cannot shadow one); a note says so when a module was
    then imported from it."""
    notes: list[str] = []
    if spec.startswith(TIMM_PREFIX) and spec != TIMM_PREFIX:
        factory = _timm_factory(spec, what, notes)
        if factory is not None:
            return factory
    added = add_working_directory()
    obj = import_user_object(spec, what, notes)
    module_name = spec.partition(":")[0]
    if added and _from_directory(module_name, os.getcwd()):
        notes.append(f"imported {module_name!r} from the working directory {os.getcwd()} "
                     "(added to the import path, as `python -m` does)")
    return Factory(spec, obj, "import", notes)


def import_user_object(spec: str, what: str = param("arch"), notes: list[str] | None = None) -> Any:
    """`utils.import_object`, plus close matches on a typo and torchvision's CPU-torch workaround."""
    try:
        return _import_with_torchvision_workaround(spec, what, notes)
    except InputError as e:
        hint = _close_matches_hint(spec)  # also for a typo found only after the workaround let torchvision import
        if hint:
            raise InputError(f"{e.message}; did you mean {hint}?", param=e.param) from e.__cause__
        raise


def _import_with_torchvision_workaround(spec: str, what: str, notes: list[str] | None) -> Any:
    """`utils.import_object`, retried once after `declare_torchvision_ops` if torchvision's C++ ops did not load."""
    from .utils import import_object

    try:
        return import_object(spec, what=what)
    except InputError as e:
        if not (_is_torchvision_ops_mismatch(e.__cause__) and declare_torchvision_ops()):
            raise
    if notes is not None:
        notes.append("torchvision's compiled operators do not match this torch (a CUDA build of "
                     "torchvision on a CPU torch?); its model definitions are used without them")
    return import_object(spec, what=what)


def add_working_directory() -> bool:
    """Put the working directory on the import path if it is not there; True if it was added.

    `python -m bntool` has it first on sys.path; the `bntool` console script does not, so without this a user's
    `mymodels.py` next to the checkpoint would not import. Appended, not prepended: installed packages keep
    precedence over same-named local files."""
    cwd = os.getcwd()
    if any(_same_directory(p, cwd) for p in sys.path):
        return False
    sys.path.append(cwd)
    importlib.invalidate_caches()
    return True


def _same_directory(entry: str, cwd: str) -> bool:
    try:
        return os.path.realpath(entry or os.curdir) == os.path.realpath(cwd)
    except (OSError, ValueError):
        return False


def _from_directory(module_name: str, directory: str) -> bool:
    module = sys.modules.get(module_name.split(".")[0])
    path = getattr(module, "__file__", None)
    if not path:
        return False
    return os.path.realpath(path).startswith(os.path.realpath(directory) + os.sep)


# ---------------------------------------------------------------- timm


def _timm_factory(spec: str, what: str, notes: list[str]) -> Factory | None:
    """`timm:NAME` through timm's registry; None when NAME is an attribute of timm instead (e.g. create_model)."""
    name = spec[len(TIMM_PREFIX):]
    try:
        timm = _import_timm(notes)
    except ImportError as e:
        raise InputError(f"{what} {spec!r}: timm is not installed (pip install timm) ({e})") from e
    if timm.is_model(name):
        return Factory(spec, functools.partial(timm.create_model, name, pretrained=False), "timm registry", notes)
    if hasattr(timm, name):
        return None
    close = close_matches(name, timm.list_models())
    hint = f"; did you mean {_quoted(close, TIMM_PREFIX)}?" if close else (
        f"; list them with python -c \"import timm; print(timm.list_models('*{name[:4]}*'))\"")
    raise InputError(f"{what} {spec!r}: timm has no model {name!r} ({len(timm.list_models())} models "
                     f"registered){hint}")


def _import_timm(notes: list[str]):
    try:
        return importlib.import_module("timm")
    except RuntimeError as e:  # timm imports torchvision
        if not (_is_torchvision_ops_mismatch(e) and declare_torchvision_ops()):
            raise
        notes.append("torchvision's compiled operators do not match this torch (a CUDA build of torchvision on "
                     "a CPU torch?); its model definitions are used without them")
        return importlib.import_module("timm")


# ---------------------------------------------------------------- torchvision on a torch it was not built for

_TORCHVISION_SCHEMAS: Any = None  # kept alive: dropping the Library object removes the schemas


def _is_torchvision_ops_mismatch(e: BaseException | None) -> bool:
    return isinstance(e, RuntimeError) and "torchvision::nms" in str(e)


def declare_torchvision_ops() -> bool:
    """Let torchvision's Python part import when its C++ ops cannot load (PyPI's CUDA wheel on a CPU torch).

    Importing torchvision registers fake kernels for `torchvision::nms`, which fails when its compiled library
    did not load. Declaring the two schemas it touches lets the import finish; the model definitions need none
    of those ops (calling nms would still fail, loudly). Returns False if it cannot help."""
    global _TORCHVISION_SCHEMAS
    import torch

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith(("torchvision.", "timm"))]:
        del sys.modules[name]
    if _TORCHVISION_SCHEMAS is None:
        try:
            library = torch.library.Library("torchvision", "DEF")
            for op in ("nms", "qnms"):
                library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        except RuntimeError:
            return False
        _TORCHVISION_SCHEMAS = library
    return True


# ---------------------------------------------------------------- close matches


def _close_matches_hint(spec: str) -> str:
    """Names close to the part of `spec` that failed: a module, a submodule or an attribute."""
    if ":" not in spec:
        return ""
    module_name, _, attr_path = spec.partition(":")
    parts = module_name.split(".")
    for i in range(len(parts)):
        prefix = ".".join(parts[:i])
        try:
            importlib.import_module(".".join(parts[:i + 1]))
        except Exception:
            candidates = _submodules(prefix)
            close = close_matches(parts[i], candidates)
            full = [".".join([*parts[:i], c]) + ":" + attr_path for c in close]
            return _quoted(full)
    obj: Any = sys.modules[module_name]
    attrs = attr_path.split(".")
    for i, part in enumerate(attrs):
        if not hasattr(obj, part):
            close = close_matches(part, _public_names(obj))
            return _quoted(f"{module_name}:{'.'.join([*attrs[:i], c])}" for c in close)
        obj = getattr(obj, part)
    return ""


# Characters a reader or a keyboard confuses (O and 0, l, I and 1, S and 5, Z and 2, B and 8), and case: names
# are compared with each group written as one character, so a confusion costs nothing in the ranking.
_CONFUSABLE = str.maketrans({"o": "0", "l": "1", "i": "1", "s": "5", "z": "2", "b": "8"})


def _canonical(name: str) -> str:
    return name.lower().translate(_CONFUSABLE)


def close_matches(word: str, candidates: Iterable[str], n: int = 3, cutoff: float = 0.6) -> list[str]:
    """The `n` candidates closest to `word` (difflib's ratio, at least `cutoff`), confusable characters and case
    counting as equal: `efficientnet_bO` ranks `efficientnet_b0` first (plain difflib put b8 and b7 ahead).
    Ties go to the plain similarity."""
    key = _canonical(word)
    scored = []
    for candidate in candidates:
        matcher = difflib.SequenceMatcher(None, key, _canonical(candidate))
        if matcher.real_quick_ratio() >= cutoff and matcher.quick_ratio() >= cutoff and matcher.ratio() >= cutoff:
            plain = difflib.SequenceMatcher(None, word, candidate).ratio()
            scored.append((matcher.ratio(), plain, candidate))
    return [candidate for *_, candidate in heapq.nlargest(n, scored)]


def _submodules(package: str) -> list[str]:
    if not package:
        names = {m.name for m in pkgutil.iter_modules()}
        names.update(n for n in sys.modules if "." not in n)
        return sorted(n for n in names if not n.startswith("_"))
    module = sys.modules.get(package)
    path = getattr(module, "__path__", None)
    subs = {m.name for m in pkgutil.iter_modules(path)} if path else set()
    subs.update(n for n in dir(module) if not n.startswith("_") and isinstance(getattr(module, n, None), ModuleType))
    return sorted(subs)


def _public_names(obj: Any) -> list[str]:
    return [n for n in dir(obj) if not n.startswith("_")]


def _quoted(names: Iterable[str], prefix: str = "") -> str:
    return " or ".join(f"'{prefix}{n}'" for n in names)
