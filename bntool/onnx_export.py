"""Export to ONNX (folding BatchNorm first) and prove numerical equivalence with onnxruntime (bntool.onnx_check
reads, runs and compares the file)."""

from __future__ import annotations

import contextlib
import inspect as pyinspect
import io
import logging
import os
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .choices import Exporter
from .compare import ComparedReport, Comparison, RecordedRuns, Tolerance, check_samples
from .devices import check_not_meta, modes_kept, moved_to, to_device
from .errors import CheckFailed, InputError, UnsupportedError, param, user_code
from .files import OutputKind, Outputs, failed_name, test_point
from .onnx_check import (
    DEFAULT_TOLERANCE,
    OnnxCheck,
    check_provider,
    check_signature,
    compare_runs,
    compare_with_onnxruntime,
    error_line,
    load_checked,
    op_counts,
    opset_of,
    ort_session,
)
from .utils import iter_tensors

# Names that moved to onnx_check and stay importable from here.
__all__ = ["DEFAULT_TOLERANCE", "EXPORTERS", "ExportReport", "OnnxCheck", "check_opset", "check_provider",
           "check_signature", "compare_runs", "compare_with_onnxruntime", "export_onnx", "load_checked",
           "needs_external_data", "op_counts", "opset_range", "ort_session", "plan_outputs"]

EXPORTERS = Exporter.values()
TWO_GB = 2 * 1024**3


@dataclass
class ExportReport(ComparedReport):
    """What `export_onnx` wrote (graph, ops, files) and how onnxruntime's outputs compared with PyTorch's."""

    path: str
    exporter: str
    opset: int | None
    folded: bool
    fold_counts: dict[str, int] = field(default_factory=dict)
    op_counts: dict[str, int] = field(default_factory=dict)
    batch_norm_nodes: int = 0
    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)
    dynamic_batch: bool = False
    comparisons: list[Comparison] = field(default_factory=list)
    tolerance: Tolerance = DEFAULT_TOLERANCE
    provider: str = "CPUExecutionProvider"
    passed: bool = True
    notes: list[str] = field(default_factory=list)
    export_seconds: float = 0.0
    verify_seconds: float = 0.0
    file_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tolerance"] = self.tolerance.to_dict()
        d.update(self.summary_figures())
        return d


def export_onnx(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    path: str | os.PathLike,
    *,
    fold: bool = True,
    exporter: str = "auto",
    opset: int | None = None,
    dynamic_batch: bool = False,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    samples: int = 4,
    seed: int = 0,
    data: Iterable[torch.Tensor] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    provider: str = "cpu",
    check: bool = True,
    failed_path: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    folded: tuple[nn.Module, Any] | None = None,
    reference_runs: RecordedRuns | None = None,
) -> ExportReport:
    """Fold (optionally), export to a temp file, check the graph and compare onnxruntime with PyTorch; only a
    file that passed is put at `path`.

    Args:
        model: the model (put in eval mode); with `fold`, a folded copy is exported and `model` is unchanged.
        example_inputs: one tensor or a sequence of the model's inputs; they fix the exported shapes.
        path: the .onnx file (a `.onnx.data` file beside it for models over 2 GB); a file there is replaced.
        fold: fold BatchNorm first (bntool.fold).
        exporter: an Exporter: "auto" (dynamo, falling back to legacy), "dynamo" or "legacy".
        opset: the ONNX opset (default: the exporter's).
        dynamic_batch: make axis 0 dynamic; the check then runs at several batch sizes.
        input_names, output_names: graph input/output names.
        samples, seed: random inputs checked per batch size besides the example.
        data: real input batches checked too.
        rtol, atol: elementwise |Δ| ≤ atol + rtol·|reference| (bntool.compare.Tolerance); default rtol 1e-4 and
            atol 1e-4 of each output's largest magnitude (a float16/bfloat16 model: atol 5e-2 of it, the fold
            check's rule); an atol given here is absolute.
        provider: a Provider: "cpu" or "cuda" (onnxruntime's execution provider).
        check: raise CheckFailed when the check fails (else return the failed report).
        failed_path: where a file that failed the check is kept (the CLI's `--keep-failed` gives
            `files.failed_name(path)`); by default a failed file is not kept.
        device: where PyTorch runs (fold, export trace, reference outputs): "cpu", "cuda", "cuda:1", "mps"; the
            inputs and `data` are moved there and the model is put back afterwards. Default: where the model is.
        folded: with `fold`, the (folded model, FoldReport) that `bntool.fold(model, example_inputs)` returned, to
            export instead of folding again (verify folds once for its fold and ONNX checks).
        reference_runs: `model`'s outputs already computed (bntool.compare.RecordedRuns, e.g. by
            `fold(..., reference_runs=)`): the check reuses them on the same inputs instead of running `model`.

    Returns:
        An ExportReport (graph ops, files, comparisons).

    Raises:
        InputError: a bad argument, a path that cannot be written (a missing folder, a directory, a PyTorch
            checkpoint), or an export that failed.
        UnsupportedError: the dynamo exporter on a torch without it.
        CheckFailed: with `check`, onnxruntime's outputs differ beyond tolerance (`.report` is the report).

    Side effects: writes `path` (and its external data) only when the check passed, all files at once at the
    end; with `failed_path`, a failed file goes there instead. Which files may be replaced is the caller's
    decision (the CLI plans them with `plan_outputs` before any work). `model` runs in eval mode; its training
    flags (and with `device` its placement) are put back afterwards.
    """
    check_not_meta(model)
    with moved_to(model, device) as dev, modes_kept(model):
        inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
        return _export_and_check(
            model, to_device(inputs, dev) if device is not None else inputs, path, fold=fold, exporter=exporter,
            opset=opset, dynamic_batch=dynamic_batch, input_names=input_names, output_names=output_names,
            samples=samples, seed=seed, data=data, rtol=rtol, atol=atol, provider=provider, check=check,
            failed_path=failed_path, folded=folded, runs=reference_runs if reference_runs is not None else
            RecordedRuns())


