"""Rich rendering of the reports the library returns. Computes nothing."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from rich.console import Console
from rich.table import Table

ACTION_STYLE = {"folded": "green", "folded-forward": "green", "affine": "yellow", "refused": "red"}


def _clean(data: Any) -> Any:
    """NaN/Inf are not JSON: write them as strings."""
    if isinstance(data, float) and not math.isfinite(data):
        return str(data)
    if isinstance(data, dict):
        return {k: _clean(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_clean(v) for v in data]
    return data


def dumps(report: Any) -> str:
    data = report.to_dict() if hasattr(report, "to_dict") else dataclasses.asdict(report)
    return json.dumps(_clean(data), indent=2, default=str)


def fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}g}"


def _range(summary) -> str:
    return "-" if summary is None else f"{fmt(summary.min)} … {fmt(summary.max)}"


def render_inspect(report, console: Console) -> None:
    if not report.layers:
        console.print("No BatchNorm layers in this model: nothing to recalibrate or fold.")
        return
    table = Table(title=f"{len(report.layers)} BatchNorm layers", show_lines=False)
    for col in ("layer", "type", "C", "eps", "mom.", "affine", "tracked", "running_mean", "running_var", "|γ| range",
                "health"):
        table.add_column(col, overflow="fold")
    if report.fold_planned:
        table.add_column("fold")
    for layer in report.layers:
        gamma = "-" if layer.weight is None else f"{fmt(layer.weight.min)} … {fmt(layer.weight.max)}"
        health = "[red]" + "; ".join(layer.flags) + "[/]" if layer.flags else "[green]ok[/]"
        row = [layer.name, layer.type, str(layer.channels), fmt(layer.eps), fmt(layer.momentum),
               "yes" if layer.affine else "no", str(layer.num_batches_tracked if layer.track_running_stats else "off"),
               _range(layer.running_mean), _range(layer.running_var), gamma, health]
        if report.fold_planned:
            row.append(_fold_cell(layer.fold_action, layer.fold_target, layer.fold_reason))
        table.add_row(*row)
    console.print(table)
    bad = len(report.unhealthy)
    console.print(f"{len(report.layers)} BN layers, {bad} with health flags; {report.total_params:,} parameters.")


def _fold_cell(action: str | None, target: str | None, reason: str) -> str:
    if action is None:
        return "-"
    style = ACTION_STYLE.get(action, "")
    text = f"[{style}]{action}[/]"
    if target:
        text += f" → {target}"
    if reason and action in ("affine", "refused"):
        text += f" ({reason})"
    return text


def render_fold(report, console: Console) -> None:
    if report.decisions:
        table = Table(title="BatchNorm folding")
        for col in ("BN layer", "type", "C", "result", "into", "why"):
            table.add_column(col, overflow="fold")
        for d in report.decisions:
            style = ACTION_STYLE.get(d.action, "")
            why = d.reason if d.action in ("affine", "refused") else ""
            table.add_row(d.name, d.type, str(d.channels), f"[{style}]{d.action}[/]", d.target or "-", why)
        console.print(table)
    else:
        console.print("No BatchNorm layers: nothing to fold.")
    counts = ", ".join(f"{report.count(a)} {a}" for a in ("folded", "folded-forward", "affine", "refused"))
    console.print(f"{counts}. batch_norm ops per forward: "
                  f"{report.batch_norm_ops_before} → {report.batch_norm_ops_after}; "
                  f"parameters: {report.params_before:,} → {report.params_after:,}; "
                  f"fold took {report.fold_seconds:.2f} s.")
    for line in report.ops_left:
        console.print(f"[yellow]batch_norm left:[/] {line}")
    verdict = "[green]PASS[/]" if report.passed else "[red]FAIL[/]"
    for c in report.comparisons:
        if c.float64_error_original is not None:
            console.print(f"{c.input}: over tolerance against the float32 original, so both were compared with "
                          f"it in float64: folded error {fmt(c.float64_error_candidate)}, original's own "
                          f"{fmt(c.float64_error_original)} ({'within' if c.passed else 'over'} 1.5×)")
    console.print(f"Check on {len(report.comparisons)} inputs: max abs error {fmt(report.max_abs)} "
                  f"({fmt(report.max_abs_over_scale)} of the output's magnitude; rule "
                  f"{report.tolerance.describe()}) {verdict}")


def render_recalibrate(report, console: Console) -> None:
    table = Table(title=f"Recalibrated BatchNorm statistics ({report.mode})")
    for col in ("BN layer", "C", "values/channel", "max mean shift (old σ)", "var ratio new/old"):
        table.add_column(col, overflow="fold")
    for layer in report.layers:
        if layer.skipped:
            table.add_row(layer.name, str(layer.channels), "-", f"[yellow]skipped: {layer.skipped}[/]", "-")
            continue
        table.add_row(layer.name, str(layer.channels), f"{layer.samples:,}", fmt(layer.mean_shift),
                      f"{fmt(layer.var_ratio_min)} … {fmt(layer.var_ratio_max)}")
    console.print(table)
    console.print(f"{report.samples:,} samples in {report.batches} batches × {report.passes} pass(es), "
                  f"{report.seconds:.2f} s ({report.samples_per_second:,.0f} samples/s)"
                  + (f", {report.world_size} processes" if report.world_size > 1 else "") + ".")


def render_export(report, console: Console) -> None:
    verdict = "[green]PASS[/]" if report.passed else "[red]FAIL[/]"
    folded = ""
    if report.folded:
        c = report.fold_counts
        folded = (f" after folding ({c.get('folded', 0) + c.get('folded-forward', 0)} folded, "
                  f"{c.get('affine', 0)} affine, {c.get('refused', 0)} refused)")
    console.print(f"Exported {report.path} with the {report.exporter} exporter, opset {report.opset}{folded}: "
                  f"{sum(report.op_counts.values())} nodes, {report.batch_norm_nodes} BatchNormalization, "
                  f"{report.file_bytes / 1e6:.2f} MB, {report.export_seconds:.1f} s.")
    ops = ", ".join(f"{k} {v}" for k, v in sorted(report.op_counts.items(), key=lambda kv: -kv[1]))
    console.print(f"Ops: {ops}")
    table = Table(title=f"onnxruntime ({report.provider}) vs PyTorch")
    for col in ("input", "output", "max abs", "max rel", "mean abs", "over tol.", "worst at", "result"):
        # On a narrow terminal the names wrap; a figure never loses its exponent to an ellipsis ("1.86e-…").
        figure = col in ("max abs", "max rel", "mean abs")
        table.add_column(col, no_wrap=figure or col in ("over tol.", "result"), min_width=8 if figure else None,
                         overflow="fold")
    for c in report.comparisons:
        table.add_row(c.input, c.output, fmt(c.max_abs), fmt(c.max_rel_elementwise), fmt(c.mean_abs),
                      f"{c.mismatched_fraction:.2%}", str(c.worst_index),
                      "[green]ok[/]" if c.passed else "[red]FAIL[/]")
    console.print(table)
    for note in report.notes:
        console.print(f"[yellow]note:[/] {note}")
    console.print(f"{verdict} (max error {fmt(report.max_abs_over_scale)} of the output's magnitude; rule "
                  f"{report.tolerance.describe()}); verified in {report.verify_seconds:.1f} s.")


def render_verify(report, console: Console) -> None:
    table = Table(title="bntool verify")
    for col in ("check", "result", "details", "time"):
        table.add_column(col, overflow="fold")
    for c in report.checks:
        table.add_row(c.name, "[green]PASS[/]" if c.passed else "[red]FAIL[/]", c.summary, f"{c.seconds:.1f} s")
    console.print(table)
    n_failed = sum(not c.passed for c in report.checks)
    console.print("[green]All checks passed.[/]" if not n_failed else f"[red]{n_failed} check(s) failed.[/]")


def render_demo(report, console: Console) -> None:
    table = Table(title=f"bntool demo (files in {report.directory})")
    table.add_column("step")
    table.add_column("result", overflow="fold")
    for step in report.steps:
        details = ", ".join(f"{k}={fmt(v) if isinstance(v, float) else v}" for k, v in step.items() if k != "step")
        table.add_row(step["step"], details)
    console.print(table)
    console.print("[green]Demo passed.[/]" if report.passed else "[red]Demo failed.[/]")
    console.print(f"Try: bntool inspect {report.files['recalibrated.pt']} --arch bntool.zoo:resnet "
                  "--input-shape 1,3,32,32")
