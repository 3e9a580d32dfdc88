"""Rich rendering of the reports the library returns. Computes nothing (their JSON is report_json.py)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from .report_json import dumps as dumps  # the CLI imports the JSON side from here too
from .report_json import versions as versions
from .utils import plural

ACTION_STYLE = {"folded": "green", "folded-forward": "green", "affine": "yellow", "refused": "red"}


def fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}g}"


def _range(summary) -> str:
    if summary is None:
        return "-"
    bad = f" ({summary.non_finite} NaN/Inf)" if summary.non_finite else ""
    return f"{fmt(summary.min)} … {fmt(summary.max)}{bad}"


INSPECT_LEGEND = (
    "C: channels. tracked: num_batches_tracked, the batches the running statistics have averaged (off: "
    "track_running_stats=False). mom.: momentum (None: cumulative average). γ, β: the affine weight and bias, "
    "signed, min … max over channels. fold: what `bntool fold` does with the layer → the conv/linear it goes "
    "into (affine: kept as a per-channel scale and shift; refused: left as it is)."
)
COMPACT_LEGEND = ("C: channels. fold: what `bntool fold` does → the layer it folds into (…name: in the BN "
                  "layer's own parent module). --wide shows statistics, γ/β, eps, momentum and tracked batches.")


def render_inspect(report, console: Console, wide: bool = False) -> None:
    """The BN layers in a table that fits the console: layer, kind, C, health and fold (compact), or every
    column (`wide`). Long names are shortened in the middle, never cut at the end; a legend follows."""
    if not report.layers:
        console.print("No BatchNorm layers in this model: nothing to recalibrate or fold"
                      + (" (bntool folded it already)." if report.folded else "."))
        return
    table = _inspect_wide(report) if wide else _inspect_compact(report, console.width)
    console.print(table)
    console.print(INSPECT_LEGEND if wide else COMPACT_LEGEND, style="dim")
    bad = [layer for layer in report.layers if layer.problems]
    console.print(f"{plural(len(report.layers), 'BN layer')}, {len(bad)} with health problems; "
                  f"{report.total_params:,} parameters.")
    if not wide:
        for line in _reasons(report.layers):
            console.print(line)
    warning = few_updates_warning(report)
    if warning:
        console.print(f"[yellow]warning:[/] {escape(warning)}")


def few_updates_warning(report) -> str:
    """The inspect warning about BN layers that averaged few batches ("" when none did); -q shows it too."""
    from .inspection import HealthKind  # here: the report module imports no torch (ONNX commands)

    few = [layer for layer in report.layers if any(f.kind == HealthKind.FEW_UPDATES for f in layer.health)]
    if not few:
        return ""
    counts = sorted(layer.num_batches_tracked for layer in few)
    return (f"{plural(len(few), 'BN layer')} {'has' if len(few) == 1 else 'have'} averaged only {counts[0]}"
            + (f" … {counts[-1]}" if counts[-1] != counts[0] else "")
            + " batches (num_batches_tracked): their statistics are noisy. "
            "`bntool recalibrate CKPT --data DIR -o OUT` re-estimates them from data.")


@dataclasses.dataclass
class _Decision:
    name: str
    fold_action: str
    fold_reason: str


def _reasons(layers) -> list[str]:
    """'affine (fed by cat, not a conv/linear): 58 layers, e.g. a, b, c': why layers are not folded, grouped."""
    groups: dict[tuple[str, str], list[str]] = {}
    for layer in layers:
        if layer.fold_action in ("affine", "refused"):
            groups.setdefault((layer.fold_action, layer.fold_reason or "no reason given"), []).append(layer.name)
    lines = []
    for (action, reason), names in groups.items():
        style = ACTION_STYLE[action]
        which = names[0] if len(names) == 1 else f"{len(names)} layers, e.g. {', '.join(names[:2])}"
        lines.append(f"[{style}]{action}[/] ({reason}): {which}")
    return lines


def _inspect_wide(report) -> Table:
    table = Table(title=f"{len(report.layers)} BatchNorm layers", show_lines=False)
    for col in ("layer", "type", "C", "eps", "mom.", "affine", "tracked", "running_mean", "running_var",
                "γ (weight)", "β (bias)", "health"):
        table.add_column(col, overflow="fold")
    if report.fold_planned:
        table.add_column("fold", overflow="fold")
    for layer in report.layers:
        row = [layer.name, layer.type, str(layer.channels), fmt(layer.eps), fmt(layer.momentum),
               "yes" if layer.affine else "no", str(layer.num_batches_tracked if layer.track_running_stats else "off"),
               _range(layer.running_mean), _range(layer.running_var), _range(layer.weight), _range(layer.bias),
               _health_cell(layer)]
        if report.fold_planned:
            row.append(_fold_cell(layer.fold_action, layer.fold_target, layer.fold_reason))
        table.add_row(*row)
    return table


def _health_cell(layer, short: bool = False) -> str:
    if not layer.health:
        return "[green]ok[/]"
    shown = [f.message.split(":")[0] if short else f.message for f in layer.health]
    style = "yellow" if not layer.problems else "red"
    return f"[{style}]" + "; ".join(shown) + "[/]"


def _inspect_compact(report, width: int) -> Table:
    """Layer, kind, C, health and fold → into, sized to `width`: long names wrap after a dot, nothing is cut."""
    layers = report.layers
    folds = report.fold_planned
    return bn_table(f"{len(layers)} BatchNorm layers", [layer.name for layer in layers],
                    [layer.type for layer in layers], [layer.channels for layer in layers], width,
                    healths=[_health_cell(layer, short=True) for layer in layers],
                    actions=[layer.fold_action for layer in layers] if folds else None,
                    targets=[layer.fold_target for layer in layers] if folds else None)


def bn_table(title: str, names: list[str], types: list[str], channels: list[int], width: int,
             healths: list[str] | None = None, actions: list | None = None, targets: list | None = None) -> Table:
    """BN layers as rows: name, kind, C, [health], [action → target], fitted to `width` columns. Names wrap after
    a dot; targets next to their BN are named relative to the shared parent (…conv1) when full names do not fit."""
    from rich import box

    kinds = [_short_kind(t) for t in types]
    actions_text = [str(a) if a is not None else "-" for a in actions] if actions is not None else None
    targets_text = [t or "" for t in targets] if targets is not None else None
    health_width = 0
    if healths is not None:
        cap = 13 if width < 100 else 28  # a wide terminal shows a long flag on one or two lines
        health_width = max(len("health"), min(cap, max(len(Text.from_markup(h).plain) for h in healths)))
    columns = 3 + (healths is not None) + (actions is not None)
    fixed = max(map(len, kinds)) + max(len(str(c)) for c in channels) + health_width
    room = max(24, width - fixed - 3 * columns - (max(map(len, actions_text)) + 3 if actions_text else 0))
    longest_name = max(len("layer"), *map(len, names))  # the header never wraps (an ONNX name can be "y")
    longest_target = max(map(len, targets_text)) if targets_text else 0
    if targets_text and longest_name + longest_target > room:
        targets_text = [_relative_target(n, t) for n, t in zip(names, targets_text)]
        longest_target = max(map(len, targets_text))
    if longest_name + longest_target <= room:
        name_width, target_width = longest_name, longest_target
    else:  # share the room; the shorter of the two keeps its full width when it can
        name_width = max(min(longest_name, room - room // 2), room - longest_target)
        target_width = max(room - name_width, 8)
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, title_justify="left")
    table.add_column("layer", width=name_width, overflow="fold")
    table.add_column("kind", no_wrap=True)
    table.add_column("C", justify="right", no_wrap=True)
    if healths is not None:
        table.add_column("health", width=health_width, overflow="fold")  # wrapped, never cut with "…"
    if actions_text is not None:
        table.add_column("fold → into", overflow="fold")
    for i, name in enumerate(names):
        row = [wrap_dotted(name, name_width), kinds[i], str(channels[i])]
        if healths is not None:
            row.append(healths[i])
        if actions_text is not None:
            action, target = actions_text[i], targets_text[i] if targets_text is not None else ""
            style = ACTION_STYLE.get(action, "")
            cell = f"[{style}]{action}[/]" if style else action
            if target:
                pad = " " * (len(action) + 3)
                cell += " → " + wrap_dotted(target, target_width).replace("\n", "\n" + pad)
            row.append(cell)
        table.add_row(*row)
    return table


def _relative_target(name: str, target: str) -> str:
    """'layer1.0.conv1' for BN 'layer1.0.bn1' → '…conv1': the part after the parent module they share."""
    parent = name.rpartition(".")[0]
    if parent and target.startswith(parent + "."):
        return "…" + target[len(parent) + 1:]
    return target


def wrap_dotted(name: str, width: int) -> str:
    """`name` in lines of at most `width` characters, broken after a dot where possible (never cut)."""
    lines, line = [], ""
    for part in name.replace(".", ".\0").split("\0"):
        if line and len(line) + len(part) > width:
            lines.append(line)
            line = ""
        while len(part) > width:
            room = width - len(line)
            lines.append(line + part[:room])
            line, part = "", part[room:]
        line += part
    lines.append(line)
    return "\n".join(lines)


def _short_kind(type_name: str) -> str:
    """BatchNorm2d → BN2d, FrozenBatchNorm2d → FrozenBN2d, SyncBatchNorm → SyncBN, ONNX's BatchNormalization
    → BN."""
    return type_name.replace("BatchNormalization", "BN").replace("BatchNorm", "BN")


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
        ds = report.decisions
        console.print(bn_table("BatchNorm folding", [d.name for d in ds], [d.type for d in ds],
                               [d.channels for d in ds], console.width, actions=[d.action for d in ds],
                               targets=[d.target for d in ds]))
        for line in _reasons([_Decision(d.name, d.action, d.reason) for d in ds]):
            console.print(line)
    else:
        console.print("No BatchNorm layers: nothing to fold.")
    counts = ", ".join(f"{report.count(a)} {a}" for a in ("folded", "folded-forward", "affine", "refused"))
    console.print(f"{counts}. batch_norm ops per forward: "
                  f"{report.batch_norm_ops_before} → {report.batch_norm_ops_after}; "
                  f"parameters: {report.params_before:,} → {report.params_after:,}; "
                  f"fold took {report.fold_seconds:.2f} s.")
    for line in report.ops_left:
        console.print(f"[yellow]batch_norm left:[/] {line}")
    if report.subnormals_flushed:
        console.print(f"Subnormal values flushed to zero: {report.subnormals_flushed:,} (the fold made them; "
                      "many CPU paths and runtimes compute on them several times slower).")
    for note in report.notes:
        console.print(f"[yellow]note:[/] {note}")
    _render_merges(report.merges, console)
    verdict = "[green]PASS[/]" if report.passed else "[red]FAIL[/]"
    for c in report.comparisons:
        if c.float64_error_original is not None:
            console.print(f"{c.input}: over tolerance against the float32 original, so both were compared with "
                          f"it in float64: folded error {fmt(c.float64_error_candidate)}, original's own "
                          f"{fmt(c.float64_error_original)} ({'within' if c.passed else 'over'} 1.5×)")
    console.print(f"Check on {plural(len(report.comparisons), 'input')}: max abs error {fmt(report.max_abs)} "
                  f"({fmt(report.max_abs_over_scale)} of the output's magnitude) against atol "
                  f"{fmt(report.atol_at_worst)} (rule {report.tolerance.describe()}) {verdict}")
    _comparison_notes(report, console)


def _render_merges(merges, console: Console) -> None:
    """One line per sum of branches: what merged into which layer, or why not."""
    done = [m for m in merges if m.merged]
    if done:
        console.print(f"Merged branches: {plural(len(done), 'sum')} of "
                      f"{plural(sum(len(m.branches) for m in done), 'branch', 'branches')} into one layer each.")
    shown = 0
    for m in merges:
        branches = ", ".join(b.rpartition(".")[2] if m.module else b for b in m.branches)
        where = m.module or "the model"
        if m.merged and shown == 6:
            console.print(f"  … and {len(done) - 6} more (all in --json)")
        shown += m.merged
        if m.merged and shown > 6:
            continue
        if m.merged:
            line = f"  {where}: {branches} → {m.into.rpartition('.')[2]}"
            if m.left_out:
                line += f" (kept: {'; '.join(m.left_out)})"
            console.print(escape(line))
        else:
            console.print(f"  [yellow]not merged:[/] {escape(where)}: {escape(branches)}: {escape(m.reason)}")


def _comparison_notes(report, console: Console) -> None:
    """What a figure alone does not say (NaN in the reference, a runner that failed), once per distinct note."""
    seen: dict[str, list[str]] = {}
    for c in report.comparisons:
        if c.note:
            seen.setdefault(c.note, []).append(c.input)
    for note, inputs in seen.items():
        where = inputs[0] + (f" and {plural(len(inputs) - 1, 'other')}" if len(inputs) > 1 else "")
        console.print(f"[yellow]note:[/] {where}: {escape(note)}")


def render_recalibrate(report, console: Console) -> None:
    from rich import box

    table = Table(title=f"Recalibrated BatchNorm statistics ({report.mode})", box=box.SIMPLE_HEAD, pad_edge=False,
                  title_justify="left", caption="mean shift: max over channels of |new − old mean| / old σ; "
                  "var new/old: the range over channels", caption_justify="left")
    names = [layer.name for layer in report.layers]
    name_width = max(12, min(max(map(len, names), default=8), console.width - 52))
    table.add_column("BN layer", width=name_width, overflow="fold")
    table.add_column("C", justify="right", no_wrap=True)
    table.add_column("values/ch", justify="right", no_wrap=True)
    table.add_column("mean shift", justify="right")
    table.add_column("var new/old", no_wrap=True)
    for layer in report.layers:
        name = wrap_dotted(layer.name, name_width)
        if layer.skipped:
            table.add_row(name, str(layer.channels), "-", f"[yellow]skipped: {layer.skipped}[/]", "-")
            continue
        table.add_row(name, str(layer.channels), f"{layer.samples:,}", f"{fmt(layer.mean_shift)} σ",
                      f"{fmt(layer.var_ratio_min)} … {fmt(layer.var_ratio_max)}")
    console.print(table)
    console.print(f"{plural(report.samples, 'sample')} in {plural(report.batches, 'batch', 'batches')} × "
                  f"{plural(report.passes, 'pass', 'passes')}, "
                  f"{report.seconds:.2f} s ({report.samples_per_second:,.0f} samples/s)"
                  + (f", {report.world_size} processes" if report.world_size > 1 else "") + ".")
    if report.mode == "exact" and (report.cache_budget_bytes or report.cache_note):
        console.print(f"Activation cache: {report.segment_replays:,} segment replays, peak "
                      f"{report.cache_peak_bytes / 2**20:,.0f} MiB of {report.cache_budget_bytes / 2**20:,.0f} MiB"
                      + (f", {report.cache_over_budget:,} activations over budget" if report.cache_over_budget else "")
                      + (f"; {report.cache_note}" if report.cache_note else "") + ".")
    for bypassed in report.cache_bypassed:
        console.print(f"[yellow]note:[/] the activation cache does not replay around {escape(bypassed)}")
    if report.whole_passes:
        console.print(f"[yellow]note:[/] exact mode ran whole passes until the statistics stopped changing, not one "
                      f"pass per BN level: {escape(report.whole_passes)}")


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
    from rich import box

    table = Table(title=f"onnxruntime ({report.provider}) vs PyTorch", box=box.SIMPLE_HEAD, pad_edge=False,
                  title_justify="left")
    full = console.width >= 110  # mean abs and the worst element's index need the room (both are in --json)
    roomy = console.width >= 96  # max rel too; at 80 columns the input names need its room
    longest_input = max((len(c.input) for c in report.comparisons), default=5)
    longest_output = max((len(c.output) for c in report.comparisons), default=6)
    table.add_column("input", min_width=min(14, longest_input), overflow="fold")  # text wraps; figures never do
    table.add_column("output", min_width=min(10, longest_output), overflow="fold")
    for col in ("max abs", "atol", *(("max rel",) if roomy else ()), *(("mean abs",) if full else ()), "over tol.",
                *(("worst at",) if full else ()), "result"):
        table.add_column(col, no_wrap=True, justify="right" if col != "result" else "left")
    for c in report.comparisons:
        figures = [fmt(c.max_abs), fmt(c.threshold), *([fmt(c.max_rel_elementwise)] if roomy else []),
                   *([fmt(c.mean_abs)] if full else []),
                   f"{c.mismatched_fraction:.2%}", *([str(c.worst_index)] if full else [])]
        table.add_row(c.input, c.output, *figures, "[green]ok[/]" if c.passed else "[red]FAIL[/]")
    console.print(table)
    for note in report.notes:
        console.print(f"[yellow]note:[/] {note}")
    _comparison_notes(report, console)
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
    console.print("[green]All checks passed.[/]" if not n_failed else f"[red]{plural(n_failed, 'check')} failed.[/]")


def render_demo(report, console: Console) -> None:
    table = Table(title=f"bntool demo (files in {report.directory})", title_justify="left")
    table.add_column("step", no_wrap=True)
    table.add_column("result", no_wrap=True)
    table.add_column("figures")
    for step in report.steps:
        passed = step.get("passed")
        result = "-" if passed is None else ("[green]PASS[/]" if passed else "[red]FAIL[/]")
        table.add_row(step["step"], result, demo_details(step))
    console.print(table)
    console.print("[green]Demo passed.[/]" if report.passed else "[red]Demo failed.[/]")
    model = report.files.get("recalibrated.pt")
    if model:
        # One line however narrow the terminal (it wraps it visually), so the command pastes whole.
        console.print(f"Try: bntool inspect {model} --arch bntool.zoo:resnet --input-shape 1,3,32,32",
                      soft_wrap=True, markup=False)


def demo_details(step: dict[str, Any]) -> str:
    """A demo step's figures as text: 'bn layers 6; fold plan: folded 6, affine 0; batch norm ops 6 → 0'."""
    parts = []
    for key, value in step.items():
        if key in ("step", "passed"):
            continue
        label = key.replace("_", " ")
        if isinstance(value, dict):
            inner = ", ".join(f"{k} {_demo_value(v)}" for k, v in value.items())
            parts.append(f"{label}: {inner}")
        elif isinstance(value, (list, tuple)) and len(value) == 2:
            parts.append(f"{label} {_demo_value(value[0])} → {_demo_value(value[1])}")
        else:
            parts.append(f"{label} {_demo_value(value)}")
    return "; ".join(parts)


