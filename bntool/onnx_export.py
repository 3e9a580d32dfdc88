"""Export to ONNX (folding BatchNorm first) and prove numerical equivalence with onnxruntime."""

from __future__ import annotations

import contextlib
import inspect as pyinspect
import io
import logging
import os
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .choices import Exporter, Provider
from .compare import (
    ComparedReport,
    Comparison,
    Tolerance,
    check_samples,
    compare_arrays,
    random_like,
    random_stream,
    to_numpy,
)
from .devices import check_not_meta, modes_kept, moved_to, to_device
from .errors import CheckFailed, InputError, UnsupportedError, param, user_code
from .files import OutputKind, Outputs, failed_name, test_point
from .utils import iter_tensors

EXPORTERS = Exporter.values()
TWO_GB = 2 * 1024**3
# Without atol, the absolute tolerance is this share of each output's largest magnitude: onnxruntime and
# PyTorch sum in different orders, and through a deep float32 network that differs by ~1e-6 of the scale.
DEFAULT_TOLERANCE = Tolerance(rtol=1e-4, atol=1e-4, atol_relative=True)


@dataclass
class OnnxCheck(ComparedReport):
    """onnxruntime against PyTorch on the same inputs: one Comparison per input and output."""

    provider: str
    comparisons: list[Comparison] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(self.comparisons)


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
    force: bool = False,
    check: bool = True,
    keep_failed: bool = False,
    protect: Sequence[str | os.PathLike] = (),
    device: str | torch.device | None = None,
    folded: tuple[nn.Module, Any] | None = None,
) -> ExportReport:
    """Fold (optionally), export to a temp file, check the graph and compare onnxruntime with PyTorch; only a
    file that passed is put at `path`.

    Args:
        model: the model (put in eval mode); with `fold`, a folded copy is exported and `model` is unchanged.
        example_inputs: one tensor or a sequence of the model's inputs; they fix the exported shapes.
        path: the .onnx file (a `.onnx.data` file beside it for models over 2 GB).
        fold: fold BatchNorm first (bntool.fold).
        exporter: an Exporter: "auto" (dynamo, falling back to legacy), "dynamo" or "legacy".
        opset: the ONNX opset (default: the exporter's).
        dynamic_batch: make axis 0 dynamic; the check then runs at several batch sizes.
        input_names, output_names: graph input/output names.
        samples, seed: random inputs checked per batch size besides the example.
        data: real input batches checked too.
        rtol, atol: elementwise |Δ| ≤ atol + rtol·|reference| (bntool.compare.Tolerance); default rtol 1e-4 and
            atol 1e-4 of each output's largest magnitude; an atol given here is absolute.
        provider: a Provider: "cpu" or "cuda" (onnxruntime's execution provider).
        force: replace an existing file at `path` (never a PyTorch checkpoint).
        check: raise CheckFailed when the check fails (else return the failed report).
        keep_failed: keep a file that failed the check as `model.FAILED.onnx` (planned and checked up front).
        protect: input files the outputs must not replace (the checkpoint the model came from, data files).
        device: where PyTorch runs (fold, export trace, reference outputs): "cpu", "cuda", "cuda:1", "mps"; the
            inputs and `data` are moved there and the model is put back afterwards. Default: where the model is.
        folded: with `fold`, the (folded model, FoldReport) that `bntool.fold(model, example_inputs)` returned, to
            export instead of folding again (verify folds once for its fold and ONNX checks).

    Returns:
        An ExportReport (graph ops, files, comparisons).

    Raises:
        InputError: a bad argument, an output that must not be written, or an export that failed.
        UnsupportedError: the dynamo exporter on a torch without it.
        CheckFailed: with `check`, onnxruntime's outputs differ beyond tolerance (`.report` is the report).

    Side effects: writes `path` (and its external data) only when the check passed, all files at once at the
    end; with `keep_failed`, a failed file goes to `failed_name(path)` instead. `model` runs in eval mode; its
    training flags (and with `device` its placement) are put back afterwards.
    """
    check_not_meta(model)
    with moved_to(model, device) as dev, modes_kept(model):
        inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
        return _export_and_check(
            model, to_device(inputs, dev) if device is not None else inputs, path, fold=fold, exporter=exporter,
            opset=opset, dynamic_batch=dynamic_batch, input_names=input_names, output_names=output_names,
            samples=samples, seed=seed, data=data, rtol=rtol, atol=atol, provider=provider, force=force,
            check=check, keep_failed=keep_failed, protect=protect, folded=folded)


