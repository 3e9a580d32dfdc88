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
