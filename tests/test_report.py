"""What people read: tables that fit 80 columns without cutting names, honest columns with a legend, warnings
that point somewhere, progress over every pass, CI summaries (JUnit, Markdown) and JSON without NaN strings."""

from __future__ import annotations

import json
import math
from xml.etree import ElementTree as ET

import pytest
import torch
from rich.console import Console
from torch import nn

from bntool import zoo
from bntool.demo import DemoReport
from bntool.folding import fold
from bntool.inspection import inspect
from bntool.recalibration import LayerShift, RecalibrationReport, recalibrate
from bntool.report import (
    RecalibrationProgress,
    dumps,
    few_updates_warning,
    render_demo,
    render_fold,
    render_inspect,
    render_recalibrate,
    render_verify,
    versions,
    wrap_dotted,
)
from bntool.verification import Check, VerifyReport, check_health, junit_error_xml, to_junit_xml, to_markdown


def rendered(render, *args, width: int = 80, **kwargs) -> str:
    console = Console(width=width, highlight=False, force_terminal=False, color_system=None)
    with console.capture() as capture:
        render(*args, console, **kwargs)
    return capture.get()


class Deep(nn.Module):
    """torchvision/timm-like depth: BN names of 40+ characters whose convs sit next to them."""

    def __init__(self):
        super().__init__()
        self.features = nn.ModuleDict({
            f"denseblock{i}": nn.ModuleDict({
                f"denselayer{j}": nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
                for j in range(1, 3)})
            for i in range(1, 3)})
        self.stem_norm_with_a_rather_long_name = nn.BatchNorm2d(4)

    def forward(self, x):
        for block in self.features.values():
            for layer in block.values():
                x = layer(x)
        return self.stem_norm_with_a_rather_long_name(x)


def column_cells(text: str, column: str, next_column: str | None) -> list[str]:
    """The full content of one column per table row, re-joined from its wrapped lines (a row starts where the
    "kind" column has text); `next_column` None: the last column."""
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if " layer " in line and " kind " in line)
    start = lines[header].index(column)
    end = lines[header].index(next_column) if next_column else None
    kind = lines[header].index(" kind ") + 1
    cells: list[str] = []
    for line in lines[header + 2:]:
        if not line.strip():
            break
        piece = line[start:end].strip()
        if line[kind:kind + 4].strip():
            cells.append(piece)
        else:
            cells[-1] += piece
    return cells


@pytest.mark.parametrize("width", [60, 80, 100, 160])
def test_compact_inspect_fits_the_width_and_keeps_every_name(width):
    model = zoo.randomize_bn(Deep()).eval()
    report = inspect(model, (torch.randn(1, 4, 8, 8),))
    text = rendered(render_inspect, report, width=width)
    assert max(len(line) for line in text.splitlines()) <= width
    names = [name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert column_cells(text, "layer", "kind") == names
    assert " health " in text
    folds = column_cells(text, "fold → into", None)
    convs = [name[:-1] + "0" for name in names[:-1]]  # each folds into the conv just before it
    if width >= 160:
        assert folds == [f"folded → {c}" for c in convs] + ["affine"]
    else:  # named relative to the parent module both share, and the legend says so
        assert folds == ["folded → …0"] * len(convs) + ["affine"]
        assert "…name: in the BN layer's own parent module" in " ".join(text.split())


def test_wrap_dotted_never_loses_a_character():
    for name in ["a.b.c", "features.denseblock4.denselayer16.norm2", "x" * 50, "blocks.1.0.conv_pw"]:
        for width in (5, 8, 13, 30):
            lines = wrap_dotted(name, width).split("\n")
            assert "".join(lines) == name and all(len(line) <= width for line in lines)


def test_wide_inspect_shows_signed_gamma_and_a_legend():
    model = zoo.randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([-0.5, 0.25, 1.0, 2.0]))
    text = rendered(render_inspect, inspect(model), width=200, wide=True)
    assert "γ (weight)" in text and "|γ|" not in text
    assert "-0.5 … 2" in text  # signed: min and max of γ itself
    assert "tracked: num_batches_tracked" in text and "mom.: momentum" in text


