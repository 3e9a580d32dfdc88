"""The planner's rules on a graph that is not a PyTorch trace: a small hand-built graph implementing FoldGraph,
as the ONNX path does. The decisions must follow only from the graph interface."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from bntool.folding.planner import OUTPUT, NoFold, OpKind, consumer_target, producer_targets


@dataclass(eq=False)
class Node:
    kind: OpKind
    name: str
    inputs: list[str]
    output: str
    perm: tuple[int, ...] | None = None  # a transpose's permutation
    bias: bool = False
    axis: int = 1
    pads: bool = False
    shared: bool = False


@dataclass
class Graph:
    """Tensors are names with shapes; nodes are listed in order; `outputs` are the graph's outputs."""

    shapes: dict[str, tuple[int, ...]]
    nodes: list[Node] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)

    def producer(self, t):
        return next((n for n in self.nodes if n.output == t), None)

    def value_readers(self, t):
        return [n for n in self.nodes if t in n.inputs] + ([OUTPUT] if t in self.outputs else [])

    def kind(self, node):
        return node.kind

    def op_name(self, node):
        return node.name

    def inputs(self, node):
        return node.inputs

    def output(self, node):
        return node.output

    def shape(self, t):
        return self.shapes[t]

    def concat_axis(self, node):
        return node.axis

    def move_probe(self, node, probe):
        return probe.permute(node.perm)

    def layer_name(self, node):
        return node.name

    def layer_has_bias(self, node):
        return node.bias

    def channel_axes(self, node):
        return 1, 1

    def producer_refusal(self, node):
        return "its weight is shared" if node.shared else ""

    def consumer_refusal(self, node, x):
        return "the next conv zero-pads its input" if node.pads else ""


def conv(name, x, y, **kw):
    return Node(OpKind.LAYER, name, [x], y, **kw)


def test_sum_of_two_convs_each_scaled_one_takes_the_shift():
    g = Graph({"x": (1, 3, 4, 4), "a": (1, 4, 4, 4), "b": (1, 4, 4, 4), "s": (1, 4, 4, 4)})
    g.nodes = [conv("c1", "x", "a"), conv("c2", "x", "b", bias=True), Node(OpKind.ADD, "Add", ["a", "b"], "s")]
    bn = Node(OpKind.OTHER, "BatchNormalization", ["s"], "y")
    g.nodes.append(bn)
    targets = producer_targets(g, "s", lambda n: n is bn, 4)
    by_layer = {t.layer: t for t in targets}
    assert by_layer["c1"].channels == [0, 1, 2, 3] and by_layer["c2"].channels == [0, 1, 2, 3]
    assert by_layer["c2"].shift == [True] * 4 and by_layer["c1"].shift == [False] * 4  # the bias-holder takes it


def test_concat_maps_channels_and_a_second_reader_refuses():
    g = Graph({"x": (1, 3, 2, 2), "a": (1, 2, 2, 2), "b": (1, 3, 2, 2), "c": (1, 5, 2, 2)})
    bn = Node(OpKind.OTHER, "BatchNormalization", ["c"], "y")
    g.nodes = [conv("c1", "x", "a"), conv("c2", "x", "b"), Node(OpKind.CONCAT, "Concat", ["a", "b"], "c"), bn]
    targets = producer_targets(g, "c", lambda n: n is bn, 5)
    assert [(t.layer, t.channels) for t in targets] == [("c1", [0, 1]), ("c2", [2, 3, 4])]
    g.nodes.append(Node(OpKind.OTHER, "Relu", ["b"], "r"))
    with pytest.raises(NoFold, match="a part of the Concat feeding it is also read by Relu"):
        producer_targets(g, "c", lambda n: n is bn, 5)


def test_transpose_that_moves_channels_refuses_and_the_adapter_reason_is_kept():
    g = Graph({"x": (1, 3, 2, 2), "a": (1, 2, 2, 2), "t": (1, 2, 2, 2)})
    bn = Node(OpKind.OTHER, "BatchNormalization", ["t"], "y")
    g.nodes = [conv("c1", "x", "a"), Node(OpKind.MOVE, "Transpose", ["a"], "t", perm=(0, 2, 1, 3)), bn]
    with pytest.raises(NoFold, match="mixes channels"):
        producer_targets(g, "t", lambda n: n is bn, 2)
    g.nodes[1].perm = (0, 1, 3, 2)  # spatial only: channels stay
    assert producer_targets(g, "t", lambda n: n is bn, 2)[0].channels == [0, 1]
    g.nodes[0].shared = True
    with pytest.raises(NoFold, match="its weight is shared"):
        producer_targets(g, "t", lambda n: n is bn, 2)


