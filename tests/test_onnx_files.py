"""ONNX files as input: detection by content, bad input, inspect, fold (vs a float64 reference), verify, CLI."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from helpers import assert_clean_error, files_in
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from bntool import zoo
from bntool.errors import CorruptFileError, InputError
from bntool.onnx_fold import fold_onnx, inspect_onnx
from bntool.onnx_model import batch_norm_nodes, is_onnx_file, load_onnx
from bntool.onnx_recalibration import recalibrate_onnx_file

# ---------------------------------------------------------------- files


def export_with_bn(model: torch.nn.Module, x: torch.Tensor, path, dynamic: bool = False):
    """The legacy exporter with BatchNormalization nodes kept (as the deployment files of issue #18)."""
    axes = {"x": {0: "batch"}, "y": {0: "batch"}} if dynamic else None
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (x,), str(path), dynamo=False, do_constant_folding=False,
                          training=torch.onnx.TrainingMode.PRESERVE, input_names=["x"], output_names=["y"],
                          dynamic_axes=axes)
    nodes = batch_norm_nodes(onnx.load(str(path)))
    assert nodes, "the export kept no BatchNormalization node: the test would test nothing"
    return path


class ConcatAddTrap(torch.nn.Module):
    """What the ONNX tools leave (issue #18): a BN after a channel concat of two convs (densenet-like), and a
    BN after the sum of two convs; then a BN whose concat part is also read elsewhere (an exact affine)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Conv2d(3, 6, 1, bias=False)
        self.bn_cat = torch.nn.BatchNorm2d(10)
        self.c, self.d = torch.nn.Conv2d(10, 5, 3, padding=1), torch.nn.Conv2d(10, 5, 1)
        self.bn_sum = torch.nn.BatchNorm2d(5)
        self.e = torch.nn.Conv2d(5, 5, 1)
        self.bn_shared = torch.nn.BatchNorm2d(10)

    def forward(self, x):
        y = self.bn_cat(torch.cat([self.a(x), self.b(x)], 1)).relu()
        z = self.bn_sum(self.c(y) + self.d(y))
        e = self.e(z)
        return self.bn_shared(torch.cat([e, z], 1)) + e.mean()


@pytest.fixture(scope="module")
def zoo_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    files = {}
    for name in ("resnet", "mobilenet", "mlp", "preact", "shared", "reused"):
        model = zoo.build(name)
        files[name] = (model, export_with_bn(model, zoo.example_input(name), folder / f"{name}.onnx"))
    trap = zoo.randomize_bn(ConcatAddTrap()).eval()
    files["trap"] = (trap, export_with_bn(trap, torch.randn(2, 3, 8, 8), folder / "trap.onnx"))
    return files


def example(name: str) -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) if name == "trap" else \
        zoo.example_input(name)


def run_ort(path, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def op_types(path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


# ---------------------------------------------------------------- detection and bad input


def test_detection_is_by_content(tmp_path, zoo_files, resnet_sd):
    onnx_named_pt = tmp_path / "model.pt"
    onnx_named_pt.write_bytes(zoo_files["resnet"][1].read_bytes())
    torch_named_onnx = tmp_path / "model.onnx"
    torch_named_onnx.write_bytes(resnet_sd.read_bytes())
    assert is_onnx_file(onnx_named_pt) and not is_onnx_file(torch_named_onnx)
    assert not is_onnx_file(resnet_sd) and is_onnx_file(zoo_files["resnet"][1])
    truncated = tmp_path / "cut.onnx"
    truncated.write_bytes(zoo_files["resnet"][1].read_bytes()[:3000])
    assert is_onnx_file(truncated)  # still ONNX by content: refused as corrupt, not as "not a checkpoint"
    with pytest.raises(CorruptFileError, match="truncated or corrupt ONNX"):
        load_onnx(truncated)


def test_missing_external_data_and_over_two_gb(tmp_path, zoo_files):
    model = onnx.load(str(zoo_files["resnet"][1]))
    path = tmp_path / "ext.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    assert load_onnx(path).has_external_data
    (tmp_path / "ext.onnx.data").unlink()
    with pytest.raises(InputError, match="missing external data file"):
        load_onnx(path)
    big = tmp_path / "big.onnx"
    with open(big, "wb") as f:  # a sparse file: the size check must refuse it before protobuf reads it
        f.write(zoo_files["resnet"][1].read_bytes()[:64])
        f.truncate(2 * 1024**3 + 10)
    assert is_onnx_file(big)
    with pytest.raises(InputError, match="over 2 GB"):
        load_onnx(big)


def bn_graph(opset: int, spatial: int | None = None, training_mode: int | None = None):
    """x → Conv → BatchNormalization → y, built by hand (for attributes no exporter writes today)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")]
    for name, value in (("g", rng.random(4) + 0.5), ("b", rng.standard_normal(4)), ("m", rng.standard_normal(4)),
                        ("v", rng.random(4) + 0.5)):
        inits.append(numpy_helper.from_array(value.astype(np.float32), name))
    attrs = {} if spatial is None else {"spatial": spatial}
    if training_mode is not None:
        attrs["training_mode"] = training_mode
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"],
                              ["y", "rm", "rv"] if training_mode else ["y"], name="bn", **attrs)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def with_offset_input(model: onnx.ModelProto, out_batch: int | None) -> onnx.ModelProto:
    """`bn_graph`'s model with a second input t [4] added per channel to its output (a Reshape to [1, 4, 1, 1]
    and an Add): an input that is not batch-major. The output "out" is [out_batch, 4, 6, 6]."""
    g = model.graph
    g.node.append(helper.make_node("Reshape", ["t", "to_nchw"], ["tr"], name="reshape"))
    g.node.append(helper.make_node("Add", ["y", "tr"], ["out"], name="add"))
    g.initializer.append(numpy_helper.from_array(np.array([1, 4, 1, 1], dtype=np.int64), "to_nchw"))
    g.input.append(helper.make_tensor_value_info("t", TensorProto.FLOAT, [4]))
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("out", TensorProto.FLOAT, [out_batch, 4, 6, 6]))
    return model


@pytest.mark.parametrize("batch", ["1", "N"])
def test_a_second_input_keeps_its_own_shape_in_the_check(tmp_path, batch):
    """x [batch, 3, 8, 8] and a per-channel offset t [4] (not batch-major): the check's random inputs keep t's
    shape. They took the first input's batch as every input's axis 0 (t [1]): exit 2 blaming the file."""
    model = with_offset_input(bn_graph(17), None)
    g = model.graph
    g.input[0].type.tensor_type.shape.dim[0].dim_param = batch if batch == "N" else ""
    if batch == "1":
        g.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    path = tmp_path / "two_inputs.onnx"
    onnx.save(model, str(path))
    shapes = [(2, 3, 8, 8), (4,)] if batch == "N" else None
    report = fold_onnx(path, tmp_path / "folded.onnx", input_shapes=shapes, samples=2)
    assert report.passed and report.batch_norm_ops_after == 0


