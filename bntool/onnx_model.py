"""ONNX files as input: detection by content, loading with the checks that make bad input exit 2, the
BatchNormalization nodes with their constant inputs, and the dataflow helpers graph surgery shares. Saving is
onnx_save.py.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from .errors import CorruptFileError, InputError, first_line
from .files import looks_like_checkpoint

TWO_GB = 2 * 1024**3
# Field tags a ModelProto can start a file with after its ir_version (protobuf writes fields in number order):
# producer_name 2, producer_version 3, domain 4, model_version 5, doc_string 6, graph 7, opset_import 8,
# metadata_props 14, training_info 20, functions 25, configuration 26.
_SECOND_TAGS = {0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42, 0x72, 0xA2, 0xCA, 0xD2}
_BN_INPUTS = ("scale", "bias", "mean", "var")


# ---------------------------------------------------------------- detection


def is_onnx_file(path: str | os.PathLike) -> bool:
    """Whether the file's content is an ONNX ModelProto (its name does not matter): it starts with the
    `ir_version` field and a ModelProto field after it. A truncated ONNX file is still detected (and then
    refused by `load_onnx` as corrupt); a PyTorch zip, pickle or safetensors file never is."""
    path = Path(path)
    try:
        if not path.is_file():  # never open a FIFO or device here: the checkpoint loader says what it is
            return False
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return False
    if len(head) < 3 or head[0] != 0x08 or looks_like_checkpoint(path):
        return False
    version, i = _varint(head, 1)
    return version is not None and 1 <= version <= 64 and i < len(head) and head[i] in _SECOND_TAGS


def _varint(data: bytes, i: int) -> tuple[int | None, int]:
    value, shift = 0, 0
    while i < len(data):
        byte = data[i]
        value |= (byte & 0x7F) << shift
        i += 1
        if not byte & 0x80:
            return value, i
        shift += 7
    return None, i


# ---------------------------------------------------------------- loading


@dataclass
class OnnxFile:
    """A loaded ONNX file: the ModelProto (external data read in) and where its tensors came from."""

    path: Path
    model: Any  # onnx.ModelProto
    external_data: list[Path] = field(default_factory=list)  # the files its tensors were read from
    file_bytes: int = 0  # the .onnx file and its external data together

    @property
    def opset(self) -> int | None:
        return default_opset(self.model)

    @property
    def ir_version(self) -> int:
        return int(self.model.ir_version)

    @property
    def has_external_data(self) -> bool:
        return bool(self.external_data)


def default_opset(model) -> int | None:
    """The version of the default ("" / "ai.onnx") operator set."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return None


def load_onnx(path: str | os.PathLike, *, check: bool = True) -> OnnxFile:
    """Read an ONNX file with its external data.

    Raises:
        InputError: no such file, a directory, empty, over 2 GB in one file, missing or misplaced external
            data, not valid ONNX (onnx.checker), or a BatchNormalization with `spatial=0`.
        CorruptFileError: truncated or corrupt (protobuf cannot parse it, external data cut short).
    """
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    path = Path(path)
    size = _checked_size(path)
    invalid = _checker_error(path) if check else None  # first, so that two copies are never held at once
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends: the bytes are not a whole ModelProto
        raise CorruptFileError(f"{path}: truncated or corrupt ONNX file ({type(e).__name__}: {first_line(e)})",
                               what=str(path)) from e
    if not model.HasField("graph") or model.ir_version <= 0:
        raise CorruptFileError(f"{path}: not an ONNX model (no graph or IR version)", what=str(path))
    external = _external_data_files(model, path)
    if external:
        try:
            load_external_data_for_model(model, str(path.parent))
        except Exception as e:
            raise CorruptFileError(f"{path}: cannot read its external data ({type(e).__name__}: {first_line(e)})",
                                   what=str(path)) from e
    _refuse_spatial_zero(model, path)
    _refuse_duplicate_names(model, path)
    if invalid is not None:
        raise InputError(f"{path}: invalid ONNX model ({type(invalid).__name__}: {first_line(invalid)})") from invalid
    total = size + sum(p.stat().st_size for p in external)
    return OnnxFile(path=path, model=model, external_data=external, file_bytes=total)


def _refuse_duplicate_names(model, path: Path) -> None:
    """Two nodes of the main graph with one name: onnxruntime refuses such a graph, and bntool names nodes to
    fold and recalibrate them (one BN's statistics would be written into the other's)."""
    seen: set[str] = set()
    for node in model.graph.node:
        if node.name and node.name in seen:
            raise InputError(f"{path}: two nodes are named {node.name!r} (onnxruntime refuses such a graph too); "
                             "give each node its own name")
        seen.add(node.name)
    bns = {node.name for node in model.graph.node if node.op_type == "BatchNormalization"}
    for node in model.graph.node:  # an unnamed BN goes by its first output's name (BNNode.name, the reports)
        key = node.output[0] if not node.name and node.output else ""
        if key and key in seen and (node.op_type == "BatchNormalization" or key in bns):
            raise InputError(f"{path}: an unnamed {node.op_type} writes {key!r}, the name of another node; bntool "
                             "names an unnamed node by its output: give it a name of its own")