def _export_and_check(model, inputs, path, *, fold, exporter, opset, dynamic_batch, input_names, output_names,
                      samples, seed, data, rtol, atol, provider, force, check, keep_failed, protect,
                      folded=None) -> ExportReport:
    """export_onnx with the model and inputs where they are."""
    tolerance = Tolerance.resolve(rtol, atol, DEFAULT_TOLERANCE)
    if exporter not in EXPORTERS:
        raise InputError(f"{param('exporter')} {exporter!r}: choose one of {', '.join(EXPORTERS)}", param="exporter")
    check_opset(opset)
    check_samples(samples)
    check_provider(provider)
    path = Path(path)
    big = _is_big(model)
    outputs = plan_outputs(path, big, force, keep_failed, protect)
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

            to_export, fold_report = folded or fold_model(model, inputs, samples=0, seed=seed)
            report.fold_counts = fold_report.to_dict()["counts"]
        with torch.no_grad(), user_code("the model's forward on the example inputs"):
            reference_out = model(*inputs)
        names_out = list(output_names or _default_output_names(reference_out))
        staging = outputs.staging_dir(path)
        staged = staging / path.name  # external data refers to the file by name: it gets its final name here
        report.exporter = _export(to_export, inputs, staged, exporter, opset, dynamic_batch, names_in, names_out,
                                  big, report)
        report.export_seconds = time.perf_counter() - started
        graph = load_checked(staged)
        report.opset = _opset(graph)
        report.op_counts = dict(sorted(op_counts(graph).items()))
        report.batch_norm_nodes = report.op_counts.get("BatchNormalization", 0)
        report.output_names = [o.name for o in graph.graph.output]
        report.file_bytes = sum(p.stat().st_size for p in _written_files(staged))

        started = time.perf_counter()
        test_point("check")
        result = compare_with_onnxruntime(model, staged, inputs, tolerance, samples=samples, seed=seed, data=data,
                                          provider=provider)
        report.provider, report.comparisons, report.passed = result.provider, result.comparisons, result.passed
        report.notes.extend(result.notes)
        report.verify_seconds = time.perf_counter() - started
        if fold and report.batch_norm_nodes:
            report.notes.append(f"{report.batch_norm_nodes} BatchNormalization nodes remain after folding")
        if report.passed or keep_failed:
            target = path if report.passed else failed_name(path)
            files = {staged: target}
            data_file = staged.with_name(_data_name(path))
            if _exists(data_file):
                if target != path:
                    _relocate_external_data(staged, data_file.name, _data_name(target))
                    data_file = staged.with_name(_data_name(target))
                files[data_file] = target.with_name(_data_name(target))
            for written, final in files.items():
                outputs.adopt(final, written, staging)
            outputs.commit()
            report.path = str(target)
    if check and not report.passed:
        where = (f"kept as {failed_name(path)} ({param('keep_failed')})" if keep_failed else
                 f"nothing written at {path}")
        raise CheckFailed(f"onnxruntime output differs from PyTorch: max abs error {report.max_abs:.3g} "
                          f"({report.max_abs_over_scale:.3g} of the output's magnitude), "
                          f"{report.mismatched_fraction:.2%} of elements over {tolerance.describe()}"
                          + (f" ({report.first_note})" if report.first_note else "") + f"; {where}", report=report)
    return report


def _is_big(model: nn.Module) -> bool:
    """Over ~2 GB of weights: the protobuf limit, so the exporter writes them to `<name>.data` beside the file."""
    return sum(p.numel() * p.element_size() for p in model.state_dict().values()) > TWO_GB * 0.9