def test_an_input_with_a_symbol_of_its_own_keeps_its_shape_at_other_batch_sizes(tmp_path):
    """x [N, 3, 8, 8] and t [K]: only inputs whose axis 0 is the batch's symbol change at the check's other batch
    sizes. t became [1] and [5] (every symbolic axis 0 was taken for the batch): exit 2 blaming the file."""
    model = with_offset_input(bn_graph(17), None)
    g = model.graph
    g.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    g.input[1].type.tensor_type.shape.dim[0].dim_param = "K"
    onnx.save(model, str(tmp_path / "m.onnx"))
    report = fold_onnx(tmp_path / "m.onnx", None, input_shapes=[(2, 3, 8, 8), (4,)], samples=1)
    assert report.passed and {c.input.split(" #")[0] for c in report.comparisons} >= {"random b=1", "random b=5"}


def test_a_rank0_first_input_and_a_negative_seed(tmp_path):
    """A static graph whose first input is a scalar: every input keeps its shape (the scalar became [1]: exit 2);
    and --seed -1 (numpy's generator takes no negative seed: exit 3)."""
    model = bn_graph(17)
    g = model.graph
    g.node.append(helper.make_node("Mul", ["y", "s"], ["out"], name="scale"))
    g.input.insert(0, helper.make_tensor_value_info("s", TensorProto.FLOAT, []))
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, 6, 6]))
    onnx.save(model, str(tmp_path / "m.onnx"))
    assert fold_onnx(tmp_path / "m.onnx", None, samples=2, seed=-1).passed


def test_random_check_inputs_keep_masks_and_ids_valid():
    """numpy (an ONNX file's check): booleans all True (a random mask may mask a whole row: NaN in the original
    too, a verdict that depended on the seed), integers 0 or 1. Tensors (the PyTorch path): other dtypes are the
    example's own values, its samples repeated at another batch size (zeros made an all-False mask: NaN)."""
    from bntool.compare import numpy_generator, random_array
    from bntool.onnx_check import _random_inputs

    rng = numpy_generator(-1)
    assert random_array(rng, (3, 2), np.bool_).all() and set(np.unique(random_array(rng, (50,), np.int64))) == {0, 1}
    mask, ids = torch.tensor([[True, False], [False, True]]), torch.tensor([7, 9])
    drawn = _random_inputs((torch.zeros(2, 3), mask, ids), 0)([(3, 3), (3, 2), (3,)])
    assert drawn[0].shape == (3, 3) and drawn[0].abs().sum() > 0
    assert drawn[1].tolist() == [[True, False], [False, True], [True, False]] and drawn[2].tolist() == [7, 9, 7]


def test_a_float16_file_is_checked_with_the_float16_rule(tmp_path):
    """A float16 file folds and passes the check at the default tolerance, float16's (5e-2 of each output's
    magnitude) as for a float16 PyTorch model; the float32 rule (1e-4) failed such files (exit 1): the folded
    weights are rounded to float16 once more than the original's."""
    rng = np.random.default_rng(0)
    c = 8
    values = {"w": rng.normal(0, 1, (c, 3, 3, 3)), "g": rng.uniform(0.5, 2, c), "b": rng.normal(0, 1, c),
              "m": rng.normal(0, 1, c), "v": rng.uniform(0.1, 3, c)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"], name="bn")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, c, 16, 16])],
                              [numpy_helper.from_array(v.astype(np.float16), k) for k, v in values.items()])
    path = tmp_path / "half.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    report = fold_onnx(path, tmp_path / "folded.onnx", samples=4)
    assert report.passed and report.tolerance.atol == 5e-2 and report.max_abs_over_scale < 5e-3
    # verify folded --reference original: the same float16 rule (it failed with float32's: exit 1)
    from bntool.verification import verify_onnx

    pair = verify_onnx(tmp_path / "folded.onnx", reference=path, samples=4)
    assert pair.passed, [(c.name, c.summary) for c in pair.checks]


def test_verify_reference_with_other_inputs_names_both_files(tmp_path, cli, zoo_files):
    """verify A --reference B where B takes other inputs: exit 2 naming both files, not a flag never given."""
    a, b = zoo_files["mobilenet"][1], zoo_files["mlp"][1]
    result = cli("verify", a, "--reference", b)
    assert_clean_error(result, contains="the two files do not take the same inputs")
    assert str(b) in result.err and str(a) in result.err and "--input-shape" not in result.err
    # the same inputs declared in another order: said as such (both files are fed by position)
    two = with_offset_input(bn_graph(17), 1)
    g = two.graph
    onnx.save(two, str(tmp_path / "xt.onnx"))
    swapped = g.input[0]
    g.input.remove(swapped)
    g.input.append(swapped)
    onnx.save(two, str(tmp_path / "tx.onnx"))
    assert_clean_error(cli("verify", tmp_path / "xt.onnx", "--reference", tmp_path / "tx.onnx"),
                       contains="in another order")


def test_two_nodes_with_one_name_are_refused(tmp_path, cli):
    """Two BNs named 'bn' (onnx.checker accepts it, onnxruntime does not): exit 2 naming it; recalibrate wrote
    the second BN's statistics into the first (exit 0), fold crashed (exit 3)."""
    model = bn_graph(17)
    g = model.graph
    g.node.extend([helper.make_node("Conv", ["x", "w"], ["c2"], name="conv2"),
                   helper.make_node("BatchNormalization", ["c2", "g", "b", "m", "v"], ["y2"], name="bn")])
    g.output.append(helper.make_tensor_value_info("y2", TensorProto.FLOAT, [1, 4, 6, 6]))
    path = tmp_path / "dup.onnx"
    onnx.save(model, str(path))
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32))
    for args in (("fold", path, "-o", tmp_path / "f.onnx"), ("verify", path), ("inspect", path),
                 ("recalibrate", path, "--data", tmp_path / "x.npy", "-o", tmp_path / "r.onnx")):
        assert_clean_error(cli(*args), contains="two nodes are named 'bn'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dup.onnx", "x.npy"]
    # an unnamed BN writing 'bn2', the name of another BN: both went by 'bn2'
    g.node[-1].name = "bn2"
    g.node[1].name = ""
    g.node[1].output[0] = "bn2"
    g.output[0].name = "bn2"
    onnx.save(model, str(path))
    assert_clean_error(cli("recalibrate", path, "--data", tmp_path / "x.npy", "-o", tmp_path / "r.onnx"),
                       contains="an unnamed BatchNormalization writes 'bn2'")
    assert not (tmp_path / "r.onnx").exists()
    # an unnamed Relu writing 'conv', the name of the Conv the BN folds into: no BN goes by it, the fold runs
    relu = bn_graph(17)
    relu.graph.node.append(helper.make_node("Relu", ["y"], ["conv"]))
    relu.graph.output[0].name = "conv"
    onnx.save(relu, str(tmp_path / "relu.onnx"))
    assert cli("fold", tmp_path / "relu.onnx", "-o", tmp_path / "relu_f.onnx").code == 0
    assert "BatchNormalization" not in op_types(tmp_path / "relu_f.onnx")