def _checked_size(path: Path) -> int:
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not an ONNX file")
    size = path.stat().st_size
    if size == 0:
        raise InputError(f"{path}: empty file, not an ONNX model")
    if size >= TWO_GB:
        raise InputError(f"{path}: {size / 2**30:.1f} GiB in one file; protobuf cannot read a model over 2 GB, so "
                         "save its tensors as external data (onnx.save_model(..., save_as_external_data=True))")
    return size


def _external_data_files(model, path: Path) -> list[Path]:
    """The external data files the model's tensors refer to, each checked: inside the model's folder, present,
    long enough for every tensor's offset and length."""
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    needed: dict[Path, int] = {}
    for tensor in _get_all_tensors(model):
        if not uses_external_data(tensor):
            continue
        info = ExternalDataInfo(tensor)
        location = info.location or ""
        if not location or os.path.isabs(location) or ".." in Path(location).parts:
            raise InputError(f"{path}: tensor {tensor.name!r} points outside the model's folder for its external "
                             f"data ({location!r}); refusing to read it")
        file = path.parent / location
        if not file.is_file():
            raise InputError(f"{path}: missing external data file {file} (holds tensor {tensor.name!r}); "
                             "copy it next to the model")
        end = (info.offset or 0) + (info.length if info.length is not None else 0)
        needed[file] = max(needed.get(file, 0), end)
    for file, end in needed.items():
        if file.stat().st_size < end:
            raise CorruptFileError(f"{path}: external data file {file} is truncated ({file.stat().st_size} bytes, "
                                   f"tensors need {end})", what=str(path))
    return sorted(needed)


def _checker_error(path: Path) -> Exception | None:
    """onnx.checker's complaint about the file, if any (by path: it reads external data itself, and no copy
    of the model is made in Python)."""
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except Exception as e:  # ValidationError, or a parse error that load_onnx reports as corruption
        return e
    return None


def _refuse_spatial_zero(model, path: Path) -> None:
    """BatchNormalization before opset 9 could have `spatial=0`: statistics per element, not per channel."""
    for bn in batch_norm_nodes(model):
        if bn.spatial == 0:
            raise InputError(f"{path}: BatchNormalization {bn.name!r} has spatial=0 (opset {default_opset(model)}): "
                             "statistics per element, not per channel, which bntool does not handle; re-export "
                             "with opset 9 or later")


# ---------------------------------------------------------------- BatchNormalization nodes


@dataclass
class BNNode:
    """One BatchNormalization node and the constant values of its inputs (None: computed at run time)."""

    name: str  # the node's name, or its output's when it has none
    node: Any  # onnx.NodeProto
    where: str  # "" for the main graph; "function NAME" or "subgraph of NODE" otherwise
    x: str
    y: str
    inputs: dict[str, str]  # scale, bias, mean, var → tensor names
    values: dict[str, np.ndarray | None]  # the same keys → constant values, None when not a constant
    epsilon: float = 1e-5
    momentum: float = 0.9
    training_mode: int = 0
    spatial: int = 1
    extra_outputs: list[str] = field(default_factory=list)  # running mean/var outputs (training mode)

    @property
    def channels(self) -> int:
        shapes = [v.size for v in self.values.values() if v is not None]
        return int(shapes[0]) if shapes else 0

    @property
    def constant(self) -> bool:
        """Every statistic and affine input is an initializer or a Constant node."""
        return all(v is not None for v in self.values.values())

    def as_module_values(self) -> SimpleNamespace:
        """Its values in the shape bntool.inspection's health rules read from a BN module (float64 arrays);
        `running_mean`/`running_var` are None when computed at run time."""

        def tensor(key):
            v = self.values[key]
            return None if v is None else np.asarray(v, dtype=np.float64).reshape(-1)

        return SimpleNamespace(running_mean=tensor("mean"), running_var=tensor("var"), weight=tensor("scale"),
                               bias=tensor("bias"), eps=self.epsilon, momentum=self.momentum, training=False,
                               num_batches_tracked=None)


def batch_norm_nodes(model) -> list[BNNode]:
    """Every BatchNormalization node: the main graph's first (in order), then those in subgraphs (If/Loop/Scan
    bodies) and local functions, with the constant values of their inputs."""
    main = Constants(model.graph)
    found = []
    for graph, where in _graphs(model):
        constants = main if not where else Constants(graph, outer=main)
        for node in graph.node:
            if node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx"):
                found.append(_bn_node(node, where, constants))
    return found


def _graphs(model) -> Iterator[tuple[Any, str]]:
    """The main graph (where ""), its nested subgraphs, and each local function's body."""
    yield model.graph, ""
    yield from _subgraphs(model.graph)
    for fn in model.functions:
        yield fn, f"function {fn.domain}:{fn.name}" if fn.domain else f"function {fn.name}"
        yield from _subgraphs(fn)


def _subgraphs(graph) -> Iterator[tuple[Any, str]]:
    for node in graph.node:
        for attr in node.attribute:
            for g in [attr.g] if attr.HasField("g") else list(attr.graphs):
                yield g, f"subgraph {attr.name!r} of {node.op_type} {node.name or node.output[0]!r}"
                yield from _subgraphs(g)