def test_consumer_through_data_movement_and_its_refusals():
    g = Graph({"y": (1, 3, 2, 2), "t": (1, 3, 2, 2), "z": (1, 4, 2, 2)}, outputs=["z"])
    g.nodes = [Node(OpKind.MOVE, "Transpose", ["y"], "t", perm=(0, 1, 3, 2)), conv("c", "t", "z")]
    target, reason = consumer_target(g, "y")
    assert reason is None and target.layer == "c" and target.channels == [0, 1, 2] and all(target.shift)
    g.nodes[1].pads = True
    assert consumer_target(g, "y") == (None, "the next conv zero-pads its input")
    g.outputs.append("t")  # the graph returns the BN output too: no consumer fold
    assert consumer_target(g, "y") == (None, None)


def test_fed_by_a_graph_input():
    g = Graph({"x": (1, 2, 2, 2)})
    bn = Node(OpKind.OTHER, "BatchNormalization", ["x"], "y")
    g.nodes = [bn]
    with pytest.raises(NoFold, match="fed by a model input"):
        producer_targets(g, "x", lambda n: n is bn, 2)


# ---------------------------------------------------------------- the probe-free shortcut (#18)


def _plans_with_and_without_shortcut(make_plan, monkeypatch):
    """The plan as made, and as made with every channel mapping decided by the probe."""
    from bntool import graph
    from bntool.folding import planner

    calls = []
    probe = graph.channel_probe  # the planner imports it where it probes (it imports no torch itself)
    monkeypatch.setattr(graph, "channel_probe", lambda *a: calls.append(1) or probe(*a))
    fast = make_plan()
    probes_used = len(calls)
    monkeypatch.setattr(planner, "_direct_channels", lambda *a: None)
    monkeypatch.setattr(planner, "_direct_consumer_channels", lambda *a: None)
    return fast, make_plan(), probes_used


@pytest.mark.parametrize("name", ["resnet", "mobilenet", "tokens", "preact", "acnet", "dbb", "decoder"])
def test_shortcut_gives_the_probe_plan(name, monkeypatch):
    from bntool import zoo
    from bntool.folding import plan_fold

    model, x = zoo.build(name), zoo.example_input(name)
    fast, probed, _ = _plans_with_and_without_shortcut(lambda: plan_fold(model, x), monkeypatch)
    assert fast.steps == probed.steps


def test_a_conv_feeding_its_bn_needs_no_probe(monkeypatch):
    """ResNet-like: every BN reads its conv directly (or a sum of convs): no channel probe at all."""
    from bntool import zoo
    from bntool.folding import FOLDED, plan_fold

    model, x = zoo.build("resnet"), zoo.example_input("resnet")
    fast, probed, probes_used = _plans_with_and_without_shortcut(lambda: plan_fold(model, x), monkeypatch)
    assert probes_used == 0 and all(d.action == FOLDED for d in fast.decisions)
    assert fast.steps == probed.steps


def test_shortcut_concat_offsets_match_the_probe(monkeypatch):
    """A BN after a channel concat of two convs, one of them itself a concat: offsets as the probe has them."""
    import torch

    from bntool.folding import plan_fold

    class Cats(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = (torch.nn.Conv2d(3, n, 1) for n in (2, 3, 4))
            self.bn = torch.nn.BatchNorm2d(9)

        def forward(self, x):
            return self.bn(torch.cat([self.a(x), torch.cat([self.b(x), self.c(x)], dim=-3)], 1))

    model, x = Cats().eval(), torch.randn(1, 3, 4, 4)
    fast, probed, probes_used = _plans_with_and_without_shortcut(lambda: plan_fold(model, x), monkeypatch)
    assert probes_used == 0 and fast.steps == probed.steps
    assert [t.channels for t in fast.steps[0].targets] == [[0, 1], [2, 3, 4], [5, 6, 7, 8]]