@pytest.mark.skipif(ort.get_device() == "GPU", reason="needs a machine without onnxruntime's CUDA provider")
def test_torch_only_flags_are_refused_for_an_onnx_file_not_ignored(tmp_path, cli, zoo_files):
    """--device cuda with no CUDA provider here, and --dtype (an ONNX file declares its input types): exit 2;
    both were accepted and ignored (a CPU check reported as the GPU one asked for)."""
    path = zoo_files["resnet"][1]
    out = tmp_path / "out.onnx"
    for command in (("fold", path, "-o", out), ("verify", path), ("inspect", path)):
        assert_clean_error(cli(*command, "--device", "cuda"), contains="--device cuda: onnxruntime has no CUDA")
        assert_clean_error(cli(*command, "--dtype", "float16"), contains="--dtype")
    assert not out.exists()
    assert cli("fold", path, "-o", out, "--device", "cpu").code == 0


def test_recalibrate_refuses_a_graph_onnxruntime_refuses(tmp_path, cli):
    """A BN in inference mode with its optional outputs named ("y", "", ""): onnx.checker accepts it, onnxruntime
    does not. fold said so (exit 2); recalibrate ran its segments, exit 0, and wrote a file that does not load."""
    model = bn_graph(15)
    del model.graph.node[1].output[:]
    model.graph.node[1].output.extend(["y", "", ""])
    path = tmp_path / "outs.onnx"
    onnx.save(model, str(path))
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32))
    result = cli("recalibrate", path, "--data", tmp_path / "x.npy", "-o", tmp_path / "r.onnx")
    assert_clean_error(result, contains="onnxruntime cannot load it")
    assert not (tmp_path / "r.onnx").exists()


def test_spatial_zero_is_refused(tmp_path):
    path = tmp_path / "old.onnx"
    model = bn_graph(7, spatial=0)
    model.ir_version = 3  # IR 3: initializers are graph inputs too
    model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, t.dims)
                             for t in model.graph.initializer)
    onnx.save(model, str(path))
    with pytest.raises(InputError, match="spatial=0"):
        load_onnx(path)


def test_training_mode_bn_is_refused_before_any_work(tmp_path, cli):
    """A training-mode BN normalizes with the batch's statistics, which onnxruntime computes differently at each
    optimisation level: no check could pass, and it is the file, not the fold (exit 2, as for a checkpoint)."""
    path = tmp_path / "train.onnx"
    model = bn_graph(15, training_mode=1)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 2
    onnx.save(model, str(path))
    with pytest.raises(InputError, match="'bn' \\(training_mode=1"):
        fold_onnx(path, tmp_path / "out.onnx")
    result = cli("fold", path, "-o", tmp_path / "out.onnx")
    assert_clean_error(result, contains="training_mode=1")
    assert "Export the model in eval mode" in result.err and "recalibrate" not in result.err  # it would refuse
    assert not (tmp_path / "out.onnx").exists()


def test_broken_statistics_are_refused_before_any_work(tmp_path, cli):
    """var + eps <= 0 (or NaN) is a broken file, named with its problem: exit 2, not a failed check (exit 1)."""
    model = bn_graph(15)
    model.graph.node[1].attribute.extend([helper.make_attribute("epsilon", 0.0)])
    for t in model.graph.initializer:
        if t.name == "v":
            t.CopyFrom(numpy_helper.from_array(np.array([0.0, 1.0, 1.0, 1.0], np.float32), "v"))
    path = tmp_path / "zero.onnx"
    onnx.save(model, str(path))
    assert_clean_error(cli("fold", path, "-o", tmp_path / "out.onnx"), contains="'bn' (running_var + eps")
    assert not (tmp_path / "out.onnx").exists()
    # verify: the checks run and fail (exit 1), as for a checkpoint with the same defect; the JUnit file says so
    result = cli("verify", path, "--junit-xml", tmp_path / "v.xml")
    assert result.code == 1 and "bn-health" in result.err, (result.code, result.err)
    xml = (tmp_path / "v.xml").read_text()
    assert 'name="bn-health"' in xml and 'errors="0"' in xml and "not run: 1 BN layer cannot be folded" in xml


# ---------------------------------------------------------------- fold against a float64 reference


@pytest.mark.parametrize("name", ["resnet", "mobilenet", "mlp", "preact", "shared", "reused", "trap"])
def test_fold_removes_every_bn_and_matches_float64(tmp_path, zoo_files, name):
    model, path = zoo_files[name]
    out = tmp_path / "folded.onnx"
    report = fold_onnx(path, out, samples=1)
    assert report.passed and report.batch_norm_ops_after == 0
    assert "BatchNormalization" not in op_types(out)
    x = example(name)
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(x.double()).numpy()
    scale = np.abs(exact).max()
    original_error = np.abs(run_ort(path, x.numpy()) - exact).max()
    folded_error = np.abs(run_ort(out, x.numpy()) - exact).max()
    assert folded_error <= 2 * original_error + 1e-6 * scale, (folded_error, original_error)


def test_no_more_affines_than_the_pytorch_path(tmp_path, zoo_files):
    from bntool.folding import plan_fold
    from bntool.onnx_fold import plan_onnx_fold

    for name, (model, path) in zoo_files.items():
        if name == "resnet":
            continue  # all folded into convs both ways; the others are the cases that differ
        torch_actions = [d.action for d in plan_fold(model, example(name)).decisions]
        actions = [d.action for d in plan_onnx_fold(onnx.load(str(path))).decisions]
        assert actions.count("affine") <= torch_actions.count("affine"), (name, actions, torch_actions)
        assert "refused" not in actions, name