def _bn_node(node, where: str, constants: Constants) -> BNNode:
    import onnx

    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    names = dict(zip(_BN_INPUTS, list(node.input)[1:5]))
    values = {key: constants.get(n) for key, n in names.items()}
    return BNNode(name=node.name or node.output[0], node=node, where=where, x=node.input[0], y=node.output[0],
                  inputs=names, values=values, epsilon=float(attrs.get("epsilon", 1e-5)),
                  momentum=float(attrs.get("momentum", 0.9)), training_mode=int(attrs.get("training_mode", 0)),
                  spatial=int(attrs.get("spatial", 1)), extra_outputs=[o for o in list(node.output)[1:] if o])


class Constants:
    """The tensors of a graph whose values are fixed, read on demand (a model's weights are not copied up
    front): initializers that are not also graph inputs (those can be overridden at run time), outputs of
    Constant nodes with a `value` tensor, and Identity nodes of those. `outer`: the enclosing graph's, for
    subgraphs."""

    def __init__(self, graph, outer: Constants | None = None):
        overridable = {i.name for i in getattr(graph, "input", [])}
        self.tensors = {t.name: t for t in getattr(graph, "initializer", []) if t.name not in overridable}
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                for attr in node.attribute:
                    if attr.name == "value":
                        self.tensors[node.output[0]] = attr.t
        for node in graph.node:  # the legacy exporter shares equal initializers through Identity nodes
            if node.op_type == "Identity" and node.domain in ("", "ai.onnx") and node.input[0] in self.tensors:
                self.tensors[node.output[0]] = self.tensors[node.input[0]]
        self.outer = outer

    def __contains__(self, name: str) -> bool:
        return name in self.tensors or (self.outer is not None and name in self.outer)

    def proto(self, name: str):
        """The TensorProto holding `name`'s value (an initializer, or a Constant node's attribute)."""
        if name in self.tensors:
            return self.tensors[name]
        return self.outer.proto(name) if self.outer is not None else None

    def get(self, name: str) -> np.ndarray | None:
        from onnx import numpy_helper

        proto = self.proto(name) if name else None
        return None if proto is None else numpy_helper.to_array(proto)


# ---------------------------------------------------------------- dataflow helpers for graph surgery


def readers_of(graph) -> dict[str, list[Any]]:
    """Tensor name → the nodes that read it (a subgraph that reads an outer tensor counts as its node reading
    it). A graph output is not a node: see `graph_output_names`."""
    readers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in set(node.input) | _outer_names(node):
            if name:
                readers.setdefault(name, []).append(node)
    return readers


def _outer_names(node) -> set[str]:
    """Names a node's subgraphs read from the enclosing scope."""
    names: set[str] = set()
    for attr in node.attribute:
        for g in [attr.g] if attr.HasField("g") else list(attr.graphs):
            local = {i.name for i in g.input} | {t.name for t in g.initializer}
            local |= {o for n in g.node for o in n.output}
            for n in g.node:
                names |= {i for i in n.input if i and i not in local}
                names |= _outer_names(n) - local
    return names


def graph_output_names(graph) -> set[str]:
    return {o.name for o in graph.output}


def unique_name(taken: set[str], base: str) -> str:
    """`base`, or `base_1`, `base_2`, … whichever is not taken; the name is added to `taken`."""
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


def all_names(model) -> set[str]:
    """Every tensor and node name used in the main graph and its subgraphs (for new, unique names)."""
    names: set[str] = set()
    for graph, _ in _graphs(model):
        names |= {i.name for i in getattr(graph, "input", [])} | {o.name for o in getattr(graph, "output", [])}
        names |= {t.name for t in getattr(graph, "initializer", [])}
        for node in graph.node:
            names |= set(node.input) | set(node.output) | ({node.name} if node.name else set())
    names.discard("")
    return names


def without_large_tensors(model, input_shapes: dict[str, tuple[int, ...]] | None):
    """The model with each initializer over 1 KiB replaced by a graph input of its shape (what shape inference
    needs of it, without copying or serializing the weights), and symbolic input dimensions made concrete: those
    `input_shapes` gives, else 1; None: left symbolic."""
    import onnx

    small = onnx.ModelProto()
    small.ir_version, small.producer_name = model.ir_version, model.producer_name
    small.opset_import.extend(model.opset_import)
    small.functions.extend(model.functions)
    g = small.graph
    g.node.extend(model.graph.node)
    g.input.extend(model.graph.input)
    g.output.extend(model.graph.output)
    g.value_info.extend(model.graph.value_info)
    if input_shapes is not None:
        for info in g.input:
            given = input_shapes.get(info.name)
            for i, d in enumerate(info.type.tensor_type.shape.dim):
                if not d.HasField("dim_value"):
                    d.dim_value = given[i] if given is not None and i < len(given) else 1
    inputs = {i.name for i in model.graph.input}
    for init in model.graph.initializer:
        if len(init.raw_data) <= 1024 and not init.external_data:
            g.initializer.append(init)
        elif init.name not in inputs:
            g.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return small
