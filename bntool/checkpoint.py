"""Load every checkpoint kind users arrive with, and save results as the same kind, atomically."""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .choices import CheckpointFormat, CheckpointKind
from .errors import CorruptFileError, InputError, UnsupportedError, param, user_code
from .files import atomic_write, check_input_file, check_output_path
from .layout import LAYOUT_KEY, FoldLayout, layout_of
from .utils import a_type, first_line, parse_kwargs, plural, short_list

# Keys under which training scripts (Lightning, timm, DeiT, SWA/EMA scripts, ...) keep the weights.
WRAPPER_KEYS = (
    "state_dict", "model_state_dict", "model", "state_dict_ema", "model_ema", "ema",
    "ema_state_dict", "module", "net", "network", "weights",
)
# Added by DDP and by torch.compile; removed on load so the weights fit the bare architecture.
STRIPPED_PREFIXES = ("module.", "_orig_mod.")
SAFETENSORS_SUFFIXES = (".safetensors",)


@dataclass
class Checkpoint:
    """A loaded model and what is needed to save a result the same way it came in."""

    model: nn.Module
    kind: CheckpointKind
    path: Path
    container: dict | None = None  # the whole training checkpoint, for kind "wrapped"
    key: str | None = None  # where the state_dict sits in the container
    stripped_prefix: str = ""  # DDP/compile prefixes removed from every key, put back on save
    submodule: str = ""  # the model's weights sat under this prefix (a LightningModule's `model.`), put back on save
    other_entries: dict[str, torch.Tensor] = field(default_factory=dict)  # the state_dict's entries outside it
    fmt: CheckpointFormat = CheckpointFormat.TORCH
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
    """Load a model from a state_dict (+ arch), a training checkpoint, a pickled module or TorchScript.

    Args:
        path: the file (.pt/.pth/.bin/.safetensors, or a TorchScript archive).
        arch: 'module.path:callable' building the architecture, needed for state_dicts.
        arch_kwargs: keyword arguments for `arch`, a mapping or a JSON object.
        key: where the state_dict sits inside a training checkpoint (default: the usual keys), or the prefix of
            the weights to take inside a state_dict ("ema": the keys under 'ema.', e.g. an EMA copy).
        trust_pickle: allow unpickling arbitrary objects (runs code from the file).

    Returns:
        A Checkpoint: the model (a folded state_dict is rebuilt with its FoldLayout) and how it was stored.

    Raises:
        InputError: the file is missing, corrupt, of an unknown kind, pickled without `trust_pickle`, or
            does not fit `arch`.
    """
    path = Path(path)
    check_readable_file(path)
    if path.suffix in SAFETENSORS_SUFFIXES or _is_safetensors(path):
        return _from_state_dict(path, _read_safetensors(path), arch, arch_kwargs, kind=CheckpointKind.STATE_DICT,
                                fmt=CheckpointFormat.SAFETENSORS, prefix=key)
    if _is_torchscript(path):
        return Checkpoint(model=_read_torchscript(path), kind=CheckpointKind.TORCHSCRIPT, path=path)
    obj = _torch_load(path, trust_pickle)
    if isinstance(obj, nn.Module):
        return Checkpoint(model=obj, kind=CheckpointKind.MODULE, path=path)
    if not isinstance(obj, Mapping):
        raise InputError(f"{path}: holds {a_type(obj)}, not a state_dict, checkpoint dict or module")
    if _is_state_dict(obj):
        return _from_state_dict(path, obj, arch, arch_kwargs, kind=CheckpointKind.STATE_DICT, prefix=key)
    found_key, inner, prefix = _find_wrapped_or_prefixed(path, obj, key)
    if isinstance(inner, nn.Module):
        if not trust_pickle:  # unreachable with weights_only, kept for clarity
            raise InputError(f"{path}: key {found_key!r} holds a pickled module; pass {param('trust_pickle')}",
                             param="trust_pickle")
        return Checkpoint(model=inner, kind=CheckpointKind.MODULE, path=path,
                          notes=[f"module taken from key {found_key!r}"])
    ckpt = _from_state_dict(path, inner, arch, arch_kwargs, kind=CheckpointKind.WRAPPED, prefix=prefix)
    ckpt.container, ckpt.key = dict(obj), found_key
    return ckpt


