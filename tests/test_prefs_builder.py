"""Teacher rankings become TRL-format preference pairs the spine reads unchanged."""

import datasets
import numpy as np
import pytest

from mint.data.task_data import Sample, TaskData
from mint.pairs.rows import read_preference_rows
from mint.prefs.builder import PromptTemplate, build_preference_rows, choose_labels, save_preference_dataset
from mint.prefs.formats import AnswerFormat

LABELS = [f"Syndrome {c}" for c in "ABCDEFGH"]
FMT = AnswerFormat("POTENTIAL_DISEASES:", n=3)
TEMPLATE = PromptTemplate(system="You are a genetic counselor.", user="Note: {text}\nList 3 diseases.")
PROMPT = TEMPLATE.text_messages  # as a text student reads it


def _task(n_train=4):
    train = [Sample(id=f"p{i}", label=i % len(LABELS), text=f"note {i}") for i in range(n_train)]
    return TaskData("rare_disease", LABELS, {"train": train, "val": [], "test": []})


def test_choose_labels_bottom_hard_and_forced_truth():
    order = [3, 1, 4, 0, 5, 2, 7, 6]  # teacher's best first
    assert choose_labels(order, truth=3, k=3, q=2, negatives="bottom", force_truth=False) == (
        [3, 1, 4],
        [6, 7],
    )
    assert choose_labels(order, truth=3, k=3, q=2, negatives="hard", force_truth=False) == ([3, 1, 4], [0, 5])
    # truth ranked 7th: forced into the last chosen slot and never rejected
    chosen, rejected = choose_labels(order, truth=7, k=3, q=2, negatives="bottom", force_truth=True)
    assert chosen == [3, 1, 7] and 7 not in rejected and rejected == [6, 2]
    # without forcing, a truth the teacher ranks last stays out of both lists
    assert choose_labels(order, truth=6, k=3, q=2, negatives="bottom", force_truth=False) == (
        [3, 1, 4],
        [7, 2],
    )
    with pytest.raises(ValueError, match="exceeds"):
        choose_labels(order, truth=0, k=5, q=3, negatives="bottom", force_truth=False)


def test_rows_follow_the_teacher_and_the_answer_format(tmp_path):
    task = _task()
    scores = np.tile(
        np.arange(len(LABELS), dtype=np.float32)[::-1], (4, 1)
    )  # teacher prefers A > B > ... > H
    rows = build_preference_rows(task, scores, answer=FMT, prompt=PROMPT, q=2)
    assert (
        rows[0]["chosen"][0]["content"]
        == "POTENTIAL_DISEASES:\n1. 'Syndrome A'\n2. 'Syndrome B'\n3. 'Syndrome C'"
    )
    assert rows[0]["rejected"][0]["content"] == "POTENTIAL_DISEASES:\n1. 'Syndrome H'\n2. 'Syndrome G'"
    assert rows[2]["prompt"][1]["content"] == "Note: note 2\nList 3 diseases."
    assert [r["truth"] for r in rows] == ["Syndrome A", "Syndrome B", "Syndrome C", "Syndrome D"]

    save_preference_dataset(rows, tmp_path, config={"k": 3, "q": 2})
    loaded = datasets.load_from_disk(str(tmp_path / "dataset"))
    assert loaded.column_names[:5] == ["id", "truth", "prompt", "chosen", "rejected"]
    assert loaded[0]["prompt"][0] == {"role": "system", "content": "You are a genetic counselor."}
    assert read_preference_rows(tmp_path / "prefs.jsonl")[1]["chosen"] == rows[1]["chosen"]
    card = (tmp_path / "README.md").read_text()
    assert "- pairs: 4" in card and "| Syndrome A | 1 |" in card and '"q": 2' in card
    from huggingface_hub import DatasetCard

    metadata = DatasetCard(card).data  # the Hub's metadata header parses
    assert metadata.task_categories == ["text-generation"] and "mint" in metadata.tags


def test_truth_then_teacher_puts_the_truth_first_and_keeps_the_teachers_order_after_it():
    """Teacher prefers A > B > ... > H for every sample; sample i's truth is label i (A, B, C, D)."""
    scores = np.tile(np.arange(len(LABELS), dtype=np.float32)[::-1], (4, 1))
    rows = build_preference_rows(
        _task(), scores, answer=FMT, prompt=PROMPT, q=2, ranking="truth_then_teacher"
    )
    chosen = [row["chosen"][0]["content"].splitlines()[1:] for row in rows]
    assert chosen[0] == ["1. 'Syndrome A'", "2. 'Syndrome B'", "3. 'Syndrome C'"]  # the teacher was right
    assert chosen[3] == ["1. 'Syndrome D'", "2. 'Syndrome A'", "3. 'Syndrome B'"]  # truth, then A > B
    assert all(
        row["rejected"][0]["content"].splitlines()[1:] == ["1. 'Syndrome H'", "2. 'Syndrome G'"]
        for row in rows
    )
    # a truth the teacher put last comes first all the same, and is never rejected
    last = build_preference_rows(
        _task(), -scores, answer=FMT, prompt=PROMPT, q=2, ranking="truth_then_teacher"
    )  # teacher prefers H > G > ... > A
    assert last[0]["chosen"][0]["content"].splitlines()[1:] == [
        "1. 'Syndrome A'",
        "2. 'Syndrome H'",
        "3. 'Syndrome G'",
    ]
    assert last[0]["rejected"][0]["content"].splitlines()[1:] == ["1. 'Syndrome B'", "2. 'Syndrome C'"]


def test_wrong_score_shape_is_refused():
    with pytest.raises(ValueError, match=r"shape \(4, 3\), expected \(4, 8\)"):
        build_preference_rows(_task(), np.zeros((4, 3)), answer=FMT, prompt=PROMPT, q=2)


def test_truth_ranking_ignores_the_teacher_and_puts_the_truth_first():
    """The teacher-free ablation: the same rows whatever the teacher scored, truth first,
    the rest shuffled per sample (not one fixed list for everyone), never the truth rejected."""
    task = _task(n_train=8)
    rng = np.random.default_rng(0)
    built = [
        build_preference_rows(
            task, rng.normal(size=(8, len(LABELS))), answer=FMT, prompt=PROMPT, q=2, ranking="truth"
        )
        for _ in range(2)
    ]
    assert built[0] == built[1]
    rows = built[0]
    for row in rows:
        assert row["chosen"][0]["content"].splitlines()[1] == f"1. '{row['truth']}'"
        assert row["truth"] not in row["rejected"][0]["content"]
    assert len({row["chosen"][0]["content"].split("\n", 2)[2] for row in rows}) > 1
    with pytest.raises(ValueError, match="task.prefs.ranking='oracle'"):
        build_preference_rows(
            task, np.zeros((8, len(LABELS))), answer=FMT, prompt=PROMPT, q=2, ranking="oracle"
        )
