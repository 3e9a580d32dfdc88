"""ONNX files written back: outputs planned (with their external data), only the changed tensors replaced, the
model streamed to disk piece by piece.

What a saved file keeps: everything in the ModelProto is written back as it is (opset imports, IR version,
metadata, producer, graph input/output names and their symbolic dimensions, value_info, functions); only the
tensors a caller changed differ. A file that came with external data is written with external data again (one
`<name>.data` file beside it), as is any model whose tensors would not fit protobuf's 2 GB.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .files import OutputKind, Outputs
from .onnx_model import TWO_GB, OnnxFile


def data_file_names(path: Path, count: int = 2) -> list[str]:
    """Names for the external data file written beside `path`: `model.onnx.data`, `model.onnx.1.data`, …"""
    return [path.name + ".data"] + [f"{path.name}.{i}.data" for i in range(1, count)]


SCANNED_SIBLING_BYTES = 256 << 20  # a larger .onnx beside the output is taken to read any data file there


def _planned_data_file(outputs: Outputs, path: Path) -> Path:
    """The external data file plan_onnx_output planned beside `path`."""
    planned = {p.path for p in outputs.planned}
    for name in data_file_names(path, count=8):
        if path.with_name(name) in planned:
            return path.with_name(name)
    raise RuntimeError(f"no external data file was planned beside {path} (plan_onnx_output)")


def plan_onnx_output(outputs: Outputs, path: str | os.PathLike, source: OnnxFile | None, *, force: bool = False,
                     in_place: bool = False, what: str = "-o") -> Path:
    """Plan an ONNX output (and its external data file when the input had one) in `outputs`; the input's own
    files are protected, except the input file itself with `in_place`. Call `outputs.check()` afterwards.

    The file an output replaces (in place, or with `force`) may read a data file beside it: the new data takes a
    name that neither it nor another .onnx file in the folder reads (`.data`, `.1.data`, …) and is committed
    before the model file, whose rename is the switch, so the model on disk always reads data written for it.
    After the commit, the data files the replaced model read go, unless another .onnx file there reads them
    (`cp a.onnx b.onnx` shares a.onnx's data)."""
    path = Path(path)
    if source is not None:
        for file in (source.path, *source.external_data):
            outputs.add_input(file, "the input ONNX file" if file == source.path else "the input's external data")
    if source is not None and (source.has_external_data or source.file_bytes >= int(TWO_GB * 0.9)):
        replaced = os.path.lexists(path) and (force or in_place)
        old = _data_files_read(path) if replaced else set()
        others = _data_files_read_by_others(path, old)
        # The input's own data stays, unless the input is the file replaced in place.
        kept = set() if source is None or _same_file(path, source.path) else \
            {p.name for p in source.external_data if _same_file(p.parent, path.parent)}
        beside = [path.with_name(name) for name in data_file_names(path, count=8)]
        taken = old | others | kept
        # A name no file has yet is read by nobody (a large sibling "reads" every name only where one exists).
        data = next((p for p in beside if not os.path.lexists(p)),
                    next((p for p in beside if p.name not in taken), beside[0]))
        outputs.add(data, OutputKind.ONNX, force=force, what="external data")  # first: committed first
        outputs.obsolete += [path.with_name(n) for n in sorted(old - others - kept) if path.with_name(n) != data]
    outputs.add(path, OutputKind.ONNX, force=force, in_place=in_place, what=what, replaceable=True)
    return path


def data_files_read(path: str | os.PathLike | None) -> list[Path]:
    """The external data files the ONNX file at `path` reads, wherever in its folder they lie (`./a.data`,
    `weights/w.bin`), whatever its size; none for any other file: inputs too, which no output may replace."""
    if path is None or not os.path.isfile(path):
        return []
    return sorted({Path(path).parent / location for location in _data_locations(Path(path), any_size=True)})


def _data_files_read(path: Path) -> set[str]:
    """The data files beside it (bare names) that the ONNX file at `path` reads: those a replacing output may
    remove; one under another folder is never removed."""
    return {name for name in _data_locations(path) if Path(name).name == name}


def _data_locations(path: Path, any_size: bool = False) -> set[str]:
    """The external data locations the ONNX file at `path` names; none when it is not one (or, unless
    `any_size`, is over SCANNED_SIBLING_BYTES: such a file holds its weights)."""
    from .onnx_model import is_onnx_file

    try:
        if not is_onnx_file(path) or (not any_size and path.stat().st_size > SCANNED_SIBLING_BYTES):
            return set()
        import onnx

        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # an unreadable file reads nothing we could keep for it
        return set()
    from onnx.external_data_helper import _get_all_tensors  # as onnx_model reads them

    return {entry.value for tensor in _get_all_tensors(model) for entry in tensor.external_data
            if entry.key == "location"}


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def _data_files_read_by_others(path: Path, read_by_path: set[str]) -> set[str]:
    """Of the data file names beside `path` (those it may write, and `read_by_path`, those it reads now), the ones
    another .onnx file in its folder reads (a small file's bytes name them; a large one is taken to read all)."""
    from .onnx_model import is_onnx_file

    names = set(data_file_names(path, count=8)) | read_by_path
    read: set[str] = set()
    for other in path.parent.iterdir():  # by content: a backup (a.onnx.bak, A.ONNX) reads the data too
        if other.name == path.name or not other.is_file() or other.name in names or not is_onnx_file(other):
            continue
        if other.stat().st_size > SCANNED_SIBLING_BYTES:
            return names
        content = other.read_bytes()
        read |= {n for n in names if n.encode() in content}
    return read


def needs_external_data(model, source: OnnxFile | None) -> bool:
    """Written with external data: the input had it, or the tensors would not fit protobuf's 2 GB."""
    if source is not None:  # the fold changes a model's size by a few bias vectors at most
        return source.has_external_data or source.file_bytes >= int(TWO_GB * 0.9)
    return model.ByteSize() >= int(TWO_GB * 0.9)


@dataclass
class TensorChanges:
    """Initializers changed by a graph rewrite, kept beside the model instead of in it: protobuf's arena would
    keep a replaced tensor's old bytes until the whole model is freed, doubling a large model's memory.
    `save_onnx` writes the model with them; `apply_to` puts them into the model itself."""

    replaced: dict[str, Any] = field(default_factory=dict)  # name → new TensorProto (same name)
    added: list[Any] = field(default_factory=list)  # new TensorProtos, after the model's own
    removed: set[str] = field(default_factory=set)

    def apply_to(self, model) -> None:
        g = model.graph
        kept = [t for t in g.initializer if t.name not in self.removed]
        for t in kept:
            if t.name in self.replaced:
                t.CopyFrom(self.replaced[t.name])
        del g.initializer[:]
        g.initializer.extend([*kept, *self.added])
        self.replaced, self.added, self.removed = {}, [], set()

    def initializers(self, model) -> Iterator[Any]:
        """The model's initializers as they are after the changes, in order."""
        for t in model.graph.initializer:
            if t.name not in self.removed:
                yield self.replaced.get(t.name, t)
        yield from self.added


def give_memory_back() -> None:
    """Return freed heap memory to the system (glibc keeps pages freed between live allocations; on a large
    model that is another copy of it at the peak). Nothing to do elsewhere than glibc."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None (macOS, musl: nothing to give back this way)."""
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def save_onnx(model, path: str | os.PathLike, outputs: Outputs, source: OnnxFile | None = None,
              changes: TensorChanges | None = None) -> list[Path]:
    """Write `model` (with `changes` to its initializers) to the planned output `path` through `outputs` (temp
    files, committed by the caller's `outputs.commit()`), with external data in `<name>.data` when
    `needs_external_data`. Neither the model nor `changes` is modified, and no second copy of the model is
    made: it is written piece by piece (protobuf merges a repeated field written in several pieces). Returns
    the files it will put in place."""
    path = Path(path)
    staging = outputs.staging_dir(path)
    staged = staging / path.name  # external data is referred to by name: the file gets its final name here
    changes = changes or TensorChanges()
    files = [path]
    data_name = None
    if needs_external_data(model, source):
        data_name = _planned_data_file(outputs, path).name
        files.append(path.with_name(data_name))
    with open(staged, "wb") as f, (open(staging / data_name, "wb") if data_name else _no_file()) as data:
        f.write(_without_initializers(model).SerializeToString())
        for tensor in changes.initializers(model):
            if data is not None and _tensor_bytes(tensor) >= 1024:
                assert data_name is not None  # the data file is open only where it has a name
                tensor = _external(tensor, data, data_name)
            # ModelProto.graph (field 7) holding GraphProto.initializer (field 5): merged into the graph above.
            f.write(_length_delimited(7, _length_delimited(5, tensor.SerializeToString())))
    outputs.adopt(path, staged, staging)
    if data_name:
        outputs.adopt(files[1], staging / data_name, staging)
    return files


@contextlib.contextmanager
def _no_file():
    yield None


def _without_initializers(model):
    """A copy of the model without its graph's initializers (small: nodes, names, types, metadata)."""
    import onnx

    header = onnx.ModelProto()
    for fd, value in model.ListFields():
        if fd.name != "graph":
            _copy_field(header, fd, value)
    for fd, value in model.graph.ListFields():
        if fd.name != "initializer":
            _copy_field(header.graph, fd, value)
    header.graph.SetInParent()
    return header


def _copy_field(target, fd, value) -> None:
    if fd.is_repeated:
        getattr(target, fd.name).extend(value)
    elif fd.message_type is not None:
        getattr(target, fd.name).CopyFrom(value)
    else:
        setattr(target, fd.name, value)


def _tensor_bytes(tensor) -> int:
    return len(tensor.raw_data) if tensor.HasField("raw_data") else tensor.ByteSize()


def _external(tensor, data, location: str):
    """A copy of `tensor` whose values are appended to the open external data file `data`."""
    from onnx import TensorProto, numpy_helper

    raw = tensor.raw_data if tensor.HasField("raw_data") else numpy_helper.to_array(tensor).tobytes()
    offset = data.tell()
    data.write(raw)
    out = TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims, doc_string=tensor.doc_string)
    out.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(raw)))):
        entry = out.external_data.add()
        entry.key, entry.value = key, value
    return out


def _length_delimited(field_number: int, payload: bytes) -> bytes:
    return _varint_bytes(field_number << 3 | 2) + _varint_bytes(len(payload)) + payload


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)
