"""The plot a run ends with: hits@k of the student's answers against the teacher's rankings.

hits@k is the share of test cases whose true label is among the first k names, for k = 1..n
(n = the answer length): the student's parsed answers, the teacher's score ranking, and
chance (k / number of labels). One picture shows how much of the teacher the student kept.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mint.files import write_atomic


def hits_at_k(ranked: Sequence[Sequence[str]], truths: Sequence[str], n: int) -> list[float]:
    """[hits@1, ..., hits@n] for ranked name lists (a short or empty list just hits less)."""
    if len(ranked) != len(truths):
        raise ValueError(f"{len(ranked)} ranked lists for {len(truths)} truths")
    if not truths:
        return [0.0] * n
    first = np.array([list(r[:n]).index(t) if t in r[:n] else n for r, t in zip(ranked, truths, strict=True)])
    return [float(np.mean(first < k)) for k in range(1, n + 1)]


def plot_hits_at_k(path: Path, curves: dict[str, list[float]], n_labels: int, title: str) -> Path:
    """Line plot of each curve plus chance; written to a temp file and renamed into place."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    n = max(len(c) for c in curves.values())
    ks = np.arange(1, n + 1)
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for name, curve in curves.items():
        ax.plot(ks[: len(curve)], curve, marker="o", label=name)
    ax.plot(ks, ks / n_labels, linestyle="--", color="grey", label="chance")
    ax.set(xlabel="k", ylabel="truth among the first k", title=title, ylim=(0, 1), xticks=ks)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    png = io.BytesIO()
    try:
        fig.savefig(png, format="png")
    finally:
        plt.close(fig)
    write_atomic(path, png.getvalue())
    return path