def test_few_updates_warn_and_point_to_recalibrate_without_failing_verify():
    model = zoo.randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1),
                                           nn.BatchNorm2d(4))).eval()
    model[1].num_batches_tracked.fill_(37)
    model[3].num_batches_tracked.fill_(12)
    report = inspect(model)
    assert [f for layer in report.layers for f in layer.flags] == [
        f"few updates: num_batches_tracked {n} < 100; recalibrate" for n in (37, 12)]
    text = rendered(render_inspect, report, width=80)
    assert "2 BN layers have averaged only 12 … 37 batches" in " ".join(text.split())
    assert "bntool recalibrate" in text and "0 with health problems" in text
    health = check_health(model)
    assert health.passed and "2 with warnings" in health.summary


def test_demo_summary_has_columns_not_dicts():
    report = DemoReport(directory="bntool-demo", files={"recalibrated.pt": "bntool-demo/recalibrated.pt"})
    report.steps = [
        {"step": "inspect", "bn_layers": 6, "fold_plan": {"folded": 5, "affine": 1}},
        {"step": "fold", "batch_norm_ops": [6, 0], "max_rel_error": 1.5e-7, "passed": True},
        {"step": "verify", "passed": False, "checks": {"bn-health": True, "onnx-equivalence": False}},
    ]
    text = rendered(render_demo, report, width=100)
    assert not any(c in text for c in "{}=")
    rows = {line.split()[0]: line for line in text.splitlines() if line.strip().startswith(("│ inspect", "│ fold",
                                                                                           "│ verify"))
            for line in [line.strip("│ ")]}
    assert "bn layers 6; fold plan: folded 5, affine 1" in rows["inspect"]
    assert "PASS" in rows["fold"] and "batch norm ops 6 → 0; max rel error 1.5e-07" in rows["fold"]
    assert "FAIL" in rows["verify"] and "bn-health PASS, onnx-equivalence FAIL" in rows["verify"]


def test_progress_is_one_bar_over_all_passes():
    console = Console(width=120, force_terminal=False)
    with RecalibrationProgress(console, samples_per_pass=50) as progress:
        progress(20, 1, 3)
        task = progress.bar.tasks[0]
        assert (task.description, task.completed, task.total) == ("pass 1 of 3", 20, 150)
        progress(50, 1, 3)
        progress(10, 2, 3)
        task = progress.bar.tasks[0]
        assert (task.description, task.completed, task.total) == ("pass 2 of 3", 60, 150)
        progress(50, 3, 3)
        assert progress.bar.tasks[0].completed == progress.bar.tasks[0].total == 150
    with RecalibrationProgress(console, samples_per_pass=None) as single:
        single(7, 1, 1)
        assert (single.bar.tasks[0].description, single.bar.tasks[0].total) == ("pass 1", None)


def test_exact_recalibration_tells_the_bar_how_many_passes_from_its_first_call():
    model, samples = zoo.build("resnet"), 12
    data = list(torch.randn(samples, *zoo.ZOO["resnet"].input_shape[1:]).split(5))  # batches of 5, 5, 2
    calls, descriptions = [], []
    with RecalibrationProgress(Console(width=120, force_terminal=False), samples_per_pass=samples) as bar:
        def progress(done, pass_number, passes):
            calls.append((done, pass_number, passes))
            bar(done, pass_number, passes)
            descriptions.append(bar.bar.tasks[0].description)

        report = recalibrate(model, data, mode="exact", progress=progress)
        task = bar.bar.tasks[0]
        assert task.completed == task.total == samples * report.passes  # one bar over every pass
    assert report.passes > 2
    assert {passes for _, _, passes in calls} == {report.passes}  # the total, from the first call on
    assert sorted({pass_number for _, pass_number, _ in calls}) == list(range(1, report.passes + 1))
    assert calls[:4] == [(0, 1, report.passes), (5, 1, report.passes), (10, 1, report.passes),
                         (12, 1, report.passes)]
    assert descriptions[0] == f"pass 1 of {report.passes}"
    assert descriptions[-1] == f"pass {report.passes} of {report.passes}"


