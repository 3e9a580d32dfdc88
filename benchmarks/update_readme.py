"""Write the saved benchmark tables (benchmarks/results/*.json) into docs/benchmarks.md between its markers.

    python benchmarks/update_readme.py
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PAGE = ROOT / "docs" / "benchmarks.md"  # the README links to it and keeps the headline figures
START, END = "<!-- benchmarks:start -->", "<!-- benchmarks:end -->"

# (result file, what the table answers), in the order a reader meets the commands.
TABLES = [
    ("startup", "`bntool --help` must not pay for importing torch"),
    ("fold_coverage", "batch_norm ops left per forward, bntool vs `torch.fx` fuse and `torch.jit.freeze`; error vs a "
                      "float64 reference, folded/unfolded (target ≤ 1.5); time to fold (target < 2 s for ResNet-50)"),
    ("fold_zoo", "the cases the baselines miss: BN subclasses, pre-activation, token models, shared outputs"),
    ("fold_affines", "BNs that stay exact per-channel affines, and why (regressions show here)"),
    ("fold_speed", "eager CPU latency: folded vs unfolded vs the floor (every BN deleted)"),
    ("fold_speed_timm", "timm's BN+act models (BatchNormAct2d), one thread: folded vs unfolded vs the floor that "
                        "deletes only the BN math (target: folded within 1.03× of the floor, never slower than "
                        "unfolded)"),
    ("reparam", "branch merging: fold without and with merging vs timm's own `reparameterize_model`, side by side "
                "(target: no more layers than timm, latency within 1.05× of it, error within the float32 floor; "
                "folded never slower than unfolded)"),
    ("recalibrate_speed_cpu", "recalibration cost vs the floor (an eval forward under inference_mode over the same "
                              "data) and vs `update_bn` (target ≤ 1.10× the floor's time and peak memory)"),
    ("recalibrate_exact", "exact mode with its segment cache, as a multiple of one eval pass (target ≤ 5×), next "
                          "to the figures before the cache"),
    ("recalibrate_exact_equivalence", "exact statistics with the cache vs one whole forward per level, on every "
                                      "fold-benchmark architecture (target ≤ 1e-6)"),
    ("recalibrate_bn_kernels", "why train-mode recalibration (cumulative, update_bn) costs more than an eval pass "
                               "on CPU: the BatchNorm kernels, layer by layer"),
    ("recalibrate_quality", "accuracy restored after an input-domain shift, by calibration batch size"),
    ("recalibrate_speed_cuda", "the same on a GPU"),
    ("export_timing", "export + verify, bntool vs by hand (torch.onnx + onnxruntime) and polygraphy"),
    ("export_latency", "onnxruntime latency of the folded vs the unfolded export"),
    ("verify_timing", "verify (all checks) against export-onnx alone"),
    ("distributed", "recalibration with 1 and 2 processes (torchrun, gloo) on this 2-core machine"),
    ("onnx_fold", "ONNX files in: BatchNormalization nodes left by each ONNX tool and by `bntool fold` on the same "
                  "exported torchvision/timm files (per-file figures in benchmarks/results/onnx_fold_files.json)"),
    ("onnx_fold_files", "the same, file by file: nodes left, standalone affines, error vs the original in "
                        "onnxruntime, time, onnxruntime latency"),
    ("onnx_fold_resnet50", "`bntool fold resnet50.onnx` and `bntool.fold_onnx` with their onnxruntime check: time "
                           "(target < 2 s) and peak memory above the process after imports (target < 3× the file)"),
    ("onnx_recalibrate", "`bntool recalibrate model.onnx` in onnxruntime (exact mode) as a multiple of one "
                         "onnxruntime eval pass (target ≤ 3×), and its statistics vs PyTorch's exact mode "
                         "(target ≤ 1e-5) next to float32's own floor"),
]


def markdown(result: dict) -> str:
    columns, rows = result["columns"], result["rows"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def section() -> str:
    parts = []
    for name, question in TABLES:
        path = RESULTS / f"{name}.json"
        if not path.exists():
            continue
        result = json.loads(path.read_text())
        head = f"**{result['title']}** — {question}. torch {result.get('torch', '?')}."
        parts.append(head + "\n\n" + markdown(result) + ("\n\n" + result["notes"] if result.get("notes") else ""))
    return "\n\n".join(parts)


def main() -> None:
    text = PAGE.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{PAGE.relative_to(ROOT)} has no {START} … {END} block")
    new = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: f"{START}\n{section()}\n{END}", text,
                 flags=re.S)
    PAGE.write_text(new)
    print(f"{PAGE.relative_to(ROOT)}: {sum((RESULTS / f'{n}.json').exists() for n, _ in TABLES)} benchmark tables "
          "written")


if __name__ == "__main__":
    main()
