"""The command line as a user meets it: instant help, version, exit codes, JSON, the demo."""

from __future__ import annotations

import json
import subprocess

import torch
from helpers import PYTHON, assert_clean_error

from bntool import __version__, zoo


def test_help_does_not_import_torch():
    code = ("import sys; from bntool.cli import main; "
            "rc = main(['--help']); "
            "heavy = [m for m in ('torch', 'onnx', 'onnxruntime', 'numpy') if m in sys.modules]; "
            "print(rc, heavy)")
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "0 []"


def test_console_script_and_module_entry_points():
    out = subprocess.run(["bntool", "--version"], capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"bntool {__version__}"
    out = subprocess.run([PYTHON, "-m", "bntool", "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("inspect", "fold", "recalibrate", "export-onnx", "verify", "demo"):
        assert command in out


def test_unknown_option_is_usage_error(cli):
    result = cli("fold", "--no-such-option")
    assert result.code == 2 and "Traceback" not in result.err


def test_inspect_json_and_health(tmp_path, cli):
    model = zoo.build("resnet")
    model.layer1.bn1.reset_running_stats()
    with torch.no_grad():
        model.layer1.bn2.running_var[:3] = 0.0
        model.layer2.bn1.weight[:2] = 0.0
        model.layer2.bn2.running_mean[0] = float("nan")
    path = tmp_path / "m.pt"
    torch.save(model.state_dict(), path)
    result = cli("inspect", path, "--arch", "bntool.zoo:resnet", "--input-shape", "1,3,32,32", "--json")
    assert result.code == 0, result.err
    layers = {layer["name"]: layer for layer in json.loads(result.out)["layers"]}
    assert len(layers) == 6
    assert any("never updated" in f for f in layers["layer1.bn1"]["flags"])
    assert any("var <= eps in 3" in f for f in layers["layer1.bn2"]["flags"])
    assert any("near-dead" in f and " 2 " in f for f in layers["layer2.bn1"]["flags"])
    assert any("NaN/Inf in running_mean" in f for f in layers["layer2.bn2"]["flags"])
    assert layers["stem.1"]["flags"] == [] and layers["stem.1"]["fold_action"] == "folded"
    assert layers["layer2.bn2"]["fold_action"] == "refused"


def test_inspect_table_and_no_bn(tmp_path, cli):
    path = tmp_path / "nobn.pt"
    torch.save(zoo.build("nobn").state_dict(), path)
    result = cli("inspect", path, "--arch", "bntool.zoo:NoBN")
    assert result.code == 0 and "No BatchNorm layers" in result.out
    path = tmp_path / "r.pt"
    torch.save(zoo.build("resnet").state_dict(), path)
    result = cli("inspect", path, "--arch", "bntool.zoo:resnet")
    assert result.code == 0 and "layer2.down.1" in result.out


def test_debug_shows_traceback(tmp_path, cli):
    result = cli("--debug", "inspect", tmp_path / "missing.pt")
    assert result.code == 2 and "Traceback" in result.err
    assert_clean_error(cli("inspect", tmp_path / "missing.pt"), contains="no such file")


def test_demo_runs_end_to_end(tmp_path, cli):
    result = cli("demo", tmp_path / "demo", "--exporter", "legacy", "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["passed"]
    steps = {s["step"]: s for s in report["steps"]}
    assert steps["fold"]["batch_norm_ops"] == [6, 0] and steps["export-onnx"]["batch_norm_nodes"] == 0
    assert (tmp_path / "demo" / "model.onnx").exists()
    # `make demo` twice: --force replaces the files of the earlier demo (they once were refused as checkpoints)
    stale = {p.name: p.stat().st_ino for p in (tmp_path / "demo").iterdir()}
    again = cli("demo", tmp_path / "demo", "--exporter", "legacy", "--force")
    assert again.code == 0, again.err
    assert {p.name: p.stat().st_ino for p in (tmp_path / "demo").iterdir()}.keys() == stale.keys()
    assert all(p.stat().st_ino != stale[p.name] for p in (tmp_path / "demo").iterdir())  # each one replaced


def test_recalibrate_writes_nothing_to_a_log_s_stderr_when_all_is_well(tmp_path, cli, resnet_sd):
    """No progress bar when stderr is not a terminal: in a CI log Rich's transient bar left a blank line before
    every warning or error."""
    torch.save(torch.randn(8, 3, 32, 32), tmp_path / "x.pt")
    result = cli("recalibrate", resnet_sd, "--arch", "bntool.zoo:resnet", "--data", tmp_path / "x.pt", "--workers",
                 "0", "-o", tmp_path / "out.pt")
    assert result.code == 0, result.err
    assert result.err == ""


def test_recalibrate_parses_into_its_option_group_and_the_library_takes_it():
    """recalibrate's own flags are one option group (no settings object in the CLI): the group parses them and
    gives exactly keyword arguments bntool.recalibrate takes."""
    import inspect

    import bntool
    from bntool.options import RecalibrationOptions

    options = RecalibrationOptions(input_shape="1,3,8,8", cache_budget="4M", amp=True, prior=2.0)
    assert options.shape() == (1, 3, 8, 8)
    settings = options.torch_options()
    assert settings["mode"] == "cumulative" and settings["cache_budget"] == 4 * 2**20
    assert set(settings) <= set(inspect.signature(bntool.recalibrate).parameters)
    assert options.torch_only_flags() == ["--amp", "--prior"]
    assert RecalibrationOptions(mode="exact").torch_only_flags() == []
