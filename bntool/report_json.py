"""Reports as JSON: a report's data after the context of its run, non-finite figures written as null (and listed
with the value each stands for, since JSON has no NaN/Inf), and the versions the results depend on."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any


def _clean(data: Any, where: str, found: dict[str, str]) -> Any:
    """JSON has no NaN/Inf: write null, and note in `found` which value it stands for."""
    if isinstance(data, float) and not math.isfinite(data):
        found[where or "."] = str(data)
        return None
    if isinstance(data, dict):
        return {k: _clean(v, f"{where}.{k}" if where else str(k), found) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_clean(v, f"{where}[{i}]", found) for i, v in enumerate(data)]
    return data


def to_json_data(report: Any, context: dict[str, Any] | None = None) -> dict[str, Any]:
    """The report as JSON-ready data, after `context` (what ran on what: checkpoint, arch, versions, data).
    Non-finite figures become null, listed under "non_finite" with the value they stand for."""
    data = report.to_dict() if hasattr(report, "to_dict") else dataclasses.asdict(report)
    if context:
        notes = [*context.get("notes", []), *data.get("notes", [])]  # both say something: keep both
        data = {**context, **data}
        if notes:
            data["notes"] = notes
    found: dict[str, str] = {}
    data = _clean(data, "", found)
    if found:
        data["non_finite"] = found
    return data


def dumps(report: Any, context: dict[str, Any] | None = None) -> str:
    return json.dumps(to_json_data(report, context), indent=2, default=str, allow_nan=False)


def versions() -> dict[str, str | None]:
    """Installed versions of bntool and what its results depend on (None: not installed)."""
    from importlib import metadata

    from ._version import __version__

    found: dict[str, str | None] = {"bntool": __version__}
    for name in ("torch", "onnx", "onnxruntime"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found
