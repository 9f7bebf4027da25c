"""Teacher rankings -> preference pairs in TRL's conversational format.

For each training sample the prompt is what the *student* sees (the note, or the
image plus a question), `chosen` is the teacher's top-k labels and `rejected`
its bottom-q labels (or, with `negatives="hard"`, the labels it ranks just
below the top-k), each rendered in the task's answer format. The teacher's
scores of training samples must be out-of-fold (see mint.teacher.crossfit):
ranked in-sample, the teacher is always right and `chosen` copies the label.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from mint.data.task_data import Sample, TaskData
from mint.files import sha256_hex
from mint.prefs.formats import AnswerFormat

Negatives = Literal["bottom", "hard"]
Ranking = Literal["teacher", "truth", "truth_then_teacher"]
RANKINGS: tuple[str, ...] = get_args(Ranking)


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
    system: str
    user: str  # str.format template; `{text}` is the sample's text (the note) when the student reads it

    def text_messages(self, sample: Sample) -> list[dict[str, Any]]:
        """The prompt of a text student: system and user turns as strings."""
        user_text = self.user.format(text=sample.text)
        return [{"role": "system", "content": self.system}, {"role": "user", "content": user_text}]

    def image_messages(self, sample: Sample) -> list[dict[str, Any]]:
        """The prompt of an image student, in the vision chat format (TRL's too): every content a
        list of parts, so a dataset column has one type; the image part stands before the question."""
        user_text = self.user.format(text=sample.text)
        return [
            {"role": "system", "content": [{"type": "text", "text": self.system}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": user_text}]},
        ]


def choose_labels(
    order: Sequence[int], truth: int, *, k: int, q: int, negatives: Negatives, force_truth: bool
) -> tuple[list[int], list[int]]:
    """(chosen, rejected) label indices from a best-first teacher ordering."""
    if k + q + 1 > len(order):  # + 1: the truth, which is never rejected
        raise ValueError(f"task.answer.n={k} + task.prefs.q={q} + 1 exceeds the {len(order)} labels")
    chosen = list(order[:k])
    if force_truth and truth not in chosen:
        chosen[-1] = truth  # the truth takes the weakest chosen slot
    # The truth is never a negative: the teacher may rank it low, but penalising the
    # right answer would teach the student the teacher's mistakes as certainties.
    remaining = [label for label in order if label not in chosen and label != truth]
    if negatives == "bottom":
        rejected = remaining[-q:][::-1]  # the teacher's least likely first
    elif negatives == "hard":
        rejected = remaining[:q]  # just below the top-k: look-alikes
    else:
        raise ValueError(f"prefs.negatives={negatives!r}: expected 'bottom' or 'hard'")
    return chosen, rejected


def truth_first_order(sample: Sample, n_labels: int) -> list[int]:
    """The true label, then every other label in a random order of this sample's own (seeded by
    its id): a ranking that carries the label and nothing a teacher knows."""
    rng = np.random.default_rng(int(sha256_hex(sample.id)[:16], 16))
    others = [label for label in range(n_labels) if label != sample.label]
    return [sample.label] + rng.permutation(others).tolist()


def build_preference_rows(
    task: TaskData,
    train_scores: np.ndarray,
    *,
    answer: AnswerFormat,
    prompt: Callable[[Sample], list[dict[str, Any]]],
    q: int,
    negatives: Negatives = "bottom",
    force_truth: bool = False,
    ranking: Ranking = "teacher",
) -> list[dict[str, Any]]:
    """One conversational preference row per training sample, in task.splits['train'] order.

    `prompt(sample)` is the prompt as the student reads it (the student kind renders the
    template: mint/student/kinds.py); an image student's rows get their images attached after.
    `ranking="truth"` ignores the teacher: `truth_first_order` (the teacher-free ablation);
    `"truth_then_teacher"` puts the true label first and the teacher's order after it (the label
    where it is known for sure, the teacher's knowledge for the rest of the list).
    """
    if ranking not in RANKINGS:
        raise ValueError(f"task.prefs.ranking={ranking!r}: expected one of {', '.join(RANKINGS)}")
    samples = task.splits["train"]
    if train_scores.shape != (len(samples), len(task.labels)):
        raise ValueError(
            f"teacher train scores have shape {train_scores.shape}, expected {(len(samples), len(task.labels))}"
        )
    rejected_format = dataclasses.replace(answer, n=q)
    rows = []
    for sample, scores in zip(samples, train_scores, strict=True):
        if ranking == "truth":
            order = truth_first_order(sample, len(task.labels))
        else:
            order = np.argsort(-scores, kind="stable").tolist()
            if ranking == "truth_then_teacher":
                order = [sample.label] + [label for label in order if label != sample.label]
        chosen, rejected = choose_labels(
            order, sample.label, k=answer.n, q=q, negatives=negatives, force_truth=force_truth
        )
        row: dict[str, Any] = {
            "id": sample.id,
            # "truth", not "label": TRL reads a `label` column as the unpaired-preference flag
            "truth": task.labels[sample.label],
            "prompt": prompt(sample),
            "chosen": [{"role": "assistant", "content": answer.render([task.labels[i] for i in chosen])}],
            "rejected": [
                {"role": "assistant", "content": rejected_format.render([task.labels[i] for i in rejected])}
            ],
        }
        rows.append(row)
    return rows


def dataset_card(rows: list[dict[str, Any]], config: dict[str, Any]) -> str:
    """A README for the saved dataset: counts, label distribution, one example, the config."""
    counts = Counter(row["truth"] for row in rows)
    truth_in_chosen = sum(row["truth"] in row["chosen"][0]["content"] for row in rows) / max(len(rows), 1)
    example = {k: v for k, v in rows[0].items() if k != "images"} if rows else {}
    from huggingface_hub import DatasetCardData

    images = bool(rows) and "images" in rows[0]
    metadata = DatasetCardData(  # the Hub's dataset card header (YAML front matter)
        language=["en"],
        pretty_name="MINT preference dataset",
        task_categories=["image-text-to-text" if images else "text-generation"],
        tags=["mint", "preference", "dpo", "orpo", "trl", "biomedical", "synthetic-preferences"],
        size_categories=["n<1K" if len(rows) < 1000 else "1K<n<10K" if len(rows) < 10000 else "10K<n<100K"],
    )
    lines = [
        "---",
        metadata.to_yaml(),
        "---",
        "",
        "# MINT preference dataset",
        "",
        "TRL conversational preference format: `prompt`, `chosen`, `rejected` are message lists.",
        "`chosen` = the teacher's top-ranked labels, `rejected` = its low-ranked labels (out-of-fold rankings).",
        "",
        f"- pairs: {len(rows)}",
        f"- labels: {len(counts)}",
        f"- truth inside `chosen`: {truth_in_chosen:.3f}",
        "",
        "| label | pairs |",
        "|---|---|",
        *[f"| {label} | {n} |" for label, n in sorted(counts.items())],
        "",
        "## Example",
        "",
        "```json",
        json.dumps(example, indent=2, default=str),
        "```",
        "",
        "## Config",
        "",
        "```json",
        json.dumps(config, indent=2, sort_keys=True, default=str),
        "```",
        "",
    ]
    return "\n".join(lines)


def save_preference_dataset(rows: list[dict[str, Any]], folder: Path, config: dict[str, Any]) -> None:
    """`folder/dataset` (datasets.save_to_disk), `folder/prefs.jsonl`, `folder/README.md`.

    Writes into `folder` directly: callers pass a temp folder (mint.cache.cached) that is renamed when complete.
    """
    import datasets  # heavy import, only where a dataset is written

    text_rows = [{k: v for k, v in row.items() if k != "images"} for row in rows]
    with open(folder / "prefs.jsonl", "w") as f:
        for row in text_rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    table = datasets.Dataset.from_list(rows if rows and "images" in rows[0] else text_rows)
    table.save_to_disk(str(folder / "dataset"))
    (folder / "README.md").write_text(dataset_card(rows, config))
