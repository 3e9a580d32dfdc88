"""The command line as a new user meets it: one data pipeline on every command that reads data, the same flags
everywhere, output files that are what their names say, CI artifacts also when verify cannot run."""

from __future__ import annotations

import json
from xml.etree import ElementTree as ET

import numpy as np
import pytest
import torch
from helpers import assert_clean_error, write_pngs

from bntool import zoo
from bntool.layers import bn_modules

ARCH = ["--arch", "bntool.zoo:resnet"]
DATA_FLAGS = ["--data", "--loader", "--input-shape", "--image-size", "--resize", "--center-crop", "--interpolation",
              "--mean", "--std", "--batch-size"]


def help_of(cli, command: str) -> str:
    result = cli(command, "--help")
    assert result.code == 0, result.err
    return " ".join(result.out.split())


@pytest.mark.parametrize("command", ["recalibrate", "export-onnx", "verify"])
def test_the_same_data_options_on_every_command_that_reads_data(cli, command):
    text = help_of(cli, command)
    missing = [flag for flag in DATA_FLAGS if flag not in text]
    assert not missing, missing


@pytest.mark.parametrize("command, flags", [
    ("inspect", ["-q", "--json", "--seed", "--wide", "--device"]),
    ("fold", ["-q", "--json", "--seed", "--force", "--keep-extra", "--device"]),
    ("recalibrate", ["-q", "--json", "--seed", "--force", "--device"]),
    ("export-onnx", ["-q", "--json", "--seed", "--force", "--device"]),
    ("verify", ["-q", "--json", "--seed", "--junit-xml", "--summary-md", "--device"]),
    ("demo", ["-q", "--json", "--force"]),
])
def test_common_flags_on_every_command(cli, command, flags):
    text = help_of(cli, command)
    assert not [f for f in flags if f" {f} " not in f" {text} " and f" {f}," not in text], text
    if command != "demo":
        assert f"Usage: bntool {command} [OPTIONS] CKPT" in text and "{ckpt}" not in text.lower()


def test_device_names_the_accepted_values(cli, resnet_sd, tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((4, 3, 32, 32), dtype=np.float32))
    result = cli("recalibrate", resnet_sd, *ARCH, "--data", tmp_path / "x.npy", "-o", tmp_path / "o.pt", "--device",
                 "gpu")
    assert_clean_error(result, contains="--device 'gpu': expected cpu, cuda, cuda:N (e.g. cuda:1) or mps")
    assert not (tmp_path / "o.pt").exists()


def test_demo_does_not_overwrite_without_force(cli, tmp_path):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "model.pt").write_bytes(b"mine")
    assert_clean_error(cli("demo", tmp_path / "demo"), contains="--force")
    assert (tmp_path / "demo" / "model.pt").read_bytes() == b"mine"


@pytest.fixture
def pngs(tmp_path):
    return write_pngs(tmp_path / "pngs", 6, 32)


