"""Small helpers every module may use: nested tensors, import strings, JSON keyword arguments, one-line errors.

Depends on nothing in bntool but errors.py, so any module can import it without a circle.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterator, Mapping
from enum import Enum
from typing import Any

from .errors import MAX_MESSAGE, InputError, first_line, param

__all__ = ["MAX_MESSAGE", "first_line"]  # defined in errors.py (the boundary needs them), used from here


def iter_tensors(obj: Any) -> Iterator[Any]:
    """Every tensor in a nested structure of tuples, lists, dicts and dataclasses (model outputs), in order."""
    import torch

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


def import_object(spec: str, what: str = param("arch")) -> Any:
    """Resolve 'package.module:attr.path' to an object; InputError naming `what` if it cannot be."""
    if ":" not in spec:
        raise InputError(f"{what} {spec!r}: expected 'module.path:callable', e.g. 'torchvision.models:resnet18'")
    module_name, _, attr_path = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise InputError(f"{what} {spec!r}: cannot import module {module_name!r} ({first_line(e)})") from e
    except Exception as e:
        raise InputError(f"{what} {spec!r}: importing {module_name!r} failed "
                         f"({type(e).__name__}: {first_line(e)})") from e
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise InputError(f"{what} {spec!r}: {obj.__name__ if hasattr(obj, '__name__') else obj!r} has no {part!r}")
        obj = getattr(obj, part)
    return obj


def parse_kwargs(kwargs: str | Mapping[str, Any] | None, what: str = param("arch_kwargs")) -> dict[str, Any]:
    """A JSON object (or a mapping, or None) as a dict of keyword arguments; InputError naming `what` if not."""
    if kwargs is None:
        return {}
    if isinstance(kwargs, Mapping):
        return dict(kwargs)
    try:
        value = json.loads(kwargs)
    except json.JSONDecodeError as e:
        raise InputError(f"{what}: invalid JSON ({e.msg} at column {e.colno}): {kwargs!r}") from e
    if not isinstance(value, dict):
        raise InputError(f"{what}: expected a JSON object like '{{\"num_classes\": 10}}', got {kwargs!r}")
    return value


def short_list(items, n: int = 3) -> str:
    """The first `n` items, comma-separated, and how many more there are."""
    items = [str(i) for i in items]
    shown = ", ".join(items[:n])
    return shown + (f", … {len(items) - n} more" if len(items) > n else "")


class StrEnum(str, Enum):
    """A str Enum whose members print and format as their value (enum.StrEnum is Python ≥ 3.11 only)."""

    __str__ = str.__str__
    __format__ = str.__format__  # type: ignore[assignment]

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """'1 channel', '3 channels', '1,200 samples' (`nouns` for an irregular plural: plural(2, "pass", "passes"))."""
    return f"{count:,} {noun if count == 1 else nouns or noun + 's'}"


def a_type(obj: object) -> str:
    """'an int', 'a list': the type of `obj` with its article, for messages."""
    name = type(obj).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def bn_eps(module: Any) -> float:
    """A BN's eps (1e-5 where it has none): of a module, or of anything holding its values (an ONNX node's)."""
    return float(getattr(module, "eps", 1e-5))


def checked_arguments(function):
    """`function` with its arguments checked against its type hints first: a wrong type raises InputError naming
    the parameter ("example_inputs: expected a tensor or a sequence, got a str") instead of a TypeError or
    AttributeError deep inside. Used on the public API's entry points (bntool.fold, bntool.recalibrate, …).

    Only the outer types are checked (a Sequence, not its items); a str counts as a Sequence or Iterable only
    where the hint names str somewhere (`Sequence[str]`); hints that cannot be read are not checked."""
    import functools
    import inspect

    try:
        hints = _type_hints(function)
    except Exception:  # a hint that names what is not importable at run time: check nothing rather than fail
        return function
    signature = inspect.signature(function)
    allowed = {name: _runtime_classes(hint) for name, hint in hints.items() if name != "return"}
    takes_str = {name for name, hint in hints.items() if _mentions_str(hint)}

    @functools.wraps(function)
    def checked(*args, **kwargs):
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as e:
            raise InputError(f"{getattr(function, '__name__', 'call')}: {e}") from None
        for name, value in bound.arguments.items():
            classes = allowed.get(name)
            if classes and signature.parameters[name].kind not in (inspect.Parameter.VAR_POSITIONAL,
                                                                   inspect.Parameter.VAR_KEYWORD):
                _check_argument(name, value, classes, name in takes_str)
        return function(*args, **kwargs)

    return checked


def _type_hints(function) -> dict:
    """`function`'s type hints; torch and nn resolved where its module imports them only for type checkers
    (a module the ONNX path shares: torch is imported here, for the PyTorch entry point being checked)."""
    import typing

    try:
        return typing.get_type_hints(function)
    except NameError:
        import torch

        return typing.get_type_hints(function, localns={"torch": torch, "nn": torch.nn})


def _runtime_classes(hint) -> tuple[type, ...] | None:
    """The classes an isinstance check accepts for a type hint; None when it cannot be checked (Any, Literal…)."""
    import collections.abc
    import numbers
    import types
    import typing

    if hint is typing.Any:  # a class itself from Python 3.11 on, but no isinstance target
        return None
    if hint is type(None):
        return (type(None),)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        parts = [_runtime_classes(h) for h in typing.get_args(hint)]
        return None if any(p is None for p in parts) else tuple(c for p in parts if p is not None for c in p)
    if origin is not None:
        hint = origin
    if hint is float:
        return (numbers.Real,)
    if hint is int or hint is bool:
        return (numbers.Integral,)
    if hint is collections.abc.Callable:
        return (collections.abc.Callable,)
    return (hint,) if isinstance(hint, type) else None


def _mentions_str(hint) -> bool:
    """Whether str appears anywhere in a hint (`Sequence[str]`: the function judges a lone string itself)."""
    import typing

    return hint is str or any(_mentions_str(arg) for arg in typing.get_args(hint))


def _check_argument(name: str, value: Any, classes: tuple[type, ...], takes_str: bool) -> None:
    if isinstance(value, str) and not takes_str:
        ok = False  # a string is not the tensors, batches or module a hint asks for, though it is a Sequence
    else:
        ok = isinstance(value, classes)
    if not ok:
        names = " or ".join(dict.fromkeys(_class_name(c) for c in classes))
        raise InputError(f"{param(name)}: expected {names}, got {a_type(value)}", param=name)


_CLASS_NAMES = {"Real": "a number", "Integral": "an integer", "NoneType": "None", "Sequence": "a sequence",
                "Iterable": "an iterable", "Mapping": "a mapping", "Callable": "a callable", "PathLike": "a path",
                "str": "a str", "Tensor": "a tensor", "Module": "a torch.nn.Module", "device": "a torch.device"}


def _class_name(cls: type) -> str:
    return _CLASS_NAMES.get(cls.__name__, f"a {cls.__name__}")
