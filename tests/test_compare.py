"""experiments/compare.py: the sweep's command lines, and the report built from real run outputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from mint.run import run
from tests.conftest import load_experiment

compare = load_experiment("compare")
SMOKE = ("task=rare_disease", "debug=smoke")


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def make_sweep_like_outputs(make_cfg, runs_dir: Path, methods: list[str], seeds: list[int]) -> None:
    """Real runs, laid out as compare.py's two sweeps lay them out (with Hydra's saved config)."""

    def one(folder: Path, *overrides: str) -> None:
        cfg = make_cfg(*overrides, output_dir=folder)
        run(cfg)
        (folder / ".hydra").mkdir()
        OmegaConf.save(cfg, folder / ".hydra" / "config.yaml")  # what Hydra writes for each job

    for seed in seeds:
        for method in methods:
            one(runs_dir / "methods" / f"{method}_seed{seed}", *SMOKE, f"optim={method}", f"seed={seed}")
        one(
            runs_dir / "unimodal_teacher" / f"seed{seed}",
            *SMOKE,
            "stage=teacher",
            f"seed={seed}",
            "teacher.model.modalities=[text]",
        )


def distinct_per_seed(runs_dir: Path, methods: list[str], seeds: list[int]) -> None:
    """Give every method run's five test metrics (and their CI bounds) values that differ between
    seeds, methods and metrics: at smoke size most of them are 0 in every run, and a mean or std
    of zeros cannot tell a right statistic from a wrong one."""
    metrics = ("top1", "topk", "format_valid", "rank_top1", "rank_topk")
    for m, method in enumerate(methods):
        for s, seed in enumerate(seeds):
            path = runs_dir / "methods" / f"{method}_seed{seed}" / "results.json"
            results = json.loads(path.read_text())
            for k, metric in enumerate(metrics):
                value = 0.05 + 0.31 * s + 0.07 * m + 0.11 * k
                results[f"test/{metric}"] = value
                results[f"test/{metric}_ci_low"] = value - 0.02 - 0.01 * s
                results[f"test/{metric}_ci_high"] = value + 0.03 + 0.01 * m
            results["time/total_s"] = 1500.0 + 900 * s + 420 * m  # hours in all: the total in h
            results["time/run_s"] = 60.0  # its last invocation's (a re-evaluation): not what a run cost
            path.write_text(json.dumps(results))


def check_report(
    out_dir: Path, runs_dir: Path, methods: list[str], seeds: list[int], distinct: bool = False
) -> None:
    """The CSV/MD/PNG exist, hold one row per method and teacher, and their numbers are the runs' means
    (`distinct`: the runs' values differ between seeds, as `distinct_per_seed` made them)."""
    unimodal = "teacher (note only)"
    rows = {row["method"]: row for row in read_csv(out_dir / "comparison.csv")}
    assert list(rows) == [*methods, compare.MULTIMODAL_TEACHER, unimodal]
    assert all(int(row["n_seeds"]) == len(seeds) for row in rows.values())
    assert (out_dir / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def results(folder: Path) -> dict:
        return json.loads((folder / "results.json").read_text())

    for method in methods:
        per_seed = [results(runs_dir / "methods" / f"{method}_seed{s}") for s in seeds]
        for metric in ("top1", "topk", "format_valid", "rank_top1", "rank_topk"):
            values = np.array([r[f"test/{metric}"] for r in per_seed])
            assert not distinct or len(set(values)) == len(seeds)  # then the statistics below discriminate
            assert float(rows[method][f"{metric}_mean"]) == pytest.approx(values.mean(), abs=1e-6)
            assert float(rows[method][f"{metric}_std"]) == pytest.approx(values.std(ddof=1), abs=1e-6)
            assert float(rows[method][f"{metric}_min"]) == pytest.approx(values.min(), abs=1e-6)
            assert float(rows[method][f"{metric}_max"]) == pytest.approx(values.max(), abs=1e-6)
            lows = [r[f"test/{metric}_ci_low"] for r in per_seed]
            assert float(rows[method][f"{metric}_ci_low"]) == pytest.approx(np.mean(lows), abs=1e-6)
    for name, folders in (
        (compare.MULTIMODAL_TEACHER, [runs_dir / "methods" / f"{methods[0]}_seed{s}" for s in seeds]),
        (unimodal, [runs_dir / "unimodal_teacher" / f"seed{s}" for s in seeds]),
    ):
        top1 = [results(f)["teacher/test/top1"] for f in folders]
        assert float(rows[name]["top1_mean"]) == pytest.approx(np.mean(top1), abs=1e-6)
        assert rows[name]["format_valid_mean"] == ""  # a teacher gives no generated answers

    # What each run cost: its own wall time, averaged per row, summed for the whole comparison.
    minutes = {}
    for method in methods:
        seconds = [results(runs_dir / "methods" / f"{method}_seed{s}")["time/total_s"] for s in seeds]
        assert float(rows[method]["minutes_mean"]) == pytest.approx(np.mean(seconds) / 60, abs=1e-6)
        minutes[method] = seconds
    minutes[unimodal] = [results(runs_dir / "unimodal_teacher" / f"seed{s}")["time/total_s"] for s in seeds]
    assert float(rows[unimodal]["minutes_mean"]) == pytest.approx(np.mean(minutes[unimodal]) / 60, abs=1e-6)
    assert rows[compare.MULTIMODAL_TEACHER]["minutes_mean"] == ""  # its time is inside the student runs
    total = sum(sum(v) for v in minutes.values()) / 60
    took = f"{total:.1f} min" if total < 120 else f"{total / 60:.1f} h"
    assert (
        f"Compute: {len(seeds) * (len(methods) + 1)} runs took {took} in all"
        in (out_dir / "comparison.md").read_text()
    )

    per_run = read_csv(out_dir / "comparison_runs.csv")
    assert len(per_run) == (len(methods) + 2) * len(seeds)
    for row in per_run:  # where a student run's time went, from its results.json
        if row["method"] in methods:
            ran = results(runs_dir / "methods" / f"{row['method']}_seed{row['seed']}")
            for column in ("generate_min", "rank_min"):
                seconds = ran[compare.STAGE_TIMES[column]]
                assert seconds > 0 and float(row[column]) == pytest.approx(seconds / 60, abs=1e-6)
    table = (out_dir / "comparison.md").read_text()
    for name in rows:
        assert f"| {name} | {seeds[0]} |" in table  # one per-seed line per method and seed
    teacher_seed = results(runs_dir / "methods" / f"{methods[0]}_seed{seeds[0]}")
    assert (
        f"{teacher_seed['teacher/test/top1']:.3f} [{teacher_seed['teacher/test/top1_ci_low']:.3f}," in table
    )


def test_the_report_is_made_of_the_runs_results_and_is_deterministic(make_cfg, tmp_path):
    methods, seeds = ["none", "rag"], [1, 2]
    runs_dir = tmp_path / "sweep" / "runs"
    make_sweep_like_outputs(make_cfg, runs_dir, methods, seeds)
    distinct_per_seed(runs_dir, methods, seeds)

    runs = compare.collect(runs_dir, "teacher (note only)")
    order = [*methods, compare.MULTIMODAL_TEACHER, "teacher (note only)"]
    compare.write_report(tmp_path / "sweep", "rare_disease", runs, order, "python experiments/compare.py ...")
    check_report(tmp_path / "sweep", runs_dir, methods, seeds, distinct=True)

    again = tmp_path / "again"
    again.mkdir()
    compare.write_report(
        again,
        "rare_disease",
        compare.collect(runs_dir, "teacher (note only)"),
        order,
        "python experiments/compare.py ...",
    )
    for name in ("comparison.md", "comparison.csv", "comparison_runs.csv"):
        assert (again / name).read_text() == (tmp_path / "sweep" / name).read_text()


def test_an_unfinished_run_is_named_not_counted(tmp_path):
    (tmp_path / "methods" / "orpo_seed1").mkdir(parents=True)
    (tmp_path / "ablations" / "orpo_unimodal_seed2").mkdir(parents=True)
    assert compare.started_unfinished(tmp_path) == ["methods/orpo_seed1", "ablations/orpo_unimodal_seed2"]
    with pytest.raises(FileNotFoundError, match="no finished runs under .*methods or .*ablations"):
        compare.collect(tmp_path, None)


def test_the_comparison_runs_every_method_per_seed_grouped_in_wandb_plus_the_unimodal_teacher(tmp_path):
    jobs = compare.comparison_jobs(
        overrides=["task=rare_disease", "trainer.max_steps=50"],
        seeds=[1, 2, 3],
        methods=list(compare.METHODS),
        name="cmp",
        runs_dir=tmp_path,
        unimodal=["teacher.model.modalities=[text]"],
        wandb_mode="offline",
    )
    folders = [job.folder.relative_to(tmp_path).as_posix() for job in jobs]
    expected = [
        *(f"methods/{method}_seed{seed}" for seed in (1, 2, 3) for method in compare.METHODS),
        *(f"unimodal_teacher/seed{seed}" for seed in (1, 2, 3)),
    ]
    assert sorted(folders) == sorted(expected)
    main = next(job for job in jobs if job.folder.name == "dpo_seed2")
    command = main.command(resume=False)
    assert command[1:3] == ["-m", "mint.run"] and command[-1] == f"hydra.run.dir={main.folder}"
    assert {"seed=2", "optim=dpo", "trainer.max_steps=50", "logger=wandb", "logger.wandb.group=cmp"} <= set(
        command
    )
    teacher = next(job for job in jobs if job.folder.name == "seed1")
    assert {"stage=teacher", "seed=1", "teacher.model.modalities=[text]"} <= set(teacher.overrides)
    assert not any(a.startswith("optim=") for a in teacher.overrides)

    # Another logger chosen, or W&B off: no W&B keys that would not exist in that config.
    (quiet,) = compare.comparison_jobs(
        overrides=["task=tissue", "logger=csv"],
        seeds=[1],
        methods=["none"],
        name="cmp",
        runs_dir=tmp_path,
        unimodal=None,
        wandb_mode="offline",
    )
    assert not any(a.startswith("logger.wandb") or a == "logger=wandb" for a in quiet.overrides)
    with pytest.raises(SystemExit, match="task="):
        compare.task_name(["debug=smoke"])


@pytest.mark.slow
def test_the_comparison_command_end_to_end_on_the_smoke_config(tmp_path):
    """The real command: one `mint.run` subprocess per run, then the report (about 2 minutes here)."""
    methods, seeds = ["none", "rag"], [1, 2]
    out = compare.main(
        [
            *SMOKE,
            f"paths.cache_dir={tmp_path / 'cache'}",
            "--seeds",
            *map(str, seeds),
            "--methods",
            *methods,
            "--out",
            str(tmp_path / "cmp"),
            "--wandb",
            "disabled",
        ]
    )
    check_report(out, out / "runs", methods, seeds)
    assert json.loads((out / "sweep.json").read_text())["seeds"] == seeds
