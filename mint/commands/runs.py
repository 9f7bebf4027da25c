"""`mint runs [DIR]`: every run's results.json under DIR (single runs and multirun jobs) in one table.

Each row is a run folder (its path under DIR), then the command-line overrides that differ
between the runs (from `.hydra/overrides.yaml`; `hydra.*` and `paths.*` left out: they name
folders, not experiments), then the metrics. The printed markdown table has the headline
metrics (or `--metrics`); `--csv FILE` writes every metric.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from mint.files import read_json, write_atomic

# The printed columns, in this order, when a run has them (mint.report.headline's keys).
HEADLINE = (
    "test/top1",
    "test/topk",
    "test/format_valid",
    "test/rank_top1",
    "test/rank_topk",
    "test/car",
    "teacher/test/top1",
    "teacher/test/topk",
    "val/loss",
    "val/rewards/accuracies",
)
SKIPPED_DIRS = {"cache", "wandb", "checkpoints"}
IGNORED_OVERRIDES = ("hydra.", "paths.")


def find_runs(root: Path) -> list[Path]:
    """Folders under `root` holding a results.json (hidden, cache and W&B folders not searched)."""
    found = []
    for path in sorted(root.rglob("results.json")):
        parts = path.relative_to(root).parts[:-1]
        if any(p.startswith(".") or p in SKIPPED_DIRS for p in parts):
            continue
        found.append(path.parent)
    return found


def overrides(run_dir: Path) -> dict[str, str]:
    """`key -> value` of the run's command-line overrides (`+key=v` and `~key` included)."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    pairs = {}
    for item in OmegaConf.to_container(OmegaConf.load(path)) or []:
        key, _, value = str(item).partition("=")
        pairs[key.lstrip("+~")] = value if "=" in str(item) else "(deleted)"
    return pairs


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4f}"
    return "" if value is None else str(value)


def runs_table(root: str | Path, *, csv_path: str | Path | None = None, metrics: str | None = None) -> str:
    """The markdown table of the runs under `root` (and the CSV at `csv_path`, every metric)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    run_dirs = find_runs(root)
    if not run_dirs:
        raise FileNotFoundError(f"no results.json under {root}: no finished runs there")
    results = [read_json(d / "results.json") for d in run_dirs]
    args = [overrides(d) for d in run_dirs]
    keys = sorted({k for a in args for k in a if not k.startswith(IGNORED_OVERRIDES)})
    # The overrides that tell runs apart: a value that is not the same in every run (absent counts).
    differ = [k for k in keys if len({a.get(k, "") for a in args}) > 1] if len(run_dirs) > 1 else keys
    names = [str(d.relative_to(root)) if d != root else "." for d in run_dirs]
    numeric = sorted({k for r in results for k, v in r.items() if isinstance(v, int | float)})
    if metrics:
        shown = [m.strip() for m in metrics.split(",") if m.strip()]
        unknown = [m for m in shown if m not in numeric]
        if unknown:
            known = [k for k in numeric if "_ci_" not in k]
            raise ValueError(
                f"--metrics: {', '.join(unknown)} in no run's results; known: {', '.join(known)}"
            )
    else:
        shown = [m for m in HEADLINE if m in numeric]
    if csv_path is not None:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["run", *differ, *numeric])
        for name, a, r in zip(names, args, results, strict=True):
            writer.writerow([name, *(a.get(k, "") for k in differ), *(r.get(m, "") for m in numeric)])
        write_atomic(Path(csv_path), buffer.getvalue())
    header = ["run", *differ, *shown]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, a, r in zip(names, args, results, strict=True):
        cells = [name, *(a.get(k, "") for k in differ), *(_cell(r.get(m)) for m in shown)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
