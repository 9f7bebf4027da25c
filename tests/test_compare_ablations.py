"""experiments/compare.py's transfer ablations and --resume: which runs they make, that each
ablation's overrides reach the training data, and that a resumed comparison skips finished runs."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from mint.stages.prefs import prefs_stage
from mint.stages.teacher import load_task, teacher_stage
from mint.student.kinds import student_kind
from tests.conftest import load_experiment

compare = load_experiment("compare")

SMOKE = ("task=rare_disease", "debug=smoke")
UNIMODAL = compare.UNIMODAL_TEACHER["rare_disease"][1]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def jobs(runs_dir: Path, ablations: list[str]) -> list:
    return compare.comparison_jobs(
        overrides=["task=rare_disease"],
        seeds=[1, 2],
        methods=["sft", "orpo"],
        name="cmp",
        runs_dir=runs_dir,
        unimodal=UNIMODAL,
        wandb_mode="disabled",
        ablations=ablations,
        max_steps=40,
    )


def test_every_ablation_runs_once_per_seed_with_its_own_overrides(tmp_path):
    made = jobs(tmp_path, list(compare.ABLATIONS))
    by_folder = {job.folder.relative_to(tmp_path).as_posix(): set(job.overrides) for job in made}
    assert len(made) == 2 * (2 + len(compare.ABLATIONS) + 1)  # methods, ablations, unimodal teacher
    assert {"seed=2", "optim=orpo", *UNIMODAL} <= by_folder["ablations/orpo_unimodal_seed2"]
    assert {"optim=sft", "task.prefs.ranking=truth"} <= by_folder["ablations/sft_truth_seed1"]
    assert {"optim=orpo", "task.prefs.force_truth=true"} <= by_folder["ablations/orpo_truth_seed1"]
    assert {"optim=orpo", "task.prefs.ranking=truth_then_teacher"} <= by_folder[
        "ablations/orpo_truth_first_seed2"
    ]
    assert {"optim=sft", "task.prefs.ranking=truth_then_teacher"} <= by_folder[
        "ablations/sft_truth_first_seed1"
    ]
    assert {"optim=sft", "task.prefs.ranking=truth_then_teacher", *UNIMODAL} <= by_folder[
        "ablations/sft_truth_first_unimodal_seed2"
    ]
    assert {"optim=orpo", "task.prefs.ranking=truth_then_teacher", *UNIMODAL} <= by_folder[
        "ablations/orpo_truth_first_unimodal_seed1"
    ]
    assert {"optim=dpo", "optim.rpo_alpha=1.0"} <= by_folder["ablations/dpo_rpo_seed2"]
    assert "optim.init_from_sft=false" not in by_folder["ablations/dpo_rpo_seed2"]
    assert {"optim=dpo", "optim.rpo_alpha=1.0", "optim.init_from_sft=false"} <= by_folder[
        "ablations/dpo_rpo_base_seed1"
    ]
    orpo_2x = next(job.overrides for job in made if job.folder.name == "orpo_2x_seed1")
    assert "optim=orpo" in orpo_2x and orpo_2x[-1] == "trainer.max_steps=80"  # last: Hydra's last value wins
    sft_2x = next(job.overrides for job in made if job.folder.name == "sft_2x_seed1")
    assert "optim=sft" in sft_2x and sft_2x[-1] == "trainer.max_steps=80"
    truth_first_2x = next(job.overrides for job in made if job.folder.name == "orpo_truth_first_2x_seed2")
    assert "optim=orpo" in truth_first_2x and "task.prefs.ranking=truth_then_teacher" in truth_first_2x
    assert truth_first_2x[-1] == "trainer.max_steps=80"
    assert not any(o.startswith("trainer.max_steps") for o in by_folder["methods/orpo_seed1"])
    assert not set(UNIMODAL) & by_folder["methods/orpo_seed1"]  # MINT itself: the multimodal teacher
    assert {"stage=teacher", *UNIMODAL} <= by_folder["unimodal_teacher/seed1"]
    # Seed by seed: a stopped comparison has whole seeds done.
    per_seed = 2 + len(compare.ABLATIONS) + 1
    assert [job.overrides[0] for job in made] == ["seed=1"] * per_seed + ["seed=2"] * per_seed


def test_twice_the_steps_reads_the_comparisons_own_max_steps():
    assert compare.composed_max_steps(["task=rare_disease"]) == 600
    assert compare.composed_max_steps(["task=rare_disease", "debug=smoke"]) == 12
    assert compare.composed_max_steps(["task=rare_disease", "trainer.max_steps=300"]) == 300
    with pytest.raises(ValueError, match="orpo_2x"):
        compare.comparison_jobs(
            overrides=["task=rare_disease"],
            seeds=[1],
            methods=[],
            name="cmp",
            runs_dir=Path("x"),
            unimodal=None,
            wandb_mode="disabled",
            ablations=["orpo_2x"],
        )


def test_resume_skips_finished_runs_and_resumes_the_interrupted_one(tmp_path, monkeypatch):
    made = jobs(tmp_path, ["sft_truth"])
    finished, interrupted = made[0], made[1]
    finished.folder.mkdir(parents=True)
    (finished.folder / "results.json").write_text("{}")
    interrupted.folder.mkdir(parents=True)  # started, no results.json: killed mid-run
    ran = []
    monkeypatch.setattr(subprocess, "run", lambda command, **kwargs: ran.append(command))
    compare.run_jobs(made, "disabled", resume=True)
    folders = [next(a for a in command if a.startswith("hydra.run.dir=")) for command in ran]
    assert f"hydra.run.dir={finished.folder}" not in folders
    assert len(ran) == len(made) - 1
    assert "resume=true" in ran[0] and ran[0][-1] == f"hydra.run.dir={interrupted.folder}"
    assert "resume=true" not in ran[1]  # never started: a fresh run


def test_a_fresh_comparison_refuses_an_existing_folder_and_resume_needs_one(tmp_path):
    (tmp_path / "runs").mkdir()
    with pytest.raises(SystemExit, match="--resume"):
        compare.main(["task=rare_disease", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="needs the --out"):
        compare.main(["task=rare_disease", "--resume"])


def test_report_only_tables_the_finished_runs_of_a_comparison_in_progress(tmp_path, monkeypatch):
    """--report-only runs nothing: the tables hold the finished runs, the .md names the others."""
    runs_dir = tmp_path / "runs"
    for folder, top1 in (("methods/sft_seed1", 0.5), ("methods/orpo_seed1", None)):
        path = runs_dir / folder
        (path / ".hydra").mkdir(parents=True)
        OmegaConf.save({"seed": 1, "optim": {"method": folder[8:-6]}}, path / ".hydra" / "config.yaml")
        if top1 is not None:  # orpo_seed1 was interrupted: a folder without results.json
            results = {"test/top1": top1, "teacher/test/top1": 0.7, "time/run_s": 90.0}
            (path / "results.json").write_text(json.dumps(results))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("--report-only ran a job"))
    args = ["task=rare_disease", "--seeds", "1", "2", "--methods", "sft", "orpo", "--no-unimodal-teacher"]
    compare.main([*args, "--out", str(tmp_path), "--report-only", "--wandb", "disabled"])

    rows = {row["method"]: row for row in read_csv(tmp_path / "comparison.csv")}
    assert list(rows) == ["sft", compare.MULTIMODAL_TEACHER]
    assert rows["sft"]["n_seeds"] == "1" and float(rows["sft"]["top1_mean"]) == 0.5
    assert float(rows["sft"]["minutes_mean"]) == 1.5
    table = (tmp_path / "comparison.md").read_text()
    assert "3 runs not finished yet (methods/orpo_seed1, methods/sft_seed2, methods/orpo_seed2)" in table
    # sft_seed2 at sft_seed1's 1.5 min; no orpo run has finished to time the other two by
    assert "about 1.5 min to go for 1 of them (2 not estimated: no finished run of their row)" in table
    assert not (tmp_path / "sweep.json").exists()  # what a comparison ran is written by its own run
    with pytest.raises(SystemExit, match="no comparison in"):
        compare.main([*args, "--out", str(tmp_path / "elsewhere"), "--report-only"])


def test_a_comparison_run_in_parts_reports_despite_another_parts_unfinished_run(tmp_path, monkeypatch):
    """Seed 1's SFT command finishes while seed 3's DPO, started by another command, was stopped
    mid-way, and other commands finished `none` and an ablation: the report tables every finished
    row in the script's order and names the stopped run as unfinished, instead of failing."""
    runs_dir = tmp_path / "runs"
    (runs_dir / "methods" / "dpo_seed3" / ".hydra").mkdir(parents=True)  # started, no results.json

    def finish(folder: Path, method: str, seed: int, top1: float) -> None:
        (folder / ".hydra").mkdir(parents=True)
        OmegaConf.save({"seed": seed, "optim": {"method": method}}, folder / ".hydra" / "config.yaml")
        results = {"test/top1": top1, "teacher/test/top1": 0.7, "time/run_s": 60.0}
        (folder / "results.json").write_text(json.dumps(results))

    finish(runs_dir / "methods" / "orpo_seed1", "orpo", 1, 0.25)  # by other commands
    finish(runs_dir / "methods" / "none_seed1", "none", 1, 0.125)
    finish(runs_dir / "ablations" / "dpo_rpo_seed1", "dpo", 1, 0.375)

    def run_jobs(jobs, *args):  # each job as a finished run of its method and seed
        for job in jobs:
            method, seed = job.folder.name.rsplit("_seed", 1)
            finish(job.folder, method, int(seed), 0.5)

    monkeypatch.setattr(compare, "run_jobs", run_jobs)
    args = ["task=rare_disease", "--seeds", "1", "--methods", "sft", "--no-unimodal-teacher"]
    compare.main([*args, "--out", str(tmp_path), "--resume", "--wandb", "disabled"])

    rows = {row["method"]: row for row in read_csv(tmp_path / "comparison.csv")}
    rpo = compare.ABLATIONS["dpo_rpo"].row
    assert list(rows) == ["none", "sft", "orpo", rpo, compare.MULTIMODAL_TEACHER]
    assert [float(rows[m]["top1_mean"]) for m in ("none", "sft", "orpo", rpo)] == [0.125, 0.5, 0.25, 0.375]
    assert "1 runs not finished yet (methods/dpo_seed3)" in (tmp_path / "comparison.md").read_text()
    assert json.loads((tmp_path / "sweep.json").read_text())["name"] == tmp_path.name  # W&B group: --out's


