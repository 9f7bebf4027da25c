"""The MINT pipeline end to end on task=rare_disease (smoke size): teacher -> prefs -> student -> eval."""

from __future__ import annotations

import csv
import json

import datasets
import pytest
from PIL import Image

import mint.stages.prefs
import mint.stages.teacher
from mint.data.tissue import TISSUES
from mint.pairs.rows import read_preference_rows
from mint.run import run
from mint.stages.prefs import prefs_stage
from mint.stages.teacher import load_task, teacher_stage
from mint.student.kinds import student_kind


@pytest.fixture
def count_teacher_fits(monkeypatch):
    calls = []
    real = mint.stages.teacher.fit_teacher

    def counting(*args, **kwargs):
        calls.append(kwargs["out_dir"])
        return real(*args, **kwargs)

    monkeypatch.setattr(mint.stages.teacher, "fit_teacher", counting)
    return calls


def test_rare_disease_pipeline_runs_end_to_end_and_a_second_method_reuses_teacher_and_prefs(
    make_cfg, tmp_path, count_teacher_fits, monkeypatch
):
    prefs_builds = []
    real_rows = mint.stages.prefs.build_preference_rows
    monkeypatch.setattr(
        mint.stages.prefs,
        "build_preference_rows",
        lambda *a, **k: prefs_builds.append(1) or real_rows(*a, **k),
    )

    def pipeline(method: str) -> dict:
        cfg = make_cfg("task=rare_disease", f"optim={method}", "debug=smoke", output_dir=tmp_path / method)
        cfg.paths.cache_dir = str(tmp_path / "cache")  # this test's own: it counts every build
        return run(cfg)

    orpo = pipeline("orpo")
    assert len(count_teacher_fits) == 1 and prefs_builds  # built once, into the empty cache
    built = len(prefs_builds)
    sft = pipeline("sft")
    assert len(count_teacher_fits) == 1 and len(prefs_builds) == built  # the second method reused both

    for results in (orpo, sft):
        assert {
            "teacher/test/top1",
            "teacher/test/topk",
            "test/format_valid",
            "test/top1",
            "test/topk",
            "test/car",
            "test/rank_top1",
            "test/rank_topk",
            "prefs/pairs_per_s",
            "val/loss",
            "train/steps",
        } <= results.keys()
        assert 0.0 <= results["test/top1"] <= results["test/topk"] <= 1.0
        assert 0.0 <= results["test/rank_top1"] <= results["test/rank_topk"] <= 1.0
        assert results["test/top1_ci_low"] <= results["test/top1"] <= results["test/top1_ci_high"]
    # the teacher is well above chance (1/24 top-1) even at smoke size
    assert orpo["teacher/test/topk"] > 0.6
    assert orpo["teacher/test/top1"] == sft["teacher/test/top1"]

    run_dir = tmp_path / "orpo"
    predictions = [
        json.loads(line) for line in (run_dir / "eval" / "predictions.jsonl").read_text().splitlines()
    ]
    assert len(predictions) == 8
    assert {"id", "answer", "parsed", "truth", "format_valid", "top1", "topk", "car"} <= predictions[0].keys()
    assert json.loads((run_dir / "teacher" / "metrics.json").read_text())["teacher/folds"] == 2
    with Image.open(run_dir / "plots" / "hits_at_k.png") as plot:  # student vs teacher, a real PNG
        assert plot.size[0] > 200 and plot.size[1] > 200


