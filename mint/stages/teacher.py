"""The data and teacher stages: load the task's data, train the teacher (or find it in the cache).

The teacher's entry in the stage cache (mint.cache) is keyed by exactly what determines it:
the data's fingerprint, the teacher config, the list length and the seed. A sweep over
`optim=` therefore trains one teacher. Its training rankings are out-of-fold
(mint.teacher.crossfit): ranked in-sample, the teacher is always right.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from mint.cache import cached, config_key
from mint.config import plain
from mint.data.task_data import TaskData
from mint.teacher.crossfit import TeacherResult, fit_teacher


def is_pipeline_task(task: DictConfig) -> bool:
    """A task with a data source runs data -> teacher -> prefs; `task=custom|example` starts at the student."""
    return "source" in task


def load_task(task: DictConfig) -> TaskData:
    """The task's data, refused before any training when it cannot serve the run: an empty split,
    or fewer labels than an answer, its negatives and the truth need."""
    data = instantiate(task.source, _convert_="all")
    if not isinstance(data, TaskData):
        raise TypeError(f"task.source ({task.source._target_}) returned {type(data).__name__}, not TaskData")
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
    key: dict[str, Any] = {"data": task.fingerprint(), "teacher": plain(teacher), "k": k, "seed": seed}

    def make(folder: Path) -> None:
        fit_teacher(
            task,
            make_teacher=instantiate(teacher.model, _convert_="all"),
            trainer_kwargs=plain(teacher.trainer),
            batch_size=teacher.batch_size,
            folds=teacher.folds,
            k=k,
            out_dir=folder / "teacher",
            seed=seed,
            patience=teacher.patience,
            fit_threads=teacher.fit_threads,
        )

    entry = cached(Path(cfg.paths.cache_dir), "teacher", key, make)
    return TeacherResult.load(entry / "teacher"), config_key(key)
