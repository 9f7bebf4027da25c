"""Time and sanity-check the teacher stage on synthetic rare-disease-shaped data.

Planted data, simpler than the simulated HPO patients (mint/data/rare_disease.py), so the
teacher stage can be timed and checked in isolation: D diseases in look-alike triples that share most of their findings, ~50-word notes with 3-6
findings each, and a 64-d "gestalt" vector = disease centroid + Gaussian noise.
Text alone is ambiguous within a triple; the vector disambiguates.

    .venv/bin/python experiments/teacher_synthetic.py --size default   # 30 x 40, 5 folds
    .venv/bin/python experiments/teacher_synthetic.py --size smoke
    .venv/bin/python experiments/teacher_synthetic.py --modalities text
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from mint.data.task_data import Sample, TaskData, stratified_split  # noqa: E402
from mint.teacher import fit_teacher, fusion_teacher  # noqa: E402

ROOTS = "cranio facio cardio neuro oculo dento skeleto dermo renal hepato myo osteo".split()
ENDINGS = "dysplasia hypoplasia malformation anomaly dystrophy synostosis asymmetry defect".split()
FILLER = (
    "The patient was referred by the pediatrician for genetic evaluation. Family history is "
    "unremarkable and the parents are non-consanguineous. On examination we noted"
).split()
SIZES = {  # diseases, patients per disease, folds, max_epochs
    "default": (30, 40, 5, 40),
    "smoke": (8, 12, 3, 8),
}


def synthetic_rare_disease(n_diseases: int, per_disease: int, seed: int, noise: float = 0.3) -> TaskData:
    rng = np.random.default_rng(seed)
    findings = [f"{a}{b} {c}" for a in ROOTS for b in ("", "genic") for c in ENDINGS]
    rng.shuffle(findings)
    centroids = rng.normal(size=(n_diseases, 64))
    samples = []
    for disease in range(n_diseases):
        # Diseases of a triple share a pool of 8 findings and have 2 of their own.
        triple = disease // 3
        pool = findings[triple * 8 : triple * 8 + 8] + findings[100 + disease * 2 : 102 + disease * 2]
        for j in range(per_disease):
            shown = rng.choice(pool, size=rng.integers(3, 7), replace=False)
            age, sex = rng.integers(1, 40), rng.choice(["girl", "boy"])
            words = FILLER[: rng.integers(20, len(FILLER) + 1)]
            note = f"A {age}-year-old {sex}. {' '.join(words)} {', '.join(shown)}, and mild delay."
            vector = (centroids[disease] + noise * rng.normal(size=64)).astype(np.float32)
            samples.append(Sample(id=f"d{disease}_p{j}", label=disease, text=note, vector=vector))
    index = stratified_split([s.label for s in samples], (0.6, 0.2, 0.2), seed)
    splits = {split: [samples[i] for i in rows] for split, rows in index.items()}
    return TaskData("rare_disease_synthetic", [f"Syndrome {d}" for d in range(n_diseases)], splits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="default")
    parser.add_argument("--modalities", default="text,image")
    parser.add_argument("--fusion", default="gated")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--noise", type=float, default=1.0, help="gestalt-vector noise sigma (centroids ~N(0,1))"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--embed-cache-dir", default=None, help="reuse MiniLM embeddings across runs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)

    n_diseases, per_disease, folds, max_epochs = SIZES[args.size]
    task = synthetic_rare_disease(n_diseases, per_disease, args.seed, noise=args.noise)
    words = np.mean([len(s.text.split()) for s in task.splits["train"]])
    print(f"{n_diseases} diseases x {per_disease} patients, mean note {words:.0f} words; e.g.:")
    print("  " + task.splits["train"][0].text)
    make = partial(
        fusion_teacher,
        modalities=args.modalities.split(","),
        fusion=args.fusion,
        embed_cache_dir=args.embed_cache_dir,
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = fit_teacher(
            task,
            make_teacher=make,
            trainer_kwargs={"max_epochs": max_epochs, "accelerator": "cpu"},
            batch_size=64,
            folds=folds,
            k=10,
            out_dir=Path(tmp) / "teacher",
            seed=args.seed,
        )
    wall = time.perf_counter() - started
    keep = {k: round(v, 3) for k, v in result.metrics.items() if "ci_" not in k or "/test/" in k}
    print(json.dumps({"args": vars(args), "wall_s": round(wall, 1), **keep}, indent=1))


if __name__ == "__main__":
    main()