@pytest.mark.parametrize("count", [1, 2])
def test_counts_read_naturally(count):
    one = count == 1
    _, folded = fold(zoo.randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))).eval(),
                     torch.randn(1, 3, 4, 4), samples=count - 1)  # the example and count - 1 random inputs
    text = " ".join(rendered(render_fold, folded, width=200).split())
    assert f"Check on {count} {'input' if one else 'inputs'}:" in text
    checks = VerifyReport([Check(f"check-{i}", False, "over tolerance") for i in range(count)])
    assert f"{count} {'check' if one else 'checks'} failed." in rendered(render_verify, checks, width=100)
    recalibrated = RecalibrationReport(mode="exact", samples=count, batches=count, passes=count, seconds=1.0)
    text = " ".join(rendered(render_recalibrate, recalibrated).split())
    expected = "1 sample in 1 batch × 1 pass," if one else "2 samples in 2 batches × 2 passes,"
    assert expected in text and "(s)" not in text and "(es)" not in text


def test_plot_title_stays_inside_the_figure():
    pytest.importorskip("matplotlib")
    from bntool.plot import recalibration_figure

    layers = [LayerShift(f"l{i}", 8, 100, 0.5, 0.9, 1.1) for i in range(3)]
    report = RecalibrationReport(mode="exact", samples=12_345, batches=10, passes=3, layers=layers)
    fig = recalibration_figure(report)
    fig.canvas.draw()
    title = fig.axes[0].title.get_window_extent()
    bounds = fig.bbox
    assert title.x0 >= bounds.x0 and title.x1 <= bounds.x1 and title.y1 <= bounds.y1
    assert "12,345 samples" in fig.axes[0].get_title().replace("\n", " ")


def test_json_has_null_and_a_reason_instead_of_inf():
    report = VerifyReport([Check("onnx-equivalence", False, "onnxruntime failed",
                                 {"max_abs_error": math.inf, "ratios": [1.0, math.nan]})])
    text = dumps(report, {"checkpoint": "m.pt", "arch": "timm:resnet18", "versions": versions()})
    assert "Infinity" not in text and "NaN" not in text  # bare JSON tokens most parsers reject
    data = json.loads(text)
    reasons = data.pop("non_finite")
    assert reasons == {"checks[0].figures.max_abs_error": "inf", "checks[0].figures.ratios[1]": "nan"}
    assert data["checks"][0]["figures"] == {"max_abs_error": None, "ratios": [1.0, None]}
    assert data["checkpoint"] == "m.pt" and data["arch"] == "timm:resnet18"
    from importlib.metadata import version

    assert data["versions"]["torch"] == version("torch") and data["versions"]["onnxruntime"] == version("onnxruntime")


def test_junit_failure_is_readable_and_errors_are_test_cases():
    report = VerifyReport([Check("bn-health", True, "6 BN layers healthy"),
                           Check("fold-equivalence", False, "max abs 0.3 over tolerance",
                                 {"max_abs_error": 0.3, "counts": {"folded": 5, "affine": 1}})])
    suite = ET.fromstring(to_junit_xml(report))
    failure = suite.find("testcase[@name='fold-equivalence']/failure")
    assert failure.get("message") == "max abs 0.3 over tolerance"
    assert failure.text.splitlines()[2:] == ["max_abs_error: 0.3", "counts:", "  folded: 5", "  affine: 1"]
    assert "{" not in failure.text
    errored = ET.fromstring(junit_error_xml("m.pt: no such file"))
    assert (errored.get("tests"), errored.get("errors"), errored.get("failures")) == ("1", "1", "0")
    assert errored.find("testcase/error").get("message") == "m.pt: no such file"