def test_preference_dataset_is_trl_conversational_and_loads_with_datasets(make_cfg, shared_cache, tmp_path):
    run(make_cfg("task=rare_disease", "debug=smoke", "stage=prefs", output_dir=tmp_path / "prefs"))
    entries = [
        e for e in (shared_cache / "prefs").glob("*/prefs.jsonl") if "POTENTIAL_DISEASES" in e.read_text()
    ]
    assert entries, "the prefs stage wrote no rare-disease cache entry"
    table = datasets.load_from_disk(str(entries[0].parent / "dataset"))
    assert len(table) > 10
    for row in table:  # every row, not the first only
        assert [m["role"] for m in row["prompt"]] == ["system", "user"]
        assert row["chosen"][0]["role"] == "assistant" and row["chosen"][0]["content"].startswith(
            "POTENTIAL_DISEASES:"
        )
        assert row["chosen"][0]["content"].count("\n") == 10  # header + 10 names
        rejected = [
            line.split(". ", 1)[1].strip("'") for line in row["rejected"][0]["content"].splitlines()[1:]
        ]
        assert len(rejected) == 10 and row["truth"] not in rejected  # the truth is never a negative
    assert "- pairs:" in (entries[0].parent / "README.md").read_text()
    assert not (tmp_path / "prefs" / "student").exists()  # stage=prefs stops before the student


def test_a_capped_training_set_spreads_over_the_diseases(make_cfg):
    """task.max_samples (debug=smoke: 48 pairs) takes pairs spread over the preference set, which
    is grouped by disease: its first 48 would teach a handful of the diseases the test asks about."""
    cfg = make_cfg("task=rare_disease", "debug=smoke")
    task = load_task(cfg.task)
    teacher, key = teacher_stage(cfg, task)
    rows, _ = prefs_stage(cfg, student_kind(cfg), task, teacher, key)
    every = read_preference_rows(rows.source / "prefs.jsonl")
    assert len(rows.train) == cfg.task.max_samples < len(every)
    diseases = {row["truth"] for row in every}
    first = {row["truth"] for row in every[: cfg.task.max_samples]}
    assert len(first) < len(diseases)  # the set is grouped by disease: the first N miss some
    assert {row["truth"] for row in rows.train} == diseases


def test_teacher_and_prefs_stages_need_a_pipeline_task(make_cfg, tmp_path):
    with pytest.raises(ValueError, match="needs a pipeline task"):
        run(make_cfg("task=example", "stage=teacher", "debug=smoke"))


@pytest.mark.parametrize("method", ["dpo", "sft"])
def test_tissue_pipeline_trains_a_vision_student_on_image_only_prompts(make_cfg, tmp_path, method):
    results = run(make_cfg("task=tissue", f"optim={method}", "debug=smoke", output_dir=tmp_path / method))
    check_tissue_run(tmp_path / method, results)
    if method == "dpo":  # the SFT start logged into its own folder, not over the DPO logs
        assert (tmp_path / method / "sft_start" / "csv" / "metrics.csv").exists()


def test_the_default_job_trains_a_vision_student_on_image_only_prompts(default_job):
    """ORPO on the tissue task: the default job (conftest's one run of `python -m mint.run debug=smoke`)."""
    check_tissue_run(default_job.run_dir, json.loads((default_job.run_dir / "results.json").read_text()))


def check_tissue_run(run_dir, results: dict) -> None:
    """A finished tissue run at smoke size: its metrics, adapter, predictions and logged evaluation."""
    assert results["train/steps"] == 12
    assert {
        "teacher/test/top1",
        "teacher/test/topk",
        "test/format_valid",
        "test/topk",
        "test/rank_top1",
        "test/rank_topk",
        "val/loss",
    } <= results.keys()
    assert 0.0 <= results["test/rank_top1"] <= results["test/rank_topk"] <= 1.0
    assert (run_dir / "student" / "adapter" / "adapter_model.safetensors").exists()
    prediction = json.loads((run_dir / "eval" / "predictions.jsonl").read_text().splitlines()[0])
    assert prediction["truth"] in TISSUES
    # the logger (CSV under debug=smoke; W&B by default) holds the evaluation, not only training
    with open(run_dir / "csv" / "metrics.csv") as f:
        logged = [row for row in csv.DictReader(f) if row.get("test/top1")]
    assert float(logged[-1]["test/top1"]) == pytest.approx(results["test/top1"])


