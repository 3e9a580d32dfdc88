"""A picture of what recalibration changed, per BN layer (needs matplotlib: the `examples` extra)."""

from __future__ import annotations

import math
import os

from .errors import InputError, param
from .files import atomic_write


def check_can_plot(path: str | os.PathLike) -> None:
    """Before any work: matplotlib is installed and writes the format the file's suffix names.

    Raises:
        InputError: matplotlib is missing, or the suffix is not one of its formats.
    """
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError as e:
        raise InputError(f"{param('plot')} needs matplotlib: pip install 'bntool[examples]' or pip install "
                         "matplotlib", param="plot") from e
    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    suffix = os.path.splitext(os.fspath(path))[1].lower().lstrip(".")
    if suffix not in formats:
        what = f".{suffix} files" if suffix else "a file without a suffix (the suffix names the format)"
        raise InputError(f"{param('plot')} {path}: matplotlib cannot write {what}; use one of "
                         f"{', '.join('.' + f for f in formats)}", param="plot")


def plot_recalibration(report, path: str | os.PathLike, title: str | None = None) -> None:
    """Two panels along the depth of the network: mean shift in old standard deviations, and the range of
    new/old variance ratios (log scale). Written atomically as PNG/SVG/PDF by the file's suffix."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise InputError(f"{param('plot')} needs matplotlib: pip install 'bntool[examples]' or pip install "
                         "matplotlib", param="plot") from e
    layers = [layer for layer in report.layers if not layer.skipped]
    x = list(range(len(layers)))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6, len(layers) * 0.35), 5.5), sharex=True)
    top.bar(x, [layer.mean_shift for layer in layers], color="#4C72B0")
    top.set_ylabel("max |Δ mean| / old σ")
    lo = [layer.var_ratio_min for layer in layers]
    hi = [layer.var_ratio_max for layer in layers]
    bottom.vlines(x, lo, hi, color="#DD8452", linewidth=4)
    bottom.axhline(1.0, color="grey", linewidth=0.8)
    bottom.set_yscale("log")
    bottom.set_ylabel("new var / old var")
    bottom.set_xticks(x)
    bottom.set_xticklabels([layer.name for layer in layers], rotation=90, fontsize=7)
    top.set_title(title or f"BatchNorm statistics before → after recalibration ({report.mode}, "
                           f"{report.samples:,} samples)")
    if any(not math.isfinite(v) for v in lo + hi):
        bottom.text(0.01, 0.9, "non-finite ratios omitted", transform=bottom.transAxes)
    fig.tight_layout()
    suffix = os.path.splitext(str(path))[1].lstrip(".") or "png"
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format=suffix, dpi=120))
    finally:
        plt.close(fig)
