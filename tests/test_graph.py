"""graph.py: the recorded dataflow of one forward, channel mapping through data movement, BN dependency levels."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bntool.graph import channel_map, channel_probe, dependency_levels, is_eval_identity, replay, trace


class Branches(nn.Module):
    """conv → bn1 → relu, read twice: by bn2 (through a permute) and by the output sum."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv(x)))
        z = self.bn2(y)
        return self.lin(z.mean((2, 3))) + y.sum()


def test_trace_records_producers_readers_and_module_calls():
    model = Branches().eval()
    x = torch.randn(2, 3, 5, 5)
    flow, out = trace(model, (x,))
    with torch.no_grad():
        assert torch.equal(out, model(x))  # tracing does not change what the forward computes
    conv_out = flow.calls_of(model.conv)[0].outputs[0]
    assert flow.producer(conv_out).name == "conv2d" and flow.producer(conv_out).module is model.conv
    assert [r.name for r in flow.readers(conv_out)] == ["batch_norm"]
    relu_out = flow.producer(flow.calls_of(model.bn2)[0].inputs[0])
    assert relu_out.name == "relu"
    assert {r.name if not isinstance(r, str) else r for r in flow.readers(relu_out.outputs[0])} == {"batch_norm", "sum"}
    assert flow.count("batch_norm") == 2 and len(flow.calls_of(model.lin)) == 1
    assert flow.readers(out) == ["output"]
    assert flow.producer(flow.calls_of(model.conv)[0].inputs[0]) is None  # a model input


def test_trace_records_in_order_and_restores_hooks():
    model = Branches().eval()
    flow, _ = trace(model, (torch.randn(1, 3, 4, 4),))
    assert [op.index for op in flow.ops] == list(range(len(flow.ops)))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("move,axis,expected", [
    (lambda t: t.permute(0, 2, 3, 1), 3, [0, 1, 2, 3]),  # NCHW → NHWC keeps channels, on the last axis
    (lambda t: t.flip(1).permute(0, 2, 3, 1), 3, [3, 2, 1, 0]),  # a reordering is a mapping, not a mix
    (lambda t: t.reshape(2, 2, 2, 3, 3), 1, None),  # 4 channels in 2 groups: each group index mixes 2
    (lambda t: t.reshape(2, 2, 2, 3, 3), 2, None),
    (lambda t: t.unsqueeze(2), 1, [0, 1, 2, 3]),
])
def test_channel_map_through_moves(move, axis, expected):
    assert channel_map(move(channel_probe((2, 4, 3, 3), 1)), axis) == expected


def test_channel_map_of_flatten_and_transpose():
    probe = channel_probe((2, 3, 1, 1), 1)
    assert channel_map(probe.flatten(1), 1) == [0, 1, 2]  # 1×1 spatial: flatten keeps one channel per index
    # 12 features after flatten, 4 from each channel: each feature maps to one channel (a Linear can take it)
    assert channel_map(channel_probe((2, 3, 2, 2), 1).flatten(1), 1) == [0] * 4 + [1] * 4 + [2] * 4
    wide = channel_probe((2, 3, 2, 2), 1).flatten(1)  # 12 features, 4 per channel
    assert channel_map(wide.reshape(2, 3, 4), 1) == [0, 1, 2]
    assert channel_map(channel_probe((5, 6), 1).t(), 0) == list(range(6))
    assert channel_map(channel_probe((5, 6), 1), 0) is None  # the batch axis mixes every channel


def test_replay_applies_a_recorded_chain():
    class Moves(nn.Module):
        def forward(self, x):
            return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])

    flow, _ = trace(Moves(), (torch.randn(2, 3, 2, 2),))
    chain = [op for op in flow.ops if is_eval_identity(op)]
    assert [op.name for op in chain] == ["permute", "reshape"]
    probe = replay(chain, channel_probe((2, 3, 2, 2), 1))
    assert probe.shape == (2, 4, 3) and channel_map(probe, 2) == [0, 1, 2]


def test_dropout_is_identity_only_in_eval():
    class Drop(nn.Module):
        def __init__(self):
            super().__init__()
            self.d = nn.Dropout(0.5)

        def forward(self, x):
            return self.d(x)

    model = Drop()
    flow, _ = trace(model.eval(), (torch.randn(2, 3),))
    assert [is_eval_identity(op) for op in flow.ops if op.name == "dropout"] == [True]
    flow, _ = trace(model.train(), (torch.randn(2, 3),))
    assert [is_eval_identity(op) for op in flow.ops if op.name == "dropout"] == [False]


def test_dependency_levels():
    """bn1 and a parallel bn3 read only the input (level 1); bn2 reads bn1's output (level 2); a BN whose input
    depends on both levels is level 3."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn1, self.bn2, self.bn3, self.bn4 = (nn.BatchNorm1d(3) for _ in range(4))

        def forward(self, x):
            a = self.bn2(torch.relu(self.bn1(x)))
            b = self.bn3(x)
            return self.bn4(a + b)

    net = Net().eval()
    flow, _ = trace(net, (torch.randn(4, 3),))
    levels = dependency_levels(flow, [net.bn1, net.bn2, net.bn3, net.bn4])
    assert [levels[id(m)] for m in (net.bn1, net.bn2, net.bn3, net.bn4)] == [1, 2, 1, 3]
    only_some = dependency_levels(flow, [net.bn2, net.bn4])  # BNs not asked about do not count as levels
    assert [only_some[id(net.bn2)], only_some[id(net.bn4)]] == [1, 2]
