"""Example 2 — weight averaging (SWA) leaves stale BatchNorm statistics; recalibration fixes them.

As in PyTorch's SWA recipe, `AveragedModel` averages the weights of the last epochs at a high constant
learning rate. It does not average BN buffers (`use_buffers=False`, the default): it copies those of the
last model, which were measured on a network other than the averaged one. `bntool recalibrate` re-estimates
them on training images, from the command line as a user would run it; `update_bn` is shown beside it.

    python examples/weight_averaging.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel, update_bn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits import DigitsNet, accuracy, load_digits_tensors, train_epoch  # noqa: E402


def train_swa(epochs: int, swa_epochs: int, seed: int = 0):
    """SGD at a constant high learning rate; the weights of the last `swa_epochs` epochs are averaged."""
    torch.manual_seed(seed)
    (x, y), test = load_digits_tensors(seed)
    model = DigitsNet()
    swa_model = AveragedModel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    for epoch in range(epochs):
        train_epoch(model, opt, x, y, batch_size=32)
        if epoch >= epochs - swa_epochs:
            swa_model.update_parameters(model)
    return model.eval(), swa_model.module.eval(), (x, y), test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="train for fewer epochs (what the tests run)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    epochs, swa_epochs = (5, 3) if args.quick else (10, 5)
    last, averaged, (x_train, _), (x_test, y_test) = train_swa(epochs=epochs, swa_epochs=swa_epochs)
    print(f"last checkpoint:                       {accuracy(last, x_test, y_test):.1%}")
    print(f"averaged weights, stale BN statistics: {accuracy(averaged, x_test, y_test):.1%}")
    with_update_bn = copy.deepcopy(averaged)
    update_bn([x_train[i:i + 64] for i in range(0, len(x_train), 64)], with_update_bn)
    print(f"averaged weights, update_bn:           {accuracy(with_update_bn, x_test, y_test):.1%}")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.save({"state_dict": averaged.state_dict(), "epoch": epochs}, tmp / "swa.pt")
        torch.save(x_train, tmp / "train_images.pt")
        here = Path(__file__).resolve().parent
        cmd = [sys.executable, "-m", "bntool", "recalibrate", str(tmp / "swa.pt"), "--arch", "digits:DigitsNet",
               "--data", str(tmp / "train_images.pt"), "--mode", "exact", "-b", "64", "-o", str(tmp / "fixed.pt")]
        print("\n$ " + " ".join(cmd[2:]).replace(str(tmp) + "/", ""))
        subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(here)})
        fixed = DigitsNet()
        fixed.load_state_dict(torch.load(tmp / "fixed.pt")["state_dict"])
    print(f"\naveraged weights, recalibrated BN:     {accuracy(fixed, x_test, y_test):.1%}")


if __name__ == "__main__":
    main()