def default_export_tolerance(model: nn.Module, inputs) -> Tolerance:
    """float32's rule, or the fold check's float16/bfloat16 one where the model or its inputs are half precision:
    onnxruntime and PyTorch differ by a float16 ulp (5e-4 of the magnitude), so float32's 1e-4 failed every
    float16 export, folded or not."""
    from .folding.report import default_tolerance

    tensors = [*model.parameters(), *model.buffers(), *(x for x in inputs if isinstance(x, torch.Tensor))]
    dtypes = {t.dtype for t in tensors if t.is_floating_point()}
    for half in (torch.float16, torch.bfloat16):
        if half in dtypes:
            return default_tolerance(half)
    return DEFAULT_TOLERANCE


def _export_and_check(model, inputs, path, *, fold, exporter, opset, dynamic_batch, input_names, output_names,
                      samples, seed, data, rtol, atol, provider, check, failed_path, folded, runs) -> ExportReport:
    """export_onnx with the model and inputs where they are."""
    tolerance = Tolerance.resolve(rtol, atol, default_export_tolerance(model, inputs))
    if exporter not in EXPORTERS:
        raise InputError(f"{param('exporter')} {exporter!r}: choose one of {', '.join(EXPORTERS)}", param="exporter")
    check_opset(opset)
    check_samples(samples)
    check_provider(provider)
    path = Path(path)
    failed_path = Path(failed_path) if failed_path is not None else None
    big = needs_external_data(model)
    outputs = _writable(path, failed_path, big)
    model = model.eval()
    names_in = list(input_names or (["input"] if len(inputs) == 1 else [f"input_{i}" for i in range(len(inputs))]))
    if len(names_in) != len(inputs):
        raise InputError(f"{param('input_names')} given {len(names_in)} times for {len(inputs)} inputs",
                         param="input_names")
    report = ExportReport(path=str(path), exporter=exporter, opset=opset, folded=fold, input_names=names_in,
                          dynamic_batch=dynamic_batch, tolerance=tolerance)
    with outputs:
        started = time.perf_counter()
        to_export = model
        if fold:
            from .folding import fold as fold_model

            to_export, fold_report = folded or fold_model(model, inputs, samples=0, seed=seed, reference_runs=runs)
            report.fold_counts = fold_report.to_dict()["counts"]
        with torch.no_grad(), user_code("the model's forward on the example inputs"):
            reference_out = runs(model, inputs)  # the check reuses it
        names_out = list(output_names or _default_output_names(reference_out))
        staging = outputs.staging_dir(path)
        staged = staging / path.name  # external data refers to the file by name: it gets its final name here
        report.exporter = _export(to_export, inputs, staged, exporter, opset, dynamic_batch, names_in, names_out,
                                  big, report)
        report.export_seconds = time.perf_counter() - started
        graph = load_checked(staged)
        report.opset = opset_of(graph)
        report.op_counts = dict(sorted(op_counts(graph).items()))
        report.batch_norm_nodes = report.op_counts.get("BatchNormalization", 0)
        report.output_names = [o.name for o in graph.graph.output]
        report.file_bytes = sum(p.stat().st_size for p in _written_files(staged))

        started = time.perf_counter()
        test_point("check")
        result = compare_with_onnxruntime(model, staged, inputs, tolerance, samples=samples, seed=seed, data=data,
                                          provider=provider, reference_runs=runs)
        report.provider, report.comparisons, report.passed = result.provider, result.comparisons, result.passed
        report.notes.extend(result.notes)
        report.verify_seconds = time.perf_counter() - started
        if fold and report.batch_norm_nodes:
            report.notes.append(f"{report.batch_norm_nodes} BatchNormalization nodes remain after folding")
        target = path if report.passed else failed_path
        if target is not None:
            _commit(outputs, staged, path, target)
            report.path = str(target)
    if check and not report.passed:
        where = f"kept as {failed_path}" if failed_path is not None else f"nothing written at {path}"
        raise CheckFailed(f"onnxruntime output differs from PyTorch: max abs error {report.max_abs:.3g} "
                          f"({report.max_abs_over_scale:.3g} of the output's magnitude), "
                          f"{report.mismatched_fraction:.2%} of elements over {tolerance.describe()}"
                          + (f" ({report.first_note})" if report.first_note else "") + f"; {where}", report=report)
    return report