def _data_name(path: Path) -> str:
    return path.name + ".data"


def plan_outputs(path: Path, big: bool, force: bool, keep_failed: bool, protect) -> Outputs:
    """Every file the export may write, checked before any work: the file, its external data, and with
    `keep_failed` the FAILED names."""
    outputs = Outputs()
    for p in protect:
        outputs.add_input(p, "an input")
    targets = [(path, param("path"))] + ([(failed_name(path), "the file kept on failure")] if keep_failed else [])
    for target, what in targets:
        outputs.add(target, OutputKind.ONNX, force=force, what=what)
        if big:
            outputs.add(target.with_name(_data_name(target)), OutputKind.ONNX, force=force, what="external data")
    outputs.check()
    return outputs


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
            _run_exporter(kind, model, inputs, target, opset, dynamic_batch, names_in, names_out, big, has_dynamo)
        except Exception as e:  # exporters raise many types; each is reported in one line below
            failures.append(f"{kind} exporter: {_exporter_message(e)}")
            for p in target.parent.iterdir():
                p.unlink()
            continue
        if failures:
            report.notes.append(f"fell back to the {kind} exporter ({failures[0]})")
        return kind
    hint = f"; try {param('exporter')} legacy" if exporter == "dynamo" else ""
    if exporter == "legacy" and has_dynamo:
        hint = f"; try {param('exporter')} dynamo"
    raise InputError("ONNX export failed: " + " | ".join(failures) + hint)


def _run_exporter(kind, model, inputs, target, opset, dynamic_batch, names_in, names_out, big, has_dynamo) -> None:
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
    with _quiet_exporter():
        torch.onnx.export(model, tuple(inputs), str(target), **kwargs)
    if opset is not None:  # the dynamo exporter writes its own opset when converting to the one asked for fails
        import onnx

        written = _opset(onnx.load(str(target), load_external_data=False))
        if written != opset:
            raise UnsupportedError(f"it wrote opset {written}, not the requested {opset}")


