"""Load every checkpoint kind users arrive with, and save results as the same kind, atomically."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import pickle
import stat
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import InputError, UnsupportedError

# Keys under which training scripts (Lightning, timm, DeiT, SWA/EMA scripts, ...) keep the weights.
WRAPPER_KEYS = (
    "state_dict", "model_state_dict", "model", "state_dict_ema", "model_ema", "ema",
    "ema_state_dict", "module", "net", "network", "weights",
)
# Added by DDP and by torch.compile; removed on load so the weights fit the bare architecture.
STRIPPED_PREFIXES = ("module.", "_orig_mod.")
# A uint8 tensor of JSON in a folded state_dict: how to rebuild the folded structure from --arch.
FOLD_LAYOUT_KEY = "bntool.fold_layout"
SAFETENSORS_SUFFIXES = (".safetensors",)


@dataclass
class Checkpoint:
    """A loaded model and what is needed to save a result the same way it came in."""

    model: nn.Module
    kind: str  # "state_dict" | "wrapped" | "module" | "torchscript"
    path: Path
    container: dict | None = None  # the whole training checkpoint, for kind "wrapped"
    key: str | None = None  # where the state_dict sits in the container
    stripped_prefix: str = ""
    fmt: str = "torch"  # "torch" | "safetensors"
    arch: str | None = None
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- loading


def load_checkpoint(
    path: str | os.PathLike,
    arch: str | None = None,
    arch_kwargs: str | Mapping[str, Any] | None = None,
    key: str | None = None,
    trust_pickle: bool = False,
) -> Checkpoint:
    """Load a model from a state_dict (+ arch), a training checkpoint, a pickled module or TorchScript."""
    path = Path(path)
    check_readable_file(path)
    if path.suffix in SAFETENSORS_SUFFIXES:
        return _from_state_dict(path, _read_safetensors(path), arch, arch_kwargs, kind="state_dict", fmt="safetensors")
    if _is_torchscript(path):
        return Checkpoint(model=_read_torchscript(path), kind="torchscript", path=path)
    obj = _torch_load(path, trust_pickle)
    if isinstance(obj, nn.Module):
        return Checkpoint(model=obj, kind="module", path=path)
    if not isinstance(obj, Mapping):
        raise InputError(f"{path}: holds a {type(obj).__name__}, not a state_dict, checkpoint dict or module")
    if _is_state_dict(obj):
        return _from_state_dict(path, obj, arch, arch_kwargs, kind="state_dict")
    found_key, inner = _find_wrapped(path, obj, key)
    if isinstance(inner, nn.Module):
        if not trust_pickle:  # unreachable with weights_only, kept for clarity
            raise InputError(f"{path}: key {found_key!r} holds a pickled module; pass --trust-pickle")
        return Checkpoint(model=inner, kind="module", path=path, notes=[f"module taken from key {found_key!r}"])
    ckpt = _from_state_dict(path, inner, arch, arch_kwargs, kind="wrapped")
    ckpt.container, ckpt.key = dict(obj), found_key
    return ckpt


def load_model(path: str | os.PathLike, arch: str | None = None, **kwargs: Any) -> nn.Module:
    """The model alone, in eval mode. Also loads folded state_dicts written by `bntool fold`."""
    return load_checkpoint(path, arch=arch, **kwargs).model.eval()


def check_readable_file(path: Path) -> None:
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected a checkpoint file")
    if not os.access(path, os.R_OK):
        raise InputError(f"{path}: not readable (permission denied)")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: file is empty")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"{path}: not a valid safetensors file ({_first_line(e)})") from e


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except zipfile.BadZipFile:
        return False
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def _read_torchscript(path: Path) -> torch.jit.ScriptModule:
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except Exception as e:  # torch raises RuntimeError subclasses with C++ traces
        raise InputError(f"{path}: corrupt TorchScript archive ({_first_line(e)})") from e


def _torch_load(path: Path, trust_pickle: bool) -> Any:
    with open(path, "rb") as f:
        head = f.read(4)
    is_zip = head == b"PK\x03\x04"
    if is_zip and not zipfile.is_zipfile(path):
        raise InputError(f"{path}: truncated or corrupt zip archive (an interrupted save or download?)")
    if not is_zip and head[:1] != b"\x80":
        raise InputError(f"{path}: not a PyTorch checkpoint (expected a zip archive or a pickle; got bytes {head!r})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" not in str(e) and "Weights only" not in str(e):
            raise InputError(f"{path}: corrupt checkpoint ({_first_line(e)})") from e
        if not trust_pickle:
            raise InputError(
                f"{path}: contains pickled Python objects (a whole module?); loading it runs code from the file. "
                "Pass --trust-pickle only if you trust its source, or save a state_dict instead"
            ) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise InputError(f"{path}: corrupt or truncated checkpoint ({_first_line(e)})") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (ModuleNotFoundError, AttributeError) as e:
        raise InputError(f"{path}: the pickled module needs code that is not importable here ({_first_line(e)})") from e
    except Exception as e:
        raise InputError(f"{path}: cannot unpickle ({_first_line(e)})") from e


def _is_state_dict(obj: Mapping) -> bool:
    return len(obj) > 0 and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _find_wrapped(path: Path, obj: Mapping, key: str | None) -> tuple[str, Any]:
    if key is not None:
        if key not in obj:
            raise InputError(f"{path}: no key {key!r}; top-level keys: {_list(obj.keys())}")
        inner = obj[key]
        if isinstance(inner, nn.Module) or (isinstance(inner, Mapping) and _is_state_dict(inner)):
            return key, inner
        raise InputError(f"{path}: key {key!r} holds a {type(inner).__name__}, not a state_dict")
    for candidate in WRAPPER_KEYS:
        inner = obj.get(candidate)
        if isinstance(inner, Mapping) and _is_state_dict(inner):
            return candidate, inner
    raise InputError(
        f"{path}: no state_dict found under the usual keys; top-level keys: {_list(obj.keys())}. "
        "Name it with --key"
    )


def strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """Remove DDP/compile prefixes that every key carries; return the new dict and what was removed."""
    sd, removed = dict(state_dict), ""
    changed = True
    while changed:
        changed = False
        for prefix in STRIPPED_PREFIXES:
            if sd and all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                removed += prefix
                changed = True
    return sd, removed


def _from_state_dict(path, state_dict, arch, arch_kwargs, kind, fmt="torch") -> Checkpoint:
    if arch is None:
        raise InputError(f"{path}: is a state_dict; name the architecture with --arch module.path:callable")
    sd, removed = strip_prefixes(state_dict)
    model = build_arch(arch, arch_kwargs)
    layout = sd.pop(FOLD_LAYOUT_KEY, None)
    if layout is not None:
        from .folding import apply_fold_layout

        apply_fold_layout(model, decode_layout(layout))
    load_state_dict_checked(model, sd, path, arch)
    return Checkpoint(model=model, kind=kind, path=path, stripped_prefix=removed, fmt=fmt, arch=arch)


def encode_layout(layout: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(layout, sort_keys=True).encode()), dtype=torch.uint8)


def decode_layout(tensor: torch.Tensor) -> dict:
    return json.loads(bytes(tensor.tolist()).decode())


def import_object(spec: str, what: str = "--arch") -> Any:
    """Resolve 'package.module:attr.path' to an object, with one-line errors."""
    if ":" not in spec:
        raise InputError(f"{what} {spec!r}: expected 'module.path:callable', e.g. 'torchvision.models:resnet18'")
    module_name, _, attr_path = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise InputError(f"{what} {spec!r}: cannot import module {module_name!r} ({_first_line(e)})") from e
    except Exception as e:
        raise InputError(f"{what} {spec!r}: importing {module_name!r} failed "
                         f"({type(e).__name__}: {_first_line(e)})") from e
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise InputError(f"{what} {spec!r}: {obj.__name__ if hasattr(obj, '__name__') else obj!r} has no {part!r}")
        obj = getattr(obj, part)
    return obj


def parse_kwargs(arch_kwargs: str | Mapping[str, Any] | None, what: str = "--arch-kwargs") -> dict[str, Any]:
    if arch_kwargs is None:
        return {}
    if isinstance(arch_kwargs, Mapping):
        return dict(arch_kwargs)
    try:
        value = json.loads(arch_kwargs)
    except json.JSONDecodeError as e:
        raise InputError(f"{what}: invalid JSON ({e.msg} at column {e.colno}): {arch_kwargs!r}") from e
    if not isinstance(value, dict):
        raise InputError(f"{what}: expected a JSON object like '{{\"num_classes\": 10}}', got {arch_kwargs!r}")
    return value


def build_arch(arch: str, arch_kwargs: str | Mapping[str, Any] | None = None) -> nn.Module:
    from .arch import resolve_factory

    factory = resolve_factory(arch).build
    if not callable(factory):
        raise InputError(f"--arch {arch!r}: is a {type(factory).__name__}, not callable")
    kwargs = parse_kwargs(arch_kwargs)
    try:
        model = factory(**kwargs)
    except Exception as e:
        raise InputError(f"--arch {arch!r}: calling it with {kwargs} failed "
                         f"({type(e).__name__}: {_first_line(e)})") from e
    if not isinstance(model, nn.Module):
        raise InputError(f"--arch {arch!r}: returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def load_state_dict_checked(model: nn.Module, sd: Mapping[str, torch.Tensor], path: Path, arch: str) -> None:
    """load_state_dict, but mismatches are named in one line instead of a torch traceback."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in sd and tuple(sd[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({_list(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({_list(unexpected)})")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches ({_list(shapes)})")
    if problems:
        raise InputError(f"{path}: does not fit --arch {arch}: " + "; ".join(problems))
    model.load_state_dict(sd, strict=True)