def test_verify_reads_images_at_the_input_shape(cli, resnet_sd, pngs):
    """The issue's failure: 224 hard-coded for --data in verify gave 'max abs inf' on a correct model."""
    result = cli("verify", resnet_sd, *ARCH, "--input-shape", "2,3,32,32", "--data", pngs, "--exporter", "legacy",
                 "--samples", "1", "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["passed"] and "non_finite" not in report
    assert report["checkpoint"] == str(resnet_sd) and report["arch"] == "bntool.zoo:resnet"
    assert set(report["versions"]) == {"bntool", "torch", "onnx", "onnxruntime"}
    data = report["data"]
    assert data["num_samples"] == 6 and data["preprocessing"]["size"] == [32, 32]
    assert data["preprocessing"]["sources"]["size"] == "the input shape"
    onnx = next(c for c in report["checks"] if c["name"] == "onnx-equivalence")
    assert onnx["figures"]["comparisons"] > 0


def test_export_refuses_data_that_does_not_fit_the_input_shape(cli, resnet_sd, tmp_path):
    np.save(tmp_path / "big.npy", np.zeros((4, 3, 64, 64), dtype=np.float32))
    out = tmp_path / "m.onnx"
    result = cli("export-onnx", resnet_sd, *ARCH, "--input-shape", "1,3,32,32", "--data", tmp_path / "big.npy",
                 "-o", out)
    assert_clean_error(result, contains="samples of shape (3, 64, 64) do not fit --input-shape 1,3,32,32")
    assert not out.exists()


def test_recalibrate_prints_the_data_line(cli, resnet_sd, pngs, tmp_path):
    result = cli("recalibrate", resnet_sd, *ARCH, "--data", pngs, "--input-shape", "1,3,32,32", "--workers", "0",
                 "-o", tmp_path / "r.pt")
    assert result.code == 0, result.err
    text = " ".join(result.out.split())
    assert "data: 6 images in" in text and "(32×32): resize 36 → center crop 32×32 (bilinear)" in text
    assert "size from the input shape" in text and "warning" not in text
    small = cli("recalibrate", resnet_sd, *ARCH, "--data", pngs, "--workers", "0", "-o", tmp_path / "s.pt", "-q")
    assert small.code == 0 and small.out == ""
    assert "upscaled 8.0×" in small.err  # 32×32 images resized to 256 for a 224 crop: a warning even with -q


def test_verify_writes_ci_artifacts_when_it_cannot_run(cli, tmp_path, monkeypatch):
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    junit = tmp_path / "junit.xml"
    result = cli("verify", tmp_path / "missing.pt", "--input-shape", "1,3,32,32", "--junit-xml", junit)
    assert_clean_error(result, contains="no such file")
    suite = ET.fromstring(junit.read_text())
    assert suite.get("errors") == "1"
    error = suite.find("testcase/error")
    assert "missing.pt" in error.get("message") and "no such file" in error.get("message")
    text = summary.read_text()
    assert text.startswith("earlier step\n### bntool verify: could not run") and "missing.pt" in text


def test_verify_summary_markdown_file(cli, resnet_sd, tmp_path):
    out = tmp_path / "checks.md"
    result = cli("verify", resnet_sd, *ARCH, "--input-shape", "1,3,32,32", "--skip-onnx", "--summary-md", out, "-q")
    assert result.code == 0, result.err
    assert result.out == ""
    lines = out.read_text().splitlines()
    assert lines[0] == "### bntool verify: all checks passed"
    assert [line.split(" | ")[0] for line in lines[4:]] == ["| bn-health", "| fold-equivalence"]


def test_fold_drops_optimizer_state_of_a_training_checkpoint(cli, tmp_path):
    model = zoo.build("resnet")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    path = tmp_path / "train.pt"
    torch.save({"state_dict": model.state_dict(), "optimizer": optimizer.state_dict(),
                "lr_scheduler": {"last_epoch": 3}, "epoch": 3}, path)
    result = cli("fold", path, *ARCH, "--input-shape", "1,3,32,32", "-o", tmp_path / "folded.pt")
    assert result.code == 0, result.err
    assert "note: left out optimizer, lr_scheduler: optimizer state" in " ".join(result.out.split())
    folded = torch.load(tmp_path / "folded.pt", weights_only=True)
    assert set(folded) == {"state_dict", "epoch"} and folded["epoch"] == 3
    kept = cli("fold", path, *ARCH, "--input-shape", "1,3,32,32", "-o", tmp_path / "kept.pt", "--keep-extra", "-q")
    assert kept.code == 0, kept.err
    assert set(torch.load(tmp_path / "kept.pt", weights_only=True)) == {"state_dict", "optimizer", "lr_scheduler",
                                                                        "epoch"}


def test_output_format_follows_the_suffix(cli, tmp_path):
    from safetensors.torch import load_file, save_file

    model = zoo.build("resnet")
    st = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, st)
    assert cli("recalibrate", st, *ARCH, "--data", tmp_path / "x.npy", "-o", tmp_path / "o.pt").code == 2  # no data
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32))
    assert cli("recalibrate", st, *ARCH, "--data", tmp_path / "x.npy", "-o", tmp_path / "o.pt", "-q").code == 0
    as_torch = torch.load(tmp_path / "o.pt", weights_only=True)  # a torch file, not safetensors bytes
    assert as_torch.keys() == model.state_dict().keys()
    pt = tmp_path / "m.pt"
    torch.save(model.state_dict(), pt)
    assert cli("recalibrate", pt, *ARCH, "--data", tmp_path / "x.npy", "-o", tmp_path / "o.safetensors", "-q").code == 0
    as_safetensors = load_file(str(tmp_path / "o.safetensors"))
    assert torch.equal(as_safetensors["stem.1.running_mean"], as_torch["stem.1.running_mean"])


