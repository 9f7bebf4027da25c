"""Answer metrics on hand-written answers, and the teacher-agreement score by hand."""

import pytest

from mint.eval.answers import answer_metrics, teacher_agreement
from mint.prefs.formats import AnswerFormat

LABELS = ["Alpha syndrome", "Beta disease", "Gamma dysplasia", "Delta anomaly", "Epsilon syndrome"]
FMT = AnswerFormat("POTENTIAL_DISEASES:", n=2)


def test_answer_metrics_by_hand():
    answers = [
        "POTENTIAL_DISEASES:\n1. 'Alpha syndrome'\n2. 'Beta disease'",  # valid, top1
        "POTENTIAL_DISEASES:\n1. 'Beta diseas'\n2. 'Gamma dysplasia'",  # valid (misspelt), truth 2nd
        "I am not sure.\n1. Delta anomaly",  # no header, one item, wrong
        "",  # empty
    ]
    truths = ["Alpha syndrome", "Gamma dysplasia", "Gamma dysplasia", "Alpha syndrome"]
    metrics, records = answer_metrics(answers, truths, LABELS, FMT, n_boot=200)
    assert metrics["test/format_valid"] == pytest.approx(0.5)
    assert metrics["test/top1"] == pytest.approx(0.25)
    assert metrics["test/topk"] == pytest.approx(0.5)
    assert metrics["test/top1_ci_low"] <= 0.25 <= metrics["test/top1_ci_high"]
    assert records[1]["parsed"] == ["Beta disease", "Gamma dysplasia"] and records[1]["topk"]
    assert records[3] == {
        "answer": "",
        "parsed": [],
        "truth": "Alpha syndrome",
        "format_valid": False,
        "top1": False,
        "topk": False,
    }


def test_teacher_agreement_by_hand():
    top, bottom = ["A", "B"], ["D", "E"]
    assert teacher_agreement(["A", "B"], top, bottom, weight=0.5) == pytest.approx(1.0)
    # C = 1/2, A = 1 - 1/2: (1.5 * 0.25) / (0.25 + 0.5) = 0.5
    assert teacher_agreement(["A", "E"], top, bottom, weight=0.5) == pytest.approx(0.5)
    assert teacher_agreement([], top, bottom, weight=0.5) == 0.0
    assert teacher_agreement(["D", "E"], top, bottom, weight=0.5) == 0.0


def test_car_is_reported_when_teacher_lists_are_given():
    answers = ["POTENTIAL_DISEASES:\n1. 'Alpha syndrome'\n2. 'Beta disease'"]
    metrics, records = answer_metrics(
        answers,
        ["Alpha syndrome"],
        LABELS,
        FMT,
        teacher_top=[["Alpha syndrome", "Beta disease"]],
        teacher_bottom=[["Delta anomaly", "Epsilon syndrome"]],
        n_boot=50,
    )
    assert metrics["test/car"] == pytest.approx(1.0) and records[0]["car"] == pytest.approx(1.0)
