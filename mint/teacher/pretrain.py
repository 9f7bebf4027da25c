"""Contrastive pretraining of the CLIP-style teacher on an image-caption corpus, as PLIP was made.

The tower is the task teacher's own (`ClipTeacher`, same config) trained on the corpus with the
contrastive image-caption loss alone (`class_weight=0`): what it learns about tissues comes
from captions that name them, not from the task's labels. It stops early on zero-shot MRR
over the corpus's own val part (image against the tissue prompts). The task teacher then
starts from these weights (`init_from`), zero-shot or fine-tuned on the task's train split.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from mint.data.task_data import TaskData
from mint.teacher.crossfit import FitSpec, TeacherModule, fit_one, quiet_lightning, torch_threads

log = logging.getLogger(__name__)

CHECKPOINT = "pretrained.ckpt"


def pretrain_teacher(
    corpus: TaskData,
    *,
    make_teacher: Callable[..., TeacherModule],
    trainer_kwargs: dict[str, Any],
    batch_size: int,
    k: int,
    patience: int,
    seed: int,
    out_dir: Path,
    fit_threads: int | None = 1,
) -> dict[str, float]:
    """Train `make_teacher(corpus, contrastive_weight=1, class_weight=0)` on corpus train and write
    out_dir/pretrained.ckpt (a Lightning-style {"state_dict": ...}) and out_dir/metrics.json."""
    if not corpus.splits["train"] or not corpus.splits["val"]:
        raise ValueError(f"pretraining corpus {corpus.name!r} needs train and val samples")
    started = time.perf_counter()

    def contrastive_only(task: TaskData) -> TeacherModule:
        return make_teacher(task, contrastive_weight=1.0, class_weight=0.0, init_from=None, finetune=True)

    # MRR, not top-k: zero-shot top-5 of 19 tissues flattens early while the ranking still improves.
    spec = FitSpec(contrastive_only, dict(trainer_kwargs), batch_size, k, patience, "val/mrr")
    with quiet_lightning():
        featurizer = contrastive_only(corpus)
        data = {split: featurizer.make_dataset(corpus.splits[split]) for split in ("train", "val")}
        del featurizer
        with torch_threads(fit_threads):
            teacher, trainer, best = fit_one(
                spec,
                corpus,
                data["train"],
                data["val"],
                seed=seed,
                ckpt_dir=out_dir / "fit",
                desc="teacher pretraining",
            )
            val_metrics = trainer.validate(
                teacher, DataLoader(data["val"], batch_size=batch_size), verbose=False
            )[0]
    torch.save({"state_dict": teacher.state_dict()}, out_dir / CHECKPOINT)
    best.unlink()
    (out_dir / "fit").rmdir()
    metrics = {f"teacher/pretrain/{key.removeprefix('val/')}": float(v) for key, v in val_metrics.items()}
    metrics |= {
        "teacher/pretrain/images": len(corpus.splits["train"]),
        "teacher/pretrain/epochs": trainer.current_epoch,
        "teacher/pretrain/time_s": round(time.perf_counter() - started, 3),
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    log.info(
        "teacher pretraining: %d images, %d epochs, zero-shot corpus val top1=%.3f, %.0fs",
        len(corpus.splits["train"]),
        trainer.current_epoch,
        metrics.get("teacher/pretrain/top1", float("nan")),
        metrics["teacher/pretrain/time_s"],
    )
    return metrics
