"""Recalibration: throughput and peak memory vs the floor and vs torch.optim.swa_utils.update_bn, and the
accuracy each restores after a domain shift, by batch size.

    python benchmarks/bench_recalibrate.py [--quick] [--device cuda]

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
from common import setup_threads, show

VARIANTS = ("floor", "update_bn", "bntool cumulative", "bntool exact")
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
        report = recalibrate(model, data, mode=variant.split()[1], channels_last=memory_format == "channels_last")
        passes = report.passes
    sync()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"seconds": seconds, "peak_bytes": peak, "base_rss": base_rss * 1024, "passes": passes}


def measure(name, n_batches, batch, device, dtype, reps) -> dict[tuple[str, str], dict]:
    results = {}
    for memory_format in FORMATS:
        for variant in VARIANTS:
            if variant == "bntool exact" and memory_format != "contiguous":
                continue
            results[(memory_format, variant)] = best_of(name, variant, n_batches, batch, device, dtype,
                                                        memory_format, 1 if variant == "bntool exact" else reps)
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
    args = parser.parse_args()
    threads = setup_threads()
    batch = args.batch or (256 if args.device == "cuda" else 16)
    n_batches = 2 if args.quick else 4
    reps = 1 if args.quick else 3
    dtype = getattr(torch, args.dtype)
    rows = []
    for name in args.models:
        r = measure(name, n_batches, batch, args.device, dtype, reps)
        for (memory_format, variant), v in r.items():
            floor = r[(memory_format, "floor")]
            rows.append([name, memory_format, variant, f"{v['seconds']:.2f}", f"{v['seconds'] / floor['seconds']:.2f}×",
                         f"{n_batches * batch * v['passes'] / v['seconds']:.0f}" if variant != "floor" else
                         f"{n_batches * batch / v['seconds']:.0f}", v["passes"],
                         f"{v['peak_bytes'] / 2**20:.0f}", f"{v['peak_bytes'] / floor['peak_bytes']:.2f}×"])
        print(f"{name}: done", flush=True)
    where = f"{args.device}, {args.dtype}, batch {batch} x {n_batches}, {threads} threads" if args.device == "cpu" \
        else f"{args.device}, {args.dtype}, batch {batch} x {n_batches}"
    show(f"Recalibration cost ({where}, best of {reps})",
         ["model", "layout", "method", "seconds", "time / floor", "samples/s (all passes)", "passes", "peak MiB",
          "peak / floor"], rows, f"recalibrate_speed_{args.device}",
         notes="Peak is the process's max RSS on CPU (model, data and interpreter included), "
               "torch.cuda.max_memory_allocated on CUDA. The floor of each layout is an eval forward in that layout; "
               "`exact` is measured once (in NCHW).")
    if not args.skip_quality:
        quality_table(args.quick)


if __name__ == "__main__":
    main()