def test_concat_and_sum_fold_into_every_conv_feeding_them(zoo_files):
    from bntool.onnx_fold import plan_onnx_fold

    decisions = {d.name.split("/")[1]: d for d in plan_onnx_fold(onnx.load(str(zoo_files["trap"][1]))).decisions}
    assert decisions["bn_cat"].action == "folded" and decisions["bn_cat"].target.count("Conv") == 2
    assert decisions["bn_sum"].action == "folded" and decisions["bn_sum"].target.count("Conv") == 2
    assert decisions["bn_shared"].action == "affine" and "also read" in decisions["bn_shared"].reason


def test_fold_keeps_the_file_properties(tmp_path, zoo_files):
    model = onnx.load(str(zoo_files["resnet"][1]))
    export_with_bn(zoo.build("resnet"), zoo.example_input("resnet"), tmp_path / "dyn.onnx", dynamic=True)
    model = onnx.load(str(tmp_path / "dyn.onnx"))
    helper.set_model_props(model, {"author": "team", "license": "mine"})
    path = tmp_path / "in.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="in.onnx.data", size_threshold=0)
    report = fold_onnx(path, tmp_path / "out.onnx", input_shapes=[(2, 3, 32, 32)], samples=1)
    assert report.passed
    assert files_in(tmp_path) >= {"out.onnx", "out.onnx.data"}
    out = onnx.load(str(tmp_path / "out.onnx"))
    assert (out.ir_version, list(out.opset_import)) == (model.ir_version, list(model.opset_import))
    assert {p.key: p.value for p in out.metadata_props} == {"author": "team", "license": "mine"}
    assert [i.name for i in out.graph.input] == ["x"] and [o.name for o in out.graph.output] == ["y"]
    assert out.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [c.input for c in report.comparisons if "b=5" in c.input], "the dynamic batch was not checked"


def test_a_shared_weight_is_copied_not_changed(tmp_path, zoo_files):
    path = zoo_files["reused"][1]
    before = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    reads = {}
    for node in onnx.load(str(path)).graph.node:
        for name in node.input:
            reads[name] = reads.get(name, 0) + 1
    shared = [n for n, count in reads.items() if count > 1 and n in before]
    assert shared, "the model has no shared initializer"
    fold_onnx(path, tmp_path / "out.onnx", samples=0)
    after = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "out.onnx")).graph.initializer}
    for name in shared:
        if name in after:
            np.testing.assert_array_equal(after[name], before[name])


def conv_bn_values(groups: int, transposed: bool, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    cin, cout = 2 * groups, 3 * groups
    w_shape = (cin, cout // groups, 3, 3) if transposed else (cout, cin // groups, 3, 3)
    return {"w": rng.standard_normal(w_shape), "cb": rng.standard_normal(cout), "g": rng.standard_normal(cout),
            "b": rng.standard_normal(cout), "m": rng.standard_normal(cout) * 2, "v": rng.random(cout) * 3 + 0.01}


def conv_bn_graph(values, groups: int, transposed: bool, bias: bool, shared_output: bool):
    """x → Conv/ConvTranspose (groups, bias) → BN → y, optionally with the conv output also read by an Add."""
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in values.items() if bias or k != "cb"]
    op = "ConvTranspose" if transposed else "Conv"
    nodes = [helper.make_node(op, ["x", "w", "cb"] if bias else ["x", "w"], ["c"], group=groups, pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["n"], epsilon=1e-3)]
    nodes.append(helper.make_node("Add", ["n", "c"], ["y"]) if shared_output else
                 helper.make_node("Identity", ["n"], ["y"]))
    cin, cout = 2 * groups, 3 * groups
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, cin, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, cout, "h", "w"])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])


def conv_bn_float64(values, x, groups, transposed, bias, shared_output) -> np.ndarray:
    """The same graph in float64 with torch's functional ops: the independent reference."""
    t = {k: torch.from_numpy(v) for k, v in values.items()}
    conv = torch.nn.functional.conv_transpose2d if transposed else torch.nn.functional.conv2d
    c = conv(torch.from_numpy(x), t["w"], t["cb"] if bias else None, padding=1, groups=groups)
    n = torch.nn.functional.batch_norm(c, t["m"], t["v"], t["g"], t["b"], training=False, eps=1e-3)
    return (n + c if shared_output else n).numpy()


@settings(max_examples=12, deadline=None)
@given(groups=st.sampled_from([1, 2]), transposed=st.booleans(), bias=st.booleans(), shared=st.booleans(),
       seed=st.integers(0, 1000))
def test_conv_bn_graphs_fold_exactly(tmp_path_factory, groups, transposed, bias, shared, seed):
    folder = tmp_path_factory.mktemp("h")
    path = folder / "m.onnx"
    values = conv_bn_values(groups, transposed, seed)
    onnx.save(conv_bn_graph(values, groups, transposed, bias, shared), str(path))
    report = fold_onnx(path, folder / "f.onnx", samples=0)
    assert report.counts == {"folded": int(not shared), "folded-forward": 0, "affine": int(shared), "refused": 0}
    x = np.random.default_rng(seed).standard_normal((2, 2 * groups, 5, 5))
    exact = conv_bn_float64(values, x, groups, transposed, bias, shared)
    got = run_ort(folder / "f.onnx", x.astype(np.float32))
    original = run_ort(path, x.astype(np.float32))
    scale = np.abs(exact).max()
    assert np.abs(got - exact).max() <= 2 * np.abs(original - exact).max() + 1e-6 * scale


# ---------------------------------------------------------------- inspect, verify and the CLI


def test_inspect_json_has_the_pytorch_shape(cli, zoo_files):
    result = cli("inspect", zoo_files["preact"][1], "--json")
    assert result.code == 0, result.err
    layers = json.loads(result.out)["layers"]
    assert len(layers) == 4 and {"name", "channels", "flags", "fold_action", "fold_reason"} <= set(layers[0])
    assert [layer["fold_action"] for layer in layers].count("folded-forward") == 2
    assert all(layer["fold_reason"] or layer["fold_action"] != "affine" for layer in layers)


def test_inspect_flags_unhealthy_statistics(tmp_path):
    model = bn_graph(15)
    for t in model.graph.initializer:
        if t.name == "v":
            t.CopyFrom(numpy_helper.from_array(np.array([1.0, 0.0, np.nan, 1.0], np.float32), "v"))
    path = tmp_path / "bad.onnx"
    onnx.save(model, str(path))
    flags = inspect_onnx(path).layers[0].flags
    assert any("NaN/Inf in running_var" in f for f in flags) and any("var <= eps" in f for f in flags)


