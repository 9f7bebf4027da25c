"""Leakage checks: no validation or test sample may reach what the models learn from.

MINT builds several training artifacts from one TaskData: the teacher's training
folds, the preference dataset (prefs.jsonl), the student's SFT/preference rows and,
for the RAG baseline, a knowledge base. A held-out sample in any of them inflates
every reported number, silently. These checks run on every pipeline run and stop it
with a `LeakageError` that names the artifact, the split and a few offending ids.

Two kinds of check:
- by id (`check_disjoint`): the artifact's sample ids against the held-out ids;
- by content (`check_no_shared_content`): the same input under another id, e.g. a
  test note copied into the training split. Content is what the student reads: the
  note text (whitespace- and case-normalised) for text tasks, the pixels for image tasks.

Validation samples drive the teacher's early stopping and the student's `val/`
metrics by design; they must still never be *trained on*.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from mint.data.task_data import Sample, TaskData
from mint.files import sha256_hex

SHOWN = 5  # ids named in an error message


class LeakageError(RuntimeError):
    """A held-out (validation or test) sample reached a training artifact."""


def _shown(items: Iterable[str]) -> str:
    items = sorted(items)
    more = f" (and {len(items) - SHOWN} more)" if len(items) > SHOWN else ""
    return ", ".join(repr(i) for i in items[:SHOWN]) + more


def check_disjoint(artifact: str, used_ids: Iterable[str], held_out: Mapping[str, Iterable[str]]) -> None:
    """Raise LeakageError when an id of `used_ids` (what `artifact` was built from) is held out.

    held_out maps a split name ("val", "test") to its sample ids.
    """
    used = {str(i) for i in used_ids}
    for split, ids in held_out.items():
        leaked = used & {str(i) for i in ids}
        if leaked:
            raise LeakageError(
                f"{artifact} contains {len(leaked)} {split} sample(s): {_shown(leaked)}. "
                f"Held-out samples must never be trained on; rebuild {artifact} from the train split only."
            )


def check_no_shared_content(
    artifact: str, used: Mapping[str, str], held_out: Mapping[str, Mapping[str, str]]
) -> None:
    """Raise LeakageError when content used by `artifact` equals held-out content under any id.

    used maps id -> content digest (see `content_digest`); held_out maps split -> {id: digest}.
    Empty content (digest "") is never compared: an empty note says nothing about a sample.
    """
    by_digest: dict[str, list[str]] = {}
    for sample_id, digest in used.items():
        if digest:
            by_digest.setdefault(digest, []).append(sample_id)
    for split, samples in held_out.items():
        pairs = [
            f"{used_id} = {split} {held_id}"
            for held_id, digest in samples.items()
            if digest
            for used_id in by_digest.get(digest, [])
        ]
        if pairs:
            raise LeakageError(
                f"{artifact} contains the content of {len(pairs)} {split} sample(s) under another id: "
                f"{_shown(pairs)}. The same input in training and in {split} inflates every metric; "
                "remove the duplicates from the data."
            )


def normalise_text(text: str) -> str:
    return " ".join(text.split()).casefold()


# What the student reads of a sample, as bytes (b"" when nothing): the student kind's
# `student_input` (mint/student/kinds.py) - the normalised note, or the pixels.
StudentInput = Callable[[Sample], bytes]


def content_digest(sample: Sample, student_input: StudentInput) -> str:
    """sha256 of what the student reads of `sample` ("" when it reads nothing there)."""
    data = student_input(sample)
    return sha256_hex(data) if data else ""


def held_out_ids(task: TaskData, splits: Iterable[str] = ("val", "test")) -> dict[str, set[str]]:
    return {split: {s.id for s in task.splits[split]} for split in splits}


def check_task_splits(task: TaskData, student_input: StudentInput) -> None:
    """The splits themselves: no input of val or test reappears in train (or of test in val)."""
    digests = {
        split: {s.id: content_digest(s, student_input) for s in task.splits[split]}
        for split in ("train", "val", "test")
    }
    check_no_shared_content(
        f"{task.name} train split", digests["train"], {"val": digests["val"], "test": digests["test"]}
    )
    check_no_shared_content(f"{task.name} val split", digests["val"], {"test": digests["test"]})


def _prompt_key(prompt: Any) -> str:
    return normalise_text(json.dumps(prompt, sort_keys=True, ensure_ascii=False))


def check_preference_rows(
    artifact: str,
    rows: list[dict],
    held_out: Mapping[str, Iterable[str]],
    held_out_prompts: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """Preference (or SFT) rows: by their `id` and, when given, by their prompt text.

    held_out_prompts maps split -> {id: prompt messages} as the student would see them; a row
    whose prompt equals one is a held-out sample under another id (a tampered or merged file).
    Rows without an `id` fail: a pipeline row always carries its sample id.
    """
    missing = [i for i, row in enumerate(rows) if "id" not in row]
    if missing:
        raise LeakageError(
            f"{artifact}: {len(missing)} row(s) carry no sample 'id' (first at row {missing[0]}); "
            "pipeline preference rows must name their sample so leakage can be checked"
        )
    check_disjoint(artifact, (row["id"] for row in rows), held_out)
    if held_out_prompts:
        used = {str(row["id"]): _prompt_key(row["prompt"]) for row in rows}
        check_no_shared_content(
            artifact,
            used,
            {
                split: {i: _prompt_key(p) for i, p in prompts.items()}
                for split, prompts in held_out_prompts.items()
            },
        )


def check_pipeline_run(
    task: TaskData,
    *,
    teacher_train_ids: Iterable[str],
    train_rows: list[dict],
    val_rows: list[dict],
    prompt: Callable[[Sample], list[dict]] | None = None,
) -> None:
    """Everything a pipeline run trains on, against the held-out splits of `task`.

    - the teacher's training folds (its cached `ids_train.json`) hold no val/test id;
    - the preference/SFT training rows hold no val/test id, nor a val/test prompt;
    - the validation rows hold no test id, nor a test prompt.
    `prompt(sample)` renders a sample's prompt as the student sees it; None when the prompt is
    the same for every sample (an image student: its images are compared in `check_task_splits`).
    """
    held = held_out_ids(task)
    prompts = {
        split: {s.id: prompt(s) for s in task.splits[split]}
        for split in ("val", "test")
        if prompt is not None
    }
    check_disjoint("teacher training folds", teacher_train_ids, held)
    check_preference_rows(
        "preference dataset (prefs.jsonl, the student's training rows)", train_rows, held, prompts
    )
    check_preference_rows(
        "validation preference rows (val.jsonl)",
        val_rows,
        {"test": held["test"]},
        {"test": prompts["test"]} if prompts else None,
    )
