"""export-onnx and verify: onnxruntime agrees with PyTorch, and every failure is reported cleanly."""

from __future__ import annotations

import json
from xml.etree import ElementTree as ET

import onnx
import pytest
import torch
from helpers import assert_clean_error, files_in

from bntool import zoo
from bntool.errors import CheckFailed
from bntool.onnx_export import export_onnx
from bntool.verification import verify

ARCH = ["--arch", "bntool.zoo:resnet"]
SHAPE = ["--input-shape", "2,3,32,32"]


@pytest.mark.parametrize("name", ["resnet", "mobilenet", "tokens", "decoder", "preact", "conv3d", "mlp"])
def test_export_folded_models_legacy(tmp_path, name):
    path = tmp_path / f"{name}.onnx"
    report = export_onnx(zoo.build(name), zoo.example_input(name), path, exporter="legacy", dynamic_batch=True,
                         samples=1)
    assert report.passed and report.batch_norm_nodes == 0
    assert report.max_abs_over_scale < 1e-5 and report.max_abs < 1e-5
    assert {c.input.split(" #")[0] for c in report.comparisons} >= {"random b=1", "example"}
    onnx.checker.check_model(str(path))
    assert files_in(tmp_path) == {f"{name}.onnx"}  # no temp files left


def test_export_table_keeps_every_figure_whole_on_an_80_column_terminal(tmp_path):
    """At 80 columns Rich once cut the figures to '1.86e-…', dropping the exponent that is the whole point."""
    import io

    from rich.console import Console

    from bntool.report import fmt, render_export

    report = export_onnx(zoo.build("resnet"), zoo.example_input("resnet"), tmp_path / "m.onnx", exporter="legacy",
                         dynamic_batch=True, samples=1)
    out = io.StringIO()
    render_export(report, Console(file=out, width=80, force_terminal=False, color_system=None))
    text = out.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "…" not in text
    for c in report.comparisons:
        for figure in (c.max_abs, c.threshold):  # max rel and mean abs need a wider terminal (both are in --json)
            assert fmt(figure) in text, (fmt(figure), text)
    assert "example (ORT_DISABLE_ALL)" in text  # input names whole, not cut letter by letter
    wide = io.StringIO()
    render_export(report, Console(file=wide, width=120, force_terminal=False, color_system=None))
    assert all(fmt(c.max_rel_elementwise) in wide.getvalue() for c in report.comparisons)


def test_verification_catches_a_wrong_legacy_trace(tmp_path):
    """Conv2dSame computes its padding from the input shape in Python: the legacy tracer freezes it, and the
    graph breaks at other batch sizes. The check must catch that instead of shipping the file as good."""
    with pytest.raises(CheckFailed) as info:
        export_onnx(zoo.build("subclass"), zoo.example_input("subclass"), tmp_path / "m.onnx", exporter="legacy",
                    dynamic_batch=True, samples=1)
    report = info.value.report
    assert any(not c.passed for c in report.comparisons) and report.max_abs > 1e-3


@pytest.mark.parametrize("name,left_by_exporter", [("preact", 3), ("tokens", 2), ("mlp", 3)])
def test_exporter_alone_leaves_batchnorm_that_bntool_folds(tmp_path, name, left_by_exporter):
    """torch.onnx fuses conv→BN pairs itself, but not pre-activation, token or Linear→BN1d layers."""
    plain = export_onnx(zoo.build(name), zoo.example_input(name), tmp_path / "plain.onnx", fold=False,
                        exporter="legacy", samples=1)
    folded = export_onnx(zoo.build(name), zoo.example_input(name), tmp_path / "folded.onnx", exporter="legacy",
                         samples=1)
    assert plain.passed and plain.batch_norm_nodes == left_by_exporter
    assert folded.passed and folded.batch_norm_nodes == 0


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_a_standalone_affine_exports_as_one_depthwise_conv(tmp_path, exporter):
    """A pre-activation BN's affine is written as a depthwise 1×1 Conv, as onnxruntime runs a BN node (Mul+Add
    leave its blocked layout: DenseNet-121 1.17× slower); the file still matches the model."""
    report = export_onnx(zoo.build("preact"), zoo.example_input("preact"), tmp_path / "m.onnx", exporter=exporter,
                         samples=1)
    ops = [n.op_type for n in onnx.load(tmp_path / "m.onnx").graph.node]
    assert report.passed and report.batch_norm_nodes == 0
    assert "Mul" not in ops and "Sub" not in ops and ops.count("Conv") == 6, ops


