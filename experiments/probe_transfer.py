"""Can the student's input carry what the teacher knows? Linear probes, both tasks.

A student learns the task only through what it reads: the tissue student a random vision tower
that stays frozen (only the projector and the language layers train), the rare-disease student
the note's words. Each question below is answered by a multinomial logistic regression on
features of that input (standardised, L2, L-BFGS; the probe of
experiments/probe_student_states.py), fit on the training split and scored on the test split's
truth:

1. How much of the label is in the input (targets: the true labels)?
2. How much of each teacher's ranking survives distillation through it (targets: the teacher's
   out-of-fold lists on the training split, the pairs' `chosen` side: its first name, or its
   top-k names weighted 1/rank as a soft target)? The multimodal teacher's lists against the
   unimodal teacher's (compare.py's UNIMODAL_TEACHER): the gap between the two probes is the
   transfer a student restricted to this input could show with a linear read-out.

Features: tissue, the student's frozen tower output averaged over its patches (the task's default student,
tiny_mllama_tower128; e.g. student=tiny_mllama for the smaller tower), the raw pixels (8x8 mean-pooled per channel) as a floor,
and colour, contrast and edge statistics of 8x8 patches (what a general-purpose pretrained tower
is known to encode; computed, not learned); rare disease, the note's word unigrams and bigrams
(log counts, those seen in at least 3 training notes: negations such as "no narrow" are bigrams).

    PYTHONPATH=. .venv/bin/python experiments/probe_transfer.py task=tissue --seeds 1 2 3
    PYTHONPATH=. .venv/bin/python experiments/probe_transfer.py task=rare_disease --seeds 1 2 3

The teachers come from the stage cache (`--cache-dir`, default outputs/cache) when the comparison
ran first, else they are trained (minutes each). Prints one line per seed, features and target,
then the means over seeds.
"""

from __future__ import annotations

import argparse
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from omegaconf import open_dict
from PIL import Image

from experiments.compare import UNIMODAL_TEACHER
from experiments.probe_student_states import probe
from mint.cli import compose_config
from mint.pairs.rows import pairs_to_texts
from mint.stages.prefs import prefs_stage
from mint.stages.student import student_job
from mint.stages.teacher import load_task, teacher_stage
from mint.student.kinds import student_kind
from mint.student.vision import _mllama_model


def configs(seed: int, cache_dir: str, overrides: list[str]):
    """The multimodal and the unimodal teacher's run configs, as compare.py composes them."""
    common = [*overrides, f"seed={seed}"]
    task = compose_config(common).task.name
    if task not in UNIMODAL_TEACHER:
        raise SystemExit(
            f"task={task}: expected one of {sorted(UNIMODAL_TEACHER)} (a task with a unimodal teacher)"
        )
    out = []
    for teacher in ([], UNIMODAL_TEACHER[task][1]):
        cfg = compose_config([*common, *teacher])
        with open_dict(cfg):
            cfg.paths.output_dir = str(Path(cache_dir).parent / "probes" / "transfer")
            cfg.paths.cache_dir = cache_dir
        out.append(cfg)
    return out


def tower_features(model, processor, images: list[np.ndarray], batch: int = 32) -> np.ndarray:
    """[N, D] the frozen vision tower's output, the mean over its patches (the projector that
    follows is linear; every patch side by side, 1632 features for 684 images, overfits)."""
    vision = _mllama_model(model).vision_model
    parts = []
    for start in range(0, len(images), batch):
        pil = [Image.fromarray(a) for a in images[start : start + batch]]
        enc = processor.image_processor(images=[[p] for p in pil], return_tensors="pt")
        with torch.inference_mode():
            states = vision(
                pixel_values=enc["pixel_values"],
                aspect_ratio_ids=enc["aspect_ratio_ids"],
                aspect_ratio_mask=enc["aspect_ratio_mask"],
            ).last_hidden_state
        parts.append(states.reshape(len(pil), -1, states.shape[-1]).float().mean(1).numpy())
    return np.concatenate(parts)


def patches(a: np.ndarray, patch: int) -> np.ndarray:
    """[N, H, W, C] -> [N, patches, patch*patch, C]: each image cut into patch x patch squares."""
    n, h, w, c = a.shape
    cells = a.reshape(n, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return cells.reshape(n, -1, patch * patch, c)


def pixel_features(images: list[np.ndarray], patch: int = 8) -> np.ndarray:
    """[N, patches*3] each channel's mean over each patch x patch square."""
    stack = np.stack(images).astype(np.float32) / 255.0
    return patches(stack, patch).mean(2).reshape(len(images), -1)


def patch_statistics(images: list[np.ndarray], patch: int = 8) -> np.ndarray:
    """[N, 16] what a general-purpose vision tower is known to encode, without any training here:
    each patch's mean and std per channel and its mean absolute luminance step across and down,
    summarised over the patches by their mean and std."""
    x = np.stack(images).astype(np.float32) / 255.0  # [N, H, W, 3]
    lum = x.mean(-1, keepdims=True)
    dx = np.abs(np.diff(lum, axis=2, append=lum[:, :, -1:]))
    dy = np.abs(np.diff(lum, axis=1, append=lum[:, -1:, :]))
    rgb = patches(x, patch)
    per_patch = np.concatenate(
        [rgb.mean(2), rgb.std(2), patches(dx, patch).mean(2), patches(dy, patch).mean(2)], axis=-1
    )  # [N, patches, 8]
    return np.concatenate([per_patch.mean(1), per_patch.std(1)], axis=1)


def word_features(train: list[str], test: list[str], min_notes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """log(1 + count) of the word unigrams and bigrams seen in at least `min_notes` training notes."""

    def grams(text: str) -> list[str]:
        words = re.findall(r"[a-z0-9]+", text.lower())
        return words + [f"{a} {b}" for a, b in zip(words, words[1:], strict=False)]

    notes = Counter(g for text in train for g in set(grams(text)))
    vocab = {g: i for i, g in enumerate(sorted(g for g, n in notes.items() if n >= min_notes))}

    def counts(texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), len(vocab)), dtype=np.float32)
        for row, text in enumerate(texts):
            for gram, n in Counter(grams(text)).items():
                if gram in vocab:
                    out[row, vocab[gram]] = np.log1p(n)
        return out

    return counts(train), counts(test)


