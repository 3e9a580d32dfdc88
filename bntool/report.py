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
    console.print(f"{counts}. batch_norm ops per forward: {report.batch_norm_ops_before} → {report.batch_norm_ops_after}; "
                  f"parameters: {report.params_before:,} → {report.params_after:,}; "
                  f"fold took {report.fold_seconds:.2f} s.")
    verdict = "[green]PASS[/]" if report.passed else "[red]FAIL[/]"
    console.print(f"Check on {len(report.comparisons)} inputs: max abs error {fmt(report.max_abs_error)}, "
                  f"max relative error {fmt(report.max_rel_error)} (atol {report.atol:g}, rtol {report.rtol:g}) {verdict}")