def test_keep_copies_the_records_that_retable_the_comparison_and_leave_the_rest(tmp_path, monkeypatch):
    """--keep DIR: the tables and each finished run's record (not its checkpoints, not an unfinished
    run) land in DIR beside the records DIR already held; DIR then re-tables the whole comparison."""
    out, keep = tmp_path / "out", tmp_path / "kept"
    _run_with_predictions(out / "runs", "sft", 1, [1, 0, 1, 0])
    _run_with_predictions(out / "runs", "orpo", 1, [1, 1, 1, 0])
    (out / "runs" / "methods" / "orpo_seed1" / "checkpoints").mkdir()
    (out / "runs" / "methods" / "orpo_seed1" / "checkpoints" / "last.ckpt").write_bytes(b"weights")
    (out / "runs" / "methods" / "dpo_seed1" / ".hydra").mkdir(parents=True)  # stopped mid-run
    _run_with_predictions(keep / "runs", "orpo", 2, [0, 1, 1, 0])  # kept by an earlier session
    (keep / "notes.md").write_text("ours")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("--report-only ran a job"))
    args = [
        "task=rare_disease",
        "--methods",
        "sft",
        "orpo",
        "dpo",
        "--no-unimodal-teacher",
        "--wandb",
        "disabled",
    ]
    compare.main([*args, "--seeds", "1", "--out", str(out), "--report-only", "--keep", str(keep)])

    kept_runs = sorted(
        p.relative_to(keep / "runs").as_posix() for p in (keep / "runs").rglob("*") if p.is_file()
    )
    assert kept_runs == [
        f"methods/{run}/{name}"
        for run in ("orpo_seed1", "orpo_seed2", "sft_seed1")
        for name in (".hydra/config.yaml", "eval/predictions.jsonl", "results.json")
    ]
    sft = "methods/sft_seed1/eval/predictions.jsonl"
    assert (keep / "runs" / sft).read_bytes() == (out / "runs" / sft).read_bytes()
    assert (keep / "comparison.md").read_text() == (out / "comparison.md").read_text()
    assert (keep / "notes.md").read_text() == "ours"

    compare.main([*args, "--seeds", "1", "2", "--out", str(keep), "--report-only"])
    rows = {row["method"]: row for row in read_csv(keep / "comparison.csv")}
    assert (rows["orpo"]["n_seeds"], rows["sft"]["n_seeds"]) == ("2", "1")
    assert float(rows["orpo"]["top1_mean"]) == (0.75 + 0.5) / 2
    with pytest.raises(SystemExit, match="own --out folder"):
        compare.main([*args, "--out", str(out), "--report-only", "--keep", str(out)])