def test_cli_fold_writes_a_checked_file(cli, tmp_path, zoo_files):
    out = tmp_path / "folded.onnx"
    result = cli("fold", zoo_files["mobilenet"][1], "-o", out, "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["passed"] and report["batch_norm_ops_after"] == 0 and report["counts"]["folded"] == 10
    assert "BatchNormalization" not in op_types(out)


def test_cli_affine_as_conv(cli, tmp_path, zoo_files):
    out = tmp_path / "folded.onnx"
    path = zoo_files["shared"][1]
    assert cli("fold", path, "-o", out, "--affine-as", "conv").code == 0
    assert op_types(out).count("Conv") == op_types(path).count("Conv") + 1 and "Mul" not in op_types(out)


def test_cli_default_affine_is_a_depthwise_conv_and_mul_on_request(cli, tmp_path, zoo_files, resnet_sd):
    """The default (auto) writes the shared BN of a float32 4-D tensor as one depthwise Conv, as onnxruntime runs
    a BN node; `--affine-as mul` keeps Mul+Add; a PyTorch input still refuses the flag (it keeps a module)."""
    path = zoo_files["shared"][1]
    assert cli("fold", path, "-o", tmp_path / "auto.onnx").code == 0
    auto = op_types(tmp_path / "auto.onnx")
    assert auto.count("Conv") == op_types(path).count("Conv") + 1 and "Mul" not in auto
    assert cli("fold", path, "-o", tmp_path / "mul.onnx", "--affine-as", "mul").code == 0
    mul = op_types(tmp_path / "mul.onnx")
    assert mul.count("Mul") == 1 and mul.count("Conv") == op_types(path).count("Conv")
    result = cli("fold", resnet_sd, "--arch", "bntool.zoo:resnet", "--input-shape", "1,3,16,16",
                 "-o", tmp_path / "f.pt", "--affine-as", "mul")
    assert result.code == 2 and "applies to ONNX files only" in result.err


def test_affine_as_conv_on_float64_is_refused_naming_the_flag(cli, tmp_path):
    """onnxruntime has no float64 Conv: the explicit choice was exit 3 at the check (hostile QA); it is exit 2
    before any work, and auto writes Mul+Add there."""
    inits = [numpy_helper.from_array(np.full(4, v, np.float64), n) for n, v in
             (("scale", 1.5), ("bias", 0.1), ("mean", 0.2), ("var", 2.0))]
    graph = helper.make_graph([helper.make_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], ["y"],
                                                name="bn")],
                              "g", [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [2, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [2, 4, 8, 8])], inits)
    path = tmp_path / "f64.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    result = cli("fold", path, "-o", tmp_path / "conv.onnx", "--affine-as", "conv")
    assert_clean_error(result, contains="--affine-as conv: 'x' is float64")
    assert not (tmp_path / "conv.onnx").exists()
    assert cli("fold", path, "-o", tmp_path / "auto.onnx").code == 0
    assert "Mul" in op_types(tmp_path / "auto.onnx")


def test_cli_bad_onnx_inputs_exit_2_and_write_nothing(cli, tmp_path, zoo_files, resnet_sd):
    export_with_bn(zoo.build("resnet"), zoo.example_input("resnet"), tmp_path / "dyn.onnx", dynamic=True)
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(zoo_files["resnet"][1].read_bytes()[:5000])
    torch_named_onnx = tmp_path / "weights.onnx"
    torch_named_onnx.write_bytes(resnet_sd.read_bytes())
    before = files_in(tmp_path)
    out = tmp_path / "out.onnx"
    assert_clean_error(cli("fold", cut, "-o", out), contains="truncated or corrupt ONNX")
    assert_clean_error(cli("fold", tmp_path / "dyn.onnx", "-o", out), contains="'x'")
    assert_clean_error(cli("fold", tmp_path / "dyn.onnx", "-o", out, "--input-shape", "1,3,32"),
                       contains="--input-shape")
    assert_clean_error(cli("fold", zoo_files["resnet"][1], "-o", tmp_path / "out.pt"), contains="name it .onnx")
    assert_clean_error(cli("fold", zoo_files["resnet"][1], "-o", out, "--arch", "bntool.zoo:resnet"),
                       contains="drop --arch")
    assert_clean_error(cli("fold", torch_named_onnx, "--arch", "bntool.zoo:resnet", "--input-shape", "1,3,32,32",
                           "-o", out), contains="export-onnx")
    assert_clean_error(cli("export-onnx", zoo_files["resnet"][1], "-o", out), contains="bntool fold")
    assert files_in(tmp_path) == before


def test_cli_verify_an_onnx_file_and_a_rewrite(cli, tmp_path, zoo_files):
    original = zoo_files["resnet"][1]
    folded = tmp_path / "folded.onnx"
    assert cli("fold", original, "-o", folded).code == 0
    junit = tmp_path / "verify.xml"
    result = cli("verify", original, "--json", "--junit-xml", junit)
    assert result.code == 0, result.err
    checks = {c["name"]: c["passed"] for c in json.loads(result.out)["checks"]}
    assert checks == {"bn-health": True, "fold-equivalence": True}
    assert "testcase" in junit.read_text()
    result = cli("verify", folded, "--reference", original, "--json")
    assert result.code == 0, result.err
    assert {c["name"] for c in json.loads(result.out)["checks"]} == {"bn-health", "fold-equivalence",
                                                                     "onnx-equivalence"}
    # A rewrite that changed the numbers fails: another model's weights, the same graph.
    other = tmp_path / "other.onnx"
    export_with_bn(zoo.build("resnet", seed=1), zoo.example_input("resnet"), other)
    result = cli("verify", other, "--reference", original)
    assert result.code == 1 and "onnx-equivalence" in result.err
    # A missing reference or a folder is named as such, not as "not an ONNX file" (hostile QA).
    assert_clean_error(cli("verify", folded, "--reference", tmp_path / "missing.onnx"), contains="no such file")
    assert_clean_error(cli("verify", folded, "--reference", tmp_path), contains="is a directory")


def test_float64_arbiter_judges_what_is_over_tolerance(zoo_files):
    report = fold_onnx(zoo_files["preact"][1], None, samples=1, atol=1e-12, check=False)
    judged = [c for c in report.comparisons if c.float64_error_original is not None]
    assert judged and len(judged) == len([c for c in report.comparisons if c.max_abs > 1e-12])
    for c in judged:  # both runs measured against the float64 original: float32 rounding, nothing more
        assert 0 < c.float64_error_original < 1e-5 * c.scale and c.float64_error_candidate < 1e-5 * c.scale


