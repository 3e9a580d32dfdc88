"""Small models built in code that cover the shapes BatchNorm takes in real networks.

Used by `bntool demo`, the tests and the benchmarks. `build(name)` returns a model in eval mode with
randomized BN statistics (so that folding them is not a no-op); `ZOO[name].input_shape` its input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn(cin, cout, k=3, stride=1, groups=1, act=True, dims=2):
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    layers = [conv(cin, cout, k, stride, k // 2, groups=groups, bias=False), bn(cout)]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1, groups=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.down is None else self.down(x)))


class ResNetLike(nn.Module):
    """conv→BN→ReLU stem, residual blocks (with a downsample branch), grouped conv, pooling head."""

    def __init__(self, num_classes=10, width=16, groups=1):
        super().__init__()
        self.stem = conv_bn(3, width)
        self.layer1 = BasicBlock(width, width, groups=groups)
        self.layer2 = BasicBlock(width, 2 * width, stride=2, groups=groups)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, expand=4, stride=1):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.block = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )

    def forward(self, x):
        y = self.block(x)
        return x + y if self.use_res else y


class MobileNetLike(nn.Module):
    """Depthwise convs in inverted residuals; the classifier has Dropout (eval-mode matters)."""

    def __init__(self, num_classes=10, width=8):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(3, width, stride=2), InvertedResidual(width, width), InvertedResidual(width, 2 * width, stride=2),
            InvertedResidual(2 * width, 2 * width),
        )
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Linear(2 * width, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))


class ConvTransposeDecoder(nn.Module):
    """Encoder → ConvTranspose2d (plain and grouped, with bias) + BN decoder, as in segmentation heads."""

    def __init__(self):
        super().__init__()
        self.enc = conv_bn(3, 16, stride=2)
        self.up1 = nn.ConvTranspose2d(16, 8, 4, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.up2 = nn.ConvTranspose2d(8, 8, 3, stride=1, padding=1, groups=2, bias=True)
        self.bn2 = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = F.relu(self.bn1(self.up1(self.enc(x))))
        return self.head(F.relu(self.bn2(self.up2(x))))


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(conv_bn(4, 8, 5, dims=1), conv_bn(8, 16, 3, stride=2, dims=1),
                                  nn.Conv1d(16, 16, 3, padding=2, dilation=2, padding_mode="reflect"),
                                  nn.BatchNorm1d(16))
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(self.body(x).mean(-1))


class Conv3dNet(nn.Module):
    """Video-style (R3D-like) stem and block."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(conv_bn(3, 8, 3, dims=3), conv_bn(8, 8, 3, stride=2, groups=2, dims=3))
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.body(x).mean((2, 3, 4)))


class MLPBN(nn.Module):
    """Linear → BatchNorm1d on 2D input, plus a BN at the model input and BN → Linear (forward-foldable)."""

    def __init__(self):
        super().__init__()
        self.in_bn = nn.BatchNorm1d(20)
        self.fc1 = nn.Linear(20, 32)
        self.bn1 = nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, 32, bias=False)
        self.bn2 = nn.BatchNorm1d(32, affine=False)
        self.fc3 = nn.Linear(32, 5)

    def forward(self, x):
        x = F.gelu(self.bn1(self.fc1(self.in_bn(x))))
        return self.fc3(F.gelu(self.bn2(self.fc2(x))))


class TokenMLP(nn.Module):
    """Token model: Linear on (B, L, C) with BatchNorm1d applied through a transpose (channel last → 1)."""

    def __init__(self, dim=16):
        super().__init__()
        self.proj = nn.Linear(8, dim)
        self.norm = nn.BatchNorm1d(dim)
        self.mlp = nn.Linear(dim, dim)
        self.norm2 = nn.BatchNorm1d(dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):  # x: (B, L, 8)
        x = self.norm(self.proj(x).transpose(1, 2)).transpose(1, 2)
        y = self.mlp(x)
        b, n, c = y.shape
        y = self.norm2(y.reshape(b * n, c)).reshape(b, n, c)
        return self.head(F.gelu(x + y).mean(1))


