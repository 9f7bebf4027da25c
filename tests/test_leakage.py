"""No validation or test sample reaches teacher training, the preference set, the SFT rows or a
knowledge base (mint/leakage.py), and a pipeline run with a planted leak refuses to go on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mint.cache import MANIFEST
from mint.config import Modality
from mint.data.rare_disease import simulate_rare_disease
from mint.data.task_data import Sample, TaskData
from mint.files import file_checksums
from mint.leakage import (
    LeakageError,
    check_disjoint,
    check_pipeline_run,
    check_task_splits,
    held_out_ids,
)
from mint.prefs.builder import PromptTemplate
from mint.run import run
from mint.stages.teacher import load_task
from mint.student.kinds import KINDS

TEMPLATE = PromptTemplate(system="You are a counselor.", user="{text}\nList the diseases.")
TEXT, IMAGE = KINDS[Modality.text], KINDS[Modality.image]


def toy_task(train_text: str = "tall, seizures", image: bool = False) -> TaskData:
    def sample(i: str, label: int, text: str, seed: int) -> Sample:
        pixels = np.random.default_rng(seed).integers(0, 255, (4, 4, 3), dtype=np.uint8) if image else None
        return Sample(i, label, text, image=pixels)

    return TaskData(
        "toy",
        ["A", "B"],
        {
            "train": [sample("p1", 0, train_text, 1), sample("p2", 1, "short stature", 2)],
            "val": [sample("p3", 0, "cleft palate", 3)],
            "test": [sample("p4", 1, "Tall,   Seizures", 4), sample("p5", 0, "", 5)],
        },
    )


def rows_for(task: TaskData, split: str) -> list[dict]:
    return [
        {
            "id": s.id,
            "prompt": TEMPLATE.text_messages(s),
            "chosen": [{"role": "assistant", "content": "A"}],
            "rejected": [{"role": "assistant", "content": "B"}],
        }
        for s in task.splits[split]
    ]


def test_check_disjoint_names_the_artifact_the_split_and_a_few_ids():
    held = {"val": {"v1"}, "test": {f"t{i}" for i in range(8)}}
    check_disjoint("RAG knowledge base", ["a", "b"], held)  # nothing shared: passes
    with pytest.raises(LeakageError, match=r"RAG knowledge base contains 1 val sample\(s\): 'v1'"):
        check_disjoint("RAG knowledge base", ["a", "v1"], held)
    with pytest.raises(LeakageError) as err:
        check_disjoint("RAG knowledge base", [f"t{i}" for i in range(8)], {"test": held["test"]})
    assert "8 test sample(s): 't0', 't1', 't2', 't3', 't4' (and 3 more)" in str(err.value)


def test_the_same_note_in_train_and_test_under_another_id_is_a_leak():
    check_task_splits(
        toy_task(train_text="tall, deaf"), TEXT.student_input
    )  # different notes; empty ones ignored
    with pytest.raises(
        LeakageError, match=r"toy train split contains the content of 1 test sample.*p1 = test p4"
    ):
        check_task_splits(toy_task(), TEXT.student_input)  # "tall, seizures" vs "Tall,   Seizures"


def test_the_same_image_in_train_and_test_is_a_leak_for_an_image_student():
    task = toy_task(train_text="tall, deaf", image=True)
    check_task_splits(task, IMAGE.student_input)
    copied = Sample("p9", 0, "another description", image=task.splits["test"][0].image.copy())
    task.splits["train"].append(copied)
    with pytest.raises(LeakageError, match="p9 = test p4"):
        check_task_splits(task, IMAGE.student_input)


def test_every_training_artifact_of_a_pipeline_run_is_checked():
    task = toy_task(train_text="tall, deaf")
    train, val = rows_for(task, "train"), rows_for(task, "val")
    clean = dict(
        teacher_train_ids=["p1", "p2"], train_rows=train, val_rows=val, prompt=TEXT.held_out_prompt(TEMPLATE)
    )
    check_pipeline_run(task, **clean)

    with pytest.raises(LeakageError, match=r"teacher training folds contains 1 val sample\(s\): 'p3'"):
        check_pipeline_run(task, **{**clean, "teacher_train_ids": ["p1", "p2", "p3"]})
    with pytest.raises(LeakageError, match=r"preference dataset .* contains 1 test sample\(s\): 'p4'"):
        check_pipeline_run(task, **{**clean, "train_rows": train + rows_for(task, "test")[:1]})
    # a test patient's prompt under a training id (a merged or hand-edited file)
    tampered = [{**train[0], "prompt": rows_for(task, "test")[0]["prompt"]}, train[1]]
    with pytest.raises(LeakageError, match=r"preference dataset .* content of 1 test sample.*p1 = test p4"):
        check_pipeline_run(task, **{**clean, "train_rows": tampered})
    with pytest.raises(LeakageError, match=r"validation preference rows .* 1 test sample\(s\): 'p4'"):
        check_pipeline_run(task, **{**clean, "val_rows": val + rows_for(task, "test")[:1]})
    with pytest.raises(LeakageError, match="carry no sample 'id'"):
        check_pipeline_run(
            task, **{**clean, "train_rows": [{k: v for k, v in train[0].items() if k != "id"}]}
        )
    assert held_out_ids(task) == {"val": {"p3"}, "test": {"p4", "p5"}}


SMOKE_PIPELINE = ("task=rare_disease", "debug=smoke", "optim=sft", "trainer.max_steps=2")


def leaky_rare_disease() -> TaskData:
    """A task source whose training split holds a copy of a test patient's note under a new id."""
    task = simulate_rare_disease(n_diseases=24, patients_per_disease=10, seed=0)
    test = task.splits["test"][0]
    task.splits["train"].append(Sample("copied-patient", test.label, test.text, vector=test.vector))
    return task