def test_ablation_rows_are_collected_under_their_names(tmp_path):
    runs_dir = tmp_path / "runs"
    for folder, seed, top1 in (("methods/sft_seed1", 1, 0.5), ("ablations/sft_truth_seed1", 1, 0.25)):
        path = runs_dir / folder
        (path / ".hydra").mkdir(parents=True)
        OmegaConf.save({"seed": seed, "optim": {"method": "sft"}}, path / ".hydra" / "config.yaml")
        (path / "results.json").write_text(json.dumps({"test/top1": top1, "teacher/test/top1": 0.7}))
    runs = {run.method: run for run in compare.collect(runs_dir, None)}
    assert runs["sft"].values["top1"] == 0.5
    assert runs[compare.ABLATIONS["sft_truth"].row].values["top1"] == 0.25
    assert runs[compare.ABLATIONS["sft_truth"].row].kind == "student"


def test_a_folder_that_is_no_ablation_of_the_script_is_refused(tmp_path):
    """A misnamed (or renamed) ablation folder would drop out of the table silently: refuse it."""
    path = tmp_path / "runs" / "methods" / "sft_seed1"
    (path / ".hydra").mkdir(parents=True)
    OmegaConf.save({"seed": 1, "optim": {"method": "sft"}}, path / ".hydra" / "config.yaml")
    (path / "results.json").write_text(json.dumps({"test/top1": 0.5}))
    (tmp_path / "runs" / "ablations" / "sft_truht_seed1").mkdir(parents=True)  # no results yet
    with pytest.raises(ValueError, match="sft_truht_seed1: not an ablation of this script"):
        compare.collect(tmp_path / "runs", None)


