"""Fixtures: the CLI run in-process, a saved demo ResNet. Helpers tests import live in helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import Result
from hypothesis import settings

from bntool import zoo
from bntool.cli import main

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# CI runs the same examples every time (a red build must be reproducible); locally hypothesis explores.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture
def cli(capsys):
    """Run the CLI in-process; return exit code, stdout and stderr."""

    def run(*args: str) -> Result:
        capsys.readouterr()
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


@pytest.fixture
def resnet_sd(tmp_path) -> Path:
    path = tmp_path / "resnet.pt"
    torch.save(zoo.build("resnet").state_dict(), path)
    return path
