"""Architectures for the benchmarks: torchvision's when it is installed (random weights, nothing downloaded),
otherwise faithful replicas of the same building blocks, built here in code."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from bntool.zoo import randomize_bn


def have_torchvision() -> bool:
    try:
        import torchvision  # noqa: F401
    except RuntimeError as e:
        # PyPI's torchvision wheels carry C++ ops built against CUDA torch. On a CPU torch they do not load,
        # and importing torchvision fails on declaring nms. The model definitions need none of those ops:
        # declare the two schemas its import touches, then import the pure-Python models.
        if "torchvision::nms" not in str(e):
            return False
        _declare_torchvision_op_schemas()
        try:
            import torchvision  # noqa: F401, F811
        except Exception:
            return False
    except Exception:
        return False
    return True


_SCHEMAS = None


def _declare_torchvision_op_schemas() -> None:
    global _SCHEMAS
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    if _SCHEMAS is None:
        _SCHEMAS = torch.library.Library("torchvision", "DEF")  # kept alive: dropping it removes the schemas
        for op in ("nms", "qnms"):
            _SCHEMAS.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


# ---------------------------------------------------------------- replicas


def cbr(cin, cout, k=1, s=1, g=1, act=nn.ReLU):
    layers = [nn.Conv2d(cin, cout, k, s, k // 2, groups=g, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act(inplace=True) if act in (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish) else act())
    return nn.Sequential(*layers)


class Bottleneck(nn.Module):
    def __init__(self, cin, width, stride, groups=1):
        super().__init__()
        cout = width * 4 if groups == 1 else width * 2
        self.body = nn.Sequential(cbr(cin, width), cbr(width, width, 3, stride, groups),
                                  cbr(width, cout, act=None))
        self.down = cbr(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else None

    def forward(self, x):
        return F.relu(self.body(x) + (x if self.down is None else self.down(x)))


class ResNet(nn.Module):
    def __init__(self, blocks=(3, 4, 6, 3), groups=1, base=64):
        super().__init__()
        self.stem = nn.Sequential(cbr(3, 64, 7, 2), nn.MaxPool2d(3, 2, 1))
        layers, cin = [], 64
        for i, n in enumerate(blocks):
            width = base * 2**i
            for j in range(n):
                layers.append(Bottleneck(cin, width, 2 if j == 0 and i > 0 else 1, groups))
                cin = layers[-1].body[2][0].out_channels
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, 1000)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))


class SE(nn.Module):
    def __init__(self, c, r):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, r, 1), nn.Conv2d(r, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(F.silu(self.fc1(x.mean((2, 3), keepdim=True)))))


class MBConv(nn.Module):
    def __init__(self, cin, cout, expand, k, stride, act=nn.SiLU, se=True):
        super().__init__()
        hidden = cin * expand
        layers = [cbr(cin, hidden, act=act)] if expand != 1 else []
        layers += [cbr(hidden, hidden, k, stride, hidden, act=act)]
        if se:
            layers.append(SE(hidden, max(1, cin // 4)))
        layers.append(cbr(hidden, cout, act=None))
        self.block = nn.Sequential(*layers)
        self.res = stride == 1 and cin == cout

    def forward(self, x):
        y = self.block(x)
        return x + y if self.res else y


def efficientnet_b0():
    cfg = [(1, 16, 1, 3, 1), (6, 24, 2, 3, 2), (6, 40, 2, 5, 2), (6, 80, 3, 3, 2), (6, 112, 3, 5, 1),
           (6, 192, 4, 5, 2), (6, 320, 1, 3, 1)]
    layers, cin = [cbr(3, 32, 3, 2, act=nn.SiLU)], 32
    for e, c, n, k, s in cfg:
        for i in range(n):
            layers.append(MBConv(cin, c, e, k, s if i == 0 else 1))
            cin = c
    layers.append(cbr(cin, 1280, act=nn.SiLU))
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(1280, 1000))


def mobilenet_v2():
    cfg = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
    layers, cin = [cbr(3, 32, 3, 2, act=nn.ReLU6)], 32
    for e, c, n, s in cfg:
        for i in range(n):
            layers.append(MBConv(cin, c, e, 3, s if i == 0 else 1, act=nn.ReLU6, se=False))
            cin = c
    layers.append(cbr(cin, 1280, act=nn.ReLU6))
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(1280, 1000))


class DenseLayer(nn.Module):
    """Pre-activation: BN → ReLU → 1×1 conv → BN → ReLU → 3×3 conv, outputs concatenated."""

    def __init__(self, cin, growth=32):
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, 4 * growth, 1, bias=False)
        self.norm2, self.conv2 = nn.BatchNorm2d(4 * growth), nn.Conv2d(4 * growth, growth, 3, 1, 1, bias=False)

    def forward(self, x):
        y = self.conv2(F.relu(self.norm2(self.conv1(F.relu(self.norm1(x))))))
        return torch.cat([x, y], 1)


def densenet(blocks=(6, 12, 24, 16)):
    layers, c = [cbr(3, 64, 7, 2), nn.MaxPool2d(3, 2, 1)], 64
    for i, n in enumerate(blocks):
        for _ in range(n):
            layers.append(DenseLayer(c))
            c += 32
        if i < len(blocks) - 1:
            layers += [nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2)]
            c //= 2
    return nn.Sequential(*layers, nn.BatchNorm2d(c), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(c, 1000))


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 unit: split, branch, concat, channel shuffle (view/transpose/view)."""

    def __init__(self, c):
        super().__init__()
        h = c // 2
        self.branch = nn.Sequential(cbr(h, h), cbr(h, h, 3, 1, h, act=None), cbr(h, h))

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        out = torch.cat([a, self.branch(b)], 1)
        n, c, hh, w = out.shape
        return out.view(n, 2, c // 2, hh, w).transpose(1, 2).reshape(n, c, hh, w)


def shufflenet():
    return nn.Sequential(cbr(3, 116, 3, 2), *[ShuffleUnit(116) for _ in range(4)], nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(116, 1000))


def r3d():
    def c3(cin, cout, s=1):
        return nn.Sequential(nn.Conv3d(cin, cout, 3, s, 1, bias=False), nn.BatchNorm3d(cout), nn.ReLU(inplace=True))
    return nn.Sequential(c3(3, 64), c3(64, 64), c3(64, 128, 2), c3(128, 128), c3(128, 256, 2),
                         nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(256, 400))


class SegHead(nn.Module):
    """FCN-style: backbone, ASPP-like parallel branches, concat, ConvTranspose upsampling with BN."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(cbr(3, 64, 3, 2), cbr(64, 128, 3, 2), cbr(128, 256, 3, 2))
        self.branches = nn.ModuleList([cbr(256, 64), cbr(256, 64, 3), cbr(256, 64, 3)])
        self.project = cbr(192, 128)
        self.up = nn.Sequential(nn.ConvTranspose2d(128, 64, 4, 2, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                nn.ConvTranspose2d(64, 32, 4, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.classify = nn.Conv2d(32, 21, 1)

    def forward(self, x):
        f = self.backbone(x)
        return self.classify(self.up(self.project(torch.cat([b(f) for b in self.branches], 1))))


class TokenBN(nn.Module):
    """A token MLP (LeViT/ConvMixer-style): Linear with BatchNorm1d over (B·L, C) and over (B, C, L)."""

    def __init__(self, dim=384, depth=8, tokens=196):
        super().__init__()
        self.embed = nn.Linear(768, dim)
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            self.blocks.append(nn.ModuleDict({"fc1": nn.Linear(dim, 2 * dim), "bn1": nn.BatchNorm1d(2 * dim),
                                              "fc2": nn.Linear(2 * dim, dim), "bn2": nn.BatchNorm1d(dim)}))
        self.head = nn.Linear(dim, 1000)

    def forward(self, x):  # (B, L, 768)
        x = self.embed(x)
        for blk in self.blocks:
            b, n, c = x.shape
            y = F.gelu(blk["bn1"](blk["fc1"](x).flatten(0, 1))).view(b, n, -1)
            y = blk["bn2"](blk["fc2"](y).transpose(1, 2)).transpose(1, 2)
            x = x + y
        return self.head(x.mean(1))


# ---------------------------------------------------------------- the list


def architectures(full: bool = True) -> dict[str, tuple]:
    """name → (factory, input shape). torchvision's models when importable, replicas otherwise."""
    if have_torchvision():
        from torchvision import models

        table = {
            "resnet50": (models.resnet50, (1, 3, 224, 224)),
            "resnext50_32x4d": (models.resnext50_32x4d, (1, 3, 224, 224)),
            "mobilenet_v2": (models.mobilenet_v2, (1, 3, 224, 224)),
            "mobilenet_v3_large": (models.mobilenet_v3_large, (1, 3, 224, 224)),
            "efficientnet_b0": (models.efficientnet_b0, (1, 3, 224, 224)),
            "regnet_y_400mf": (models.regnet_y_400mf, (1, 3, 224, 224)),
            "densenet121": (models.densenet121, (1, 3, 224, 224)),
            "inception_v3": (lambda: models.inception_v3(init_weights=False, aux_logits=False), (1, 3, 299, 299)),
            "shufflenet_v2_x1_0": (models.shufflenet_v2_x1_0, (1, 3, 224, 224)),
            "r3d_18": (models.video.r3d_18, (1, 3, 8, 112, 112)),
            "fcn_resnet50": (lambda: models.segmentation.fcn_resnet50(weights_backbone=None, aux_loss=False),
                             (1, 3, 224, 224)),
            "deeplabv3_mobilenet": (lambda: models.segmentation.deeplabv3_mobilenet_v3_large(
                weights_backbone=None, aux_loss=False), (1, 3, 224, 224)),
            "token_mlp_bn1d": (TokenBN, (1, 196, 768)),
        }
    else:
        table = {
            "resnet50": (ResNet, (1, 3, 224, 224)),
            "resnext50_32x4d": (lambda: ResNet(groups=32, base=128), (1, 3, 224, 224)),
            "mobilenet_v2": (mobilenet_v2, (1, 3, 224, 224)),
            "efficientnet_b0": (efficientnet_b0, (1, 3, 224, 224)),
            "densenet121": (densenet, (1, 3, 224, 224)),
            "shufflenet_v2": (shufflenet, (1, 3, 224, 224)),
            "r3d": (r3d, (1, 3, 8, 112, 112)),
            "seg_head": (SegHead, (1, 3, 224, 224)),
            "token_mlp_bn1d": (TokenBN, (1, 196, 768)),
        }
    return table


# timm models (when timm imports): its BN+act layers (BatchNormAct2d), mixed-kernel concats, LeViT's
# Linear+BN1d. (name, input shape): the latency figures of the fold issue are at 128², LeViT needs 224².
TIMM_MODELS = {"efficientnet_b0": (1, 3, 128, 128), "mobilenetv3_large_100": (1, 3, 128, 128),
               "resnet50d": (1, 3, 128, 128), "mixnet_m": (1, 3, 128, 128), "levit_128s": (1, 3, 224, 224)}


def have_timm() -> bool:
    if not have_torchvision():  # timm imports torchvision
        return False
    try:
        import timm  # noqa: F401
    except Exception:
        return False
    return True


def timm_architectures() -> dict[str, tuple]:
    """'timm/name' → (factory, input shape), random weights; empty without timm."""
    if not have_timm():
        return {}
    import timm

    return {f"timm/{n}": (lambda n=n: timm.create_model(n, pretrained=False), shape)
            for n, shape in TIMM_MODELS.items()}


class OutputOnly(nn.Module):
    """Segmentation models return dicts; the baselines' tracers want a tensor."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(x)
        return out["out"] if isinstance(out, dict) else out


def build(name: str, seed: int = 0, calibrate: bool = True) -> tuple[nn.Module, torch.Tensor]:
    """Random weights; BN statistics measured on random inputs (as after training, the statistics match the
    data: random statistics make outputs that are mostly cancellation noise), then γ/β randomized."""
    from bntool.recalibration import recalibrate

    factory, shape = {**architectures(), **timm_architectures()}[name]
    torch.manual_seed(seed)
    model = OutputOnly(randomize_bn(factory(), seed)).eval()
    g = torch.Generator().manual_seed(seed + 100)
    if calibrate:
        recalibrate(model, [torch.randn((4, *shape[1:]), generator=g)], mode="cumulative")
    return model, torch.randn(shape, generator=torch.Generator().manual_seed(seed))