@pytest.mark.parametrize(
    "ablation",
    ["sft_truth", "orpo_truth", "orpo_truth_first", "sft_truth_first", "orpo_truth_first_unimodal"],
)
def test_the_truth_ablations_reach_the_training_pairs(make_cfg, ablation):
    """At smoke size, through the real stages: the ablation's overrides change the rows, which
    without them (MINT's own pairs) do not already have the property."""

    def truth_in_chosen(*overrides: str) -> tuple[list[bool], list[bool], list[list[str]]]:
        """Per training row: is the truth the chosen list's first name; is it in the list; the
        list's names other than the truth, in order."""
        cfg = make_cfg(*SMOKE, *overrides)
        task = load_task(cfg.task)
        teacher, key = teacher_stage(cfg, task)
        rows, _ = prefs_stage(cfg, student_kind(cfg), task, teacher, key)
        truth_first, in_chosen, others = [], [], []
        for row in rows.train:
            names = [line.split(". ", 1)[1] for line in row["chosen"][0]["content"].splitlines()[1:]]
            truth = f"'{row['truth']}'"
            truth_first.append(names[0] == truth)
            in_chosen.append(truth in names)
            others.append([name for name in names if name != truth])
        return truth_first, in_chosen, others

    chosen = compare.ABLATIONS[ablation]
    truth_first, in_chosen, others = truth_in_chosen(
        *chosen.overrides, *(UNIMODAL if chosen.unimodal_teacher else ())
    )
    mint_first, mint_in_chosen, mint_others = truth_in_chosen()
    if chosen.unimodal_teacher:  # the rest is the unimodal teacher's order, not MINT's
        _, _, unimodal_others = truth_in_chosen(*UNIMODAL)
        assert others != [names[: len(mine)] for mine, names in zip(others, mint_others, strict=True)]
        mint_others = unimodal_others
    if ablation == "sft_truth":
        assert all(truth_first) and not all(mint_first)
    elif ablation == "orpo_truth":  # the teacher's order, the truth added where the teacher left it out
        assert all(in_chosen) and not all(mint_in_chosen) and not all(truth_first)
    else:  # *_truth_first: the truth first, then the teacher's list without it: its head, in its order
        assert all(truth_first) and not all(mint_first)
        assert all(mine == theirs[: len(mine)] for mine, theirs in zip(others, mint_others, strict=True))