def test_inspect_fits_80_columns_and_wide_shows_everything(cli, resnet_sd, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    compact = cli("inspect", resnet_sd, *ARCH, "--input-shape", "1,3,32,32")
    assert compact.code == 0 and max(len(line) for line in compact.out.splitlines()) <= 80
    assert "layer2.down.1" in compact.out and "running_mean" not in compact.out
    monkeypatch.setenv("COLUMNS", "250")
    wide = cli("inspect", resnet_sd, *ARCH, "--wide")
    assert wide.code == 0 and "running_mean" in wide.out and "tracked: num_batches_tracked" in wide.out
    data = json.loads(cli("inspect", resnet_sd, *ARCH, "--json").out)
    assert data["checkpoint"] == str(resnet_sd) and data["versions"]["bntool"]


def test_export_with_a_fixed_batch_checks_real_data_at_that_batch(cli, resnet_sd, pngs, tmp_path, monkeypatch):
    """Without --dynamic-batch the graph takes batch 1 only: data batches of 4 are cut to the example's batch
    size instead of failing in onnxruntime (which read as 'max abs inf')."""
    monkeypatch.setenv("COLUMNS", "80")
    out = tmp_path / "m.onnx"
    args = ["export-onnx", resnet_sd, *ARCH, "--input-shape", "1,3,32,32", "--data", pngs, "-b", "4",
            "--num-batches", "3", "--exporter", "legacy", "--samples", "1", "-o", out]
    result = cli(*args)
    assert result.code == 0, result.err + result.out
    assert "…" not in result.out and max(len(line) for line in result.out.splitlines()) <= 80
    report = json.loads(cli(*args, "--force", "--json").out)
    data_rows = [c for c in report["comparisons"] if c["input"].startswith("data batch")]
    # each data batch is checked at both onnxruntime optimisation levels
    assert len(data_rows) == 6 and all(c["passed"] for c in data_rows)
    assert sum("ORT_DISABLE_ALL" in c["input"] for c in data_rows) == 3
    assert report["data"]["preprocessing"]["size"] == [32, 32]


def test_fold_to_safetensors_says_what_of_a_training_checkpoint_it_leaves_out(cli, tmp_path):
    path = tmp_path / "train.pt"
    torch.save({"state_dict": zoo.build("resnet").state_dict(), "epoch": 3, "config": {"lr": 0.1}}, path)
    result = cli("fold", path, *ARCH, "--input-shape", "1,3,32,32", "-o", tmp_path / "w.safetensors", "--json")
    assert result.code == 0, result.err
    notes = json.loads(result.out)["notes"]
    assert any("holds the weights only" in n and "epoch" in n and "config" in n for n in notes), notes


def test_verify_writes_ci_artifacts_when_an_option_does_not_parse(cli, resnet_sd, tmp_path, monkeypatch):
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    junit = tmp_path / "junit.xml"
    for bad in (["--bogus"], ["--samples", "abc"]):
        junit.unlink(missing_ok=True)
        result = cli("verify", resnet_sd, *ARCH, *bad, f"--junit-xml={junit}")
        assert_clean_error(result, contains="see bntool verify --help")
        error = ET.fromstring(junit.read_text()).find("testcase/error")
        assert error is not None and result.err.strip().removeprefix("error: ") == error.get("message")
    assert summary.read_text().count("### bntool verify: could not run") == 2
    junit.write_text("mine")  # an existing report is replaced only with --force, as in a run that parsed
    assert_clean_error(cli("verify", resnet_sd, *ARCH, "--bogus", "--junit-xml", junit))
    assert junit.read_text() == "mine"


def test_summary_md_and_the_github_step_summary_both_get_the_table(cli, resnet_sd, tmp_path, monkeypatch):
    summary = tmp_path / "step.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    out = tmp_path / "checks.md"
    result = cli("verify", resnet_sd, *ARCH, "--input-shape", "1,3,32,32", "--skip-onnx", "--summary-md", out, "-q")
    assert result.code == 0, result.err
    assert out.read_text().strip() == summary.read_text().strip()
    assert out.read_text().startswith("### bntool verify: all checks passed")


def test_a_timm_model_gives_the_example_input_shape(cli, tmp_path):
    from test_arch import timm_or_skip

    from bntool.checkpoint import build_arch

    timm_or_skip()

    path = tmp_path / "effnet.pt"
    model = zoo.randomize_bn(build_arch("timm:efficientnet_b0", {"num_classes": 10}))  # as if trained
    torch.save(model.state_dict(), path)
    result = cli("verify", path, "--arch", "timm:efficientnet_b0", "--arch-kwargs", '{"num_classes": 10}',
                 "--skip-onnx", "--samples", "0", "--json")
    notes = json.loads(result.out)["notes"]
    assert "example input 1,3,224,224 from the model's pretrained_cfg (--input-shape sets another)" in notes
    fold_check = next(c for c in json.loads(result.out)["checks"] if c["name"] == "fold-equivalence")
    assert fold_check["passed"], fold_check
    inspected = cli("inspect", path, "--arch", "timm:efficientnet_b0", "--arch-kwargs", '{"num_classes": 10}', "--json")
    assert json.loads(inspected.out)["fold_planned"] is True  # what fold would do, at the model's own size


@pytest.mark.parametrize("command", ["fold", "recalibrate", "export-onnx", "verify"])
def test_json_names_the_checkpoint_the_arch_and_the_versions_on_every_command(cli, resnet_sd, tmp_path, command):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(4, 3, 32, 32)).astype(np.float32))
    args = {"fold": ["--input-shape", "1,3,32,32", "-o", tmp_path / "f.pt"],
            "recalibrate": ["--data", tmp_path / "x.npy", "-o", tmp_path / "r.pt"],
            "export-onnx": ["--input-shape", "1,3,32,32", "--samples", "1", "-o", tmp_path / "m.onnx"],
            "verify": ["--input-shape", "1,3,32,32", "--skip-onnx"]}[command]
    result = cli(command, resnet_sd, *ARCH, *args, "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["checkpoint"] == str(resnet_sd) and report["arch"] == "bntool.zoo:resnet"
    assert set(report["versions"]) == {"bntool", "torch", "onnx", "onnxruntime"}


@pytest.mark.parametrize("command", ["fold", "export-onnx", "verify"])
def test_help_states_the_one_meaning_of_rtol_and_atol(cli, command):
    text = help_of(cli, command)
    assert "|Δ| ≤ atol + rtol·|ref|" in text, text


def test_an_unparsed_verify_never_writes_its_report_over_an_input(cli, resnet_sd, tmp_path):
    data = tmp_path / "x.npy"
    np.save(data, np.zeros((2, 3, 32, 32), dtype=np.float32))
    before = data.read_bytes()
    result = cli("verify", resnet_sd, *ARCH, "--data", data, "--junit-xml", data, "--force", "--bogus")
    assert_clean_error(result, contains="No such option: --bogus")
    assert data.read_bytes() == before
    pngs = write_pngs(tmp_path / "imgs", 2, 8)
    image = next(pngs.iterdir())
    kept = image.read_bytes()
    assert_clean_error(cli("verify", resnet_sd, *ARCH, "--data", pngs, "--summary-md", image, "--force", "--bogus"))
    assert image.read_bytes() == kept


def test_an_option_missing_its_value_still_gets_the_junit_report(cli, resnet_sd, tmp_path):
    junit = tmp_path / "a.xml"
    result = cli("verify", resnet_sd, *ARCH, "--junit-xml", junit, "--samples")
    assert_clean_error(result, contains="(see bntool verify --help)")
    assert "requires an argument" in ET.fromstring(junit.read_text()).find("testcase/error").get("message")


def test_a_model_whose_output_is_nan_fails_the_fold_check_saying_why(cli, tmp_path):
    model = zoo.build("resnet")
    with torch.no_grad():
        model.fc.bias.fill_(float("nan"))
    torch.save(model.state_dict(), tmp_path / "nan.pt")
    result = cli("fold", tmp_path / "nan.pt", *ARCH, "--input-shape", "1,3,32,32", "-o", tmp_path / "f.pt")
    assert result.code == 1 and "the reference output is NaN everywhere" in result.err
    assert "note: example and 4 others: the reference output is NaN everywhere" in " ".join(result.out.split())
    assert not (tmp_path / "f.pt").exists()
    verify = cli("verify", tmp_path / "nan.pt", *ARCH, "--input-shape", "1,3,32,32", "--skip-onnx", "--json")
    fold_check = next(c for c in json.loads(verify.out)["checks"] if c["name"] == "fold-equivalence")
    assert not fold_check["passed"] and "NaN everywhere" in fold_check["summary"]


def test_inspect_quiet_still_warns_and_a_folded_model_says_it_was_folded(cli, tmp_path):
    model = zoo.build("resnet")
    for _, bn in bn_modules(model):
        bn.num_batches_tracked.fill_(12)
    torch.save(model.state_dict(), tmp_path / "young.pt")
    result = cli("inspect", tmp_path / "young.pt", *ARCH, "-q")
    assert result.code == 0 and result.out == ""
    assert result.err.startswith("warning: 6 BN layers have averaged only 12 batches")
    verify = cli("verify", tmp_path / "young.pt", *ARCH, "--input-shape", "1,3,32,32", "--skip-onnx", "--json")
    health = json.loads(verify.out)["checks"][0]["summary"]
    assert "6 with warnings, e.g. stem.1: few updates" in health, health
    assert cli("fold", tmp_path / "young.pt", *ARCH, "--input-shape", "1,3,32,32", "-o", tmp_path / "f.pt").code == 0
    folded = cli("inspect", tmp_path / "f.pt", *ARCH)
    assert "nothing to recalibrate or fold (bntool folded it already)" in " ".join(folded.out.split())


def test_the_python_api_lists_itself_and_counts_fold_actions():
    import bntool

    assert {"fold", "recalibrate", "open_data", "verify"} <= set(dir(bntool))
    _, report = bntool.fold(zoo.build("resnet"), zoo.example_input("resnet"))
    assert report.counts == {"folded": 6, "folded-forward": 0, "affine": 0, "refused": 0}
    assert json.loads(json.dumps(report.to_dict(), default=str))["counts"] == report.counts


VERIFY = ["--input-shape", "1,3,32,32", "--skip-onnx", "--samples", "1"]


@pytest.mark.parametrize("target", ["the checkpoint", "the --data file", "a file of the --data folder",
                                    "the --junit-xml file"])
def test_the_github_step_summary_is_never_an_input_or_another_output(cli, resnet_sd, tmp_path, monkeypatch,
                                                                    target):
    """Pointed at the checkpoint, verify appended Markdown to it and exited 0 (the checkpoint no longer
    loaded); at the JUnit file, the XML stopped parsing. Now a warning, the file untouched, the verdict kept."""
    npy, folder = tmp_path / "x.npy", write_pngs(tmp_path / "imgs", 2, 32)
    np.save(npy, np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32))
    junit = tmp_path / "v.xml"
    data = ["--data", folder if target == "a file of the --data folder" else npy]
    path = {"the checkpoint": resnet_sd, "the --data file": npy, "a file of the --data folder": folder / "00.png",
            "the --junit-xml file": junit}[target]
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(path))
    before = path.read_bytes() if path.exists() else None
    result = cli("verify", resnet_sd, *ARCH, *VERIFY, *data, "--junit-xml", junit, "--workers", "0")
    assert result.code == 0, result.err
    assert "warning: $GITHUB_STEP_SUMMARY" in result.err and "the summary is not appended to it" in result.err
    if before is not None:
        assert path.read_bytes() == before
    assert ET.parse(junit).getroot().get("failures") == "0"


