"""Is the disease in SmolLM2's frozen hidden states? A linear probe per layer.

A student trained on the top N layers starts from the hidden states after layer L-N. If a linear
classifier on those states cannot tell the diseases apart, no training of the top layers will;
if it can, a slow student is an optimisation problem. For each layer asked, every simulated
rare-disease note (the note alone, no chat template) runs once through SmolLM2-135M-Instruct
(bf16, inference); its states are pooled two ways (mean over the note's tokens, last token), and
a multinomial logistic regression (standardised features, L2, L-BFGS) fits the training split and
is scored on the test split.

    PYTHONPATH=. .venv/bin/python experiments/probe_student_states.py --layers 8 16 22 26 30

Prints one line per (pooling, layer): train and test top-1 (chance 1/30). About 5 min on 1 thread.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from mint.data.rare_disease import simulate_rare_disease
from mint.student.gguf import load_gguf, smollm2_gguf


def note_states(
    model, tokenizer, texts: list[str], layers: list[int], batch: int
) -> dict[str, dict[int, np.ndarray]]:
    """{"mean" | "last": {layer: [notes, hidden]}} of the notes' hidden states after each layer."""
    pooled: dict[str, dict[int, list[np.ndarray]]] = {
        "mean": {i: [] for i in layers},
        "last": {i: [] for i in layers},
    }
    for start in range(0, len(texts), batch):
        enc = tokenizer(texts[start : start + batch], return_tensors="pt", padding=True)
        with torch.inference_mode():
            hidden = model(**enc, output_hidden_states=True).hidden_states
        mask = enc["attention_mask"].unsqueeze(-1).float()
        last = enc["attention_mask"].sum(1) - 1  # right padding: the last real token
        for layer in layers:
            states = hidden[layer].float()
            pooled["mean"][layer].append(((states * mask).sum(1) / mask.sum(1)).numpy())
            pooled["last"][layer].append(states[torch.arange(len(last)), last].numpy())
    return {
        kind: {i: np.concatenate(parts) for i, parts in by_layer.items()} for kind, by_layer in pooled.items()
    }


def probe(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, l2: float
) -> tuple[float, float]:
    """(train fit, test top-1) of an L2-regularised multinomial logistic regression. `y_train` is
    [N] class indices, or [N, C] class probabilities (a soft target; fit: its argmax reproduced)."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    xtr = torch.tensor((x_train - mean) / std)
    xte = torch.tensor((x_test - mean) / std)
    soft = y_train.ndim == 2
    classes = y_train.shape[1] if soft else int(max(y_train.max(), y_test.max())) + 1
    weight = torch.zeros(xtr.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=300)
    target = torch.tensor(y_train, dtype=xtr.dtype) if soft else torch.tensor(y_train)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(xtr @ weight + bias, target) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        train_hits = (
            (xtr @ weight + bias).argmax(1).numpy() == (y_train.argmax(1) if soft else y_train)
        ).mean()
        test_hits = ((xte @ weight + bias).argmax(1).numpy() == y_test).mean()
    return float(train_hits), float(test_hits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 16, 22, 26, 30])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--l2", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = load_gguf(*smollm2_gguf())
    model = model.to(torch.bfloat16).eval()
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    data = simulate_rare_disease()
    started = time.time()
    states, labels = {}, {}
    for split in ("train", "test"):
        samples = data.splits[split]
        states[split] = note_states(model, tokenizer, [s.text for s in samples], args.layers, args.batch)
        labels[split] = np.array([s.label for s in samples])
    print(f"states of {sum(len(v) for v in labels.values())} notes in {time.time() - started:.0f} s")
    print(f"chance top-1: {1 / len(data.labels):.3f}")
    for kind in ("mean", "last"):
        for layer in args.layers:
            train, test = probe(
                states["train"][kind][layer],
                labels["train"],
                states["test"][kind][layer],
                labels["test"],
                args.l2,
            )
            print(
                f"{kind:>4} of the note's tokens after layer {layer:>2}: train top-1 {train:.3f}, test top-1 {test:.3f}"
            )


if __name__ == "__main__":
    main()
