"""recalibrate on an ONNX file: onnxruntime gives the statistics PyTorch's exact mode gives, segment by segment."""

from __future__ import annotations

import copy
import io
import warnings

import numpy as np
import onnx
import pytest
import torch
from helpers import assert_clean_error, files_in
from onnx import numpy_helper

from bntool import zoo
from bntool.errors import InputError
from bntool.layers import bn_modules
from bntool.onnx_recalibration import recalibrate_onnx
from bntool.recalibration import recalibrate

BN = "BatchNormalization"


def export_with_bn(model: torch.nn.Module, example: torch.Tensor, dynamic: bool = True) -> onnx.ModelProto:
    """The legacy exporter with BN kept as BatchNormalization nodes (no constant folding)."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), buf, dynamo=False, training=torch.onnx.TrainingMode.PRESERVE,
                          do_constant_folding=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}} if dynamic else None)
    proto = onnx.load_from_string(buf.getvalue())
    assert sum(n.op_type == BN for n in proto.graph.node) == len(list(bn_modules(model)))  # the BNs are really there
    return proto


def batches_for(name: str, count: int = 3, size: int = 6) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    shape = zoo.example_input(name).shape[1:]
    return [torch.randn(size, *shape, generator=g) * 1.5 + 0.3 for _ in range(count)]


def onnx_statistics(proto) -> list[tuple[np.ndarray, np.ndarray]]:
    inits = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in proto.graph.initializer}
    return [(inits[n.input[3]], inits[n.input[4]]) for n in proto.graph.node if n.op_type == BN]


def worst_difference(proto, model) -> float:
    """Max over BNs and channels of |Δmean|/σ and |Δvar|/var (σ² = var + eps, what BN divides by)."""
    worst = 0.0
    for (mean, var), (_, bn) in zip(onnx_statistics(proto), bn_modules(model), strict=True):
        ref_mean, ref_var = bn.running_mean.double().numpy(), bn.running_var.double().numpy()
        scale = ref_var + bn.eps
        worst = max(worst, float((np.abs(mean - ref_mean) / np.sqrt(scale)).max()),
                    float((np.abs(var - ref_var) / scale).max()))
    return worst


@pytest.mark.parametrize("name", ["resnet", "mobilenet", "shared", "tokens", "mlp"])
def test_statistics_match_pytorch_exact_mode(name):
    model = zoo.build(name)
    proto = export_with_bn(model, zoo.example_input(name))
    data = batches_for(name)
    reference = copy.deepcopy(model)
    pt = recalibrate(reference, data, mode="exact")
    before = onnx_statistics(proto)
    result, report = recalibrate_onnx(proto, data)
    assert result is proto
    assert worst_difference(proto, reference) <= 1e-5
    assert max(abs(m0 - m1).max() for (m0, _), (m1, _) in zip(before, onnx_statistics(proto))) > 1e-2  # it moved
    assert report.mode == "exact" and report.passes == pt.passes  # the same levels as the PyTorch dataflow
    assert report.samples == 18 and report.batches == 3
    assert [round(a.mean_shift, 4) for a in report.layers] == [round(b.mean_shift, 4) for b in pt.layers]


def test_segments_from_cached_boundaries_equal_whole_passes():
    """The default (each level from the previous one's cached tensors), a budget that fits only some levels,
    and no cache at all (each level from the model input) give the same statistics."""
    model = zoo.build("resnet")
    proto = export_with_bn(model, zoo.example_input("resnet"))
    data = batches_for("resnet")
    runs = {}
    for budget in (None, "partly", 0):
        limit = runs[None][1].cache_peak_bytes - 1 if budget == "partly" else budget  # the largest level misses
        p, report = recalibrate_onnx(copy.deepcopy(proto), data, cache_budget=limit)
        runs[budget] = (onnx_statistics(p), report)
    cached, partly, whole = runs[None][1], runs["partly"][1], runs[0][1]
    assert cached.segment_replays == (cached.passes - 1) * 3 and cached.cache_over_budget == 0
    assert cached.cache_note == "" and cached.cache_peak_bytes > 0
    assert 0 < partly.cache_over_budget < partly.passes - 1 and "exceeded the cache budget" in partly.cache_note
    assert whole.segment_replays == 0 and "every level ran from the model input" in whole.cache_note
    for budget in ("partly", 0):
        for (m0, v0), (m1, v1) in zip(runs[None][0], runs[budget][0], strict=True):
            np.testing.assert_allclose(m1, m0, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(v1, v0, rtol=1e-5, atol=1e-6)


def test_the_passes_share_one_arena_when_asked_and_it_changes_no_number(monkeypatch):
    """With shared_arena (the CLI's), the passes' sessions share onnxruntime's CPU arena (each pass's own empty
    arena wrote every tensor into fresh pages: 40 % of the time on depthwise nets), given back after the passes;
    where memory lives changes no statistic. Without it (the library's default: registering replaces an
    allocator the caller's process may have registered), or without a cache, no session asks for it."""
    import onnxruntime as ort

    from bntool import onnx_recalibration

    model = zoo.build("mobilenet")
    proto = export_with_bn(model, zoo.example_input("mobilenet"))
    data = batches_for("mobilenet")
    asked, released = [], []
    original_session = ort.InferenceSession.__init__

    def session(self, model, sess_options=None, **kwargs):
        try:
            asked.append(sess_options.get_session_config_entry("session.use_env_allocators") == "1")
        except (AttributeError, RuntimeError):  # no options, or not that entry
            asked.append(False)
        original_session(self, model, sess_options=sess_options, **kwargs)

    monkeypatch.setattr(ort.InferenceSession, "__init__", session)
    monkeypatch.setattr(onnx_recalibration, "release_shared_arena",
                        lambda real=onnx_recalibration.release_shared_arena: released.append(real()))
    shared, report = recalibrate_onnx(copy.deepcopy(proto), data, shared_arena=True)
    assert asked.count(True) == report.passes + 1 and released == [None]  # every pass, and the giving back
    asked.clear()
    recalibrate_onnx(copy.deepcopy(proto), data, shared_arena=True, cache_budget=0)
    assert not any(asked) and released == [None]
    own, _ = recalibrate_onnx(copy.deepcopy(proto), data)
    assert not any(asked) and released == [None]
    for (m0, v0), (m1, v1) in zip(onnx_statistics(shared), onnx_statistics(own), strict=True):
        assert np.array_equal(m0, m1) and np.array_equal(v0, v1)


def test_a_fixed_batch_size_graph_gets_the_data_in_chunks():
    model = zoo.build("resnet")
    fixed = export_with_bn(model, zoo.example_input("resnet")[:2], dynamic=False)  # batch 2 fixed in the graph
    dynamic = export_with_bn(model, zoo.example_input("resnet"))
    data = batches_for("resnet")  # batches of 6
    recalibrate_onnx(fixed, data)
    recalibrate_onnx(dynamic, data)
    for (m0, v0), (m1, v1) in zip(onnx_statistics(dynamic), onnx_statistics(fixed), strict=True):
        np.testing.assert_allclose(m1, m0, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(v1, v0, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["resnet", "tokens"])
def test_a_fixed_batch_size_graph_takes_any_number_of_samples(name):
    """QA's repro: batch 2 fixed in the graph, 7 samples. The short chunk is padded with copies of its own samples
    and their rows are left out, also where the BN input flattens the batch with the tokens (N·L, C): the
    statistics are those of the 7 samples (refused before)."""
    model = zoo.build(name)
    example = zoo.example_input(name)
    fixed = export_with_bn(model, example[:1].expand(2, *example.shape[1:]).contiguous(), dynamic=False)
    g = torch.Generator().manual_seed(3)
    data = [torch.randn(n, *example.shape[1:], generator=g) * 1.5 + 0.3 for n in (3, 2, 2)]  # 7 samples
    reference = copy.deepcopy(model)
    recalibrate(reference, data, mode="exact")
    _, report = recalibrate_onnx(fixed, data)
    assert worst_difference(fixed, reference) <= 1e-5
    assert report.samples == 7 and report.batches == 3


def test_bns_sharing_a_statistics_initializer_each_get_their_own():
    """Two BNs read one mean and one variance initializer: each is measured with its own statistics (exact mode
    does not depend on the stored ones, so the result equals the unshared file's) and gets its own copy."""
    model = zoo.build("resnet")
    plain = export_with_bn(model, zoo.example_input("resnet"))
    shared = copy.deepcopy(plain)
    bns = [n for n in shared.graph.node if n.op_type == BN]
    bns[1].input[3], bns[1].input[4] = bns[0].input[3], bns[0].input[4]  # same channel count (16)
    names = (bns[0].input[3], bns[0].input[4])
    recalibrate_onnx(plain, batches_for("resnet"))
    recalibrate_onnx(shared, batches_for("resnet"), cache_budget=0)  # each level from the input: BN 0 runs again
    for (m0, v0), (m1, v1) in zip(onnx_statistics(plain), onnx_statistics(shared), strict=True):
        np.testing.assert_allclose(m1, m0, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(v1, v0, rtol=1e-5, atol=1e-6)
    assert (bns[0].input[3], bns[0].input[4]) != (bns[1].input[3], bns[1].input[4])
    assert {bns[0].input[3], bns[1].input[3]} >= {names[0]} or {bns[0].input[4], bns[1].input[4]} >= {names[1]}


def test_bad_data_is_an_input_error_and_changes_nothing():
    model = zoo.build("resnet")
    proto = export_with_bn(model, zoo.example_input("resnet"))
    before = proto.SerializeToString()
    with pytest.raises(InputError, match=r"shape \(6, 3, 16, 16\).*'x' has shape \(\?, 3, 32, 32\)"):
        recalibrate_onnx(proto, [torch.randn(6, 3, 16, 16)])
    nan = batches_for("resnet")
    nan[2][0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="batch 3 contains NaN"):
        recalibrate_onnx(proto, nan)
    with pytest.raises(InputError, match="no batches"):
        recalibrate_onnx(proto, [])
    assert proto.SerializeToString() == before


def test_cli_writes_a_file_that_keeps_the_model_and_only_changes_statistics(tmp_path, cli):
    model = zoo.build("resnet")
    proto = export_with_bn(model, zoo.example_input("resnet"))
    proto.metadata_props.add(key="owner", value="team")
    proto.doc_string = "exported"
    src = tmp_path / "model.bin"  # detected by content, not by name
    onnx.save(proto, src)
    torch.save(torch.cat(batches_for("resnet")), tmp_path / "data.pt")
    out = tmp_path / "recalibrated.onnx"
    result = cli("recalibrate", src, "--data", tmp_path / "data.pt", "--batch-size", "6", "-o", out, "--json")
    assert result.code == 0, result.err
    import json

    report = json.loads(result.out)
    assert report["mode"] == "exact" and report["samples"] == 18 and len(report["layers"]) == 6
    written = onnx.load(out)
    assert written.opset_import == proto.opset_import and written.ir_version == proto.ir_version
    assert {p.key: p.value for p in written.metadata_props} == {"owner": "team"} and written.doc_string == "exported"
    assert written.graph.input == proto.graph.input and written.graph.output == proto.graph.output  # names, dims
    assert [n for n in written.graph.node] == [n for n in proto.graph.node]
    reference = copy.deepcopy(model)
    recalibrate(reference, batches_for("resnet"), mode="exact")
    assert worst_difference(written, reference) <= 1e-5
    changed = {i.name for i, j in zip(written.graph.initializer, proto.graph.initializer, strict=True) if i != j}
    stats = {n.input[k] for n in proto.graph.node if n.op_type == BN for k in (3, 4)}
    assert changed == stats  # weights untouched


def test_cli_refusals_write_nothing(tmp_path, cli):
    proto = export_with_bn(zoo.build("resnet"), zoo.example_input("resnet"))
    src = tmp_path / "model.onnx"
    onnx.save(proto, src)
    torch.save(torch.randn(4, 3, 16, 16), tmp_path / "small.pt")
    torch.save(torch.randn(4, 3, 32, 32), tmp_path / "good.pt")
    out = tmp_path / "out.onnx"
    assert_clean_error(cli("recalibrate", src, "--data", tmp_path / "small.pt", "-o", out), 2, "has shape")
    assert_clean_error(cli("recalibrate", src, "--data", tmp_path / "good.pt", "-o", out, "--mode", "ema"), 2,
                       "exact mode only")
    assert_clean_error(cli("recalibrate", src, "--data", tmp_path / "good.pt", "-o", out, "--arch",
                           "bntool.zoo:resnet"), 2, "--arch")
    nobn = export_with_bn(zoo.build("nobn"), zoo.example_input("nobn"))
    onnx.save(nobn, tmp_path / "nobn.onnx")
    torch.save(torch.randn(4, 3, 16, 16), tmp_path / "x16.pt")
    assert_clean_error(cli("recalibrate", tmp_path / "nobn.onnx", "--data", tmp_path / "x16.pt", "-o", out), 2,
                       "no BatchNormalization")
    assert files_in(tmp_path) == {"model.onnx", "small.pt", "good.pt", "nobn.onnx", "x16.pt"}


def test_a_file_with_external_data_is_written_with_its_own(tmp_path):
    from bntool.onnx_recalibration import recalibrate_onnx_file

    proto = export_with_bn(zoo.build("resnet"), zoo.example_input("resnet"))
    expected, _ = recalibrate_onnx(copy.deepcopy(proto), batches_for("resnet"))
    onnx.save(proto, tmp_path / "model.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    report = recalibrate_onnx_file(tmp_path / "model.onnx", tmp_path / "out.onnx", batches_for("resnet"))
    assert report.passes == 5
    assert files_in(tmp_path) == {"model.onnx", "weights.bin", "out.onnx", "out.onnx.data"}
    written = onnx.load(tmp_path / "out.onnx")  # reads out.onnx.data
    for (m0, v0), (m1, v1) in zip(onnx_statistics(expected), onnx_statistics(written), strict=True):
        np.testing.assert_allclose(m1, m0, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(v1, v0, rtol=1e-6, atol=1e-7)


def one_bn_graph(shape: tuple[int, ...], dtype=np.float32) -> onnx.ModelProto:
    """A graph of one BatchNormalization on an input of shape (n, *shape), γ 1, β 0 and statistics 0 and 1 of
    `dtype`: what is measured is the data's own statistics."""
    from onnx import helper

    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inits = [numpy_helper.from_array(np.full(shape[0], v, dtype), n) for n, v in
             (("scale", 1.0), ("bias", 0.0), ("mean", 0.0), ("var", 1.0))]
    graph = helper.make_graph([helper.make_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], ["y"])],
                              "bn", [helper.make_tensor_value_info("x", elem, ["n", *shape])],
                              [helper.make_tensor_value_info("y", elem, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_statistics_keep_float64_accuracy_over_many_values_far_from_zero():
    """131,072 values per channel around 1000 with σ 0.5: a float32 sum over the batch is off by far more than
    float32's last place; the statistics are numpy's float64 ones, cast once."""
    c = 2
    proto = one_bn_graph((c, 256, 256))
    g = torch.Generator().manual_seed(0)
    data = [1000 + 0.5 * torch.randn(2, c, 256, 256, generator=g) for _ in range(2)]
    recalibrate_onnx(proto, data)
    (mean, var), = onnx_statistics(proto)
    x = torch.cat(data).double().numpy()
    ref_mean, ref_var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3), ddof=1)
    stored = ref_mean.astype(np.float32)  # the file holds float32: within one unit in its last place
    assert (np.abs(mean - stored) <= np.spacing(stored)).all(), (mean, ref_mean)
    np.testing.assert_allclose(var, ref_var, rtol=1e-6)


@pytest.mark.parametrize("shape", [(3, 40, 40), (3, 7), (3,)])
def test_statistics_hold_for_far_apart_samples_constant_channels_and_every_rank(shape):
    """Each row is summed about its own mean: samples 1e4 apart with σ 0.01 inside each, a
    constant channel (variance exactly 0), and BN inputs of rank 4, 3 and 2, all against float64."""
    proto = one_bn_graph(shape)
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(2):
        x = torch.randn(4, *shape, generator=g)
        x[:, 0] = 0.01 * x[:, 0] + torch.tensor([0.0, 1e4, -3e3, 7e3]).view(4, *[1] * (len(shape) - 1))
        x[:, 1] = 5.0
        data.append(x)
    recalibrate_onnx(proto, data)
    (mean, var), = onnx_statistics(proto)
    x = torch.cat(data).double().numpy()
    axes = (0, *range(2, x.ndim))
    ref_mean, ref_var = x.mean(axis=axes), x.var(axis=axes, ddof=1)
    # within the float32 file's last place, or a hair of σ for a mean near zero
    allowed = np.maximum(np.spacing(np.abs(ref_mean.astype(np.float32))), 1e-7 * np.sqrt(ref_var))
    assert (np.abs(mean - ref_mean) <= allowed).all(), (mean, ref_mean)
    np.testing.assert_allclose(var, ref_var, rtol=1e-6)
    assert var[1] == 0.0


@pytest.mark.parametrize("outlier", ["first row", "first column"])
def test_statistics_hold_when_a_planes_first_row_or_column_is_an_outlier(outlier):
    """A black top row or left column (letterboxing) in planes around 1e4 with σ 0.01: a centre taken from the
    first row was 1e4 from every other row, and one float32 pass over them lost 4e-5-8e-5 of σ² (hostile QA).
    Each row is now centred on its own mean."""
    proto = one_bn_graph((2, 128, 128))
    x = (np.random.default_rng(0).normal(size=(4, 2, 128, 128)) * 1e-2 + 1e5).astype(np.float32)
    if outlier == "first row":
        x[:, :, 0, :] = 0
    else:
        x[:, :, :, 0] = 0
    recalibrate_onnx(proto, [torch.from_numpy(x)])
    (mean, var), = onnx_statistics(proto)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(var, x64.var(axis=(0, 2, 3), ddof=1), rtol=1e-6)
    np.testing.assert_allclose(mean, x64.mean(axis=(0, 2, 3)), rtol=1e-7)


def test_statistics_that_overflow_a_float16_file_are_refused_and_change_nothing():
    """σ² ≈ 9e4 is finite in float64 but inf in a float16 file: it was written as inf with exit 0 (hostile QA)."""
    proto = one_bn_graph((3, 8, 8), np.float16)
    before = proto.SerializeToString()
    x = torch.from_numpy((np.random.default_rng(0).normal(size=(16, 3, 8, 8)) * 300).astype(np.float16))
    with pytest.raises(InputError, match="overflow the file's float16"):
        recalibrate_onnx(proto, [x])
    assert proto.SerializeToString() == before


def _two_conv_bn_graph(identity: bool) -> onnx.ModelProto:
    """conv-BN-ReLU-conv-BN whose two BNs share one initializer of ones (scale and variance) and one of zeros
    (bias and mean), as the legacy exporter writes a fresh model's equal tensors; with `identity`, the BNs read
    them through Identity nodes, as it also does."""
    from onnx import TensorProto
    from onnx import helper as h

    r = np.random.default_rng(0)
    inits = [numpy_helper.from_array(r.standard_normal((4, 3, 3, 3)).astype("float32"), "w1"),
             numpy_helper.from_array(r.standard_normal((4, 4, 3, 3)).astype("float32"), "w2"),
             numpy_helper.from_array(np.ones(4, "float32"), "ones"),
             numpy_helper.from_array(np.zeros(4, "float32"), "zeros")]
    one, zero = ("one_i", "zero_i") if identity else ("ones", "zeros")
    nodes = [h.make_node("Identity", ["ones"], ["one_i"]), h.make_node("Identity", ["zeros"], ["zero_i"])] if identity \
        else []
    nodes += [h.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
              h.make_node(BN, ["c1", one, zero, zero, one], ["b1"], name="bn1"),
              h.make_node("Relu", ["b1"], ["r1"]),
              h.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
              h.make_node(BN, ["c2", one, zero, zero, one], ["y"], name="bn2")]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
                         [h.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 8, 8])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 15)])
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("identity", [False, True])
def test_statistics_never_overwrite_a_shared_scale_or_bias(identity):
    """The BNs' γ/β and statistics share initializers (also through Identity nodes): each BN gets its own new
    statistics, and γ = 1, β = 0 stay what they were (the shared initializer was overwritten in place before)."""
    proto = _two_conv_bn_graph(identity)
    data = [torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(i)) * 3 + 1 for i in range(2)]
    recalibrate_onnx(proto, data)
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    values = {**inits, **{n.output[0]: inits[n.input[0]] for n in proto.graph.node if n.op_type == "Identity"}}
    bns = [n for n in proto.graph.node if n.op_type == BN]
    for bn in bns:
        np.testing.assert_array_equal(values[bn.input[1]], np.ones(4, "float32"))
        np.testing.assert_array_equal(values[bn.input[2]], np.zeros(4, "float32"))
    # the first BN's statistics are those of conv1's output over the data, independently computed
    w1 = torch.from_numpy(inits["w1"].copy()).double()
    c1 = torch.cat([torch.nn.functional.conv2d(x.double(), w1, padding=1) for x in data])
    np.testing.assert_allclose(values[bns[0].input[3]], c1.mean((0, 2, 3)).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(values[bns[0].input[4]], c1.var((0, 2, 3)).numpy(), rtol=1e-5)
    assert not np.allclose(values[bns[1].input[4]], values[bns[0].input[4]])  # each its own


def test_the_data_are_read_once_while_the_cache_holds():
    """Each level runs from the previous level's cached chunks, so an image folder is decoded once, not once per
    level (it was read on every pass before); with no cache every level reads it from the start."""

    class Counted(list):
        reads = 0  # batches handed out

        def __iter__(self):
            for batch in super().__iter__():
                type(self).reads += 1
                yield batch

    proto = export_with_bn(zoo.build("resnet"), zoo.example_input("resnet"))
    data = Counted(batches_for("resnet"))
    _, report = recalibrate_onnx(copy.deepcopy(proto), data)
    assert report.passes == 5 and Counted.reads == 3  # 3 batches, read once
    Counted.reads = 0
    recalibrate_onnx(copy.deepcopy(proto), data, cache_budget=0)
    assert Counted.reads == 5 * 3


def test_padding_that_cannot_be_told_apart_is_refused():
    """A BN input that mixes the samples of a fixed batch of 2 into 3 rows: the padded last chunk's rows cannot be
    left out, so it is an input error naming the BN and the way out, not wrong statistics."""
    from onnx import TensorProto, helper

    inits = [numpy_helper.from_array(np.full(4, v, np.float32), n) for n, v in
             (("scale", 1.0), ("bias", 0.0), ("mean", 0.0), ("var", 1.0))]
    inits.append(numpy_helper.from_array(np.array([3, 4, 4], np.int64), "rows3"))
    graph = helper.make_graph([helper.make_node("Reshape", ["x", "rows3"], ["r"]),
                               helper.make_node(BN, ["r", "scale", "bias", "mean", "var"], ["y"], name="bn")],
                              "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    recalibrate_onnx(copy.deepcopy(proto), [torch.randn(4, 4, 6)])  # no padding: fine
    with pytest.raises(InputError, match="bn: its input has 3 rows for a fixed batch of 2.*multiple of 2"):
        recalibrate_onnx(proto, [torch.randn(3, 4, 6)])