def _commit(outputs: Outputs, staged: Path, path: Path, target: Path) -> None:
    """Put the staged file (and its external data, renamed to follow a file kept under another name) at
    `target`."""
    files = {staged: target}
    data_file = staged.with_name(_data_name(path))
    if _exists(data_file):
        if target.name != path.name:
            _relocate_external_data(staged, data_file.name, _data_name(target))
            data_file = staged.with_name(_data_name(target))
        files[data_file] = target.with_name(_data_name(target))
    for written, final in files.items():
        outputs.adopt(final, written, staged.parent)
    outputs.commit()


def needs_external_data(model: nn.Module) -> bool:
    """Over ~2 GB of weights: the protobuf limit, so the exporter writes them to `<name>.data` beside the file."""
    return sum(p.numel() * p.element_size() for p in model.state_dict().values()) > TWO_GB * 0.9


def _data_name(path: Path) -> str:
    return path.name + ".data"


def plan_outputs(path: Path, big: bool, force: bool, keep_failed: bool, protect) -> Outputs:
    """The CLI's plan of every file an export may write, checked before any work: the file, its external data,
    and with `keep_failed` the FAILED names; none may replace a file in `protect` (the inputs), nor an existing
    file without `force`."""
    outputs = Outputs()
    for p in protect:
        outputs.add_input(p, "an input")
    _add_targets(outputs, path, failed_name(path) if keep_failed else None, big, force)
    outputs.check()
    return outputs


def _writable(path: Path, failed_path: Path | None, big: bool) -> Outputs:
    """The library's outputs: what it is given may be replaced; only a path that cannot be written (a missing
    folder, a directory, a PyTorch checkpoint) is refused, before any work."""
    outputs = Outputs()
    _add_targets(outputs, path, failed_path, big, force=True)
    outputs.check()
    return outputs


def _add_targets(outputs: Outputs, path: Path, failed_path: Path | None, big: bool, force: bool) -> None:
    targets = [(path, param("path"))] + ([(failed_path, "the file kept on failure")] if failed_path else [])
    for target, what in targets:
        outputs.add(target, OutputKind.ONNX, force=force, what=what)
        if big:
            outputs.add(target.with_name(_data_name(target)), OutputKind.ONNX, force=force, what="external data")


def _relocate_external_data(onnx_path: Path, old: str, new: str) -> None:
    """Point the tensors stored in external data at the file's new name (for a file kept under another name)."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    model = onnx.load(str(onnx_path), load_external_data=False)
    for tensor in _get_all_tensors(model):
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value = new
    onnx.save(model, str(onnx_path))
    os.replace(onnx_path.with_name(old), onnx_path.with_name(new))


def opset_range() -> tuple[int, int]:
    """The ONNX opsets this torch's exporters write (the dynamo exporter converts down to the older ones)."""
    from torch.onnx import _constants

    return _constants.ONNX_MIN_OPSET, _constants.ONNX_MAX_OPSET