def test_a_rerun_replaces_its_own_reports_but_never_another_kind_of_file(cli, resnet_sd, tmp_path):
    """As pytest's --junitxml: a rerun in the same workspace (was exit 2 without --force)."""
    junit, summary = tmp_path / "v.xml", tmp_path / "v.md"
    pytest_junit = tmp_path / "pytest.xml"
    pytest_junit.write_text('<?xml version="1.0"?><testsuites><testsuite name="pytest"/></testsuites>')
    for _ in range(2):
        result = cli("verify", resnet_sd, *ARCH, *VERIFY, "--junit-xml", junit, "--summary-md", summary, "-q")
        assert result.code == 0, result.err
    assert ET.parse(junit).getroot().get("name") == "bntool.verify"
    assert summary.read_text().count("### bntool verify") == 1
    assert cli("verify", resnet_sd, *ARCH, *VERIFY, "--junit-xml", pytest_junit, "-q").code == 0
    notes = tmp_path / "notes.md"
    notes.write_text("# my notes\n")
    assert_clean_error(cli("verify", resnet_sd, *ARCH, *VERIFY, "--summary-md", notes), contains="--force")
    assert_clean_error(cli("verify", resnet_sd, *ARCH, *VERIFY, "--junit-xml", summary), contains="--force")
    assert_clean_error(cli("verify", resnet_sd, *ARCH, *VERIFY, "--junit-xml", resnet_sd), contains="input")
    assert notes.read_text() == "# my notes\n"


