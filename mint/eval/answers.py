"""Metrics of generated answers against the truth and the teacher (the paper's E1-E3 and CAR)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mint.metrics import bootstrap_ci
from mint.prefs.formats import AnswerFormat


def teacher_agreement(
    answer: Sequence[str], teacher_top: Sequence[str], teacher_bottom: Sequence[str], weight: float
) -> float:
    """CAR = (1 + l)·C·A / (l·C + A) (the paper's teacher-agreement score; `weight` is l).

    C = share of the teacher's top-k the answer contains; A = 1 - share of the
    answer's names that are among the teacher's bottom-q. An empty answer scores 0.
    """
    if not answer or not teacher_top:
        return 0.0
    coverage = len(set(answer) & set(teacher_top)) / len(teacher_top)
    avoidance = 1.0 - len(set(answer) & set(teacher_bottom)) / len(set(answer))
    denominator = weight * coverage + avoidance
    return 0.0 if denominator == 0 else (1 + weight) * coverage * avoidance / denominator


def answer_metrics(
    answers: Sequence[str],
    truths: Sequence[str],
    labels: list[str],
    answer_format: AnswerFormat,
    *,
    teacher_top: Sequence[Sequence[str]] | None = None,
    teacher_bottom: Sequence[Sequence[str]] | None = None,
    car_l: float = 0.5,
    prefix: str = "test",
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Per-run metrics with 95% bootstrap CIs, and one record per answer for predictions.jsonl.

    format_valid: the answer is the header plus exactly n distinct known labels (E1);
    top1: the first matched label is the truth (E3); topk: the truth is among the
    first n matched labels (E2). Misspelt names count when difflib ratio >= 0.8.
    """
    if len(answers) != len(truths):
        raise ValueError(f"{len(answers)} answers for {len(truths)} truths")
    records, per_sample = [], {"format_valid": [], "top1": [], "topk": []}
    if teacher_top is not None:
        per_sample["car"] = []
    for i, (answer, truth) in enumerate(zip(answers, truths, strict=True)):
        parsed = answer_format.parse(answer, labels)
        ranked = parsed.ranked_labels()[: answer_format.n]
        record: dict[str, Any] = {
            "answer": answer,
            "parsed": ranked,
            "truth": truth,
            "format_valid": answer_format.is_valid(parsed),
            "top1": bool(ranked) and ranked[0] == truth,
            "topk": truth in ranked,
        }
        if teacher_top is not None and teacher_bottom is not None:
            record["car"] = teacher_agreement(ranked, teacher_top[i], teacher_bottom[i], car_l)
        for name in per_sample:
            per_sample[name].append(float(record[name]))
        records.append(record)
    metrics: dict[str, float] = {}
    for name, values in per_sample.items():
        mean, low, high = bootstrap_ci(np.array(values), n_boot=n_boot, seed=seed)
        metrics[f"{prefix}/{name}"] = mean
        metrics[f"{prefix}/{name}_ci_low"] = low
        metrics[f"{prefix}/{name}_ci_high"] = high
    return metrics, records
