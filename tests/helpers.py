"""Helpers the tests import (fixtures stay in conftest.py): CLI results, clean-error checks, paths."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


@dataclass
class Result:
    code: int
    out: str
    err: str


def assert_clean_error(result: Result, code: int = 2, contains: str | None = None) -> None:
    """A bad input: the exit code, exactly one line on stderr, no traceback."""
    assert result.code == code, (result.code, result.err, result.out)
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1, result.err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.err + result.out
    if contains:
        assert contains in lines[0], lines[0]


def files_in(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


def write_pngs(folder: Path, count: int, size: int) -> Path:
    """`count` random RGB PNGs of size×size pixels in a new `folder`: a real image folder for the data tests."""
    import numpy as np
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(folder / f"{i:02d}.png")
    return folder
