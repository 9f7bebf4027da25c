"""Entry point: `python -m mint.run [overrides]` (Hydra).

A pipeline task (rare_disease, tissue) runs data -> teacher -> preference pairs -> student ->
evaluation on the test split; `task=custom|example` starts at the student with a ready
preference set. `stage=` stops early. Each stage is a module of `mint/stages/`; this file
only composes them. Every run writes results.json and results.md.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig

from mint.config import Method, Stage, check_config, register_configs
from mint.errors import report
from mint.files import read_json
from mint.leakage import check_task_splits
from mint.report import headline, markdown_table, scrub_job_start, write_metrics, write_results
from mint.stages.evaluate import eval_stage, val_ranking
from mint.stages.prefs import custom_rows, prefs_stage
from mint.stages.student import check_rows, fit_student, sft_start, share_sft_start, student_job
from mint.stages.teacher import is_pipeline_task, load_task, teacher_stage
from mint.stages.trainer import build_loggers, close_loggers, in_a_multirun, is_global_zero, log_final
from mint.student.kinds import student_kind

log = logging.getLogger("mint")
register_configs()


def run(cfg: DictConfig) -> dict[str, Any]:
    """Runs the configured stages and returns the flat results dict (also in results.json)."""
    started = time.time()
    check_config(cfg)  # every value in range before any work (mint/config.py)
    kind = student_kind(cfg)  # before any work: can the student read what the task gives it?
    L.seed_everything(cfg.seed, workers=True)
    run_dir, stage, method = Path(cfg.paths.output_dir), Stage(cfg.stage), Method(cfg.optim.method)
    pipeline = is_pipeline_task(cfg.task)
    results: dict[str, Any] = {}
    resumed = False  # did the student continue this folder's earlier run (resume=true)?
    if pipeline:
        task = load_task(cfg.task)
        check_task_splits(task, kind.student_input)  # no held-out input under a train id
        teacher, teacher_key = teacher_stage(cfg, task)
        results |= teacher.metrics
        if is_global_zero():
            write_metrics(run_dir / "teacher" / "metrics.json", teacher.metrics)
        if stage is not Stage.teacher:
            rows, prefs_stats = prefs_stage(cfg, kind, task, teacher, teacher_key)
            results |= prefs_stats
    elif method is Method.rag:
        raise ValueError(
            f"optim=rag needs a pipeline task (task=rare_disease|tissue): its knowledge base is built "
            f"from the task's training data, and task={cfg.task.name} has only preference pairs"
        )
    elif stage in (Stage.teacher, Stage.prefs):
        raise ValueError(
            f"stage={stage} needs a pipeline task (e.g. task=rare_disease); task={cfg.task.name} starts at the student"
        )
    else:
        rows = custom_rows(cfg.task, cfg.seed)

    if stage in (Stage.all, Stage.student):
        check_rows(rows, batch_size=cfg.optim.batch_size, objective=cfg.objective)
        job = student_job(cfg, kind)
        resumed = job.resume and job.ckpt_path is not None
        if job.starts_from_sft:  # the paper's DPO: SFT first (cached), then DPO from its adapter
            job = job.starting_from(sft_start(job, rows, run_dir))
            results["sft_start/adapter"] = job.student.adapter_path
        loggers = build_loggers(job.loggers, job.hparams)  # open until the evaluation is logged too
        try:
            validation = val_ranking(cfg, kind, task) if pipeline and cfg.task.eval.val_ranking else None
            model, processor, student_metrics = fit_student(
                job, rows, run_dir / "student", loggers, validation=validation
            )
            results |= student_metrics
            if not is_global_zero():
                # An extra DDP process: its share of training is done; rank 0 evaluates and writes.
                return results
            share_sft_start(job, rows, run_dir / "student")  # a DPO run after this one starts from it
            media = []  # plots and the predictions tables, for W&B
            if pipeline and stage is Stage.all:
                eval_metrics, media = eval_stage(cfg, kind, task, teacher, model, processor, run_dir)
                results |= eval_metrics
            log_final(loggers, results, media, step=int(results.get("train/steps", 0)))
        finally:
            close_loggers(loggers)

    # This process's wall time (a resumed run: since it resumed), and the run's over every invocation
    # that wrote its results here (a re-evaluation, a resumption after a finished run): the
    # comparison reports the total. An invocation killed before its end leaves no time to add.
    results["time/run_s"] = round(time.time() - started, 1)
    results["time/total_s"] = round(results["time/run_s"] + (earlier_time(run_dir) if resumed else 0.0), 1)
    flat = write_results(run_dir, results, title=f"MINT run {cfg.run_name}")
    log.info("results in %s\n%s", run_dir, markdown_table(headline(flat)))
    # A misspelt objective fails here, naming the keys there are, with the run's work kept above.
    objective_value(flat, cfg.objective, stage)
    return flat


def earlier_time(run_dir: Path) -> float:
    """The total wall time the folder's earlier invocations recorded (results.json), or 0."""
    path = run_dir / "results.json"
    if not path.is_file():
        return 0.0
    earlier = read_json(path)
    return float(earlier.get("time/total_s", earlier.get("time/run_s", 0.0)))


# Generation metrics on the validation split: measured only with task.eval.on_val=true.
VAL_GENERATION_METRICS = ("val/top1", "val/topk", "val/format_valid", "val/car")


def check_objective_will_exist(cfg: DictConfig) -> None:
    if cfg.objective in VAL_GENERATION_METRICS and not cfg.task.get("eval", {}).get("on_val", False):
        raise ValueError(
            f"objective={cfg.objective} is measured only with task.eval.on_val=true "
            "(the validation split answered and scored); add it, or pick another objective"
        )
    if cfg.objective.startswith("val/rank_") and not cfg.task.get("eval", {}).get("val_ranking", False):
        raise ValueError(
            f"objective={cfg.objective} is measured only with task.eval.val_ranking=true (the validation "
            "split's labels ranked after each validation pass); add it, or pick another objective"
        )
    if not is_pipeline_task(cfg.task) and cfg.objective.startswith(("test/", "teacher/", "prefs/", "rag/")):
        raise ValueError(
            f"objective={cfg.objective}: task={cfg.task.name} has no teacher and no test split, so only "
            "the student's train/ and val/ metrics exist; pick one of those"
        )


def objective_value(results: dict[str, Any], objective: str, stage: Stage) -> float | None:
    """The metric named by `objective` (what a Hydra sweeper such as Optuna optimises)."""
    if objective in results:
        return float(results[objective])
    if stage in (Stage.teacher, Stage.prefs):
        return None  # stopped before the student: none of its metrics to report
    raise KeyError(
        f"objective={objective!r} is not among this run's results; set objective= to one of: "
        f"{sorted(k for k in results if isinstance(results[k], int | float))}"
    )


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    # Hydra has written .hydra/ already: a secret typed on the command line must not stay there.
    scrub_job_start(Path(cfg.paths.output_dir))
    try:
        check_objective_will_exist(cfg)  # before hours of training, not after
        results = run(cfg)
    except Exception as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        status = report(err)  # one line on the terminal, the traceback in the run's log (mint/errors.py)
        if in_a_multirun():
            # The sweeper decides: Optuna marks the trial failed (max_failure_rate), the basic
            # sweeper stops. A SystemExit would pass by both and end the sweep at once.
            raise
        sys.exit(status)
    if not is_global_zero():
        return None  # an extra DDP process: rank 0 reports
    # Hydra sweepers (e.g. hparams_search=orpo_optuna) optimise what main returns.
    return objective_value(results, cfg.objective, Stage(cfg.stage))


if __name__ == "__main__":
    main()