def check_opset(opset: int | None) -> None:
    if opset is None:
        return
    low, high = opset_range()
    if isinstance(opset, bool) or not isinstance(opset, int) or not low <= opset <= high:
        raise InputError(f"{param('opset')} {opset!r}: this torch ({torch.__version__}) exports ONNX opsets "
                         f"{low} to {high}", param="opset")


def _default_output_names(out: Any) -> list[str]:
    n = len(list(iter_tensors(out)))
    return ["output"] if n == 1 else [f"output_{i}" for i in range(n)]


def _export(model, inputs, target: Path, exporter, opset, dynamic_batch, names_in, names_out, big, report) -> str:
    """Export to `target` (in a private temp directory: external data files refer to it by name), trying each
    exporter of `exporter` in turn; return the one that worked."""
    has_dynamo = "dynamo" in pyinspect.signature(torch.onnx.export).parameters
    order = {"auto": ["dynamo", "legacy"] if has_dynamo else ["legacy"], "dynamo": ["dynamo"], "legacy": ["legacy"]}
    if exporter == "dynamo" and not has_dynamo:
        raise UnsupportedError(f"{param('exporter')} dynamo needs torch >= 2.5 (this is {torch.__version__})",
                               param="exporter")
    failures = []
    for kind in order[exporter]:
        try:
            traced = _run_exporter(kind, model, inputs, target, opset, dynamic_batch, names_in, names_out, big,
                                   has_dynamo)
        except Exception as e:  # exporters raise many types; each is reported in one line below
            failures.append(f"{kind} exporter: {error_line(e)}")
            for p in target.parent.iterdir():
                p.unlink()
            continue
        if failures:
            report.notes.append(f"fell back to the {kind} exporter ({failures[0]})")
        if traced:
            report.notes.append(f"the {kind} exporter turned a tensor into a Python value while tracing ({traced[0]}): "
                                "where that decides a branch, the file holds the branch the example took, and the "
                                "check only sees inputs that take it too; check inputs that take the others "
                                f"({param('data')})")
        return kind
    hint = f"; try {param('exporter')} legacy" if exporter == "dynamo" else ""
    if exporter == "legacy" and has_dynamo:
        hint = f"; try {param('exporter')} dynamo"
    raise InputError("ONNX export failed: " + " | ".join(failures) + hint)


def _run_exporter(kind, model, inputs, target, opset, dynamic_batch, names_in, names_out, big, has_dynamo
                  ) -> list[str]:
    """Export with one exporter; return where the trace turned a tensor into a Python value (TracerWarning:
    data-dependent control flow frozen to the example's branch), as 'file:line'."""
    kwargs: dict[str, Any] = dict(input_names=names_in, output_names=names_out)
    if opset is not None:
        kwargs["opset_version"] = opset
    if kind == "dynamo":
        kwargs.update(dynamo=True, external_data=big, verbose=False)
        if dynamic_batch:
            batch = torch.export.Dim("batch", min=1, max=65536)
            kwargs["dynamic_shapes"] = tuple({0: batch} for _ in inputs)
    else:
        if has_dynamo:
            kwargs["dynamo"] = False
        if dynamic_batch:
            kwargs["dynamic_axes"] = {n: {0: "batch"} for n in [*names_in, *names_out]}
    with _quiet_exporter() as caught:
        torch.onnx.export(model, tuple(inputs), str(target), **kwargs)
    if opset is not None:  # the dynamo exporter writes its own opset when converting to the one asked for fails
        import onnx

        written = opset_of(onnx.load(str(target), load_external_data=False))
        if written != opset:
            raise UnsupportedError(f"it wrote opset {written}, not the requested {opset}")
    return [f"{Path(w.filename).name}:{w.lineno}" for w in caught
            if w.category.__name__ == "TracerWarning" and "Python boolean" in str(w.message)]


@contextlib.contextmanager
def _quiet_exporter():
    """The exporters print progress and warnings meant for their developers; keep the terminal ours."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx",
                                              "torch._export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()), _native_output_silenced():
            warnings.simplefilter("always")  # recorded, not shown: the caller reads the tracer's
            yield caught
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def _native_output_silenced():
    """The legacy exporter's C++ side prints whole IR graphs to fd 2 on errors: send fds 1 and 2 to /dev/null."""
    import sys

    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def _written_files(path: Path) -> list[Path]:
    """The ONNX file and its external data file if there is one (a name too long for one cannot have it)."""
    extra = path.with_name(path.name + ".data")
    return [p for p in (path, extra) if _exists(p)]


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:
        return False