class PreActNet(nn.Module):
    """Pre-activation (BN → ReLU → conv), BN → 1×1 conv (forward-foldable), BN → zero-padded 3×3 conv
    (only an affine is exact), BN → reflect-padded conv (forward-foldable)."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn_pre = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn_fwd = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 16, 1)
        self.bn_pad = nn.BatchNorm2d(16)
        self.conv_pad = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn_after_act = nn.BatchNorm2d(16)
        self.head = nn.Conv2d(16, 4, 3, padding=1, padding_mode="replicate")

    def forward(self, x):
        x = self.conv1(F.relu(self.bn_pre(self.conv0(x))))
        x = F.relu(self.pw(self.bn_fwd(F.relu(x))))
        x = F.relu(self.conv_pad(self.bn_pad(x)))
        return self.head(self.bn_after_act(x))


class SharedOutput(nn.Module):
    """A conv whose output feeds both its BN and a skip connection: folding into it would be wrong."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.out = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return self.out(F.relu(self.bn(y)) + y)


class ReusedConv(nn.Module):
    """The same conv module called twice, each call followed by its own BN."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.shared = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(8)
        self.bn_b = nn.BatchNorm2d(8)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(self.bn_a(self.shared(x)))
        return self.bn_b(self.shared(x))


class BatchNormAct2d(nn.BatchNorm2d):
    """timm-style BN subclass that adds an activation in its forward (its behaviour must survive folding)."""

    def __init__(self, num_features, **kwargs):
        super().__init__(num_features, **kwargs)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(super().forward(x))


class Conv2dSame(nn.Conv2d):
    """TF-'SAME' conv that pads dynamically in forward (as in timm/EfficientNet ports)."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        ph = max((-(-ih // self.stride[0]) - 1) * self.stride[0] + (kh - 1) * self.dilation[0] + 1 - ih, 0)
        pw = max((-(-iw // self.stride[1]) - 1) * self.stride[1] + (kw - 1) * self.dilation[1] + 1 - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class FrozenBatchNorm2d(nn.Module):
    """torchvision.ops.FrozenBatchNorm2d, copied so tests do not need torchvision."""

    def __init__(self, num_features, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x):
        scale = self.weight.reshape(1, -1, 1, 1) * (self.running_var.reshape(1, -1, 1, 1) + self.eps).rsqrt()
        bias = self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale
        return x * scale + bias


class SubclassNet(nn.Module):
    """BN subclass with activation, Conv2dSame, FrozenBatchNorm2d, 'same' padding and a squeeze-excite gate."""

    def __init__(self):
        super().__init__()
        self.conv1 = Conv2dSame(3, 8, 3, stride=2, bias=False)
        self.bn1 = BatchNormAct2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding="same", bias=False)
        self.bn2 = FrozenBatchNorm2d(8)
        self.se = nn.Conv2d(8, 8, 1)
        self.conv3 = nn.Conv2d(8, 8, 5, padding=2, groups=8)
        self.bn3 = BatchNormAct2d(8, eps=1e-3)

    def forward(self, x):
        x = self.bn1(self.conv1(x))
        x = F.relu(self.bn2(self.conv2(x)))
        x = x * torch.sigmoid(self.se(x.mean((2, 3), keepdim=True)))
        return self.bn3(self.conv3(x))


class NoBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))

    def forward(self, x):
        return self.body(x)


def _conv_only_bn(cin, cout, k, stride=1, groups=1):
    """conv-BN with no activation (padding centres the kernel): one linear branch of a re-parameterisable block."""
    k = k if isinstance(k, tuple) else (k, k)
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, (k[0] // 2, k[1] // 2), groups=groups, bias=False),
                         nn.BatchNorm2d(cout))


class ACBlock(nn.Module):
    """ACNet's asymmetric block: 3×3, 1×3 and 3×1 conv-BN branches summed (centres aligned), then ReLU."""

    def __init__(self, cin, cout, stride=1, groups=1):
        super().__init__()
        self.square = _conv_only_bn(cin, cout, 3, stride, groups)
        self.hor = _conv_only_bn(cin, cout, (1, 3), stride, groups)
        self.ver = _conv_only_bn(cin, cout, (3, 1), stride, groups)

    def forward(self, x):
        return F.relu(self.square(x) + self.hor(x) + self.ver(x))