def _demo_value(value: Any) -> str:
    if isinstance(value, bool):
        return "PASS" if value else "FAIL"
    if isinstance(value, float):
        return fmt(value)
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


class RecalibrationProgress:
    """One Rich progress bar over all passes of a recalibration, fed by the library's progress callback
    `progress(samples done in this pass, pass number, number of passes)`: "pass k of n", samples/s, elapsed and
    the remaining time of the whole run (n passes × samples_per_pass). `samples_per_pass` None: counts, no total."""

    def __init__(self, console: Console, samples_per_pass: int | None):
        self.console, self.per_pass = console, samples_per_pass
        self.bar: Any = None
        self.task: Any = None

    def __enter__(self) -> RecalibrationProgress:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[rate]} samples/s"), TimeElapsedColumn(), TimeRemainingColumn(),
                            console=self.console, transient=True)
        self.bar.__enter__()
        self.task = self.bar.add_task("pass 1", total=self.per_pass, rate="-")
        return self

    def __call__(self, done: int, pass_number: int, passes: int) -> None:
        of = f" of {passes}" if passes > 1 else ""
        total = self.per_pass * passes if self.per_pass is not None else None
        completed = (pass_number - 1) * (self.per_pass or 0) + done
        task = self.bar.tasks[0]
        rate = f"{task.speed:,.0f}" if task.speed else "-"
        self.bar.update(self.task, total=total, completed=completed, description=f"pass {pass_number}{of}",
                        rate=rate)

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)