def load_model(path: str | os.PathLike, arch: str | None = None, **kwargs: Any) -> nn.Module:
    """The model alone, in eval mode (see load_checkpoint for the arguments and errors).

    Also loads folded state_dicts written by `bntool fold` or save_checkpoint."""
    return load_checkpoint(path, arch=arch, **kwargs).model.eval()


def check_readable_file(path: Path) -> None:
    """A regular, readable, non-empty file, or InputError saying what is there instead."""
    if check_input_file(path, "a checkpoint file").st_size == 0:
        raise InputError(f"{path}: file is empty")


def _is_safetensors(path: Path) -> bool:
    """The safetensors layout whatever the name: an 8-byte little-endian header length, then a JSON object."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 2 <= int.from_bytes(head[:8], "little") <= path.stat().st_size - 8


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # a decoder of bytes from the file: any failure is the file's
        raise CorruptFileError(f"{path}: not a valid safetensors file ({first_line(e)})") from e


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except Exception:  # not a zip, or a corrupt one (zipfile raises many types): torch.load will say which
        return False
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def _read_torchscript(path: Path) -> torch.jit.ScriptModule:
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except Exception as e:  # torch raises RuntimeError subclasses with C++ traces
        raise CorruptFileError(f"{path}: corrupt TorchScript archive ({first_line(e)})") from e


def _torch_load(path: Path, trust_pickle: bool) -> Any:
    with open(path, "rb") as f:
        head = f.read(4)
    is_zip = head == b"PK\x03\x04"
    if is_zip and not _is_zipfile(path):
        raise InputError(f"{path}: truncated or corrupt zip archive (an interrupted save or download?)")
    if not is_zip and head[:1] != b"\x80":
        raise InputError(f"{path}: not a PyTorch checkpoint (expected a zip archive or a pickle; got bytes {head!r})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" not in str(e) and "Weights only" not in str(e):
            raise CorruptFileError(f"{path}: corrupt checkpoint ({first_line(e)})") from e
        if not trust_pickle:
            raise InputError(
                f"{path}: contains pickled Python objects (a whole module?); loading it runs code from the file. "
                f"Pass {param('trust_pickle')} only if you trust its source, or save a state_dict instead",
                param="trust_pickle") from e
    except Exception as e:  # the weights-only unpickler runs no code from the file: any failure is the file's
        raise CorruptFileError(f"{path}: corrupt or truncated checkpoint ({type(e).__name__}: {first_line(e)})") from e
    from .arch import add_working_directory

    add_working_directory()  # the pickle names the user's classes: `mymodels.Net` imports as with --arch
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (ModuleNotFoundError, AttributeError) as e:
        raise InputError(f"{path}: the pickled module needs code that is not importable here ({first_line(e)}); "
                         f"run from the folder that holds it, or add that folder to PYTHONPATH") from e
    except Exception as e:  # the file's own code ran (--trust-pickle): whatever it raised is the file's fault
        raise CorruptFileError(f"{path}: cannot unpickle ({type(e).__name__}: {first_line(e)})") from e


def _is_zipfile(path: Path) -> bool:
    try:
        return zipfile.is_zipfile(path)
    except Exception:
        return False


def _is_state_dict(obj: Mapping) -> bool:
    return len(obj) > 0 and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _find_wrapped_or_prefixed(path: Path, obj: Mapping, key: str | None) -> tuple[str, Any, str | None]:
    """`_find_wrapped`, where `key` may also name a prefix inside the state_dict found under the usual keys
    (--key ema: the 'ema.' weights of a Lightning state_dict); the prefix is returned third."""
    if key is None or key in obj:
        return (*_find_wrapped(path, obj, key), None)
    with contextlib.suppress(InputError):
        found_key, inner = _find_wrapped(path, obj, None)
        if isinstance(inner, Mapping) and any(k.startswith(key.rstrip(".") + ".") for k in inner):
            return found_key, inner, key
    raise InputError(f"{path}: no key {key!r}; top-level keys: {short_list(obj.keys())}")


def _find_wrapped(path: Path, obj: Mapping, key: str | None) -> tuple[str, Any]:
    if key is not None:
        if key not in obj:
            raise InputError(f"{path}: no key {key!r}; top-level keys: {short_list(obj.keys())}")
        inner = obj[key]
        if isinstance(inner, nn.Module) or (isinstance(inner, Mapping) and _is_state_dict(inner)):
            return key, inner
        raise InputError(f"{path}: key {key!r} holds {a_type(inner)}, not a state_dict")
    for candidate in WRAPPER_KEYS:
        inner = obj.get(candidate)
        if isinstance(inner, Mapping) and _is_state_dict(inner):
            return candidate, inner
    raise InputError(
        f"{path}: no state_dict found under the usual keys; top-level keys: {short_list(obj.keys())}. "
        f"Name it with {param('key')}", param="key"
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


def _from_state_dict(path, state_dict, arch, arch_kwargs, kind, fmt=CheckpointFormat.TORCH,
                     prefix: str | None = None) -> Checkpoint:
    if arch is None:
        raise InputError(f"{path}: is a state_dict; name the architecture with {param('arch')} module.path:callable",
                         param="arch")
    sd, removed = strip_prefixes(state_dict)
    notes: list[str] = []
    model = build_arch(arch, arch_kwargs, notes)
    if prefix is not None:
        submodule = _named_prefix(sd, prefix, path)
        copies: list[str] = []
        others = {k: v for k, v in sd.items() if not k.startswith(submodule)}
    else:
        submodule, others, copies = _submodule_prefix(model, sd, path, arch)
    kept = (f"; {len(others)} other {'entry is' if len(others) == 1 else 'entries are'} written back unchanged"
            if others else "")
    if submodule:
        why = "as asked" if prefix is not None else "the attribute holding the architecture, as in a LightningModule"
        notes.append(f"took the weights under {submodule!r} ({why}){kept}")
        sd = {k[len(submodule):]: v for k, v in sd.items() if k.startswith(submodule)}
    elif copies:
        named = " and ".join(repr(c) for c in copies)
        notes.append(f"took the top-level weights; the copy under {named} (an EMA?) also fits; pass --key "
                     f"{copies[0].rstrip('.')} to use it instead{kept}")
        sd = {k: v for k, v in sd.items() if k not in others}
    where = f"{path} (the weights under {submodule!r})" if submodule else path
    layout = sd.pop(LAYOUT_KEY, None)
    if layout is not None:
        try:
            FoldLayout.from_tensor(layout).apply(model)
        except InputError as e:  # the record is part of the file: name it
            raise CorruptFileError(f"{where}: {e.message}", param=e.param) from e
    load_state_dict_checked(model, sd, where, arch)
    notes += _dtype_notes(model, sd)
    return Checkpoint(model=model, kind=kind, path=path, stripped_prefix=removed, submodule=submodule,
                      other_entries=others, fmt=fmt, arch=arch, notes=notes)


def _submodule_prefix(model: nn.Module, sd: Mapping[str, torch.Tensor], path: Path,
                      arch: str) -> tuple[str, dict[str, torch.Tensor], list[str]]:
    """Where `arch`'s weights sit when the file holds a wrapper's state_dict (a LightningModule keeps the network
    as `self.model`, so every key reads `model.…`): the one key prefix under which the keys are exactly the model's,
    or under which a fold layout was saved; the entries outside it; and the prefixes of copies that also fit when
    the top-level keys fit (then "" and the entries outside the top-level ones). ("", {}, []) when the keys fit
    as they are.
    Where no prefix fits exactly, the one under which most of the model's keys are found (at least half), so
    that load_state_dict_checked names the few that differ there.
    """
    expected = set(model.state_dict())
    if set(sd) - {LAYOUT_KEY} == expected or LAYOUT_KEY in sd:
        return "", {}, []
    inner = {p: {k[len(p):] for k in sd if k.startswith(p)} for p in _candidate_prefixes(sd)}
    fitting = sorted(p for p, keys in inner.items() if keys - {LAYOUT_KEY} == expected or LAYOUT_KEY in keys)
    if fitting and expected <= set(sd) and all(k in expected or k.startswith(tuple(fitting)) for k in sd):
        # The top-level keys fit too (a model saved with its EMA copy as an attribute): the top-level weights are
        # the model's own; a copy is a choice the user makes with --key.
        return "", {k: v for k, v in sd.items() if k not in expected}, fitting
    if len(fitting) > 1:
        raise InputError(f"{path}: the weights under {' and '.join(repr(p) for p in fitting)} all fit "
                         f"{param('arch')} {arch}; say which with {param('key')} (e.g. {param('key')} "
                         f"{fitting[0].split('.')[0]}), or pass {param('arch')} a factory of the whole wrapper "
                         "(e.g. the LightningModule)", param="key")
    if not fitting:
        overlap = {p: len(keys & expected) for p, keys in inner.items()}
        best = max(overlap, key=lambda p: (overlap[p], -len(p)), default=None)
        if best is None or overlap[best] <= max(len(set(sd) & expected), len(expected) // 2):
            return "", {}, []
        fitting = [best]
    prefix = fitting[0]
    return prefix, {k: v for k, v in sd.items() if not k.startswith(prefix)}, []


def _named_prefix(sd: Mapping[str, torch.Tensor], key: str, path: Path) -> str:
    """The prefix `key` names ("ema" → 'ema.'), or InputError listing the prefixes there are."""
    prefix = key.rstrip(".") + "."
    if any(k.startswith(prefix) for k in sd):
        return prefix
    tops = sorted({k.split(".")[0] for k in sd if "." in k})
    raise InputError(f"{path}: no key {key!r} and no weights under {prefix!r}; the weights' first names: "
                     f"{short_list(tops, 6)}", param="key")


def _candidate_prefixes(sd: Mapping[str, torch.Tensor]) -> set[str]:
    """'a.' and 'a.b.' of every key (a wrapper's attribute, or an attribute of one), each also followed by a
    DDP/compile prefix where keys carry one (`model._orig_mod.`: Lightning around a compiled network)."""
    prefixes: set[str] = set()
    for k in sd:
        parts = k.split(".")
        prefixes.update(".".join(parts[:depth]) + "." for depth in (1, 2) if len(parts) > depth)
    wrapped = {p + w for p in prefixes for w in STRIPPED_PREFIXES}
    return prefixes | {p for p in wrapped if any(k.startswith(p) for k in sd)}


def build_arch(arch: str, arch_kwargs: str | Mapping[str, Any] | None = None,
               notes: list[str] | None = None) -> nn.Module:
    """The model `arch` builds (bntool.arch.resolve_factory) with `arch_kwargs`; what is worth telling the user
    about where it came from is appended to `notes`."""
    from .arch import resolve_factory

    resolved = resolve_factory(arch)
    if notes is not None:
        notes.extend(resolved.notes)
    factory = resolved.build
    if not callable(factory):
        raise InputError(f"{param('arch')} {arch!r}: is {a_type(factory)}, not callable")
    kwargs = parse_kwargs(arch_kwargs)
    with user_code(f"{param('arch')} {arch!r}: calling it with {kwargs}", param="arch"):
        model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise InputError(f"{param('arch')} {arch!r}: returned {a_type(model)}, not a torch.nn.Module")
    return model


def _dtype_notes(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> list[str]:
    """Weights stored in another float type than the model --arch builds take the model's (load_state_dict
    copies them): the outputs are written in the model's type, which the user should know."""
    stored = {v.dtype for v in sd.values() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    built = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if not stored or not built or stored == built:
        return []
    return [f"the file's {_dtype_names(stored)} weights were loaded into the {_dtype_names(built)} model --arch "
            f"builds: outputs are written in {_dtype_names(built)}"]


def _dtype_names(dtypes: set[torch.dtype]) -> str:
    return "/".join(sorted(str(d).removeprefix("torch.") for d in dtypes))


def load_state_dict_checked(model: nn.Module, sd: Mapping[str, torch.Tensor], path: Path | str, arch: str) -> None:
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
        problems.append(f"{plural(len(missing), 'missing key')} ({short_list(missing)})")
    if unexpected:
        problems.append(f"{plural(len(unexpected), 'unexpected key')} ({short_list(unexpected)})")
    if shapes:
        problems.append(f"{plural(len(shapes), 'shape mismatch', 'shape mismatches')} ({short_list(shapes)})")
    if problems:
        raise InputError(f"{path}: does not fit {param('arch')} {arch}: " + "; ".join(problems))
    with user_code(f"{path}: the model's load_state_dict"):
        model.load_state_dict(sd, strict=True)


# ---------------------------------------------------------------- saving


def state_dict_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """model.state_dict() plus, for a folded model, its fold layout record: what `load_model` needs back."""
    sd = model.state_dict()  # keeps _metadata (module versions) for load_state_dict
    layout = layout_of(model)
    if layout:
        sd[LAYOUT_KEY] = layout.to_tensor()
    return sd


def save_checkpoint(ckpt: Checkpoint, model: nn.Module, out: str | os.PathLike,
                    force: bool = False, in_place: bool = False, keep_training_state: bool = True) -> Path:
    """Save `model` the way `ckpt` came in (kind, wrapper keys), in the format `out`'s suffix names, atomically.

    Args:
        ckpt: the Checkpoint the model came from (its kind, format and training-checkpoint container).
        model: the model to save; a folded model's FoldLayout is saved with it.
        out: the output file: `.safetensors` writes safetensors, `.pt`/`.pth` a torch file, any other suffix the
            input's format.
        force: replace an existing file.
        in_place: allow `out` to be the file `ckpt` was loaded from.
        keep_training_state: False drops optimizer, scheduler and grad-scaler state from a training checkpoint
            (`training_state_keys`): after a fold they refer to parameters that no longer exist.

    Returns:
        `out` as a Path.

    Raises:
        InputError: `out` must not or cannot be written (checked before writing).
        UnsupportedError: a TorchScript archive cannot be written from an eager module.
    """
    out = check_output_path(out, ckpt.path, force=force, in_place=in_place)
    return write_checkpoint(ckpt, model, out, lambda write: atomic_write(out, write),
                            keep_training_state=keep_training_state)


TORCH_SUFFIXES = (".pt", ".pth")
# Training-checkpoint entries that describe the parameters' optimization (Lightning, torch examples, timm, ...).
_TRAINING_STATE = re.compile(r"optim|sched|scaler|^amp$", re.IGNORECASE)


def output_format(ckpt: Checkpoint, out: str | os.PathLike) -> CheckpointFormat:
    """The format `out` is written in: its suffix's (.safetensors, .pt, .pth), else the input's."""
    suffix = Path(out).suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return CheckpointFormat.SAFETENSORS
    if suffix in TORCH_SUFFIXES:
        return CheckpointFormat.TORCH
    return ckpt.fmt


def training_state_keys(ckpt: Checkpoint) -> list[str]:
    """Top-level keys of a training checkpoint holding optimizer, scheduler or grad-scaler state."""
    container = ckpt.container or {}
    return [k for k in container if isinstance(k, str) and k != ckpt.key and _TRAINING_STATE.search(k)]


def _keys_as_they_came(ckpt: Checkpoint, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's state_dict under the key names the input used: its submodule prefix with the wrapper's other
    entries, and its DDP/compile prefix, so the training script that wrote it loads the result."""
    if not ckpt.submodule and not ckpt.stripped_prefix and not ckpt.other_entries:
        return sd
    named = {ckpt.submodule + k: v for k, v in sd.items()}
    named.update(ckpt.other_entries)
    result = {ckpt.stripped_prefix + k: v for k, v in named.items()}
    metadata = getattr(sd, "_metadata", None)
    if metadata is not None:  # module versions by module name, for load_state_dict
        prefix = ckpt.stripped_prefix + ckpt.submodule
        result = type(sd)(result)
        result._metadata = type(metadata)(  # type: ignore[attr-defined]  # state_dict's OrderedDict has it
            (prefix + k if k else prefix[:-1], v) for k, v in metadata.items())
    return result


def write_checkpoint(ckpt: Checkpoint, model: nn.Module, out: Path,
                     write_file: Callable[[Callable[[str], None]], Path], keep_training_state: bool = True) -> Path:
    """Write `model` the way `ckpt` came in, through `write_file(writer)` (atomic_write or Outputs.write)."""
    if ckpt.kind == CheckpointKind.MODULE:
        return write_file(lambda tmp: torch.save(model, tmp))
    if ckpt.kind == CheckpointKind.TORCHSCRIPT:
        if not isinstance(model, torch.jit.ScriptModule):
            raise UnsupportedError(f"{out}: cannot write a TorchScript archive from an eager module here")
        return write_file(lambda tmp: torch.jit.save(model, tmp))
    sd = _keys_as_they_came(ckpt, state_dict_of(model))
    if ckpt.kind == CheckpointKind.WRAPPED and output_format(ckpt, out) == CheckpointFormat.TORCH:
        dropped = set() if keep_training_state else set(training_state_keys(ckpt))
        container = {k: v for k, v in (ckpt.container or {}).items() if k not in dropped}
        container[ckpt.key or "state_dict"] = sd
        return write_file(lambda tmp: torch.save(container, tmp))
    if output_format(ckpt, out) == CheckpointFormat.SAFETENSORS:  # tensors only: a training checkpoint's weights
        from safetensors.torch import save_file

        flat = {k: v.contiguous().clone() for k, v in sd.items()}
        return write_file(lambda tmp: save_file(flat, tmp))
    return write_file(lambda tmp: torch.save(sd, tmp))
