"""Your architecture, as bntool imports it: `--arch my_models:build --arch-kwargs '{"num_classes": 5}'`.

Any importable callable that returns an nn.Module works: torchvision.models:resnet50, timm.create_model
wrapped in a function, a Lightning module's inner network...
"""

from torch import nn


def build(num_classes: int = 10, width: int = 16) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(2 * width, num_classes),
    )