def test_a_bn_inside_a_subgraph_is_left_with_its_reason(tmp_path):
    inner = bn_graph(15).graph
    branch = helper.make_graph(list(inner.node), "then", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                                                              [1, 4, 6, 6])])
    other = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["z"])], "else", [],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4, 6, 6])])
    nodes = [helper.make_node("If", ["flag"], ["out"], then_branch=branch, else_branch=other, name="if")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8]),
                                           helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, 6, 6])],
                              list(inner.initializer))
    path = tmp_path / "if.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)]), str(path))
    layer = inspect_onnx(path).layers[0]
    assert layer.fold_action == "refused" and "subgraph 'then_branch' of If 'if'" in layer.fold_reason
    report = fold_onnx(path, tmp_path / "out.onnx", samples=1)
    assert report.passed and report.counts["refused"] == 1


@pytest.mark.parametrize("name", ["resnet", "mobilenet", "mlp", "preact", "trap"])
def test_the_onnx_plan_is_the_same_without_the_probe_shortcut(zoo_files, name, monkeypatch):
    """#18: the planner's probe-free shortcut (a layer feeding its BN directly) changes no ONNX decision."""
    from bntool.folding import planner
    from bntool.onnx_fold import plan_onnx_fold

    model = onnx.load(str(zoo_files[name][1]))

    def plan():
        return [(s.decision, s.targets) for s in plan_onnx_fold(model).steps]

    fast = plan()
    monkeypatch.setattr(planner, "_direct_channels", lambda *a: None)
    monkeypatch.setattr(planner, "_direct_consumer_channels", lambda *a: None)
    assert fast == plan()


def test_a_missing_onnx_input_is_named(tmp_path, cli):
    result = cli("fold", tmp_path / "missing.onnx", "-o", tmp_path / "out.onnx")
    assert_clean_error(result, contains="missing.onnx: no such file")


def test_unnamed_nodes_are_named_by_their_output_and_the_layer_column_stays_whole(tmp_path, cli):
    """#18: a BN node without a name is shown by its output tensor (here "y", shorter than the header), in the
    inspect table and JSON and in the fold report, and the "layer" header does not wrap letter by letter."""
    model = bn_graph(15)
    for node in model.graph.node:
        node.name = ""
    path = tmp_path / "unnamed.onnx"
    onnx.save(model, str(path))
    table = cli("inspect", path)
    assert table.code == 0, table.err
    assert any(line.split()[:2] == ["layer", "kind"] for line in table.out.splitlines()), table.out
    assert any(line.split()[:1] == ["y"] for line in table.out.splitlines())
    assert [layer["name"] for layer in json.loads(cli("inspect", path, "--json").out)["layers"]] == ["y"]
    folded = cli("fold", path, "-o", tmp_path / "out.onnx")
    assert folded.code == 0, folded.err
    assert any(line.split()[:2] == ["layer", "kind"] for line in folded.out.splitlines()), folded.out


