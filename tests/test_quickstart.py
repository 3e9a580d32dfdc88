"""The README's quickstart, as a new user runs it: `make demo`, then the follow-up commands, which must write
into bntool-demo/ and not into the checkout."""

from __future__ import annotations

import re
import shlex

import torch
from helpers import ROOT

from bntool import zoo
from bntool.demo import shifted_images


def readme_followups() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    block = text.split("Then try the commands on", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = re.sub(r"\\\n\s*", " ", block).splitlines()
    return [shlex.split(line.split("#", 1)[0]) for line in lines if line.strip()]


def test_quickstart_followups_write_into_the_demo_folder(tmp_path, cli, monkeypatch):
    commands = readme_followups()
    assert commands[0] == ["cd", "bntool-demo"]
    demo = tmp_path / "bntool-demo"  # the two files of `make demo` the commands read (the demo has its own test)
    demo.mkdir()
    torch.save(zoo.build("resnet").state_dict(), demo / "model.pt")
    torch.save(shifted_images(64), demo / "calibration.pt")
    monkeypatch.chdir(demo)
    before = {p.name for p in tmp_path.iterdir()}
    for command in commands[1:]:
        assert command[0] == "bntool"
        args = command[1:]
        if args[0] == "export-onnx":
            args += ["--exporter", "legacy"]  # the fast exporter: the test is about where files go
        result = cli(*args)
        assert result.code == 0, (command, result.err)
    assert {p.name for p in tmp_path.iterdir()} == before == {"bntool-demo"}
    written = {"mine-recalibrated.pt", "mine-folded.pt", "mine.onnx", "verify.xml"}
    assert written <= {p.name for p in (tmp_path / "bntool-demo").iterdir()}
