"""Example 1 — domain shift (AdaBN): recalibrate BatchNorm on unlabeled data from the new domain.

A small CNN is trained on scikit-learn's handwritten digits (shipped with the package). The input domain
then shifts (brighter, lower contrast, noisy: another scanner). Accuracy drops; recalibrating the BN
statistics on unlabeled shifted images brings it back, without labels or training. The first table compares
bntool's modes with torch.optim.swa_utils.update_bn at several calibration batch sizes; the second adapts from
few images (4, 16, 64, all), with and without the source statistics as a prior (`prior=N`, Schneider et al.
2020), averaged over random draws of the calibration images.

    python examples/domain_shift.py [--plot shift.png] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits import accuracy, make_shift, train_digits_cnn  # noqa: E402

import bntool  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plot", type=Path, help="write a per-layer plot of the statistics shift (matplotlib)")
    parser.add_argument("--quick", action="store_true", help="train for fewer epochs")
    args = parser.parse_args()
    torch.set_num_threads(2)

    model, (x_train, _), (x_test, y_test) = train_digits_cnn(epochs=6 if args.quick else 15)
    calibration = make_shift(x_train)  # unlabeled images from the new domain
    shifted_test = make_shift(x_test, seed=1)
    clean, shifted = accuracy(model, x_test, y_test), accuracy(model, shifted_test, y_test)
    print(f"accuracy on clean test images:   {clean:.1%}")
    print(f"accuracy on shifted test images: {shifted:.1%}  (same model, new input domain)\n")

    print(f"{'calibration batch size':>24} | {'update_bn':>9} | {'cumulative':>10} | {'exact':>7}")
    best = None
    for bs in (1, 2, 8, 64):
        batches = list(calibration.split(bs))
        row = []
        for method in ("update_bn", "cumulative", "exact"):
            m = copy.deepcopy(model)
            try:
                if method == "update_bn":
                    torch.optim.swa_utils.update_bn(batches, m)
                    m.eval()
                else:
                    report = bntool.recalibrate(m, batches, mode=method)
                    if method == "exact" and bs == 64:
                        best = (m, report)
                row.append(f"{accuracy(m, shifted_test, y_test):.1%}")
            except (ValueError, bntool.BntoolError):  # BatchNorm1d cannot train on one sample
                row.append("fails")
        print(f"{bs:>24} | {row[0]:>9} | {row[1]:>10} | {row[2]:>7}")
    print("\n'exact' gives the same statistics at every batch size. Train-mode methods (update_bn, cumulative)"
          "\nnormalize each layer with per-batch statistics: they cannot run a batch of one sample (the last batch"
          "\nat batch sizes 1 and 2), and their statistics drift from the population's as batches shrink.")
    prior_table(model, x_train, x_test, y_test, args.quick)
    if args.plot and best is not None:
        from bntool.plot import plot_recalibration

        plot_recalibration(best[1], args.plot, title="Digits CNN: BN statistics after a domain shift")
        print(f"\nwrote {args.plot}")


SHIFTS = {"strong": {}, "mild": {"brightness": 0.2, "contrast": 0.85, "noise": 0.15}}


def prior_table(model, x_train, x_test, y_test, quick: bool) -> None:
    """Exact mode on n random calibration images, alone and blended with the source statistics as N samples."""
    sizes, priors, draws = ((4, 64), (0, 16), 2) if quick else ((4, 16, 64, len(x_train)), (0, 4, 16, 64), 10)
    for shift, params in SHIFTS.items() if not quick else [("strong", {})]:
        calibration, test = make_shift(x_train, **params), make_shift(x_test, seed=1, **params)
        print(f"\n{shift} shift (source statistics: {accuracy(model, test, y_test):.1%}); adapting from n images "
              f"(exact mode; mean accuracy over {draws} random draws)")
        print(f"{'n images':>10} | " + " | ".join(f"{'no prior' if p == 0 else f'prior N={p}':>11}" for p in priors))
        g = torch.Generator().manual_seed(0)
        for n in sizes:
            runs = draws if n < len(calibration) else 1
            totals = dict.fromkeys(priors, 0.0)
            for _ in range(runs):
                chosen = calibration[torch.randperm(len(calibration), generator=g)[:n]]
                for p in priors:
                    m = copy.deepcopy(model)
                    bntool.recalibrate(m, list(chosen.split(64)), mode="exact", prior=p)
                    totals[p] += accuracy(m, test, y_test) / runs
            label = f"{n} (all)" if n == len(calibration) else str(n)
            print(f"{label:>10} | " + " | ".join(f"{totals[p]:>11.1%}" for p in priors))


if __name__ == "__main__":
    main()
