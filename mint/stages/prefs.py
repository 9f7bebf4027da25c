"""The preference stage: the student's training and validation rows.

A pipeline task builds them from the teacher's rankings (`prefs_stage`): `chosen` = the
teacher's top-k labels, `rejected` = its bottom-q (or hard) labels, for every training
sample (out-of-fold rankings) and every validation sample. The set is saved as an HF dataset
plus JSONL in TRL's conversational format, in the stage cache keyed by the teacher's key and
the prompt/answer/pair settings, so every method of a sweep trains on the same pairs. Before
the rows are used, the leakage checks confirm that no held-out sample reached them.

`task=custom|example` reads a preference set the user points to instead (`custom_rows`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from mint.cache import cached
from mint.config import plain
from mint.data.example_prefs import make_example_prefs, write_jsonl
from mint.data.task_data import TaskData, spread_indices
from mint.leakage import check_pipeline_run
from mint.pairs.rows import ACCEPTED_FORMS, Rows, looks_like_hub_id, read_preference_rows, split_rows
from mint.prefs.builder import PromptTemplate, build_preference_rows, save_preference_dataset
from mint.prefs.formats import AnswerFormat
from mint.student.kinds import StudentKind
from mint.teacher.crossfit import TeacherResult

log = logging.getLogger("mint")
LAYOUT = 3  # bump when the cache entry's files change, so older entries are not read


def prefs_stage(
    cfg: DictConfig, kind: StudentKind, task: TaskData, teacher: TeacherResult, teacher_key: str
) -> tuple[Rows, dict[str, Any]]:
    """The rows (images attached for an image student) and the set's `prefs/...` statistics."""
    t = cfg.task
    settings = {
        "layout": LAYOUT,
        "teacher": teacher_key,
        "answer": plain(t.answer),
        "prompt": plain(t.prompt),
        "prefs": plain(t.prefs),
        "student_modality": str(kind.modality),
    }
    answer = AnswerFormat(header=t.answer.header, n=t.answer.n)
    template = PromptTemplate(system=t.prompt.system, user=t.prompt.user)

    def rows_for(split: str) -> list[dict[str, Any]]:
        split_task = TaskData(
            task.name, task.labels, {**{s: [] for s in task.splits}, "train": task.splits[split]}
        )
        return build_preference_rows(
            split_task,
            teacher.scores[split],
            answer=answer,
            prompt=lambda sample: kind.prompt(template, sample),
            q=t.prefs.q,
            negatives=t.prefs.negatives,
            force_truth=t.prefs.force_truth,
            ranking=t.prefs.ranking,
        )

    def make(folder: Path) -> None:
        started = time.perf_counter()
        train_rows, val_rows = rows_for("train"), rows_for("val")
        kind.attach_images(train_rows, task)  # the saved HF dataset carries an image student's images
        built = time.perf_counter() - started
        save_preference_dataset(train_rows, folder, config=settings)
        with open(folder / "val.jsonl", "w") as f:
            for row in val_rows:
                f.write(
                    json.dumps({k: v for k, v in row.items() if k != "images"}, ensure_ascii=False) + "\n"
                )
        stats = {
            "prefs/train_pairs": len(train_rows),
            "prefs/val_pairs": len(val_rows),
            "prefs/pairs_per_s": (len(train_rows) + len(val_rows)) / max(built, 1e-9),
            "prefs/total_s": time.perf_counter() - started,
        }
        (folder / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")

    entry = cached(Path(cfg.paths.cache_dir), "prefs", settings, make)
    log.info("preference dataset: %s", entry)
    train = read_preference_rows(entry / "prefs.jsonl")  # grouped by class, as the split is
    rows = Rows(
        train=[train[i] for i in spread_indices(len(train), t.max_samples)],
        val=read_preference_rows(entry / "val.jsonl"),
        source=entry,
    )
    check_pipeline_run(  # nothing held out reached the teacher's folds or the student's rows
        task,
        teacher_train_ids=teacher.ids["train"],
        train_rows=rows.train,
        val_rows=rows.val,
        prompt=kind.held_out_prompt(template),
    )
    kind.attach_images(rows.train + rows.val, task)
    return rows, json.loads((entry / "stats.json").read_text())


def custom_rows(task: DictConfig, seed: int) -> Rows:
    """`task=custom|example`: the preference set at `task.prefs_path`, split into train and val."""
    path = Path(task.prefs_path)
    if task.get("example") is not None and not path.exists():
        log.info("generating the example preference set at %s", path)
        write_jsonl(make_example_prefs(n=task.example.n, seed=task.example.seed), path)
    if not path.exists() and not looks_like_hub_id(str(task.prefs_path)):
        raise FileNotFoundError(
            f"task.prefs_path={str(path)!r} does not exist: expected a TRL preference dataset "
            f"({ACCEPTED_FORMS})"
        )
    rows = read_preference_rows(path, on_error=str(task.on_error), split=str(task.prefs_split))
    if task.max_samples is not None:
        rows = rows[: task.max_samples]
    split = split_rows(rows, task.val_fraction, seed)
    return dataclasses.replace(split, source=path if path.exists() else None)
