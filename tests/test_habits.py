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


def test_a_parameter_hinted_any_takes_anything(tmp_path):
    """typing.Any is a class from Python 3.11 on: it was taken as an isinstance target, so
    `bntool.open_data("imgs/", model=model)` raised TypeError and `recalibrate_onnx(path, ...)` refused any path."""
    import inspect

    from PIL import Image

    from bntool import zoo
    from bntool.utils import checked_arguments

    def f(x: typing.Any, y: typing.Optional[typing.Any] = None) -> int:
        return 1

    checked = checked_arguments(f)
    assert checked("a") == checked(3) == checked(object(), y="b") == 1
    from bntool.utils import _type_hints

    hinted_any = [name for name in bntool.__all__ if callable(obj := getattr(bntool, name)) and
                  any(h is typing.Any for h in _type_hints(inspect.unwrap(obj)).values())]
    assert {"open_data", "recalibrate_onnx", "recalibrate_onnx_file"} <= set(hinted_any), hinted_any
    for i in range(2):
        Image.new("RGB", (40, 40), (60 * i, 90, 30)).save(tmp_path / f"{i}.png")
    batches = bntool.open_data(str(tmp_path), model=zoo.build("resnet"), batch_size=2)  # the README's call
    assert next(iter(batches)).shape[0] == 2