def _run_with_predictions(
    runs_dir: Path, method: str, seed: int, hits: list[int], teacher_top1: float = 0.7
) -> None:
    """A finished run whose test cases c0, c1, ... were answered right (1) or wrong (0).
    `method`: a method, or an ablation's slug (its run sits in runs/ablations/)."""
    ablation = compare.ABLATIONS.get(method)
    kind = "ablations" if ablation else "methods"
    path = runs_dir / kind / f"{method}_seed{seed}"
    (path / ".hydra").mkdir(parents=True)
    (path / "eval").mkdir()
    optim = ablation.method if ablation else method
    OmegaConf.save({"seed": seed, "optim": {"method": optim}}, path / ".hydra" / "config.yaml")
    (path / "results.json").write_text(
        json.dumps({"test/top1": sum(hits) / len(hits), "teacher/test/top1": teacher_top1})
    )
    lines = [json.dumps({"id": f"c{i}", "top1": bool(hit)}) for i, hit in enumerate(hits)]
    (path / "eval" / "predictions.jsonl").write_text("\n".join(lines) + "\n")


def test_orpo_is_compared_with_each_method_case_by_case(tmp_path):
    """The paired table: orpo minus the method on the same cases, its CI, the seeds it is ahead."""
    runs_dir = tmp_path / "runs"
    _run_with_predictions(runs_dir, "orpo", 1, [1, 1, 1, 0, 1, 0, 1, 1])
    _run_with_predictions(runs_dir, "sft", 1, [1, 0, 1, 0, 1, 0, 0, 1])  # orpo +2 of 8
    _run_with_predictions(runs_dir, "orpo", 2, [1, 1, 0, 0, 1, 1, 0, 1])
    _run_with_predictions(runs_dir, "sft", 2, [1, 1, 0, 0, 1, 0, 0, 1])  # orpo +1 of 8
    _run_with_predictions(runs_dir, "dpo", 2, [1, 1, 1, 1, 1, 1, 1, 1])  # orpo -3 of 8, seed 2 only
    runs = compare.collect(runs_dir, None)
    rows = {row["method"]: row for row in compare.paired_differences(runs, n_boot=500)}

    assert set(rows) == {"sft", "dpo"}
    sft, dpo = rows["sft"], rows["dpo"]
    assert sft["n_seeds"] == 2 and sft["diff_mean"] == pytest.approx((2 / 8 + 1 / 8) / 2)
    assert sft["seeds_ahead"] == 2
    # orpo is never worse than sft on a case: no resample can make the difference negative.
    assert 0 <= sft["diff_ci_low"] <= sft["diff_mean"] <= sft["diff_ci_high"]
    assert dpo["n_seeds"] == 1 and dpo["diff_mean"] == pytest.approx(-3 / 8) and dpo["seeds_ahead"] == 0
    assert dpo["diff_ci_high"] <= 0

    compare.write_report(
        tmp_path, "rare_disease", runs, ["sft", "dpo", "orpo", compare.MULTIMODAL_TEACHER], "cmd"
    )
    assert "| sft | 2 | +0.188 [" in (tmp_path / "comparison.md").read_text()
    assert [r["method"] for r in read_csv(tmp_path / "comparison_paired.csv")] == ["sft", "dpo"]

    # Runs scored on different test cases cannot be paired.
    (runs_dir / "methods" / "sft_seed2" / "eval" / "predictions.jsonl").write_text(
        '{"id": "x", "top1": true}\n'
    )
    with pytest.raises(ValueError, match="different test cases"):
        compare.paired_differences(compare.collect(runs_dir, None))


