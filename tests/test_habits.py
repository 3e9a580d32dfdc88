"""What Python users expect of a library: errors of the usual kinds, names their editors resolve."""

from __future__ import annotations

import ast
import typing

import pytest
from helpers import ROOT

import bntool


def test_an_input_error_is_a_value_error():
    with pytest.raises(ValueError, match="input-shape"):
        from bntool.options import parse_shape

        parse_shape("1,three")
    assert issubclass(bntool.InputError, ValueError) and issubclass(bntool.InputError, bntool.BntoolError)


def test_lazy_names_are_declared_for_editors_and_all_resolve():
    """Each lazily imported name is also imported under TYPE_CHECKING, from the module it is loaded from."""
    tree = ast.parse((ROOT / "bntool" / "__init__.py").read_text())
    guarded = next(node for node in tree.body if isinstance(node, ast.If) and getattr(node.test, "id", "") ==
                   "TYPE_CHECKING")
    declared = {alias.name: node.module for node in guarded.body for alias in node.names}
    assert declared == bntool._EXPORTS
    assert all(getattr(bntool, name) is not None for name in bntool.__all__)
    assert not hasattr(bntool, "open_source") and callable(bntool.open_data)


def test_export_onnx_takes_no_option_that_does_nothing():
    import inspect

    assert "strict" not in inspect.signature(bntool.export_onnx).parameters


def test_argument_checks_hold_on_python_39_without_types_uniontype(monkeypatch):
    """requires-python >= 3.9, whose `types` has no UnionType (3.10+): typing.Union hints are still checked."""
    import sys
    import types

    from bntool.utils import checked_arguments

    without = types.ModuleType("types")
    without.__dict__.update({k: v for k, v in vars(types).items() if k != "UnionType"})
    monkeypatch.setitem(sys.modules, "types", without)  # what `import types` in bntool.utils gets, as on 3.9

    def f(x: typing.Optional[int]) -> int:
        return 0 if x is None else x

    checked = checked_arguments(f)
    assert checked(None) == 0 and checked(3) == 3
    with pytest.raises(bntool.InputError, match="x: expected an integer or None, got a str"):
        checked("a")
