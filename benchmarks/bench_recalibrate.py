"""Recalibration: throughput and peak memory vs the floor and vs torch.optim.swa_utils.update_bn, and the
accuracy each restores after a domain shift, by batch size; exact mode's segment cache: its time per eval pass
and its statistics against whole-forward level passes on every architecture of the fold benchmark.

    python benchmarks/bench_recalibrate.py [--quick] [--device cuda] [--uncached-exact]

Floor: an eval-mode forward under torch.inference_mode over the same batches (nothing can be cheaper: the
statistics need at least one forward). Each variant runs in its own process so peak RSS is its own.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import time

import archs
import torch
from common import RESULTS, median_time, setup_threads, show

VARIANTS = ("floor", "update_bn", "bntool cumulative", "bntool exact")
# exact mode before the segment cache (one whole forward per BN level), measured with this benchmark on this
# machine at commit a07acf1 (README of 2026-11-25): time / floor. --uncached-exact measures it again.
EXACT_BEFORE = {"resnet50": "36.21×", "mobilenet_v2": "44.87×", "efficientnet_b0": "46.30×"}
# Train-mode BatchNorm (what update_bn and cumulative mode run) is several times faster on CPU in channels_last
# than in NCHW, so both layouts are measured, each against the floor in the same layout. `exact` runs eval-mode
# forwards like the floor; it is measured once, in NCHW.
FORMATS = ("contiguous", "channels_last")


def batches_for(shape, n_batches, batch, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((batch, *shape[1:]), generator=g).to(device) for _ in range(n_batches)]


def run_variant(name, variant, n_batches, batch, device, dtype, memory_format) -> dict:
    """One measurement in this (fresh) process: seconds and peak RSS / CUDA memory."""
    from bntool.recalibration import recalibrate

    setup_threads()
    model, x = archs.build(name, calibrate=False)
    fmt = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}[memory_format]
    model = model.to(device=device, dtype=dtype, memory_format=fmt)
    data = [b.to(dtype).contiguous(memory_format=fmt) for b in batches_for(x.shape, n_batches, batch, device)]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.inference_mode():
        model(data[0])  # warm-up (kernel selection), same for every variant
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    passes = 1
    if variant == "floor":
        with torch.inference_mode():
            for b in data:
                model(b)
    elif variant == "update_bn":
        torch.optim.swa_utils.update_bn(data, model)
    else:
        report = recalibrate(model, data, mode=variant.split()[1], channels_last=memory_format == "channels_last",
                             cache_budget=0 if variant.endswith("(no cache)") else None)
        passes = report.passes
    sync()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    out = {"seconds": seconds, "peak_bytes": peak, "base_rss": base_rss * 1024, "passes": passes}
    if variant.startswith("bntool"):
        out.update(replays=report.segment_replays, cache_peak=report.cache_peak_bytes, note=report.cache_note)
    return out


def measure(name, n_batches, batch, device, dtype, reps, uncached_exact=False) -> dict[tuple[str, str], dict]:
    results = {}
    for memory_format in FORMATS:
        for variant in VARIANTS + (("bntool exact (no cache)",) if uncached_exact else ()):
            if variant.startswith("bntool exact") and memory_format != "contiguous":
                continue
            results[(memory_format, variant)] = best_of(name, variant, n_batches, batch, device, dtype, memory_format,
                                                        1 if variant == "bntool exact (no cache)" else reps)
    return results


def best_of(name, variant, n_batches, batch, device, dtype, memory_format, reps) -> dict:
    """Fastest of `reps` runs, each in a fresh process (so peak memory is the variant's own)."""
    runs = []
    for _ in range(reps):
        out = subprocess.run([sys.executable, __file__, "--child", name, variant, str(n_batches), str(batch),
                              device, str(dtype).replace("torch.", ""), memory_format], capture_output=True,
                             text=True)
        if out.returncode:
            raise RuntimeError(out.stderr[-2000:])
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    best = min(runs, key=lambda r: r["seconds"])
    best["peak_bytes"] = min(r["peak_bytes"] for r in runs)
    return best


# ---------------------------------------------------------------- quality


def quality_table(quick: bool) -> None:
    """A small CNN trained on scikit-learn's digits; the input domain shifts (brightness, contrast, noise);
    recalibration on unlabeled shifted data restores accuracy. bntool vs update_bn, by batch size."""
    from digits import make_shift, train_digits_cnn

    from bntool.recalibration import recalibrate

    model, (x_train, _), (x_test, y_test) = train_digits_cnn(epochs=8 if quick else 15)
    shifted_cal, shifted_test = make_shift(x_train), make_shift(x_test, seed=1)

    def accuracy(m, x):
        with torch.no_grad():
            return float((m(x).argmax(1) == y_test).float().mean())

    rows = [["(no recalibration)", f"{accuracy(model, x_test):.1%}", f"{accuracy(model, shifted_test):.1%}",
             "", "", ""]]
    for bs in (1, 2, 8, 64):
        cal = list(shifted_cal.split(bs))
        accs = {}
        for variant in ("update_bn", "cumulative", "exact"):
            m = copy.deepcopy(model)
            if variant == "update_bn":
                try:
                    torch.optim.swa_utils.update_bn(cal, m)
                except ValueError:  # BatchNorm1d with one value per channel
                    accs[variant] = "fails"
                    continue
            else:
                try:
                    recalibrate(m, cal, mode=variant)
                except Exception:
                    accs[variant] = "fails"
                    continue
            accs[variant] = f"{accuracy(m, shifted_test):.1%}"
        rows.append([f"batch size {bs}", "", "", accs["update_bn"], accs["cumulative"], accs["exact"]])
    show("Accuracy on shifted digits (scikit-learn) after recalibrating on unlabeled shifted data",
         ["calibration", "clean test", "shifted test", "update_bn", "bntool cumulative", "bntool exact"], rows,
         "recalibrate_quality",
         notes="Shift: brightness +0.8, contrast x0.5, Gaussian noise 0.3 (inputs standardized). "
               f"{len(shifted_cal)} calibration images, {len(shifted_test)} test images.")


def exact_table(results: dict, n_batches: int, batch: int, where: str) -> None:
    """Exact mode with the segment cache vs without, as multiples of one eval pass (the floor)."""
    rows = []
    for name, r in results.items():
        floor, exact = r[("contiguous", "floor")], r[("contiguous", "bntool exact")]
        uncached = r.get(("contiguous", "bntool exact (no cache)"))
        before = (f"{uncached['seconds'] / floor['seconds']:.2f}×" if uncached else
                  f"{EXACT_BEFORE[name]} (a07acf1)" if name in EXACT_BEFORE else "-")
        rows.append([name, f"{floor['seconds']:.2f}", f"{exact['seconds']:.2f}",
                     f"{exact['seconds'] / floor['seconds']:.2f}×", before, exact["passes"], exact["replays"],
                     f"{exact['cache_peak'] / 2**20:.0f}", f"{n_batches * batch * 4 * 224 * 224 * 3 / 2**20:.0f}"])
    show(f"Exact mode with the segment cache ({where})",
         ["model", "floor s", "exact s", "exact / floor", "before: no cache / floor", "passes", "segment replays",
          "peak cache MiB", "input MiB"], rows, "recalibrate_exact",
         notes="Target ≤ 5×. One pass per BN level as before, but each starts from the last cached final "
               "activation before its level; `before` is one whole forward per level (cache_budget=0).")


def equivalence_table() -> None:
    """Every architecture of the fold benchmark: exact statistics with the cache vs one whole forward per level."""
    from bntool.recalibration import recalibrate

    rows = []
    for name, (_, shape) in archs.architectures().items():
        model, _ = archs.build(name, calibrate=False)
        side = max(64, shape[-1] // 3)  # small images: fast level passes (Inception needs at least 75)
        small = (shape[0], *shape[1:-2], side, side) if len(shape) >= 4 else shape
        g = torch.Generator().manual_seed(1)
        data = [torch.randn((3, *small[1:]), generator=g) * 1.5 + 0.2 for _ in range(2)]
        plain, cached = copy.deepcopy(model), copy.deepcopy(model)
        old = recalibrate(plain, data, mode="exact", cache_budget=0)
        new = recalibrate(cached, data, mode="exact")
        worst = 0.0
        bns = [(a, b) for a, b in zip(plain.modules(), cached.modules())
               if isinstance(a, torch.nn.modules.batchnorm._BatchNorm)]
        for a, b in bns:
            scale = a.running_var.double().sqrt().clamp_min(1e-12)
            worst = max(worst, float(((a.running_mean.double() - b.running_mean.double()).abs() / scale).max()),
                        float(((a.running_var.double() - b.running_var.double()).abs()
                               / a.running_var.double().clamp_min(1e-30)).max()))
        rows.append([name, "x".join(map(str, small[1:])), len(bns), new.passes, new.segment_replays,
                     f"{old.seconds:.2f}", f"{new.seconds:.2f}", f"{worst:.1e}"])
        print(f"{name}: max relative difference {worst:.1e}, {new.segment_replays} replays", flush=True)
    show("Exact statistics with the segment cache vs whole-forward level passes (2 batches of 3)",
         ["model", "input", "BNs", "passes", "segment replays", "s, no cache", "s, cache",
          "max relative difference"], rows, "recalibrate_exact_equivalence",
         notes="Relative difference: |Δmean|/σ and |Δvar|/var, the worst over every channel of every BN "
               "(target ≤ 1e-6).")


def _bn_kernels(name: str, batch: int, reps: int) -> tuple[float, list[tuple]]:
    """(eval pass seconds, per BN layer: name, input shape, eval / train / var_mean+eval kernel seconds)."""
    import torch.nn.functional as F

    model, x = archs.build(name, calibrate=False)
    data = torch.randn((batch, *x.shape[1:]), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model(data)
        floor = median_time(lambda: model(data), reps)
    per_layer = []

    def probe(module, args, bn_name):
        x = args[0]
        mean, var, w, b, eps = module.running_mean.clone(), module.running_var.clone(), module.weight, module.bias, \
            module.eps
        dims = [0, *range(2, x.dim())]

        def fused():
            v, m = torch.var_mean(x, dim=dims, correction=0)
            F.batch_norm(x, m, v, w, b, False, 0.0, eps)

        per_layer.append((bn_name, tuple(x.shape[1:]),
                          median_time(lambda: F.batch_norm(x, mean, var, w, b, False, 0.0, eps), reps),
                          median_time(lambda: F.batch_norm(x, mean.clone(), var.clone(), w, b, True, 1.0, eps), reps),
                          median_time(fused, reps)))

    handles = [m.register_forward_pre_hook(lambda mod, a, n=n: probe(mod, a, n))
               for n, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    with torch.inference_mode():
        model(data)
    for h in handles:
        h.remove()
    return floor, per_layer


def bn_kernel_profile(models, batch: int, reps: int = 3) -> None:
    """Why cumulative mode costs more than an eval pass on CPU: per BN layer, on its real input (one batch),
    the eval kernel (what the floor runs), the train kernel (cumulative, update_bn) and the cheapest exact
    alternative we found (one fused var_mean reduction + the eval kernel with those statistics)."""
    rows, layers = [], {}
    for name in models:
        floor, per_layer = _bn_kernels(name, batch, reps)
        layers[name] = per_layer
        ev, tr, fu = (sum(p[i] for p in per_layer) for i in (2, 3, 4))
        best = sum(min(p[3], p[4]) for p in per_layer)
        rows.append([name, f"{floor * 1e3:.0f}", f"{ev * 1e3:.0f} ({ev / floor:.0%})", f"{tr * 1e3:.0f}",
                     f"{fu * 1e3:.0f}", f"{tr / ev:.2f}×", f"{1 + (tr - ev) / floor:.2f}×",
                     f"{1 + (best - ev) / floor:.2f}×"])
        worst = sorted(per_layer, key=lambda p: p[3] - p[2], reverse=True)[:5]
        print(f"{name}: layers where train-mode BN costs most over eval: " + "; ".join(
            f"{n} {'x'.join(map(str, shape))} eval {e * 1e3:.1f} ms train {t * 1e3:.1f} ms fused {f * 1e3:.1f} ms"
            for n, shape, e, t, f in worst), flush=True)
    show(f"Why cumulative costs more than an eval pass: BatchNorm kernels per layer (cpu, batch {batch}, "
         f"median of {reps})",
         ["model", "eval pass ms", "Σ eval BN ms (share)", "Σ train BN ms", "Σ var_mean+eval ms",
          "train / eval BN", "bound: train kernel", "bound: best per layer"], rows, "recalibrate_bn_kernels",
         notes="Each layer's kernels timed on its real input inside one forward. A bound is the eval pass plus "
               "what replacing each eval BN kernel costs extra (no hooks, no pooling): the least any train-mode "
               "method can take. `best per layer` takes the cheaper of the two exact routes for every layer.")
    (RESULTS / "recalibrate_bn_kernels_layers.json").write_text(json.dumps(
        {name: [list(p) for p in per] for name, per in layers.items()}, indent=1))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        name, variant, n, b, device, dtype, memory_format = sys.argv[2:9]
        print(json.dumps(run_variant(name, variant, int(n), int(b), device, getattr(torch, dtype), memory_format)))
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--models", nargs="*", default=["resnet50", "mobilenet_v2", "efficientnet_b0"])
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--uncached-exact", action="store_true", help="also time exact mode without its cache")
    parser.add_argument("--only-exact", action="store_true", help="only the exact-mode tables")
    parser.add_argument("--only-kernels", action="store_true", help="only the BN kernel profile")
    args = parser.parse_args()
    threads = setup_threads()
    if args.only_kernels:
        bn_kernel_profile(args.models, args.batch or 16)
        return
    batch = args.batch or (256 if args.device == "cuda" else 16)
    n_batches = 2 if args.quick else 4
    reps = 1 if args.quick else 3
    dtype = getattr(torch, args.dtype)
    rows = []
    everything = {}
    if args.only_exact:
        global VARIANTS, FORMATS
        VARIANTS, FORMATS = ("floor", "bntool exact"), ("contiguous",)
    for name in args.models:
        r = everything[name] = measure(name, n_batches, batch, args.device, dtype, reps, args.uncached_exact)
        for (memory_format, variant), v in r.items():
            floor = r[(memory_format, "floor")]
            rows.append([name, memory_format, variant, f"{v['seconds']:.2f}", f"{v['seconds'] / floor['seconds']:.2f}×",
                         f"{n_batches * batch * v['passes'] / v['seconds']:.0f}" if variant != "floor" else
                         f"{n_batches * batch / v['seconds']:.0f}", v["passes"],
                         f"{v['peak_bytes'] / 2**20:.0f}", f"{v['peak_bytes'] / floor['peak_bytes']:.2f}×"])
        print(f"{name}: done", flush=True)
    where = f"{args.device}, {args.dtype}, batch {batch} x {n_batches}, {threads} threads" if args.device == "cpu" \
        else f"{args.device}, {args.dtype}, batch {batch} x {n_batches}"
    exact_table(everything, n_batches, batch, where)
    if args.only_exact:
        equivalence_table()
        return
    show(f"Recalibration cost ({where}, best of {reps})",
         ["model", "layout", "method", "seconds", "time / floor", "samples/s (all passes)", "passes", "peak MiB",
          "peak / floor"], rows, f"recalibrate_speed_{args.device}",
         notes="Peak is the process's max RSS on CPU (model, data and interpreter included), "
               "torch.cuda.max_memory_allocated on CUDA. The floor of each layout is an eval forward in that layout; "
               "`exact` is measured once (in NCHW).")
    equivalence_table()
    if args.device == "cpu":
        bn_kernel_profile(args.models, batch)
    if not args.skip_quality:
        quality_table(args.quick)


if __name__ == "__main__":
    main()