class DBBlock(nn.Module):
    """Diverse Branch Block: k×k conv-BN, 1×1 conv-BN, 1×1 conv → k×k conv-BN, 1×1 conv → average pool-BN and
    (same shape) an identity BN, summed, then ReLU."""

    def __init__(self, cin, cout, stride=1, groups=1):
        super().__init__()
        self.kxk = _conv_only_bn(cin, cout, 3, stride, groups)
        self.one = _conv_only_bn(cin, cout, 1, stride, groups)
        self.one_kxk = nn.Sequential(nn.Conv2d(cin, cin, 1, groups=groups, bias=False),
                                     nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=False),
                                     nn.BatchNorm2d(cout))
        self.one_avg = nn.Sequential(nn.Conv2d(cin, cout, 1, groups=groups, bias=False),
                                     nn.AvgPool2d(3, stride, 1), nn.BatchNorm2d(cout))
        self.identity = nn.BatchNorm2d(cout) if cin == cout and stride == 1 else None

    def forward(self, x):
        out = self.kxk(x) + self.one(x) + self.one_kxk(x) + self.one_avg(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return F.relu(out)


class RepNet(nn.Module):
    """A small classifier of re-parameterisable blocks (ACBlock or DBBlock): plain, strided and grouped."""

    def __init__(self, block=ACBlock, width=16):
        super().__init__()
        self.stem = conv_bn(3, width, 3, 2)
        self.blocks = nn.Sequential(block(width, width), block(width, 2 * width, 2),
                                    block(2 * width, 2 * width, groups=4))
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


def acnet() -> RepNet:
    return RepNet(ACBlock)


def dbb() -> RepNet:
    return RepNet(DBBlock)


@dataclass(frozen=True)
class ZooEntry:
    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    description: str


ZOO: dict[str, ZooEntry] = {
    "resnet": ZooEntry(ResNetLike, (2, 3, 32, 32), "conv-BN-ReLU, residual adds, downsample branch"),
    "resnext": ZooEntry(lambda: ResNetLike(groups=4), (2, 3, 32, 32), "grouped 3x3 convs"),
    "mobilenet": ZooEntry(MobileNetLike, (2, 3, 32, 32), "depthwise convs, inverted residuals, dropout"),
    "decoder": ZooEntry(ConvTransposeDecoder, (2, 3, 16, 16), "ConvTranspose2d (grouped, biased) + BN"),
    "conv1d": ZooEntry(Conv1dNet, (2, 4, 32), "Conv1d, dilation, reflect padding"),
    "conv3d": ZooEntry(Conv3dNet, (2, 3, 8, 16, 16), "Conv3d, grouped, video-style"),
    "mlp": ZooEntry(MLPBN, (4, 20), "Linear-BN1d on 2D input, BN at the input, affine=False"),
    "tokens": ZooEntry(TokenMLP, (2, 6, 8), "Linear-BN1d on 3D tokens through transpose/reshape"),
    "preact": ZooEntry(PreActNet, (2, 3, 16, 16), "BN-ReLU-conv, BN-1x1 conv, BN after activation"),
    "shared": ZooEntry(SharedOutput, (2, 3, 16, 16), "conv output read by BN and a skip"),
    "reused": ZooEntry(ReusedConv, (2, 3, 16, 16), "one conv module called twice"),
    "subclass": ZooEntry(SubclassNet, (2, 3, 17, 17), "BN+act subclass, Conv2dSame, FrozenBN, SE gate"),
    "nobn": ZooEntry(NoBN, (2, 3, 16, 16), "no BatchNorm at all"),
    "acnet": ZooEntry(acnet, (2, 3, 32, 32), "ACNet blocks: 3x3 + 1x3 + 3x1 conv-BN branches summed"),
    "dbb": ZooEntry(dbb, (2, 3, 32, 32),
                    "Diverse Branch Blocks: kxk, 1x1, 1x1→kxk, 1x1→avg-pool and identity branches summed"),
}


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN non-trivial statistics and affine parameters, as after training."""
    g = torch.Generator().manual_seed(seed)
    from .layers import bn_modules

    with torch.no_grad():
        m: Any
        for _, m in bn_modules(model):
            c = m.running_mean.numel()
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.1)
            if getattr(m, "weight", None) is not None:
                m.weight.copy_(torch.randn(c, generator=g) * 0.5 + 1)
            if getattr(m, "bias", None) is not None:
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)
            if getattr(m, "num_batches_tracked", None) is not None:
                m.num_batches_tracked.fill_(100)
    return model


def build(name: str, seed: int = 0) -> nn.Module:
    """A zoo model with seeded weights and randomized BN statistics, in eval mode."""
    if name not in ZOO:
        raise KeyError(f"unknown zoo model {name!r}; choose from {', '.join(ZOO)}")
    torch.manual_seed(seed)
    return randomize_bn(ZOO[name].factory(), seed).eval()


def example_input(name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(ZOO[name].input_shape, generator=g).to(dtype)


# Factories importable with --arch, e.g. --arch bntool.zoo:resnet
def resnet(num_classes: int = 10, width: int = 16) -> nn.Module:
    return ResNetLike(num_classes=num_classes, width=width)


def mobilenet(num_classes: int = 10, width: int = 8) -> nn.Module:
    return MobileNetLike(num_classes=num_classes, width=width)