@contextlib.contextmanager
def _quiet_exporter():
    """The exporters print progress and warnings meant for their developers; keep the terminal ours."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx",
                                              "torch._export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()), _native_output_silenced():
            warnings.simplefilter("ignore")
            yield
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


def _exporter_message(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("For more information", "Traceback", "File "))]
    text = (useful or [type(e).__name__])[0]
    return f"{type(e).__name__}: {text[:300]}"


def _written_files(path: Path) -> list[Path]:
    """The ONNX file and its external data file if there is one (a name too long for one cannot have it)."""
    extra = path.with_name(path.name + ".data")
    return [p for p in (path, extra) if _exists(p)]


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:
        return False


def load_checked(path: str | os.PathLike):
    """onnx.load + onnx.checker, with one-line errors for files that are not valid ONNX."""
    import onnx

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir() or path.stat().st_size == 0:
        raise InputError(f"{path}: not an ONNX file (empty or a directory)")
    try:
        model = onnx.load(str(path), load_external_data=False)
        onnx.checker.check_model(str(path))
    except Exception as e:
        raise InputError(f"{path}: corrupt or invalid ONNX model ({_exporter_message(e)})") from e
    return model


def _opset(model) -> int | None:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return None


def op_counts(model) -> Counter:
    """Node types in the graph, its subgraphs and its local functions."""
    counts: Counter = Counter()

    def walk(graph):
        for node in graph.node:
            counts[node.op_type] += 1
            for attr in node.attribute:
                if attr.g is not None and attr.g.node:
                    walk(attr.g)
                for g in attr.graphs:
                    walk(g)

    walk(model.graph)
    for fn in model.functions:
        for node in fn.node:
            counts[node.op_type] += 1
    return counts


def check_provider(provider: str) -> None:
    """Before any work: `provider` is one onnxruntime has here."""
    import onnxruntime as ort

    if provider not in Provider.values():
        raise InputError(f"{param('provider')} {provider!r}: choose one of {', '.join(Provider.values())}",
                         param="provider")
    available = ort.get_available_providers()
    if provider == Provider.CUDA and "CUDAExecutionProvider" not in available:
        raise InputError(f"{param('provider')} cuda: onnxruntime has no CUDA provider here "
                         f"(available: {available})", param="provider")


# onnxruntime's default level fuses Conv+BN and more when it loads a file; with optimisations off it runs the graph
# as written, as TensorRT, OpenVINO or a mobile converter receive it. The check runs both.
OPTIMIZATION_LEVELS = ("ORT_ENABLE_ALL", "ORT_DISABLE_ALL")
UNOPTIMIZED_LABEL = "{} ({})"  # an input's label at a level other than the default: words only, never parsed


def ort_session(path: str | os.PathLike, provider: str = "cpu", optimization: str = "ORT_ENABLE_ALL"):
    """An onnxruntime session on `path` with `provider` at graph optimisation level `optimization`."""
    import onnxruntime as ort

    check_provider(provider)
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if provider == Provider.CUDA else \
        ["CPUExecutionProvider"]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, optimization)
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as e:
        raise InputError(f"{path}: onnxruntime cannot load it ({_exporter_message(e)})") from e


def check_signature(session, inputs: Sequence[torch.Tensor], path) -> None:
    """The ONNX inputs must match the PyTorch inputs in number, rank and fixed sizes."""
    ort_inputs = session.get_inputs()
    if len(ort_inputs) != len(inputs):
        raise InputError(f"{path}: has {len(ort_inputs)} inputs {[i.name for i in ort_inputs]}, "
                         f"but {len(inputs)} were given ({param('example_inputs')})", param="example_inputs")
    for spec, x in zip(ort_inputs, inputs):
        shape = spec.shape
        if len(shape) != x.dim() or any(isinstance(d, int) and d != s for d, s in zip(shape, x.shape)):
            raise InputError(f"{path}: input {spec.name!r} has shape {shape}, but {param('example_inputs')} gives "
                             f"{list(x.shape)}", param="example_inputs")


def _batch_sizes(session, inputs) -> list[int]:
    dims = [i.shape[0] if i.shape else None for i in session.get_inputs()]
    dynamic = bool(dims) and all(not isinstance(d, int) for d in dims)
    b = inputs[0].shape[0] if inputs and inputs[0].dim() else 1
    return sorted({1, b, b + 3}) if dynamic else [b]


def compare_with_onnxruntime(
    model: nn.Module,
    path: str | os.PathLike,
    inputs: Sequence[torch.Tensor],
    tolerance: Tolerance = DEFAULT_TOLERANCE,
    *,
    samples: int = 4,
    seed: int = 0,
    data: Iterable[torch.Tensor] | None = None,
    provider: str = "cpu",
) -> OnnxCheck:
    """Run the same inputs through PyTorch and onnxruntime and compare every output.

    Args:
        model: the PyTorch reference (run as it is: put it in eval mode first).
        path: the ONNX file.
        inputs: example inputs; `samples` random inputs of the same shapes are added, at several batch sizes
            when the file's batch axis is dynamic, and every batch of `data`.
        tolerance: the elementwise rule.

    Returns:
        An OnnxCheck with one Comparison per input and output (a runner failure is a failed Comparison).

    Raises:
        InputError: onnxruntime cannot load the file, or its inputs do not match `inputs`.
    """
    def reference(label: str, xs: tuple) -> list:
        with torch.no_grad(), user_code(f"the model's forward on the {label} input"):
            output = model(*xs)
        return [to_numpy(t) for t in iter_tensors(output)]

    return compare_runs(reference, "PyTorch", path, inputs, tolerance, samples=samples, seed=seed, data=data,
                        provider=provider)


def compare_runs(
    reference,
    reference_name: str,
    path: str | os.PathLike,
    inputs: Sequence[torch.Tensor],
    tolerance: Tolerance = DEFAULT_TOLERANCE,
    *,
    samples: int = 4,
    seed: int = 0,
    data: Iterable[torch.Tensor] | None = None,
    provider: str = "cpu",
    candidate_check=None,
    inputs_like=None,
) -> OnnxCheck:
    """onnxruntime on `path`, at each optimisation level, against `reference(label, inputs)` (a list of arrays:
    PyTorch's outputs, or another ONNX file's in onnxruntime) on the example, random and data inputs. The
    reference runs once per input, before the levels; then `reference.close()`, if it has one (an onnxruntime
    reference gives its memory back before the candidate's sessions are made). `candidate_check(comparison,
    inputs, reference_array, candidate_array, output_name)` may re-judge a failed comparison (the float64 arbiter
    of an ONNX fold). `inputs_like`: something with `get_inputs()` describing `path`'s inputs as a session does
    (a fold's original file, whose inputs the folded file keeps): no session on `path` is made just to read them.
    Comparisons are listed input by input, the default level first."""
    # One session at a time, level by level: a large model is held once by onnxruntime, not once per level.
    session = ort_session(path, provider, OPTIMIZATION_LEVELS[0]) if inputs_like is None else None
    described = session if session is not None else inputs_like
    result = OnnxCheck(provider=session.get_providers()[0] if session is not None else provider)
    check_signature(described, inputs, path)
    cases: list[tuple[str, tuple]] = [("example", tuple(inputs))]
    g = random_stream(seed)
    for b in _batch_sizes(described, inputs):
        for i in range(samples):
            shaped = tuple(torch.empty((b, *x.shape[1:]), dtype=x.dtype, device=x.device) for x in inputs)
            cases.append((f"random b={b} #{i + 1}", random_like(shaped, g)))
    for i, batch in enumerate(data or []):
        cases.append((f"data batch {i + 1}", (batch.to(inputs[0].device),)))
    if hasattr(reference, "close"):  # another onnxruntime model: hold one model at a time, not two
        session = None
    expected = {label: reference(label, xs) for label, xs in cases}
    if hasattr(reference, "close"):
        reference.close()
    by_case: dict[str, list[Comparison]] = {label: [] for label, _ in cases}
    for level in OPTIMIZATION_LEVELS:
        if session is None:
            session = ort_session(path, provider, level)
            check_signature(session, inputs, path)
            result.provider = session.get_providers()[0]
        names = [i.name for i in session.get_inputs()]
        for label, xs in cases:
            by_case[label].extend(_compare_case(session, names, label, xs, level, expected[label], reference_name,
                                                path, tolerance, candidate_check, result))
        session = None
    result.comparisons = [c for label, _ in cases for c in by_case[label]]
    for level in OPTIMIZATION_LEVELS:
        mine = [c for c in result.comparisons if c.optimization == level]
        failed = sum(not c.passed for c in mine)
        result.notes.append(f"onnxruntime {level}: {len(mine) - failed} of {len(mine)} comparisons passed")
    return result


def _compare_case(session, names, label, xs, level, expected, reference_name, path, tolerance, candidate_check,
                  result: OnnxCheck) -> list[Comparison]:
    """One input at one optimisation level: each output against the reference's."""
    # Labels of the default level stay as they are; the unoptimised run says so.
    level_label = label if level == OPTIMIZATION_LEVELS[0] else UNOPTIMIZED_LABEL.format(label, level)
    try:
        got = session.run(None, {n: x.detach().cpu().numpy() for n, x in zip(names, xs)})
    except Exception as e:
        message = f"onnxruntime failed: {_exporter_message(e)}"
        result.notes.append(f"{level_label}: {message}")
        failure = Comparison.failure(level_label, "*", message)
        failure.optimization = level
        return [failure]
    out_names = [o.name for o in session.get_outputs()]
    if len(got) != len(expected):
        raise CheckFailed(f"{path}: returns {len(got)} outputs, {reference_name} returns {len(expected)}")
    comparisons = []
    for name, ref, out in zip(out_names, expected, got):
        c = compare_arrays(level_label, name, ref, out, tolerance)
        c.optimization = level
        if not c.passed and candidate_check is not None:
            candidate_check(c, xs, ref, out, name)
        comparisons.append(c)
    return comparisons