def test_a_rows_paired_ci_does_not_depend_on_the_other_rows(tmp_path):
    """Adding a run of another method (a later part of the comparison) leaves each row's CI as it was."""
    runs_dir = tmp_path / "runs"
    rng = np.random.default_rng(3)
    for method in ("orpo", "sft", "dpo"):
        for seed in (1, 2):
            _run_with_predictions(runs_dir, method, seed, list(rng.integers(0, 2, 60)))
    runs = compare.collect(runs_dir, None)
    rows = compare.paired_differences(runs, n_boot=500)
    assert [row["method"] for row in rows] == ["dpo", "sft"]  # dpo's draws come first
    assert compare.paired_differences([r for r in runs if r.method != "dpo"], n_boot=500) == rows[1:]


def test_ablations_alone_can_be_run_and_paired_against_one_of_them(tmp_path, monkeypatch):
    """`--methods` with no method and two ablations runs those two rows only, and
    `--paired-against orpo_2x` makes ORPO at twice the steps the case-by-case table's reference:
    ORPO and SFT at equal, longer training side by side."""
    ran = []

    def run_jobs(jobs, *args):  # seed 1's two rows as finished runs
        ran.extend(job.folder.name for job in jobs)
        _run_with_predictions(tmp_path / "runs", "sft_2x", 1, [1, 0, 1, 0, 0, 1])
        _run_with_predictions(tmp_path / "runs", "orpo_2x", 1, [1, 1, 1, 0, 1, 1])  # +2 of 6

    monkeypatch.setattr(compare, "run_jobs", run_jobs)
    monkeypatch.setattr(compare, "composed_max_steps", lambda overrides: 300)
    args = ["task=rare_disease", "--seeds", "1", "--no-unimodal-teacher", "--wandb", "disabled"]
    compare.main(
        [
            *args,
            "--methods",
            "--ablations",
            "sft_2x",
            "orpo_2x",
            "--paired-against",
            "orpo_2x",
            "--out",
            str(tmp_path),
        ]
    )

    assert ran == ["sft_2x_seed1", "orpo_2x_seed1"]
    orpo_2x, sft_2x = compare.ABLATIONS["orpo_2x"].row, compare.ABLATIONS["sft_2x"].row
    paired = read_csv(tmp_path / "comparison_paired.csv")
    assert [(row["reference"], row["method"]) for row in paired] == [(orpo_2x, sft_2x)]
    assert float(paired[0]["diff_mean"]) == pytest.approx(2 / 6)
    assert f"**{orpo_2x} against each method, case by case**" in (tmp_path / "comparison.md").read_text()
    assert "--paired-against orpo_2x" in (tmp_path / "comparison.md").read_text()
    with pytest.raises(SystemExit, match="nothing to compare"):
        compare.main([*args, "--methods", "--out", str(tmp_path / "none")])

    # With no method run, the multimodal teacher's row comes from the ablations that used it, not
    # from one whose results hold the unimodal teacher's numbers.
    _run_with_predictions(tmp_path / "runs", "orpo_unimodal", 1, [1, 0, 0, 0, 1, 1], teacher_top1=0.45)
    report = ["task=rare_disease", "--seeds", "1", "--methods", "--out", str(tmp_path), "--report-only"]
    compare.main([*report, "--ablations", "sft_2x", "orpo_2x", "orpo_unimodal", "--wandb", "disabled"])
    rows = {row["method"]: row for row in read_csv(tmp_path / "comparison.csv")}
    assert float(rows[compare.MULTIMODAL_TEACHER]["top1_mean"]) == 0.7
