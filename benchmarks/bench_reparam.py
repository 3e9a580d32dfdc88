"""Branch merging (structural re-parameterisation): bntool's fold with and without merging vs timm's own
`reparameterize_model`, on timm's re-parameterisable models and on the zoo's ACNet and DBB blocks.

    python benchmarks/bench_reparam.py [--quick] [--only repvgg_a0 ...]

Random weights with BN statistics measured on random inputs (then γ/β randomized), one thread, batch 1, 128²,
the variants interleaved in one loop (medians). Layers: conv + linear modules. Error: max |Δ| against the
original run in float64, next to the float32 floor (the original in float32 against the same reference).
"""

from __future__ import annotations

import argparse
import copy

import archs
import torch
from common import fmt_ratio, interleaved_times, show
from torch import nn

from bntool import zoo
from bntool.folding import fold
from bntool.recalibration import recalibrate
from bntool.zoo import randomize_bn

TIMM = ["repvgg_a0", "mobileone_s0", "fastvit_t8", "repvit_m1", "repghostnet_050"]
ZOO = ["acnet", "dbb"]
SHAPE = (1, 3, 128, 128)


def layers(model: nn.Module) -> int:
    return sum(isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) for m in model.modules())


def build(name: str) -> nn.Module:
    """Random weights, BN statistics measured on random inputs, then γ/β randomized (as archs.build)."""
    torch.manual_seed(0)
    if name in ZOO:
        model = zoo.ZOO[name].factory()
    else:
        import timm

        model = timm.create_model(name, pretrained=False)
    model = randomize_bn(model).eval()
    recalibrate(model, [torch.randn((4, *SHAPE[1:]), generator=torch.Generator().manual_seed(100))],
                mode="cumulative")
    return model.eval()


def timm_reparameterized(model: nn.Module) -> nn.Module | None:
    try:
        from timm.utils.model import reparameterize_model
    except ImportError:
        return None
    return reparameterize_model(copy.deepcopy(model))


def error(model: nn.Module, x: torch.Tensor, reference: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).double() - reference).abs().max())


def measure(name: str, reps: int) -> list:
    model = build(name)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    plain, plain_report = fold(model, x, merge=False)
    merged, report = fold(model, x)
    variants = {"unfolded": model, "folded": plain, "merged": merged}
    own = timm_reparameterized(model) if name not in ZOO else None
    if own is not None:
        variants["timm"] = own
    with torch.no_grad():
        reference = copy.deepcopy(model).double()(x.double())
    errors = {k: error(m, x, reference) for k, m in variants.items()}
    with torch.inference_mode():
        t = interleaved_times({k: (lambda m=m: m(x)) for k, m in variants.items()}, reps=reps, warmup=3)
    ms = {k: f"{v * 1e3:.1f}" for k, v in t.items()}
    slowest_fold = max(t["folded"], t["merged"]) / t["unfolded"]
    merges = f"{sum(d.merged for d in report.merges)}/{len(report.merges)}"
    return [name, ms["unfolded"], ms["folded"], ms["merged"], ms.get("timm", "-"),
            f"{layers(model)} / {layers(plain)} / {layers(merged)} / {layers(own) if own is not None else '-'}",
            merges, fmt_ratio(t["merged"] / t["timm"]) if own is not None else "-",
            fmt_ratio(t["folded"] / t["unfolded"]), fmt_ratio(t["merged"] / t["unfolded"]),
            "yes" if slowest_fold <= 1.0 else f"≈ ({slowest_fold:.2f}×, timing noise)" if slowest_fold <= 1.03
            else f"NO ({slowest_fold:.2f}×)",
            f"{errors['merged']:.1e}", f"{errors['unfolded']:.1e}", f"{report.fold_seconds:.1f} s"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer timing repetitions")
    parser.add_argument("--only", nargs="*", help="model names")
    args = parser.parse_args()
    have_timm = archs.have_timm()
    names = args.only or [*(TIMM if have_timm else []), *ZOO]
    torch.set_num_threads(1)
    reps = 10 if args.quick else 30
    rows = []
    for name in names:
        rows.append(measure(name, reps))
        print(f"{name}: done", flush=True)
    show(f"Branch merging vs timm's reparameterize_model: eager CPU latency at batch 1, 128², 1 thread "
         f"(median of {reps}, interleaved)",
         ["model", "unfolded ms", "folded, no merge ms", "folded + merged ms", "timm reparameterize_model ms",
          "conv+linear layers: unfolded / folded / merged / timm", "sums merged", "merged / timm",
          "folded / unfolded", "merged / unfolded", "folded never slower than unfolded",
          "merged max error vs fp64", "float32 floor (original vs fp64)", "fold time"],
         rows, "reparam",
         notes="acnet and dbb are the zoo's ACNet (3×3 + 1×3 + 3×1) and DBB (k×k, 1×1, 1×1→k×k, 1×1→avg-pool, "
               "identity) blocks, which no library re-parameterises. 'sums merged': merged / sums of branches found.")


if __name__ == "__main__":
    main()