def student_input_features(
    cfg, task, multimodal, key, cache_dir: str
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{name: (train features, test features)} of what the task's student reads."""
    train, test = task.splits["train"], task.splits["test"]
    if task.name == "rare_disease":
        return {"note words": word_features([s.text for s in train], [s.text for s in test])}
    # The student as the run builds it (its tokenizer is trained on the pairs' texts; the tower is
    # seeded by the student config, the same in every run).
    kind = student_kind(cfg)
    rows, _ = prefs_stage(cfg, kind, task, multimodal, key)
    job = student_job(cfg, kind)
    model, processor = kind.load(
        job.student, cache_dir=cache_dir, corpus=pairs_to_texts(rows.train), with_adapter=False
    )
    model.eval()
    images = [s.image for s in train], [s.image for s in test]
    return {
        "student tower": tuple(tower_features(model, processor, split) for split in images),
        "pixels 8x8": tuple(pixel_features(split) for split in images),
        "patch statistics": tuple(patch_statistics(split) for split in images),
    }


def list_targets(scores: np.ndarray, k: int) -> np.ndarray:
    """[N, C] the teacher's top-k names weighted 1/rank, normalised: what its `chosen` lists say."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    target = np.zeros_like(scores, dtype=np.float64)
    weights = 1.0 / np.arange(1, k + 1)
    for row, labels in enumerate(order):
        target[row, labels] = weights / weights.sum()
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--cache-dir", default="outputs/cache")
    parser.add_argument("--l2", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "overrides", nargs="+", help="Hydra overrides for both teachers (and the student); task=... first"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cache_dir = str(Path(args.cache_dir).resolve())

    results: dict[str, list[float]] = {}
    features: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    task = None
    for seed in args.seeds:
        started = time.time()
        multimodal_cfg, unimodal_cfg = configs(seed, cache_dir, args.overrides)
        if task is None:  # the data is seeded by its own config, the same for every seed
            task = load_task(multimodal_cfg.task)
        multimodal, key = teacher_stage(multimodal_cfg, task)
        unimodal, _ = teacher_stage(unimodal_cfg, task)
        train, test = task.splits["train"], task.splits["test"]
        for teacher in (multimodal, unimodal):
            if teacher.ids["train"] != [s.id for s in train]:
                raise ValueError("the teacher's training ids are not the task's, in order")
        truth_train = np.array([s.label for s in train])
        truth_test = np.array([s.label for s in test])
        k = multimodal_cfg.task.answer.n
        targets = {
            "truth": truth_train,
            "multimodal teacher's first name": multimodal.scores["train"].argmax(1),
            "unimodal teacher's first name": unimodal.scores["train"].argmax(1),
            f"multimodal teacher's top-{k}, 1/rank": list_targets(multimodal.scores["train"], k),
            f"unimodal teacher's top-{k}, 1/rank": list_targets(unimodal.scores["train"], k),
        }
        # The input's features are the same for every seed (the data and the student's tower are
        # seeded by their own configs); only the teachers differ.
        features = features or student_input_features(multimodal_cfg, task, multimodal, key, cache_dir)
        for name, target in targets.items():
            if target.ndim == 1:
                print(
                    f"seed {seed}: {name} matches the truth on {np.mean(target == truth_train):.3f} of train"
                )
        for feature, (x_train, x_test) in features.items():
            for name, target in targets.items():
                fit, test_top1 = probe(x_train, target, x_test, truth_test, args.l2)
                results.setdefault(f"{feature} <- {name}", []).append(test_top1)
                print(f"seed {seed}: {feature} <- {name}: train fit {fit:.3f}, test top-1 {test_top1:.3f}")
        print(f"seed {seed}: {time.time() - started:.0f} s")
    print(
        f"\nmeans over seeds {args.seeds} (test top-1 against the truth; chance {1 / len(task.labels):.3f})"
    )
    for name, values in results.items():
        print(f"{name}: {np.mean(values):.3f} ({', '.join(f'{v:.3f}' for v in values)})")


if __name__ == "__main__":
    main()
