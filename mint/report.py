"""Run results: results.json (one flat object of final metrics) and results.md."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any


def write_atomic(path: Path, text: str) -> None:
    """Write via a temp file in the same folder + rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _plain(value: Any) -> float | int | str | None:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf
    return value


def write_metrics(path: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    flat = {k: _plain(v) for k, v in sorted(metrics.items())}
    write_atomic(path, json.dumps(flat, indent=2) + "\n")
    return flat


def markdown_table(metrics: dict[str, Any]) -> str:
    lines = ["| metric | value |", "|---|---|"]
    for key, value in sorted(metrics.items()):
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"| `{key}` | {shown} |")
    return "\n".join(lines) + "\n"


def write_results(run_dir: Path, metrics: dict[str, Any], title: str) -> dict[str, Any]:
    flat = write_metrics(run_dir / "results.json", metrics)
    write_atomic(run_dir / "results.md", f"# {title}\n\n{markdown_table(flat)}")
    return flat
