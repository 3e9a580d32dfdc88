from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import settings

from bntool import zoo
from bntool.cli import main

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# CI runs the same examples every time (a red build must be reproducible); locally hypothesis explores.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys):
    """Run the CLI in-process; return exit code, stdout and stderr."""

    def run(*args: str) -> Result:
        capsys.readouterr()
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def assert_clean_error(result: Result, code: int = 2, contains: str | None = None) -> None:
    """A bad input: the exit code, exactly one line on stderr, no traceback."""
    assert result.code == code, (result.code, result.err, result.out)
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1, result.err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.err + result.out
    if contains:
        assert contains in lines[0], lines[0]


@pytest.fixture
def resnet_sd(tmp_path) -> Path:
    path = tmp_path / "resnet.pt"
    torch.save(zoo.build("resnet").state_dict(), path)
    return path


def files_in(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
