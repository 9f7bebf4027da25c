"""The data and teacher stages: load the task's data, train the teacher (or find it in the cache).

The teacher's entry in the stage cache (mint.cache) is keyed by exactly what determines it:
the data's fingerprint, the teacher config, the list length and the seed. A sweep over
`optim=` therefore trains one teacher. Its training rankings are out-of-fold
(mint.teacher.crossfit): ranked in-sample, the teacher is always right.
A teacher with `pretrain` (teacher=clip_pretrained) first has its tower pretrained on a
caption corpus (mint.teacher.pretrain), in an entry of its own that every seed shares.
"""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from mint.cache import cached
from mint.config import plain
from mint.data.task_data import TaskData
from mint.data.tissue_corpus import check_corpus_disjoint, corpus_digests
from mint.teacher.crossfit import TeacherResult, fit_teacher
from mint.teacher.pretrain import CHECKPOINT, pretrain_teacher

CORPUS_DIGESTS = "corpus_digests.json"  # sample id -> pixel digest, kept with the pretrained tower
# Teacher settings that do not change the pretrained tower: pretraining fixes both loss weights
# and has its own learning rate, and where MiniLM embeddings are cached changes no number.
NOT_PRETRAINING_KEYS = {"contrastive_weight", "class_weight", "lr", "embed_cache_dir"}


def is_pipeline_task(task: DictConfig) -> bool:
    """A task with a data source runs data -> teacher -> prefs; `task=custom|example` starts at the student."""
    return "source" in task


def load_task(task: DictConfig) -> TaskData:
    """The task's data, refused before any training when it cannot serve the run: an empty split,
    or fewer labels than an answer, its negatives and the truth need."""
    data = instantiate(task.source, _convert_="all")
    if not isinstance(data, TaskData):
        raise ValueError(
            f"task.source ({task.source._target_}) returned {type(data).__name__}: expected a TaskData"
        )
    counts = {split: len(samples) for split, samples in data.splits.items()}
    empty = [split for split, n in counts.items() if n == 0]
    if empty:
        raise ValueError(
            f"task={task.name}: the {' and '.join(empty)} split(s) of task.source are empty ({counts}); "
            "the teacher needs train and val samples and the evaluation test samples"
        )
    needed = task.answer.n + task.prefs.q + 1  # the truth is never a negative
    if needed > len(data.labels):
        raise ValueError(
            f"task.answer.n={task.answer.n} + task.prefs.q={task.prefs.q} + 1 (the truth) = {needed} names, "
            f"but task={task.name} has {len(data.labels)} labels: lower task.prefs.q or task.answer.n"
        )
    return data


def teacher_stage(cfg: DictConfig, task: TaskData) -> tuple[TeacherResult, str]:
    """The trained teacher's scores for every split (train: out-of-fold) and its cache key."""
    if cfg.teacher is None:
        raise ValueError(
            f"task={cfg.task.name} needs a teacher: add teacher=fusion|clip|plip "
            f"(or conf/teacher/task_{cfg.task.name}.yaml naming its usual one)"
        )
    teacher, k, seed = cfg.teacher, cfg.task.answer.n, cfg.seed
    # fit_workers only schedules the fits (the scores are the same): not part of the key.
    settings = {name: value for name, value in plain(teacher).items() if name != "fit_workers"}
    key: dict[str, Any] = {"data": task.fingerprint(), "teacher": settings, "k": k, "seed": seed}
    make_teacher = instantiate(teacher.model, _convert_="all")
    pretrain_metrics: dict[str, float] = {}
    if teacher.pretrain is not None:
        pretrained = pretrain_stage(cfg, task)
        pretrain_metrics = json.loads((pretrained.parent / "metrics.json").read_text())
        make_teacher = partial(
            make_teacher, init_from=str(pretrained), finetune=not teacher.pretrain.zero_shot
        )

    def make(folder: Path) -> None:
        fit_teacher(
            task,
            make_teacher=make_teacher,
            trainer_kwargs=plain(teacher.trainer),
            batch_size=teacher.batch_size,
            folds=teacher.folds,
            k=k,
            out_dir=folder / "teacher",
            seed=seed,
            patience=teacher.patience,
            fit_threads=teacher.fit_threads,
            fit_workers=teacher.fit_workers,
        )

    entry = cached(Path(cfg.paths.cache_dir), "teacher", key, make)
    result = TeacherResult.load(entry / "teacher")
    result.metrics |= pretrain_metrics
    return result, entry.name  # the teacher's cache key: what the preference set is built from


def pretrain_stage(cfg: DictConfig, task: TaskData) -> Path:
    """The teacher's tower pretrained on its caption corpus (cached), after checking that the
    corpus holds no sample of the task. Keyed by the corpus, the tower and the pretraining
    settings, not by the run seed or the task: every seed and method shares one."""
    pre = cfg.teacher.pretrain
    per_label = math.ceil(pre.scale * len(task.splits["train"]) / len(task.labels))
    corpus_node = plain(pre.corpus) | {"train_per_tissue": per_label}
    model = {
        name: value for name, value in plain(cfg.teacher.model).items() if name not in NOT_PRETRAINING_KEYS
    }
    # zero_shot decides what happens after pretraining, not the tower: not part of the key.
    settings = {name: value for name, value in plain(pre).items() if name not in ("zero_shot", "corpus")}
    key = {
        "corpus": corpus_node,
        "model": model,
        "pretrain": settings,
        "fit": {"trainer": plain(cfg.teacher.trainer), "patience": cfg.teacher.patience},
        "k": cfg.task.answer.n,
    }

    def make(folder: Path) -> None:
        corpus = instantiate(pre.corpus, train_per_tissue=per_label, _convert_="all")
        digests = corpus_digests(corpus)
        check_corpus_disjoint(digests, task)
        (folder / CORPUS_DIGESTS).write_text(json.dumps(digests))
        pretrain_teacher(
            corpus,
            make_teacher=partial(instantiate(cfg.teacher.model, _convert_="all"), lr=pre.lr),
            trainer_kwargs=plain(cfg.teacher.trainer),
            batch_size=pre.batch_size,
            k=cfg.task.answer.n,
            patience=cfg.teacher.patience,
            seed=pre.seed,
            out_dir=folder,
            fit_threads=cfg.teacher.fit_threads,
        )

    entry = cached(Path(cfg.paths.cache_dir), "teacher_pretrain", key, make)
    # Every run, against this run's task: the stored digests, not a redrawn corpus.
    check_corpus_disjoint(json.loads((entry / CORPUS_DIGESTS).read_text()), task)
    return entry / CHECKPOINT