def test_dynamo_exporter_with_external_data_layout(tmp_path):
    report = export_onnx(zoo.build("subclass"), zoo.example_input("subclass"), tmp_path / "m.onnx",
                         exporter="dynamo", samples=1, dynamic_batch=True)
    assert report.exporter == "dynamo" and report.passed and report.batch_norm_nodes == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_multiple_inputs_and_tuple_outputs(tmp_path):
    class TwoInTwoOut(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = zoo.conv_bn(3, 4)
            self.b = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.BatchNorm1d(6))

        def forward(self, image, features):
            return {"map": self.a(image), "vec": self.b(features)}

    model = zoo.randomize_bn(TwoInTwoOut()).eval()
    inputs = (torch.randn(2, 3, 8, 8), torch.randn(2, 5))
    report = export_onnx(model, inputs, tmp_path / "m.onnx", exporter="legacy", input_names=["image", "features"],
                         samples=1)
    assert report.passed and report.input_names == ["image", "features"] and len(report.output_names) == 2


def test_verify_api_all_checks(tmp_path):
    report = verify(zoo.build("mobilenet"), zoo.example_input("mobilenet"), exporter="legacy", samples=1)
    assert report.passed and [c.name for c in report.checks] == ["bn-health", "fold-equivalence", "onnx-equivalence"]


def test_a_float16_model_exports_and_verifies_with_float16s_rule(tmp_path):
    """onnxruntime and PyTorch differ by a float16 ulp (5e-4 of the magnitude): float32's 1e-4 failed every
    float16 export, folded or not (hostile QA); the fold check's float16 rule applies, as on the PyTorch path."""
    model, x = zoo.build("resnet").half(), zoo.example_input("resnet").half()
    report = export_onnx(model, x, tmp_path / "h.onnx", exporter="legacy", samples=1)
    assert report.passed and report.tolerance.atol == 5e-2 and report.max_abs > 0
    assert verify(model, x, exporter="legacy", samples=1).passed
    float32 = export_onnx(zoo.build("resnet"), zoo.example_input("resnet"), tmp_path / "f.onnx", exporter="legacy",
                          samples=1)
    assert float32.tolerance.atol == 1e-4


def test_verify_fails_on_unhealthy_stats():
    model = zoo.build("resnet")
    model.layer1.bn1.reset_running_stats()  # never updated: 0/1
    report = verify(model, zoo.example_input("resnet"), onnx=False)
    health = report.checks[0]
    assert not report.passed and not health.passed and "layer1.bn1" in health.summary


# ---------------------------------------------------------------- CLI