class SliceTrap(torch.nn.Module):
    """A conv reading a channel slice (dpn68's pattern): exported without constant folding, the Slice bounds are
    Unsqueeze nodes that shape inference does not read, so only an onnxruntime run tells the conv's output shape."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(3, 8, 1), torch.nn.Conv2d(4, 5, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(5)

    def forward(self, x):
        y = self.a(x)
        return self.bn(self.b(y[:, :4])) * y[:, 4:5]


def test_inspect_decides_as_fold_where_only_a_run_tells_a_shape(tmp_path, cli):
    """#18: inspect (a plan only) said "affine" where fold, after its onnxruntime run, folds. It now plans on the
    same shapes; with symbolic dimensions and no --input-shape it says that fold decides after that run."""
    model = zoo.randomize_bn(SliceTrap()).eval()
    fixed = export_with_bn(model, torch.randn(1, 3, 8, 8), tmp_path / "fixed.onnx")
    dynamic = export_with_bn(model, torch.randn(1, 3, 8, 8), tmp_path / "dynamic.onnx", dynamic=True)
    folded = fold_onnx(fixed, None, samples=1).decisions[0]
    assert folded.action == "folded"
    layer = inspect_onnx(fixed).layers[0]
    assert (layer.fold_action, layer.fold_target) == (folded.action, folded.target)
    unsure = inspect_onnx(dynamic).layers[0]
    assert unsure.fold_action == "affine" and "fold decides after one onnxruntime run" in unsure.fold_reason
    result = cli("inspect", dynamic, "--input-shape", "2,3,8,8", "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out)["layers"][0]["fold_action"] == "folded"


# ---------------------------------------------------------------- --in-place


def with_external_data(src, path):
    """`src` saved again as `path` with every tensor in `path.name + ".data"`."""
    onnx.save_model(onnx.load(str(src)), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=0)
    return path


def test_fold_in_place_replaces_the_file(tmp_path, cli, zoo_files):
    path = tmp_path / "m.onnx"
    path.write_bytes(zoo_files["resnet"][1].read_bytes())
    before = path.read_bytes()
    assert_clean_error(cli("fold", path, "-o", path), contains="--in-place")
    assert path.read_bytes() == before
    result = cli("fold", path, "-o", path, "--in-place")
    assert result.code == 0, result.err
    assert "BatchNormalization" not in op_types(path) and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    x = example("resnet").numpy()
    assert np.abs(run_ort(path, x) - run_ort(zoo_files["resnet"][1], x)).max() < 1e-4


def test_in_place_with_external_data_never_points_at_stale_data(tmp_path, zoo_files, monkeypatch):
    """The new data is written under the name the old model does not read (.data ↔ .1.data) and put in place
    first; the model file's rename is the switch; the old data goes after. A crash between the two renames
    leaves the old model with its own data, whole."""
    import os

    path = with_external_data(zoo_files["resnet"][1], tmp_path / "m.onnx")
    x = example("resnet").numpy()
    original = run_ort(path, x)
    recalibrate_onnx_file(path, path, [torch.from_numpy(x)], in_place=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.1.data"]
    recalibrated = run_ort(path, x)
    assert np.abs(recalibrated - original).max() > 1e-3  # new statistics, read from the new data file
    fold_onnx(path, path, in_place=True, samples=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert "BatchNormalization" not in op_types(path)
    assert np.abs(run_ort(path, x) - recalibrated).max() < 1e-4

    # A crash after the first rename of the commit (a power cut, SIGKILL): the model on disk reads its own data.
    path = with_external_data(zoo_files["resnet"][1], tmp_path / "n.onnx")
    renames, replace = [], os.replace

    def crash_after_one(src, dst):
        if renames:
            raise SystemExit("killed")
        renames.append(dst)
        replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_after_one)
    with pytest.raises(SystemExit):
        fold_onnx(path, path, in_place=True, samples=0)
    monkeypatch.setattr(os, "replace", replace)
    assert [p.name for p in renames] == ["n.onnx.1.data"]
    assert "BatchNormalization" in op_types(path)
    assert np.abs(run_ort(path, x) - original).max() == 0


# ---------------------------------------------------------------- summed branches merged (as the PyTorch path)


class RepBlocks(torch.nn.Module):
    """The sums timm's re-parameterisable blocks write, with BNs that fold into no neighbour: RepVGG (k×k + 1×1 +
    an identity BN), MobileOne (a sum started at 0, depthwise branches), FastViT's RepMixer (x + γ·(BN(conv(x)) −
    BN(x))); then a sum that must stay (one term is also read elsewhere)."""

    def __init__(self, c: int = 6):
        super().__init__()
        conv, bn = torch.nn.Conv2d, torch.nn.BatchNorm2d
        self.k3, self.bn3, self.k1, self.bn1, self.id = conv(c, c, 3, padding=1, bias=False), bn(c), \
            conv(c, c, 1, bias=False), bn(c), bn(c)
        self.dw = torch.nn.ModuleList([conv(c, c, k, padding=k // 2, groups=c, bias=False) for k in (3, 3, 1)])
        self.dw_bn, self.dw_id = torch.nn.ModuleList([bn(c) for _ in range(3)]), bn(c)
        self.mix, self.mix_bn, self.norm = conv(c, c, 3, padding=1, groups=c, bias=False), bn(c), bn(c)
        self.gamma = torch.nn.Parameter(torch.rand(c, 1, 1) + 0.5)
        self.e3, self.e1 = conv(c, c, 3, padding=1), conv(c, c, 1)

    def forward(self, x):
        x = (self.bn3(self.k3(x)) + self.bn1(self.k1(x)) + self.id(x)).relu()
        out = 0
        out = out + self.dw_id(x)
        for layer, norm in zip(self.dw, self.dw_bn):
            out = out + norm(layer(x))
        x = out.relu()
        x = x + self.gamma * (self.mix_bn(self.mix(x)) - self.norm(x))
        a = self.e3(x)
        return a + self.e1(x) + a.mean()


@pytest.mark.parametrize("affine_as", ["mul", "conv"])
def test_summed_branches_of_one_tensor_become_one_conv(tmp_path, affine_as):
    """#18: the ONNX path leaves no more standalone affines than the PyTorch path, which merges these sums
    (bntool.merging): each block becomes one Conv, exact against a float64 run; the last sum stays. An identity
    BN made a depthwise 1×1 Conv (`--affine-as conv`) merges as the identity it is (it stayed a Conv + Add)."""
    model = zoo.randomize_bn(RepBlocks()).eval()
    x = torch.randn(2, 6, 8, 8, generator=torch.Generator().manual_seed(0))
    path = export_with_bn(model, x, tmp_path / "rep.onnx")
    out, unmerged = tmp_path / "merged.onnx", tmp_path / "unmerged.onnx"
    report = fold_onnx(path, out, samples=0, affine_as=affine_as)
    assert report.passed and len(report.merges) == 3 and all(m.merged for m in report.merges)
    ops = op_types(out)
    assert ops.count("Conv") == 5 and "Mul" not in ops and "Sub" not in ops and "BatchNormalization" not in ops
    fold_onnx(path, unmerged, samples=0, merge=False, affine_as=affine_as)
    affines = op_types(unmerged).count("Mul") if affine_as == "mul" else op_types(unmerged).count("Conv") - 8
    assert op_types(unmerged).count("Conv") >= 8 and affines in (3, 4)  # 3 affines (γ's Mul besides with mul)
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(x.double()).numpy()
    original_error = np.abs(run_ort(path, x.numpy()) - exact).max()
    assert np.abs(run_ort(out, x.numpy()) - exact).max() <= 2 * original_error + 1e-6 * np.abs(exact).max()


def test_in_place_keeps_data_that_another_model_file_reads(tmp_path, zoo_files):
    """`cp a.onnx b.onnx` shares a.onnx.data: replacing a.onnx in place must leave b.onnx whole (its data was
    deleted with a.onnx's old data), and a data file b.onnx reads under the other name is not written over."""
    a = with_external_data(zoo_files["resnet"][1], tmp_path / "a.onnx")
    (tmp_path / "b.onnx").write_bytes(a.read_bytes())  # reads a.onnx.data too
    x = example("resnet").numpy()
    before = run_ort(tmp_path / "b.onnx", x)
    fold_onnx(a, a, in_place=True, samples=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "a.onnx.1.data", "a.onnx.data", "b.onnx"]
    assert np.array_equal(run_ort(tmp_path / "b.onnx", x), before)
    # c.onnx reads a.onnx.data (the name a.onnx no longer reads): the next in-place fold takes a third name
    c = tmp_path / "c.onnx"
    c.write_bytes((tmp_path / "b.onnx").read_bytes())
    (tmp_path / "b.onnx").unlink()
    fold_onnx(a, a, in_place=True, samples=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "a.onnx.2.data", "a.onnx.data", "c.onnx"]
    assert np.array_equal(run_ort(c, x), before)
    assert np.abs(run_ort(a, x) - before).max() < 1e-4
    # a backup by another name (found by content, not by the .onnx suffix) keeps the data it reads
    (tmp_path / "a.onnx.bak").write_bytes(a.read_bytes())  # reads a.onnx.2.data
    c.unlink()
    fold_onnx(a, a, in_place=True, samples=0)
    assert "a.onnx.2.data" in {p.name for p in tmp_path.iterdir()}


def test_a_report_never_replaces_an_input_s_external_data(tmp_path, cli, zoo_files):
    """verify --junit-xml/--summary-md over the checked file's or the reference's external data, --force or not:
    exit 2 naming it, the weights kept (a JUnit XML replaced them, exit 0)."""
    a = with_external_data(zoo_files["resnet"][1], tmp_path / "a.onnx")
    b = with_external_data(zoo_files["resnet"][1], tmp_path / "b.onnx")
    data = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for flag, target in (("--junit-xml", "b.onnx.data"), ("--summary-md", "a.onnx.data")):
        result = cli("verify", a, "--reference", b, flag, tmp_path / target, "--force")
        assert_clean_error(result, contains="external data")
    result = cli("verify", a, "--reference", b, "--samples", "x", "--junit-xml", tmp_path / "b.onnx.data", "--force")
    assert result.code == 2  # options that do not parse: the errored case is not written over the data either
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == data
    # data named by a path, not a bare name: ./c.data, and a file in a folder beside the model
    (tmp_path / "w").mkdir()
    for location in ("./c.data", "w/weights.bin"):
        c = tmp_path / "c.onnx"
        onnx.save_model(onnx.load(str(zoo_files["resnet"][1])), str(c), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=location, size_threshold=0)
        weights = (tmp_path / location).read_bytes()
        assert_clean_error(cli("verify", c, "--junit-xml", tmp_path / location, "--force"), contains="external data")
        assert (tmp_path / location).read_bytes() == weights


def test_replacing_a_copy_keeps_the_input_s_data_and_any_shared_name(tmp_path, zoo_files):
    """-o b.onnx --force where b.onnx is a copy of the input a.onnx (both read a.onnx.data): the input's data
    stays (it was deleted: the input no longer loaded). And a shared data file under any name (weights.bin)
    stays while another .onnx reads it."""
    a = with_external_data(zoo_files["resnet"][1], tmp_path / "a.onnx")
    b = tmp_path / "b.onnx"
    b.write_bytes(a.read_bytes())
    x = example("resnet").numpy()
    before = run_ort(a, x)
    fold_onnx(a, b, force=True, samples=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "a.onnx.data", "b.onnx", "b.onnx.data"]
    assert np.array_equal(run_ort(a, x), before)
    shared = tmp_path / "shared"
    shared.mkdir()
    onnx.save_model(onnx.load(str(zoo_files["resnet"][1])), str(shared / "a.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    (shared / "b.onnx").write_bytes((shared / "a.onnx").read_bytes())
    fold_onnx(shared / "a.onnx", shared / "a.onnx", in_place=True, samples=0)
    assert sorted(p.name for p in shared.iterdir()) == ["a.onnx", "a.onnx.data", "b.onnx", "weights.bin"]
    assert np.array_equal(run_ort(shared / "b.onnx", x), before)


def test_in_place_beside_a_large_onnx_file(tmp_path, zoo_files):
    """A large .onnx beside (not scanned: taken to read any data file there) left no free name, and --in-place
    fell back to the input's own data name: exit 2 the user could not avoid. A name no file has is free."""
    a = with_external_data(zoo_files["resnet"][1], tmp_path / "a.onnx")
    with open(tmp_path / "z.onnx", "wb") as f:
        f.write(zoo_files["mlp"][1].read_bytes())  # ONNX by content,
        f.truncate(300 << 20)  # and large (sparse): stands for a large model in the same folder
    fold_onnx(a, a, in_place=True, samples=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "a.onnx.1.data", "a.onnx.data", "z.onnx"]
    assert "BatchNormalization" not in op_types(a)


def test_ctrl_c_during_an_in_place_commit_still_removes_the_old_data(tmp_path, zoo_files, capsys):
    """The commit is one unit, the old data's removal included: a Ctrl-C during it left a full-size stray copy
    of the weights (a.onnx.data, read by nothing) while the message said nothing else was written."""
    from bntool.cli import main
    from bntool.tempfiles import InterruptAt

    a = with_external_data(zoo_files["resnet"][1], tmp_path / "a.onnx")
    code = main(["fold", str(a), "-o", str(a), "--in-place", "--samples", "0"], interrupt=InterruptAt("during-commit"))
    assert code == 130, capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "a.onnx.1.data"]


def test_force_over_a_file_with_external_data_switches_data_files(tmp_path, zoo_files):
    """-o over an existing model that reads `out.onnx.data` (--force): the new data goes to `out.onnx.1.data`,
    committed before the model file; the old data file goes after."""
    src = with_external_data(zoo_files["resnet"][1], tmp_path / "m.onnx")
    out = with_external_data(zoo_files["mobilenet"][1], tmp_path / "out.onnx")
    fold_onnx(src, out, force=True, samples=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data", "out.onnx", "out.onnx.1.data"]
    x = example("resnet").numpy()
    assert np.abs(run_ort(out, x) - run_ort(src, x)).max() < 1e-4


# ---------------------------------------------------------------- no torch before the check's inputs

# Run in a fresh interpreter: the CLI on ONNX files, recording where torch is first imported. Neither the errors
# found before any work nor a whole fold, inspect or verify import it: numpy draws the check's inputs, and the
# health rules shared with the PyTorch path are numpy (bntool.inspection).
_TORCH_WATCH = """
import importlib.abc, json, sys, traceback
first = []
class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        stack = traceback.extract_stack()
        if name == "torch" and not first and not any(f.name == "_library_dirs" for f in stack):  # a find_spec
            first.append([f.name for f in stack if "bntool" in f.filename][-1:])
sys.meta_path.insert(0, Watch())
from bntool.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    code = main(argv)
    results.append([code, "torch" in sys.modules, first[0] if first else None])
print(json.dumps(results))
"""


def test_onnx_commands_import_no_torch(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    src, out, taken = tmp_path / "m.onnx", tmp_path / "folded.onnx", tmp_path / "taken.onnx"
    onnx.save(bn_graph(17), str(src))
    taken.write_bytes(src.read_bytes())
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(src.read_bytes()[:60])
    runs = [
        ["fold", str(src), "-o", str(taken)],  # exists, no --force: exit 2 before any work
        ["fold", str(src), "-o", str(out), "--samples", "-1", "--json"],  # a bad option, --json's error object
        ["verify", str(src), "--reference", str(tmp_path / "missing.onnx")],
        ["inspect", str(src), "--dtype", "float16", "--json"],
        ["inspect", str(corrupt)],  # a corrupt file: refused on loading, before inspect's torch-side report
        ["fold", str(src), "-o", str(out), "--skip", "nomatch"],  # a typo in --skip: before the check's inputs
        ["fold", str(src), "-o", str(out), "-q", "--samples", "1"],
        ["inspect", str(src), "--json"],
        ["verify", str(out), "--reference", str(src), "-q", "--samples", "1"],
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    done = subprocess.run([sys.executable, "-c", _TORCH_WATCH, json.dumps(runs)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.strip().splitlines()[-1])
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert [code for code, _, _ in results] == [2, 2, 2, 2, 2, 2, 0, 0, 0], (results, done.stderr)
    assert len(errors) == 6 and "exists" in errors[0] and "--samples" in errors[1], errors
    assert "--dtype" in errors[3] and "corrupt" in errors[4] and "--skip 'nomatch'" in errors[5], errors
    assert [imported for _, imported, _ in results[:6]] == [False] * 6, results  # the errors: no torch
    assert results[6:] == [[0, False, None]] * 3, results  # nor do a fold, inspect and verify that work
    error_object = json.loads(done.stdout[:done.stdout.index("\n}\n") + 2])
    assert error_object["error"]["exit_code"] == 2 and error_object["versions"]["torch"] == torch.__version__
    assert not batch_norm_nodes(onnx.load(str(out)))