@pytest.mark.parametrize("command", ["verify", "export-onnx"])
def test_unreadable_images_of_the_check_data_are_counted_in_a_warning(cli, resnet_sd, tmp_path, command):
    """As recalibrate does (verify and export-onnx skipped them silently)."""
    folder = write_pngs(tmp_path / "imgs", 3, 32)
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    extra = ["--skip-onnx"] if command == "verify" else ["-o", tmp_path / "m.onnx", "--exporter", "legacy"]
    result = cli(command, resnet_sd, *ARCH, "--input-shape", "1,3,32,32", "--samples", "1", "--data", folder,
                 "--workers", "0", *extra, "--json")
    assert result.code == 0, result.err
    assert f"warning: skipped 1 unreadable image (first: {folder / 'broken.png'})" in result.err
    assert "skipped 1 unreadable image" in " ".join(json.loads(result.out)["data"]["warnings"])


def test_with_json_a_command_that_cannot_run_prints_the_error_as_json(cli, resnet_sd, tmp_path):
    """A CI step that parses stdout always gets JSON (stdout was empty); stderr keeps its one error line."""
    cases = [
        (["inspect", tmp_path / "missing.pt", *ARCH, "--json"], 2, "input", "missing.pt: no such file"),
        (["verify", resnet_sd, *ARCH, "--json", "--bogus"], 2, "usage", "No such option: --bogus"),
        (["fold", resnet_sd, *ARCH, "--input-shape", "1,3,32,32", "--json", "-o", resnet_sd], 2, "input", "-o"),
    ]
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    cases.append((["inspect", tmp_path / "corrupt.safetensors", *ARCH, "--json"], 2, "corrupt_file", "safetensors"))
    for args, code, kind, words in cases:
        result = cli(*args)
        assert_clean_error(result, code=code)
        document = json.loads(result.out)
        assert document["error"]["exit_code"] == code and document["error"]["kind"] == kind, document
        assert words in document["error"]["message"] and document["command"] == args[0]
        assert result.err.strip() == "error: " + document["error"]["message"]
    assert cli("inspect", tmp_path / "missing.pt", *ARCH).out == ""  # without --json, stdout stays empty

