"""Can the tissue student's image features carry what the teacher knows? Linear probes.

The tiny vision student (and the SmolLM2 vision student) read the image through a random vision
tower that stays frozen; only the projector and the language layers train. Whatever the student
learns about the tissue must be a function of those features. Three questions, each answered by a
multinomial logistic regression on the tower's output (standardised, L2, L-BFGS; the probe of
experiments/probe_student_states.py), fit on the training split, scored on the test split's truth:

1. How much of the tissue is in the features (targets: the true labels)?
2. How much of each teacher's ranking survives distillation through them (targets: the teacher's
   out-of-fold lists on the training split, the pairs' `chosen` side: its first name, or its
   top-k names weighted 1/rank as a soft target)? The multimodal teacher's lists against the
   task-only teacher's: the gap between the two probes is the transfer a student restricted to
   these features could show at best with a linear read-out.
3. The same on the raw pixels (8×8 mean-pooled per channel), as a floor.

    PYTHONPATH=. .venv/bin/python experiments/probe_image_features.py --seeds 1 2 3

The teachers come from the stage cache (`paths.cache_dir`, default outputs/cache) when the
comparison ran first, else they are trained (a few minutes each). Prints one line per seed and
target, then the means over seeds.
"""

from __future__ import annotations

import argparse
import time
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


def configs(seed: int, cache_dir: str, extra: list[str]):
    """The multimodal and the task-only teacher's run configs, as compare.py composes them."""
    common = ["task=tissue", f"seed={seed}", *extra]
    out = []
    for teacher in ([], UNIMODAL_TEACHER["tissue"][1]):
        cfg = compose_config([*common, *teacher])
        with open_dict(cfg):
            cfg.paths.output_dir = str(Path(cache_dir).parent / "probes" / "image_features")
            cfg.paths.cache_dir = cache_dir
        out.append(cfg)
    return out


def tower_features(
    model, processor, images: list[np.ndarray], *, pooled: bool, batch: int = 32
) -> np.ndarray:
    """[N, D] the frozen vision tower's output, the mean over its patches (`pooled`) or every patch
    side by side (the projector that follows is linear, so a linear probe on this sees what the
    projector can pass on; the language layers' cross-attention reads the patches one by one)."""
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
        states = states.reshape(len(pil), -1, states.shape[-1]).float()
        parts.append((states.mean(1) if pooled else states.flatten(1)).numpy())
    return np.concatenate(parts)


def pixel_features(images: list[np.ndarray], cells: int = 8) -> np.ndarray:
    """[N, cells*cells*3] each channel mean-pooled on a cells×cells grid."""
    stack = np.stack(images).astype(np.float32) / 255.0
    n, h, w, c = stack.shape
    return stack.reshape(n, cells, h // cells, cells, w // cells, c).mean((2, 4)).reshape(n, -1)


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
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both teachers and the student")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cache_dir = str(Path(args.cache_dir).resolve())

    results: dict[str, list[float]] = {}
    for seed in args.seeds:
        started = time.time()
        multimodal_cfg, unimodal_cfg = configs(seed, cache_dir, args.overrides)
        task = load_task(multimodal_cfg.task)
        kind = student_kind(multimodal_cfg)
        multimodal, key = teacher_stage(multimodal_cfg, task)
        unimodal, _ = teacher_stage(unimodal_cfg, task)
        # The student as the run builds it (its tokenizer is trained on the pairs' texts; the tower
        # is seeded by the student config, the same in every run).
        rows, _ = prefs_stage(multimodal_cfg, kind, task, multimodal, key)
        job = student_job(multimodal_cfg, kind)
        model, processor = kind.load(
            job.student, cache_dir=cache_dir, corpus=pairs_to_texts(rows.train), with_adapter=False
        )
        model.eval()
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
            "task-only teacher's first name": unimodal.scores["train"].argmax(1),
            f"multimodal teacher's top-{k}, 1/rank": list_targets(multimodal.scores["train"], k),
            f"task-only teacher's top-{k}, 1/rank": list_targets(unimodal.scores["train"], k),
        }
        features = {
            f"student tower, {'patch mean' if pooled else 'every patch'}": (
                tower_features(model, processor, [s.image for s in train], pooled=pooled),
                tower_features(model, processor, [s.image for s in test], pooled=pooled),
            )
            for pooled in (True, False)
        } | {
            "pixels 8x8": (pixel_features([s.image for s in train]), pixel_features([s.image for s in test])),
        }
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