def test_a_run_whose_data_repeats_a_test_note_in_train_refuses_before_the_teacher(make_cfg, tmp_path):
    cfg = make_cfg(*SMOKE_PIPELINE, output_dir=tmp_path / "run")
    cfg.task.source = {"_target_": f"{__name__}.leaky_rare_disease"}
    cfg.paths.cache_dir = str(tmp_path / "cache")
    with pytest.raises(LeakageError, match="copied-patient = test"):
        run(cfg)
    assert not (tmp_path / "cache" / "teacher").exists()  # no teacher was trained on it
    assert not (tmp_path / "run" / "results.json").exists()


def test_a_tampered_preference_set_with_a_valid_manifest_stops_the_run(make_cfg, tmp_path, shared_cache):
    """Someone edits prefs.jsonl in the cache and rewrites its manifest: the checksums pass, the
    leakage check does not."""
    cache = tmp_path / "cache"  # a private cache to tamper with
    if (shared_cache / "embeddings").is_dir():  # MiniLM note embeddings: reuse, they take a while
        shutil.copytree(shared_cache / "embeddings", cache / "embeddings")
    cfg = make_cfg(*SMOKE_PIPELINE, "stage=prefs", output_dir=tmp_path / "run")
    cfg.paths.cache_dir = str(cache)
    run(cfg)  # trains the teacher and builds the preference set, in the private cache
    (entry,) = [p for p in (cache / "prefs").iterdir() if not p.name.startswith(".")]
    task = load_task(cfg.task)
    val_note = task.splits["val"][0]
    rows = [json.loads(line) for line in (entry / "prefs.jsonl").read_text().splitlines()]
    train_note = {s.id: s.text for s in task.splits["train"]}[rows[0]["id"]]
    user = rows[0]["prompt"][-1]
    assert train_note in user["content"]
    user["content"] = user["content"].replace(train_note, val_note.text)  # a val patient, a train id
    (entry / "prefs.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    manifest = json.loads((entry / MANIFEST).read_text())
    (entry / MANIFEST).write_text(json.dumps({**manifest, "files": file_checksums(entry, skip=MANIFEST)}))

    cfg = make_cfg(*SMOKE_PIPELINE, "stage=student", output_dir=tmp_path / "student_run")
    cfg.paths.cache_dir = str(cache)
    with pytest.raises(LeakageError, match=rf"preference dataset .*{rows[0]['id']} = val {val_note.id}"):
        run(cfg)
    assert not (Path(cfg.paths.output_dir) / "student").exists()