def test_cli_export_and_verify_with_junit(tmp_path, cli, resnet_sd):
    path = tmp_path / "m.onnx"
    result = cli("export-onnx", resnet_sd, *ARCH, *SHAPE, "-o", path, "--exporter", "legacy", "--dynamic-batch",
                 "--samples", "1", "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["passed"] and report["batch_norm_nodes"] == 0 and report["op_counts"]["Conv"] == 6
    junit = tmp_path / "verify.xml"
    result = cli("verify", resnet_sd, *ARCH, *SHAPE, "--onnx", path, "--junit-xml", junit, "--samples", "1")
    assert result.code == 0, result.err
    suite = ET.parse(junit).getroot()
    assert suite.get("tests") == "3" and suite.get("failures") == "0"


def test_cli_verify_mismatch_exits_1(tmp_path, cli, resnet_sd):
    other = tmp_path / "other.pt"
    torch.save(zoo.build("resnet", seed=5).state_dict(), other)
    path = tmp_path / "other.onnx"
    assert cli("export-onnx", other, *ARCH, *SHAPE, "-o", path, "--exporter", "legacy", "--samples", "0").code == 0
    junit = tmp_path / "verify.xml"
    result = cli("verify", resnet_sd, *ARCH, *SHAPE, "--onnx", path, "--json", "--junit-xml", junit)
    assert result.code == 1
    report = json.loads(result.out)
    assert not report["passed"] and [c["passed"] for c in report["checks"]] == [True, True, False]
    assert ET.parse(junit).getroot().get("failures") == "1"
    assert "verification failed: onnx-equivalence" in result.err


def test_cli_export_mismatch_writes_nothing_unless_keep_failed(tmp_path, cli, resnet_sd):
    path = tmp_path / "m.onnx"
    result = cli("export-onnx", resnet_sd, *ARCH, *SHAPE, "-o", path, "--exporter", "legacy", "--rtol", "0",
                 "--atol", "0", "--samples", "1")
    assert result.code == 1 and f"nothing written at {path}" in result.err
    assert files_in(tmp_path) == {"resnet.pt"}
    result = cli("export-onnx", resnet_sd, *ARCH, *SHAPE, "-o", path, "--exporter", "legacy", "--rtol", "0",
                 "--atol", "0", "--samples", "1", "--keep-failed")
    kept = tmp_path / "m.FAILED.onnx"
    assert result.code == 1 and f"kept as {kept}" in result.err
    assert files_in(tmp_path) == {"resnet.pt", "m.FAILED.onnx"}
    onnx.checker.check_model(str(kept))
    result = cli("export-onnx", resnet_sd, *ARCH, *SHAPE, "-o", path, "--exporter", "legacy", "--rtol", "0",
                 "--atol", "0", "--samples", "1", "--keep-failed")
    assert_clean_error(result, contains="--force")  # the kept file is an output too: checked before work


def test_cli_bad_onnx_inputs(tmp_path, cli, resnet_sd):
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07garbage" * 10)
    assert_clean_error(cli("verify", resnet_sd, *ARCH, *SHAPE, "--onnx", corrupt), contains="corrupt")
    good = tmp_path / "good.onnx"
    assert cli("export-onnx", resnet_sd, *ARCH, "--input-shape", "1,3,32,32", "-o", good, "--exporter",
               "legacy", "--samples", "0").code == 0
    assert_clean_error(cli("verify", resnet_sd, *ARCH, "--input-shape", "1,3,16,16", "--onnx", good),
                       contains="has shape")
    assert_clean_error(cli("verify", resnet_sd, *ARCH, "--input-shape", "1,3,32,32", "--input-shape", "1,3",
                           "--onnx", good), contains="forward on the example inputs failed")


def test_cli_export_bad_inputs(tmp_path, cli, resnet_sd):
    out = tmp_path / "m.onnx"
    assert_clean_error(cli("export-onnx", resnet_sd, *ARCH, "--input-shape", "2,7,32,32", "-o", out),
                       contains="forward on the example inputs failed")
    assert_clean_error(cli("export-onnx", resnet_sd, *ARCH, *SHAPE, "-o", out, "--exporter", "legacy",
                           "--opset", "99"), contains="exports ONNX opsets")
    assert_clean_error(cli("export-onnx", resnet_sd, *ARCH, *SHAPE, "-o", tmp_path / "no" / "m.onnx"),
                       contains="does not exist")
    assert_clean_error(cli("export-onnx", resnet_sd, *ARCH, *SHAPE, "-o", "/proc/m.onnx"))
    assert files_in(tmp_path) == {"resnet.pt"}


class DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = zoo.conv_bn(3, 4)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:  # control flow on tensor values: torch.export cannot trace it
            return y * 2
        return y


def test_untraceable_model_names_the_exporter(tmp_path):
    from bntool.errors import InputError

    with pytest.raises(InputError, match="dynamo exporter") as info:
        export_onnx(zoo.randomize_bn(DataDependent()).eval(), torch.randn(1, 3, 8, 8), tmp_path / "m.onnx",
                    exporter="dynamo", fold=False)
    assert "try exporter legacy" in str(info.value) and info.value.param is None
    from bntool.cli import flag_name

    assert "try --exporter legacy" in info.value.render(flag_name)
    assert files_in(tmp_path) == set()


def test_a_branch_frozen_by_the_trace_is_said(tmp_path, cli):
    """The legacy exporter freezes `if y.sum() > 0` to the example's branch, and random inputs may all take it:
    the check passes, so the report says where the trace read a tensor's value (torch's TracerWarning, which
    the CLI hides as exporter noise)."""
    model = zoo.randomize_bn(DataDependent()).eval()
    report = export_onnx(model, torch.randn(1, 3, 8, 8), tmp_path / "m.onnx", exporter="legacy", fold=False)
    frozen = [n for n in report.notes if "turned a tensor into a Python value" in n]
    assert frozen and "test_onnx.py:" in frozen[0], report.notes
    plain = export_onnx(zoo.build("resnet"), zoo.example_input("resnet"), tmp_path / "r.onnx", exporter="legacy")
    assert not any("Python value" in n for n in plain.notes), plain.notes


def test_check_failed_carries_report(tmp_path):
    with pytest.raises(CheckFailed) as info:
        export_onnx(zoo.build("resnet"), zoo.example_input("resnet"), tmp_path / "m.onnx", exporter="legacy",
                    rtol=0, atol=0, samples=0)
    assert info.value.report.max_abs > 0 and not info.value.report.passed


# ---------------------------------------------------------------- verify runs the original once per input


class Doubling(torch.nn.Module):
    """A model with a forward hook that changes a block's output, and one conv module called twice."""

    def __init__(self):
        super().__init__()
        self.body = zoo.build("resnet")
        self.body.layer1.register_forward_hook(lambda module, args, out: out * 1.5)

    def forward(self, x):
        return self.body(x)


def _original_calls(model) -> list:
    """Forwards of `model` itself (deep copies carry the hook too, and are not counted)."""
    calls: list = []
    model.register_forward_hook(lambda m, args, out: calls.append(1) if m is model else None)
    return calls


def test_verify_runs_the_original_once_per_input():
    """The ONNX check reuses the fold check's outputs on the example and on the random inputs at the example's
    batch size; it runs the original only at the other batch size (4 here). Before: 9 runs (3 + 1 + 5), plus the
    plan's trace of a copy."""
    model = zoo.build("resnet")
    calls = _original_calls(model)
    report = verify(model, torch.randn(1, 3, 32, 32), exporter="legacy", samples=2)
    assert report.passed
    # fold's plan: one trace; fold check: example + 2 random; ONNX check: 2 random at batch 4
    assert len(calls) == 1 + 3 + 2


def test_export_runs_the_original_once_per_input(tmp_path):
    model = zoo.build("resnet")
    calls = _original_calls(model)
    export_onnx(model, torch.randn(1, 3, 32, 32), tmp_path / "m.onnx", exporter="legacy", samples=1)
    # fold's plan: one trace; the example (fold check, output names and ONNX check alike) + 1 random; was 4
    assert len(calls) == 1 + 1 + 1


@pytest.mark.parametrize("name", ["hooked", "reused", "data-dependent"])
def test_verify_json_is_what_the_plain_path_computes(monkeypatch, name):
    """Reusing the fold check's outputs changes no number: the same report as running the original every time,
    on a model with a hook, one with a module called twice, one with a data-dependent branch."""
    from bntool.compare import RecordedRuns

    def build():
        torch.manual_seed(0)  # the same weights both times
        if name == "hooked":
            return Doubling().eval()
        if name == "data-dependent":
            return zoo.randomize_bn(DataDependent()).eval()
        return zoo.build(name)

    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    reused = _timeless(verify(build(), x, exporter="legacy", samples=2).to_dict())
    with monkeypatch.context() as m:
        m.setattr(RecordedRuns, "__call__", lambda self, model, inputs: model(*inputs))  # the plain path
        plain = _timeless(verify(build(), x, exporter="legacy", samples=2).to_dict())
    assert reused == plain
    assert plain["checks"][2]["figures"]["comparisons"] == 2 * (1 + 2 + 2)  # two levels × (example, b=1, b=4)


def _timeless(d):
    if isinstance(d, dict):
        return {k: _timeless(v) for k, v in d.items() if "seconds" not in k}
    if isinstance(d, list):
        return [_timeless(v) for v in d]
    return d


def test_recorded_runs_reuse_only_the_same_run():
    from bntool.compare import RecordedRuns

    model, other = zoo.build("resnet"), zoo.build("resnet")
    runs = RecordedRuns()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        first = runs(model, (x,))
        assert runs(model, (x.clone(),)) is first and runs.reused == 1  # equal values: reused
        assert torch.equal(first, model(x))  # what a fresh run computes
        runs(other, (x,))  # another module
        runs(model, (x + 1e-6,))  # other values
        model.layer1.train()
        runs(model, (x,))  # other train/eval flags
        model.eval()
    assert runs.reused == 1 and len(runs.runs) == 4


def test_recorded_runs_keep_the_inputs_as_they_were_before_the_forward():
    from bntool.compare import RecordedRuns

    class WritesItsInput(torch.nn.Module):
        def forward(self, x):
            return x.mul_(2)

    runs, x = RecordedRuns(), torch.ones(3)
    with torch.no_grad():
        runs(WritesItsInput(), (x,))
    assert torch.equal(runs.runs[0][2][0], torch.ones(3))


# ---------------------------------------------------------------- the library exports to what it is given


def test_library_export_replaces_the_file_it_is_given(tmp_path):
    """File safety (--force, --keep-failed, the inputs) is the CLI's plan; the library writes `path`."""
    import inspect

    path = tmp_path / "m.onnx"
    path.write_text("an earlier file")
    report = export_onnx(zoo.build("resnet"), zoo.example_input("resnet"), path, exporter="legacy", samples=0)
    assert report.passed and report.path == str(path)
    onnx.checker.check_model(str(path))
    assert not {"force", "keep_failed", "protect"} & set(inspect.signature(export_onnx).parameters)


def test_library_export_keeps_a_failed_file_only_at_failed_path(tmp_path):
    kept = tmp_path / "kept.onnx"
    with pytest.raises(CheckFailed, match=f"kept as {kept}"):
        export_onnx(zoo.build("resnet"), zoo.example_input("resnet"), tmp_path / "m.onnx", exporter="legacy",
                    rtol=0, atol=0, samples=0, failed_path=kept)
    assert files_in(tmp_path) == {"kept.onnx"}
    onnx.checker.check_model(str(kept))


def test_library_export_never_replaces_a_checkpoint(tmp_path):
    from bntool.errors import InputError

    ckpt = tmp_path / "m.pt"
    torch.save({"w": torch.zeros(1)}, ckpt)
    with pytest.raises(InputError, match="is a PyTorch checkpoint"):
        export_onnx(zoo.build("resnet"), zoo.example_input("resnet"), ckpt, exporter="legacy", samples=0)
