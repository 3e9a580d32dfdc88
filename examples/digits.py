"""A small CNN on scikit-learn's handwritten digits (shipped inside the package: nothing is downloaded),
and the input-domain shift used by the examples and benchmarks. Needs the `examples` extra (scikit-learn)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DigitsNet(nn.Module):
    """conv-BN-ReLU ×3, then Linear-BN1d-ReLU-Dropout-Linear: both BN kinds, and dropout to keep off."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Linear(64, 64, bias=False), nn.BatchNorm1d(64), nn.ReLU(), nn.Dropout(0.3),
                                  nn.Linear(64, 10))

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def load_digits_tensors(seed: int = 0):
    """(x_train, y_train), (x_test, y_test): 16×16 upsampled digits standardized to mean 0, std 1."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=16, mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    split = int(0.8 * len(x))
    return (x[:split], y[:split]), (x[split:], y[split:])


def train_digits_cnn(epochs: int = 15, seed: int = 0):
    """Train DigitsNet briefly on CPU (a few seconds). Returns (model in eval mode, train, test)."""
    torch.manual_seed(seed)
    (x_train, y_train), test = load_digits_tensors(seed)
    model = DigitsNet()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        train_epoch(model, opt, x_train, y_train, batch_size=64)
    return model.eval(), (x_train, y_train), test


def train_epoch(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                batch_size: int) -> None:
    """One epoch of cross-entropy training over shuffled mini-batches."""
    model.train()
    for idx in torch.randperm(len(x)).split(batch_size):
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()


def make_shift(x: torch.Tensor, seed: int = 0, brightness: float = 0.8, contrast: float = 0.5,
               noise: float = 0.3) -> torch.Tensor:
    """A new input domain: brighter, lower contrast, noisy (a different camera or scanner)."""
    g = torch.Generator().manual_seed(seed)
    return x * contrast + brightness + noise * torch.randn(x.shape, generator=g)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model.eval()(x).argmax(1) == y).float().mean())
