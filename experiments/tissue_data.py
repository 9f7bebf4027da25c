"""Calibration check of the simulated tissue task, and a PNG grid of example patches per tissue.

    python experiments/tissue_data.py outputs/tissue_grid.png [--n-per-tissue 60] [--seed 0]

Two quick probes (multinomial logistic regression in numpy, seconds on 2 CPU cores)
measure how learnable the task is: one on simple pixel statistics of the images (stain-space
histograms, darkness and gradient statistics), one on bag-of-words of the descriptions. The
simulation is tuned so that images reach roughly 0.35-0.75 top-1 over 19 tissues (chance 0.05):
a teacher can learn it, and there is room to be better than a probe.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import numpy as np
from PIL import Image

from mint.data.task_data import Sample, TaskData
from mint.data.tissue import simulate_tissue
from mint.stains import optical_density, stain_concentrations


def image_features(images: np.ndarray) -> np.ndarray:
    """[N, F] statistics of uint8 [N, H, W, 3] patches: stain densities, their histograms, edges."""
    od = optical_density(images)
    conc = stain_concentrations(od)  # [N, H, W, 2]
    h, e = conc[..., 0].reshape(len(images), -1), conc[..., 1].reshape(len(images), -1)
    features = [od.mean(axis=(1, 2)), od.std(axis=(1, 2))]
    for channel, edges in ((h, np.linspace(0, 2.0, 11)), (e, np.linspace(0, 1.0, 11))):
        features.append(np.stack([np.histogram(row, bins=edges)[0] / row.size for row in channel]))
        features.append(np.percentile(channel, [10, 50, 90, 99], axis=1).T)
    dark = (h > 0.6).reshape(images.shape[:3])
    grad_y, grad_x = (
        np.abs(np.diff(dark, axis=1)).mean(axis=(1, 2)),
        np.abs(np.diff(dark, axis=2)).mean(axis=(1, 2)),
    )
    features.append(np.stack([dark.mean(axis=(1, 2)), grad_y, grad_x, grad_x / (grad_y + 1e-3)], axis=1))
    return np.concatenate(features, axis=1)


def text_features(texts: list[str], vocabulary: list[str]) -> np.ndarray:
    index = {word: i for i, word in enumerate(vocabulary)}
    out = np.zeros((len(texts), len(vocabulary)))
    for row, text in enumerate(texts):
        for word in _words(text):
            if word in index:
                out[row, index[word]] = 1.0
    return out


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z-]+", text.lower())


def fit_logreg(
    x: np.ndarray, y: np.ndarray, n_classes: int, *, weight_decay: float = 1e-3, steps: int = 300
) -> np.ndarray:
    """Weights [F + 1, C] of a multinomial logistic regression (full-batch Nesterov gradient descent)."""
    x = np.hstack([x, np.ones((len(x), 1))])
    onehot = np.eye(n_classes)[y]
    weights, velocity = np.zeros((x.shape[1], n_classes)), np.zeros((x.shape[1], n_classes))
    lr = 0.5 / (1.0 + (x**2).sum(1).mean() / 4)  # below 2/L for the softmax loss (L <= mean ||x||^2 / 2)
    for _ in range(steps):
        ahead = weights + 0.9 * velocity
        grad = x.T @ (_softmax(x @ ahead) - onehot) / len(x) + 2 * weight_decay * ahead
        velocity = 0.9 * velocity - lr * grad
        weights = weights + velocity
    return weights


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def topk_accuracy(weights: np.ndarray, x: np.ndarray, y: np.ndarray, k: int) -> float:
    logits = np.hstack([x, np.ones((len(x), 1))]) @ weights
    top = np.argsort(-logits, axis=1)[:, :k]
    return float((top == y[:, None]).any(axis=1).mean())


def probe(data: TaskData, *, steps: int = 1000) -> dict[str, float]:
    """Test top-1/top-5 of the image probe and the description probe, trained on train+val."""
    fit = data.splits["train"] + data.splits["val"]
    test = data.splits["test"]
    y_fit, y_test = np.array([s.label for s in fit]), np.array([s.label for s in test])
    results = {}

    x_fit, x_test = (image_features(np.stack([s.image for s in part])) for part in (fit, test))
    mean, std = x_fit.mean(0), x_fit.std(0) + 1e-6
    model = fit_logreg((x_fit - mean) / std, y_fit, len(data.labels), steps=steps)
    for k in (1, 5):
        results[f"image/top{k}"] = topk_accuracy(model, (x_test - mean) / std, y_test, k)

    vocabulary = sorted({w for s in fit for w in _words(s.text)})
    t_fit, t_test = (text_features([s.text for s in part], vocabulary) for part in (fit, test))
    model = fit_logreg(t_fit, y_fit, len(data.labels), steps=steps)
    for k in (1, 5):
        results[f"text/top{k}"] = topk_accuracy(model, t_test, y_test, k)
    return results


def save_grid(data: TaskData, path: Path, per_tissue: int = 8, scale: int = 2) -> None:
    """One row per tissue (in label order) of `per_tissue` training patches."""
    by_label: dict[int, list[Sample]] = {}
    for s in data.splits["train"]:
        by_label.setdefault(s.label, []).append(s)
    rows = [
        np.concatenate([s.image for s in by_label[k][:per_tissue]], axis=1) for k in range(len(data.labels))
    ]
    grid = Image.fromarray(np.concatenate(rows, axis=0))
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("grid", type=Path, help="where to write the PNG grid of example patches")
    parser.add_argument("--n-per-tissue", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    start = time.perf_counter()
    data = simulate_tissue(n_per_tissue=args.n_per_tissue, seed=args.seed)
    simulated = time.perf_counter() - start
    n = sum(len(v) for v in data.splits.values())
    print(f"simulated {n} patches of 64x64 in {simulated:.1f} s (seed {args.seed})")
    start = time.perf_counter()
    results = probe(data)
    print(
        f"probes trained in {time.perf_counter() - start:.1f} s; test n={len(data.splits['test'])}, chance top-1 0.053 / top-5 0.263"
    )
    for name, value in results.items():
        print(f"  {name}: {value:.3f}")
    save_grid(data, args.grid)
    print(f"grid of example patches (one row per tissue, label order) -> {args.grid}")
    for s in data.splits["train"][:: max(1, len(data.splits["train"]) // 5)][:5]:
        print(f"  {data.labels[s.label]}: {s.text}")


if __name__ == "__main__":
    main()