# ---------------------------------------------------------------- saving


def check_output_path(out: str | os.PathLike, source: str | os.PathLike | None = None,
                      force: bool = False, in_place: bool = False) -> Path:
    """Fail before any work if the output cannot or must not be written."""
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.exists():
        raise InputError(f"{out}: output directory {parent} does not exist")
    if not parent.is_dir():
        raise InputError(f"{out}: {parent} is not a directory")
    if out.is_dir():
        raise InputError(f"{out}: is a directory; give a file name")
    if source is not None and out.exists() and Path(source).exists() and os.path.samefile(out, source):
        if not in_place:
            raise InputError(f"{out}: is the input file; pass --in-place to overwrite it")
    elif out.exists() and not force:
        raise InputError(f"{out}: already exists; pass --force to overwrite it")
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


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Write through a temp file in the same directory, fsync, then rename: readers see all or nothing,
    and a failure or Ctrl-C leaves no partial file."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    except OSError as e:
        raise InputError(f"{path}: cannot write ({e.strerror})") from e
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _new_file_mode(path))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(parent)
    return path


def _new_file_mode(path: Path) -> int:
    """The mode a plain open() would give (mkstemp makes files private), or that of the file replaced."""
    with contextlib.suppress(OSError):
        return stat.S_IMODE(path.stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(ckpt: Checkpoint, model: nn.Module, out: str | os.PathLike,
                    fold_layout: dict | None = None, force: bool = False, in_place: bool = False) -> Path:
    """Save `model` as the same kind of file `ckpt` was loaded from (wrapper keys kept)."""
    out = check_output_path(out, ckpt.path, force=force, in_place=in_place)
    if ckpt.kind == "module":
        return atomic_write(out, lambda tmp: torch.save(model, tmp))
    if ckpt.kind == "torchscript":
        if not isinstance(model, torch.jit.ScriptModule):
            raise UnsupportedError(f"{out}: cannot write a TorchScript archive from an eager module here")
        return atomic_write(out, lambda tmp: torch.jit.save(model, tmp))
    sd = model.state_dict()  # keeps _metadata (module versions) for load_state_dict
    if fold_layout:
        sd[FOLD_LAYOUT_KEY] = encode_layout(fold_layout)
    if ckpt.kind == "wrapped":
        container = dict(ckpt.container or {})
        container[ckpt.key or "state_dict"] = sd
        return atomic_write(out, lambda tmp: torch.save(container, tmp))
    if ckpt.fmt == "safetensors" or out.suffix in SAFETENSORS_SUFFIXES:
        from safetensors.torch import save_file

        flat = {k: v.contiguous().clone() for k, v in sd.items()}
        return atomic_write(out, lambda tmp: save_file(flat, tmp))
    return atomic_write(out, lambda tmp: torch.save(sd, tmp))


def _list(items, n: int = 3) -> str:
    items = [str(i) for i in items]
    shown = ", ".join(items[:n])
    return shown + (f", … {len(items) - n} more" if len(items) > n else "")


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


def iter_tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a nested structure of tuples, lists and dicts (model outputs)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from iter_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from iter_tensors(v)
    elif hasattr(obj, "__dataclass_fields__"):
        for name in obj.__dataclass_fields__:
            yield from iter_tensors(getattr(obj, name))