def test_markdown_summary_is_a_table_of_the_checks():
    report = VerifyReport([Check("bn-health", True, "6 BN layers healthy", seconds=0.04),
                           Check("onnx-equivalence", False, "a | b over tolerance", seconds=1.26)])
    lines = to_markdown(report).splitlines()
    assert lines[0] == "### bntool verify: 1 failed"
    assert lines[2:4] == ["| check | result | details | time |", "|---|---|---|---|"]
    assert lines[4] == "| bn-health | ✅ pass | 6 BN layers healthy | 0.0 s |"
    assert lines[5] == "| onnx-equivalence | ❌ **FAIL** | a \\| b over tolerance | 1.3 s |"


def test_the_demos_follow_up_command_stays_one_line_at_80_columns():
    report = DemoReport(directory="bntool-demo",
                        files={"recalibrated.pt": "some/rather/long/directory/bntool-demo/recalibrated.pt"})
    report.steps = [{"step": "inspect", "bn_layers": 6}]
    line = next(line for line in rendered(render_demo, report, width=80).splitlines() if line.startswith("Try:"))
    assert line.endswith("--input-shape 1,3,32,32") and len(line) > 80  # the terminal wraps it, not a newline


def _sick_model() -> nn.Sequential:
    """One BN per health kind (NaN, var ≤ eps, never updated, near-dead, few updates, no statistics, a fold
    that overflows float16), between convs so that each is planned."""
    layers = []
    for _ in range(7):
        layers += [nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)]
    model = zoo.randomize_bn(nn.Sequential(*layers)).eval()
    model[13] = nn.BatchNorm2d(4, track_running_stats=False).eval()
    with torch.no_grad():
        model[1].running_mean[0] = float("nan")
        model[3].running_var[:2] = 0.0
        model[5].running_mean.zero_(), model[5].running_var.fill_(1.0)
        model[7].weight[1] = 0.0
        model[9].num_batches_tracked.fill_(7)
        model[11].weight[0] = 1e6  # folded weights beyond float16's 65504
    return model


def _verdicts(model: nn.Module, onnx_path) -> dict:
    from bntool.onnx_check import DEFAULT_TOLERANCE, compare_with_onnxruntime

    x = torch.randn(2, 4, 5, 5)
    report = inspect(model, x)
    health = check_health(model)
    onnx = compare_with_onnxruntime(model[:2], onnx_path, (x,), DEFAULT_TOLERANCE, samples=1)
    return {"passed": health.passed, "failed": sorted(health.figures["failed"]),
            "warned": sorted(health.figures["warnings"]),
            "kinds": [[(f.kind, f.fatal) for f in layer.health] for layer in report.layers],
            "problems": [len(layer.problems) for layer in report.layers],
            "few_updates_warning": bool(few_updates_warning(report)),
            "levels": sorted((c.optimization, c.passed) for c in onnx.comparisons),
            "level_notes": [n.split(":")[-1] for n in onnx.notes]}


def test_rewording_every_message_changes_no_verdict(tmp_path, monkeypatch):
    """Verdicts read kinds and fields, never words: every health message and the unoptimised ONNX label are
    reworded, each fatal message into a harmless one's words and back, and nothing decided changes."""
    from bntool import inspection, onnx_check
    from bntool.inspection import HEALTH_MESSAGES, HealthKind

    model = _sick_model()
    x = torch.randn(2, 4, 5, 5)
    torch.onnx.export(model[:2], (x,), tmp_path / "m.onnx", dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "b"}})
    before = _verdicts(model, tmp_path / "m.onnx")
    assert not before["passed"] and len(before["failed"]) == 4 and before["few_updates_warning"]
    assert {k for layer in before["kinds"] for k, _ in layer} >= set(HealthKind) - {HealthKind.FOLD_SUBNORMAL}
    words = {k: "few updates: near-dead " + str(i) if k in inspection.FATAL_KINDS else
             "NaN/Inf never updated var <= eps no running statistics " + str(i)
             for i, k in enumerate(HEALTH_MESSAGES)}
    monkeypatch.setattr(inspection, "HEALTH_MESSAGES", words)
    monkeypatch.setattr(onnx_check, "UNOPTIMIZED_LABEL", "{0} at level 0 (ORT_ENABLE_ALL)")
    after = _verdicts(model, tmp_path / "m.onnx")
    assert inspect(model).layers[0].flags[0].startswith("few updates: near-dead")  # the words did change
    assert after == before