def _train_losses(folder) -> list[float]:
    with open(folder / "csv" / "metrics.csv") as f:
        return [float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")]


def test_packing_is_a_layout_only_the_same_seed_trains_on_the_same_batches(make_cfg, tmp_path):
    """Packed rows change the speed, not the run: by default they are drawn in the unpacked
    layout's shuffled order, so every step's loss matches. Length-grouped batches
    (optim.length_grouped=true) are other batches; on the tissue task, one pair per image of
    near-equal lengths, they were also near-single-class and cost the tiny student
    (README, "What make run does and prints")."""
    common = ("task=tissue", "optim=orpo", "debug=smoke", "stage=student")
    for name, packed in (("packed", "true"), ("unpacked", "false")):
        run(make_cfg(*common, f"optim.packed={packed}", output_dir=tmp_path / name))
    run(make_cfg(*common, "optim.length_grouped=true", output_dir=tmp_path / "grouped"))
    packed, unpacked, grouped = (_train_losses(tmp_path / n) for n in ("packed", "unpacked", "grouped"))
    assert len(packed) == len(unpacked) == 12
    assert packed == pytest.approx(unpacked, abs=1e-4)
    assert grouped != pytest.approx(unpacked, abs=1e-4)


def test_tissue_prompts_carry_the_image_not_the_description(make_cfg, shared_cache, tmp_path):
    run(make_cfg("task=tissue", "debug=smoke", "stage=prefs", output_dir=tmp_path / "prefs"))
    entry = next(
        e
        for e in (shared_cache / "prefs").iterdir()
        if "MOST_LIKELY_TISSUE" in (e / "prefs.jsonl").read_text()
    )
    rows = [json.loads(line) for line in (entry / "prefs.jsonl").read_text().splitlines()]
    assert len(rows) > 10
    for row in rows:  # every row, not the first only
        user = row["prompt"][1]["content"]
        assert user[0] == {"type": "image"} and "nuclei" not in user[1]["text"].lower()
    table = datasets.load_from_disk(str(entry / "dataset"))
    assert "images" in table.column_names and len(table) == len(
        (entry / "prefs.jsonl").read_text().splitlines()
    )


def test_a_text_student_on_the_image_task_is_a_clear_error(make_cfg, tmp_path):
    with pytest.raises(ValueError, match="student=tiny_llama is a text model"):
        run(make_cfg("task=tissue", "student=tiny_llama", "debug=smoke"))


def test_on_val_adds_validation_answer_metrics_and_leaves_the_test_metrics_alone(make_cfg, tmp_path):
    plain = run(make_cfg("task=rare_disease", "optim=none", "debug=smoke", output_dir=tmp_path / "plain"))
    with_val = run(
        make_cfg(
            "task=rare_disease",
            "optim=none",
            "debug=smoke",
            "task.eval.on_val=true",
            output_dir=tmp_path / "val",
        )
    )
    val_keys = {"val/format_valid", "val/top1", "val/topk"}
    assert val_keys <= with_val.keys() and not val_keys & plain.keys()
    assert 0.0 <= with_val["val/top1"] <= with_val["val/topk"] <= 1.0
    assert {k: v for k, v in with_val.items() if k.startswith("test/")} == {
        k: v for k, v in plain.items() if k.startswith("test/")
    }

    def ids(name: str) -> list[str]:
        lines = (tmp_path / "val" / "eval" / name).read_text().splitlines()
        return [json.loads(line)["id"] for line in lines]

    val_ids, test_ids = ids("predictions_val.jsonl"), ids("predictions.jsonl")
    assert len(val_ids) == len(test_ids) == 8 and not set(val_ids) & set(test_ids)
    assert not (tmp_path / "plain" / "eval" / "predictions_val.jsonl").exists()


def test_hits_at_k_counts_the_truth_within_the_first_k_names():
    from mint.plots import hits_at_k

    ranked = [["A", "B", "C"], ["B", "A"], [], ["C", "C", "A"]]
    assert hits_at_k(ranked, ["A", "A", "A", "A"], n=3) == [0.25, 0.5, 0.75]
    with pytest.raises(ValueError, match="3 truths"):
        hits_at_k(ranked, ["A", "B", "C"], n=3)
