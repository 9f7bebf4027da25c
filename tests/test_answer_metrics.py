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


def test_closed_set_ranking_finds_the_label_a_student_was_trained_to_say(tmp_path):
    """A student that learned to answer 'Beta disease' ranks it first; the metric needs no parsing."""
    import torch

    from mint.config import Modality
    from mint.eval.ranking import closed_set_metrics, label_candidates
    from mint.pairs.rows import pairs_to_texts
    from mint.student import build_tiny_llama, load_student
    from mint.student.kinds import KINDS

    fmt2 = AnswerFormat("POTENTIAL_DISEASES:", n=2)
    prompt = [{"role": "user", "content": "Which disease?"}]
    target = "POTENTIAL_DISEASES:\n1. 'Beta disease'\n2. 'Alpha syndrome'"
    rows = [
        {
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": target}],
            "rejected": [{"role": "assistant", "content": "x"}],
        }
    ]
    model, tok = load_student(
        None, cache_dir=str(tmp_path), build=build_tiny_llama, corpus=pairs_to_texts(rows) + LABELS
    )
    text = tok.apply_chat_template(prompt + rows[0]["chosen"], tokenize=False)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(60):  # memorise the one answer
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    candidates = label_candidates(tok, LABELS, fmt2)
    scores = KINDS[Modality.text].label_scores(model, tok, prompt, None, candidates).numpy()[None]
    metrics = closed_set_metrics(scores, [1], fmt2.n, n_boot=10, seed=0)
    assert metrics["test/rank_top1"] == 1.0 and metrics["test/rank_topk"] == 1.0
    wrong = closed_set_metrics(scores, [3], fmt2.n, n_boot=10, seed=0)
    assert wrong["test/rank_top1"] == 0.0


def test_a_capped_evaluation_spreads_over_the_split_not_its_first_classes():
    """task.eval.max_samples on a split grouped by class (as the simulated ones are) still sees
    every class, and the same samples every time."""
    from mint.data.task_data import spread_indices

    labels = [c for c in range(19) for _ in range(12)]  # 228 test images, 12 per tissue
    picked = spread_indices(len(labels), 80)
    assert len(picked) == len(set(picked)) == 80 and picked == sorted(picked)
    assert {labels[i] for i in picked} == set(range(19))
    assert spread_indices(len(labels), 80) == picked
    assert spread_indices(5, None) == spread_indices(5, 9) == [0, 1, 2, 3, 4]