def test_inspect_flags_folds_that_give_subnormal_or_half_overflowing_weights(cli, tmp_path, monkeypatch):
    """#21 §3: conv-BN-ReLU-conv-BN with half of γ at 1e-39 (L1-pruned channels) folds to subnormal float32
    weights; a γ of 1e5 times weights of 10 folds beyond float16. Both warn in inspect and verify, never fail."""
    torch.manual_seed(0)
    model = zoo.randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                                           nn.BatchNorm2d(8))).eval()
    with torch.no_grad():
        model[1].weight[:4] = 1e-39
        model[4].weight[0] = 1e5
        model[3].weight.mul_(100)
    x = torch.randn(1, 3, 8, 8)
    layers = inspect(model, x).layers
    kinds = [[f.kind.value for f in layer.health] for layer in layers]
    assert kinds == [["near-dead-gamma", "fold-subnormal"], ["fold-overflows-half"]], kinds
    assert "in 4 channels" in layers[0].flags[1] and "beyond float16 in 1 channel" in layers[1].flags[0]
    assert not any(layer.fatal for layer in layers) and check_health(model).passed
    # What the fold would write, in float64: the flag says the truth about it.
    scale = model[1].weight.double() / (model[1].running_var.double() + model[1].eps).sqrt()
    written = (model[0].weight.double() * scale.view(-1, 1, 1, 1)).float().abs()
    assert int(((written > 0) & (written < torch.finfo(torch.float32).tiny)).any(dim=(1, 2, 3)).sum()) == 4

    # The weights the fold multiplies decide: a scale of 1e-36 is normal, times weights of 1e-3 it is not.
    with torch.no_grad():
        model[1].weight[:4] = 1e-36
        model[0].weight.mul_(1e-3 / model[0].weight.abs().max())
    assert "fold-subnormal" not in [f.kind for f in inspect(model).layers[0].health]
    assert "fold-subnormal" in [f.kind for f in inspect(model, x).layers[0].health]

    torch.save(model.state_dict(), tmp_path / "m.pt")
    (tmp_path / "pruned.py").write_text(
        "from torch import nn\n\n\ndef build():\n    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), "
        "nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    result = cli("inspect", tmp_path / "m.pt", "--arch", "pruned:build", "--input-shape", "1,3,8,8", "--json")
    assert result.code == 0, result.err
    first = json.loads(result.out)["layers"][0]
    assert {"kind": "fold-subnormal", "fatal": False}.items() <= first["health"][-1].items()
    assert first["flags"] == [f["message"] for f in first["health"]]
    text = cli("inspect", tmp_path / "m.pt", "--arch", "pruned:build", "--input-shape", "1,3,8,8").out
    assert "subnormal fold" in " ".join(text.split()) and "1 with health problems" in text


@pytest.mark.parametrize("width", [60, 120, 200])
def test_a_long_health_flag_is_wrapped_never_cut(width):
    """"no running statistics (track_running_stats=False)" was cut to "(track_runni…" at any width."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    text = rendered(render_inspect, inspect(model, (torch.randn(1, 3, 8, 8),)), width=width)
    assert max(len(line) for line in text.splitlines()) <= width
    table = text.split("C: channels")[0]
    assert "…" not in table and "track_running_stats=False" in "".join(table.split()), table


def test_a_non_finite_statistic_is_counted_in_the_range_and_the_json():
    """running_mean holding inf showed '-0.972 … 0.901' (the finite values only) with no word in --json."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        model[1].running_mean[2] = float("inf")
    report = inspect(model)
    assert report.layers[0].running_mean.non_finite == 1
    assert report.to_dict()["layers"][0]["running_mean"]["non_finite"] == 1
    assert "(1 NaN/Inf)" in " ".join(rendered(render_inspect, report, width=200, wide=True).split())
