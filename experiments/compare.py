"""Does the MINT student beat SFT, RAG, DPO and the untouched base? One command, several seeds.

    .venv/bin/python experiments/compare.py task=rare_disease --seeds 1 2 3 [overrides ...]
    .venv/bin/python experiments/compare.py task=tissue --seeds 1 2 3 --ablations
    .venv/bin/python experiments/compare.py task=rare_disease debug=smoke --seeds 1 2 --methods none rag
    .venv/bin/python experiments/compare.py task=tissue --seeds 1 2 3 --out DIR --resume   # finish DIR
    .venv/bin/python experiments/compare.py task=tissue --seeds 1 2 3 --out DIR --report-only  # tables so far
    .venv/bin/python experiments/compare.py task=tissue --methods --ablations sft_2x orpo_2x --paired-against orpo_2x

What it does:
1. one `python -m mint.run` per method and seed (`optim=none,sft,rag,dpo,orpo`), seed by seed,
   each in its own folder (runs/methods/<method>_seed<S>). The stage cache makes it train one
   teacher and build one preference set per seed, shared by every method of that seed. W&B
   runs are grouped: group = the comparison's name, job_type = method;
2. with `--ablations`, the transfer ablations as extra student rows (ABLATIONS, runs/ablations/):
   ORPO on pairs ranked by the unimodal teacher, SFT on the true label alone, ORPO with the
   truth forced into `chosen`, ORPO and SFT on the truth first then the teacher's list (and
   with the unimodal teacher's list after the truth), and DPO with an NLL term (rpo_alpha) from the SFT start (the
   paper's DPO start) and from the base (ORPO's start: the same number of steps), and ORPO at
   twice the comparison's steps (the budget of DPO + NLL with its SFT start), and SFT, and ORPO on
   the truth-first lists, at that budget;
3. one `stage=teacher` run per seed with the unimodal teacher (rare_disease: the note only,
   `teacher.model.modalities=[text]`; tissue: the image tower trained on the task alone, without
   descriptions or pretraining), a reference line beside the multimodal teacher;
4. reads every run's results.json and writes into the output folder:
   comparison.md, comparison.csv (per method; with the minutes one run takes, from each run's
   `time/total_s`, and in the .md the compute of the whole comparison), comparison_runs.csv (per method and seed,
   with where a run's time went: trunk_min, reference_min, fit_min, generate_min, rank_min),
   comparison.png (bar chart: mean over seeds, error bars = std over seeds, dots = seeds),
   comparison_paired.csv (orpo, or the row `--paired-against` names, minus each other student row
   on the same test cases, paired bootstrap CI),
   sweep.json (what ran), and logs the tables and the chart to a W&B run in the same group.
`--methods` with no name runs the named `--ablations` alone (the teacher row then comes from the
ablation runs that used the multimodal teacher).
`--resume` finishes a stopped comparison in its --out folder: finished runs (results.json) are
skipped, an interrupted one continues from its last checkpoint (`resume=true`).
`--report-only` (the comparison's own arguments plus its --out) runs nothing: it writes the tables
of the runs finished so far and names the runs still to come (a comparison spread over days).
`--keep DIR` then copies the tables and each finished run's record (results.json, .hydra/*.yaml,
eval/predictions.jsonl; no checkpoints) into DIR, e.g. experiments/results/<name>: `--report-only
--out DIR` re-tables them there, and `--resume --out DIR` skips those runs.

Statistics. Per method: the mean over seeds, the sample standard deviation over seeds and the
min-max range (seed noise: teacher, preference set, student initialisation and data order all
change with the seed). CI columns: each run's own 95% bootstrap interval over its test samples
(test-sample noise), shown per seed in comparison_runs.csv and the second table, and averaged
over seeds (mean of the lower bounds, mean of the upper bounds) in comparison.csv. Same seeds,
same overrides, same machine kind: same tables (the runs are deterministic on the CPU).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from mint.files import read_json, write_atomic

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("none", "sft", "rag", "dpo", "orpo")
# results.json keys (without the "test/" prefix) shown per student method; teachers have top1/topk.
METRICS = ("top1", "topk", "format_valid", "rank_top1", "rank_topk", "car")
HEADERS = {
    "top1": "top-1",
    "topk": "top-k",
    "format_valid": "format valid",
    "rank_top1": "rank top-1",
    "rank_topk": "rank top-k",
    "car": "CAR",
}
# The teacher that sees only what the student sees, per task: (row name, overrides).
UNIMODAL_TEACHER = {
    "rare_disease": ("teacher (note only)", ["teacher.model.modalities=[text]"]),
    # teacher=clip: trained on the task set alone, whatever teacher the comparison uses (e.g.
    # teacher=clip_pretrained, which knows the caption corpus too).
    "tissue": ("teacher (image only, task set only)", ["teacher=clip", "teacher.model.contrastive_weight=0"]),
}
MULTIMODAL_TEACHER = "teacher (multimodal)"


@dataclass(frozen=True)
class Ablation:
    """A student row that changes one thing about MINT's training data: does it matter?"""

    row: str  # the table's name for it
    method: str
    overrides: tuple[str, ...] = ()
    unimodal_teacher: bool = False  # pairs ranked by the task's UNIMODAL_TEACHER instead
    steps_factor: int = 1  # trains this many times the comparison's trainer.max_steps


# The lists of the *_truth_first ablations: the true label first, then the teacher's order.
TRUTH_FIRST = ("task.prefs.ranking=truth_then_teacher",)

# --ablations: folder slug -> what it runs (issue 15's transfer ablations and the DPO variant).
ABLATIONS = {
    # Does the multimodal teacher's extra knowledge reach the student? Same student and method,
    # pairs ranked by the teacher that sees only what the student sees.
    "orpo_unimodal": Ablation("orpo, unimodal teacher's pairs", "orpo", unimodal_teacher=True),
    # No teacher at all: the true label first, the rest in a random order per sample.
    "sft_truth": Ablation("sft, true label only", "sft", ("task.prefs.ranking=truth",)),
    # The teacher's lists, with the truth put into `chosen` where the teacher missed it.
    "orpo_truth": Ablation("orpo, truth forced into chosen", "orpo", ("task.prefs.force_truth=true",)),
    # The true label first, then the teacher's list: does the teacher add to the label? (With
    # rank-discounted answers the last slot, where orpo_truth puts a missed truth, weighs 1/100.)
    "orpo_truth_first": Ablation("orpo, truth first, then the teacher's list", "orpo", TRUTH_FIRST),
    # The same lists with SFT: does that row need ORPO's rejected side, or only its chosen lists?
    "sft_truth_first": Ablation("sft, truth first, then the teacher's list", "sft", TRUTH_FIRST),
    # ... and with the unimodal teacher's list after the truth: does the multimodal teacher's
    # knowledge still reach the student when the label is given too?
    "sft_truth_first_unimodal": Ablation(
        "sft, truth first, then the unimodal teacher's list",
        "sft",
        TRUTH_FIRST,
        unimodal_teacher=True,
    ),
    "orpo_truth_first_unimodal": Ablation(
        "orpo, truth first, then the unimodal teacher's list",
        "orpo",
        TRUTH_FIRST,
        unimodal_teacher=True,
    ),
    # DPO with an NLL term on the chosen answer (RPO): the paper's DPO collapsed on tissue.
    "dpo_rpo": Ablation("dpo + NLL (rpo_alpha=1)", "dpo", ("optim.rpo_alpha=1.0",)),
    # The same from the base model, as ORPO starts: dpo_rpo's steps come on top of its SFT
    # start's, so only this row compares the two losses at the same number of steps.
    "dpo_rpo_base": Ablation(
        "dpo + NLL from the base (no SFT start)", "dpo", ("optim.rpo_alpha=1.0", "optim.init_from_sft=false")
    ),
    # ORPO given dpo_rpo's budget: its SFT start's steps plus its own.
    "orpo_2x": Ablation("orpo, twice the steps (dpo_rpo's budget)", "orpo", steps_factor=2),
    # SFT given the same budget: is ORPO-600 above SFT at equal steps?
    "sft_2x": Ablation("sft, twice the steps", "sft", steps_factor=2),
    # The truth first at twice the steps: on tissue both lift ORPO (top-5, top-1): do they add up?
    "orpo_truth_first_2x": Ablation(
        "orpo, truth first then the teacher's list, twice the steps", "orpo", TRUTH_FIRST, steps_factor=2
    ),
}


@dataclass
class RunResult:
    method: str  # an optim name, or a teacher row's name
    kind: str  # "student" | "reference"
    seed: int
    values: dict[str, float]  # metric -> value, plus metric_ci_low / metric_ci_high when known
    folder: Path
    # The run's own wall time (results.json `time/total_s`, else `time/run_s`); None for a teacher row read out of a
    # student run (its time is that run's) and for runs made before the time was recorded.
    minutes: float | None = None
    # Where a student run's time went (STAGE_TIMES' columns), as far as its results.json says.
    stage_minutes: dict[str, float] = field(default_factory=dict)


# --- running -------------------------------------------------------------------------
def task_name(overrides: list[str]) -> str:
    names = [o.split("=", 1)[1] for o in overrides if o.startswith("task=")]
    if len(names) != 1:
        raise SystemExit("give the task as one override: task=rare_disease or task=tissue")
    return names[0]


@dataclass(frozen=True)
class Job:
    """One `python -m mint.run` of the comparison, in its own folder."""

    folder: Path
    overrides: tuple[str, ...]

    @property
    def finished(self) -> bool:
        return (self.folder / "results.json").is_file()

    def command(self, resume: bool) -> list[str]:
        # resume=true: an interrupted run continues from its own folder's last checkpoint.
        again = ["resume=true"] if resume and self.folder.exists() else []
        return [sys.executable, "-m", "mint.run", *self.overrides, *again, f"hydra.run.dir={self.folder}"]


def comparison_jobs(
    *,
    overrides: list[str],
    seeds: list[int],
    methods: list[str],
    name: str,
    runs_dir: Path,
    unimodal: list[str] | None,
    wandb_mode: str,
    ablations: list[str] = (),
    max_steps: int | None = None,
) -> list[Job]:
    """Every run, seed by seed (a stopped comparison has whole seeds done): the methods in
    runs_dir/methods/<method>_seed<S>, the ablations in runs_dir/ablations/<slug>_seed<S>, the
    unimodal teacher (stage=teacher) in runs_dir/unimodal_teacher/seed<S>. Within a seed the
    stage cache trains one teacher and builds one preference set for all of them. `max_steps`
    (the comparison's trainer.max_steps) is needed by ablations with a steps_factor."""
    # W&B runs grouped by comparison (job_type is the method: conf/logger/wandb.yaml), unless
    # the caller picked another logger or switched W&B off.
    chosen = [o for o in overrides if o.startswith("logger=")]
    wandb: list[str] = []
    if chosen == ["logger=wandb"] or (not chosen and wandb_mode != "disabled"):
        wandb = ([] if chosen else ["logger=wandb"]) + [f"logger.wandb.group={name}"]
        if wandb_mode == "online":
            wandb.append("logger.wandb.offline=false")
    jobs = []
    for seed in seeds:
        for method in methods:
            folder = runs_dir / "methods" / f"{method}_seed{seed}"
            jobs.append(Job(folder, (f"seed={seed}", f"optim={method}", *overrides, *wandb)))
        for slug in ablations:
            ablation = ABLATIONS[slug]
            if ablation.unimodal_teacher and unimodal is None:
                raise SystemExit(f"ablation {slug} needs the task's unimodal teacher")
            teacher = unimodal if ablation.unimodal_teacher else []
            steps = []
            if ablation.steps_factor != 1:
                if max_steps is None:
                    raise ValueError(f"ablation {slug} needs the comparison's trainer.max_steps")
                # Placed after the comparison's overrides: Hydra keeps a key's last value.
                steps = [f"trainer.max_steps={ablation.steps_factor * max_steps}"]
            folder = runs_dir / "ablations" / f"{slug}_seed{seed}"
            args = (
                f"seed={seed}",
                f"optim={ablation.method}",
                *overrides,
                *ablation.overrides,
                *steps,
                *teacher,
                *wandb,
            )
            jobs.append(Job(folder, args))
        if unimodal is not None:
            folder = runs_dir / "unimodal_teacher" / f"seed{seed}"
            jobs.append(Job(folder, (f"seed={seed}", "stage=teacher", *overrides, *unimodal)))
    return jobs


def composed_max_steps(overrides: list[str]) -> int:
    """trainer.max_steps of the config `python -m mint.run <overrides>` composes."""
    from mint.cli import compose_config

    steps = compose_config(overrides).trainer.get("max_steps")
    if not isinstance(steps, int) or steps <= 0:
        raise SystemExit(
            f"an ablation with more steps needs a positive trainer.max_steps, the config has {steps}"
        )
    return steps


def run_jobs(jobs: list[Job], wandb_mode: str, resume: bool) -> None:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["WANDB_MODE"] = wandb_mode
    for i, job in enumerate(jobs, 1):
        if job.finished:  # only with --resume: a fresh comparison starts in an empty folder
            print(f"[{i}/{len(jobs)}] done already: {job.folder}", flush=True)
            continue
        command = job.command(resume)
        print(f"[{i}/{len(jobs)}] +", shlex.join(command), flush=True)
        subprocess.run(command, cwd=ROOT, env=env, check=True)


# --- collecting ----------------------------------------------------------------------
def _values(results: dict, prefix: str, metrics: tuple[str, ...]) -> dict[str, float]:
    out = {}
    for metric in metrics:
        for suffix in ("", "_ci_low", "_ci_high"):
            key = f"{prefix}{metric}{suffix}"
            if results.get(key) is not None:
                out[metric + suffix] = float(results[key])
    return out


def _minutes(results: dict) -> float | None:
    # The run's total over its invocations; a record from before time/total_s existed has its last one's.
    seconds = results.get("time/total_s", results.get("time/run_s"))
    return None if seconds is None else float(seconds) / 60


# comparison_runs.csv's columns on where a run's time went -> the results.json keys they come from
STAGE_TIMES = {
    "trunk_min": "time/student/trunk_s",  # the frozen trunk's states: built, or read from the cache
    "reference_min": "time/student/reference_s",  # DPO's reference log-probs
    "fit_min": "time/student/fit_s",  # training, its validation passes included
    "generate_min": "time/test/generate_s",
    "rank_min": "time/test/rank_s",
}


def _stage_minutes(results: dict) -> dict[str, float]:
    return {column: float(results[key]) / 60 for column, key in STAGE_TIMES.items() if key in results}


def _row_of(folder: str | Path) -> tuple[str, str]:
    """(`methods`, `dpo`) for methods/dpo_seed3: what runs of one row across seeds share."""
    path = Path(folder)
    return path.parent.name, path.name.rsplit("seed", 1)[0].rstrip("_")


def collect(runs_dir: Path, unimodal_name: str | None) -> list[RunResult]:
    """Every finished run of the sweeps under `runs_dir`: one row per student run, plus teacher rows
    per seed. Runs without results.json are left out here; `started_unfinished` names them, and the
    report says so."""

    def finished(folders: list[Path]) -> list[tuple[Path, DictConfig, dict]]:
        out = []
        for folder in folders:
            results_file = folder / "results.json"
            if not results_file.is_file():
                continue
            config = OmegaConf.load(folder / ".hydra" / "config.yaml")
            out.append((folder, config, read_json(results_file)))
        return out

    def subfolders(name: str) -> list[Path]:
        parent = runs_dir / name
        return sorted(p for p in parent.iterdir() if p.is_dir()) if parent.is_dir() else []

    ablations = subfolders("ablations")
    for folder in ablations:  # unfinished ones too: a misnamed folder is an error either way
        if _row_of(folder)[1] not in ABLATIONS:
            raise ValueError(f"{folder}: not an ablation of this script ({', '.join(ABLATIONS)})")
    # (folder, config, results, its row, whether its teacher is the comparison's multimodal one)
    students = [(*run, str(run[1].optim.method), True) for run in finished(subfolders("methods"))]
    for folder, config, results in finished(ablations):
        ablation = ABLATIONS[_row_of(folder)[1]]
        students.append((folder, config, results, ablation.row, not ablation.unimodal_teacher))
    if not students:
        raise FileNotFoundError(f"no finished runs under {runs_dir / 'methods'} or {runs_dir / 'ablations'}")
    runs: list[RunResult] = []
    teachers: dict[int, RunResult] = {}
    for folder, config, results, row, multimodal_teacher in students:
        seed = int(config.seed)
        runs.append(
            RunResult(
                row,
                "student",
                seed,
                _values(results, "test/", METRICS),
                folder,
                _minutes(results),
                _stage_minutes(results),
            )
        )
        if not multimodal_teacher:  # its results hold the unimodal teacher's numbers
            continue
        teacher = RunResult(
            MULTIMODAL_TEACHER, "reference", seed, _values(results, "teacher/test/", ("top1", "topk")), folder
        )
        if seed in teachers and teachers[seed].values != teacher.values:
            raise ValueError(
                f"seed {seed}: runs disagree on the teacher ({teachers[seed].folder} vs {folder})"
            )
        teachers.setdefault(seed, teacher)
    # The teachers after the students, as the tables list them.
    runs += [teachers[s] for s in sorted(teachers)]
    if unimodal_name is not None:
        for folder, config, results in finished(subfolders("unimodal_teacher")):
            runs.append(
                RunResult(
                    unimodal_name,
                    "reference",
                    int(config.seed),
                    _values(results, "teacher/test/", ("top1", "topk")),
                    folder,
                    _minutes(results),
                )
            )
    return runs


def started_unfinished(runs_dir: Path) -> list[str]:
    """The run folders under `runs_dir` (relative, e.g. methods/dpo_seed3) without a results.json."""
    return [
        str(folder.relative_to(runs_dir))
        for group in ("methods", "ablations", "unimodal_teacher")
        for folder in sorted((runs_dir / group).glob("*"))
        if folder.is_dir() and not (folder / "results.json").is_file()
    ]


def row_order(
    runs: list[RunResult], methods: list[str], ablations: list[str], unimodal_name: str | None
) -> list[str]:
    """The report's rows, in the script's order (METHODS, ABLATIONS, then the teachers): the methods and
    ablations this command asked for, and those that other commands of the same comparison (run in
    parts: other seeds or methods) finished, so that every part's report tables the whole comparison."""
    present = {run.method for run in runs}
    return (
        [m for m in METHODS if m in methods or m in present]
        + [a.row for slug, a in ABLATIONS.items() if slug in ablations or a.row in present]
        + [MULTIMODAL_TEACHER]
        + ([unimodal_name] if unimodal_name else [])
    )


# --- aggregating -----------------------------------------------------------------------
def summarize(runs: list[RunResult], order: list[str]) -> list[dict]:
    """One row per method (in `order`): n_seeds and, per metric, mean/std/min/max over seeds and
    the per-seed bootstrap CI bounds averaged over seeds. std is the sample std (ddof=1; 0 for one seed)."""
    rows = []
    for method in order:
        group = sorted((r for r in runs if r.method == method), key=lambda r: r.seed)
        if not group:
            continue
        row: dict = {"method": method, "kind": group[0].kind, "n_seeds": len(group)}
        minutes = [r.minutes for r in group]
        if None not in minutes:  # what one run of this row costs: mean over seeds
            row["minutes_mean"] = float(np.mean(minutes))
        for metric in METRICS:
            values = np.array([r.values[metric] for r in group if metric in r.values])
            if len(values) == 0:
                continue
            row |= {
                f"{metric}_mean": float(values.mean()),
                f"{metric}_std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                f"{metric}_min": float(values.min()),
                f"{metric}_max": float(values.max()),
            }
            for bound in ("ci_low", "ci_high"):
                bounds = [r.values[f"{metric}_{bound}"] for r in group if f"{metric}_{bound}" in r.values]
                if len(bounds) == len(values):
                    row[f"{metric}_{bound}"] = float(np.mean(bounds))
        rows.append(row)
    return rows


# The leading columns of comparison.csv and comparison_runs.csv; the metrics follow.
SUMMARY_COLUMNS = ["method", "kind", "n_seeds", "minutes_mean"]
RUN_COLUMNS = ["method", "kind", "seed", "minutes", *STAGE_TIMES]


def _run_row(run: RunResult) -> dict:
    row = {"method": run.method, "kind": run.kind, "seed": run.seed, "minutes": run.minutes}
    return row | run.stage_minutes | run.values


def _columns(rows: list[dict], base: list[str]) -> list[str]:
    keys = {k for row in rows for k in row}
    ordered = [k for k in base if k in keys]
    for metric in METRICS:
        for stat in ("", "_mean", "_std", "_min", "_max", "_ci_low", "_ci_high"):
            if metric + stat in keys:
                ordered.append(metric + stat)
    return ordered


def write_csv(path: Path, rows: list[dict], base: list[str]) -> None:
    columns = _columns(rows, base)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
    write_atomic(path, text.getvalue())  # a report stopped part-way leaves the last whole table


def _duration(minutes: float) -> str:
    return f"{minutes:.1f} min" if minutes < 120 else f"{minutes / 60:.1f} h"


def time_to_go(pending: list[str], runs: list[RunResult]) -> str:
    """An estimate of the time the pending runs will take: each at the mean minutes of the finished
    runs of its row (a row's first run on a new seed also builds that seed's caches, so it is rough)."""
    finished: dict[tuple[str, str], list[float]] = {}
    for run in runs:
        if run.minutes is not None:
            finished.setdefault(_row_of(run.folder), []).append(run.minutes)
    known = [float(np.mean(finished[_row_of(p)])) for p in pending if _row_of(p) in finished]
    if not known:
        return "No finished run of their rows to estimate their time from."
    unknown = len(pending) - len(known)
    text = f"At the mean time of the finished runs of each row, about {_duration(sum(known))} to go"
    return text + (
        f" for {len(known)} of them ({unknown} not estimated: no finished run of their row)."
        if unknown
        else "."
    )


def markdown(
    task: str, summary: list[dict], runs: list[RunResult], command: str, pending: list[str] = ()
) -> str:
    shown = [m for m in METRICS if any(f"{m}_mean" in row for row in summary)]
    lines = [
        f"# MINT comparison: {task}",
        "",
        f"Command: `{command}`",
        "",
    ]
    if pending:  # --report-only on a comparison in progress
        lines += [
            f"**In progress**: {len(pending)} runs not finished yet ({', '.join(pending)}). {time_to_go(pending, runs)}",
            "",
        ]
    lines += [
        "Each cell: mean over seeds ± sample std over seeds [min-max over seeds]. Teacher rows are",
        "reference lines (the teacher sees more than the student). Per-seed values with each run's",
        "95% bootstrap CI over its test samples are in the second table.",
        "",
        "| method | seeds | min/run | " + " | ".join(HEADERS[m] for m in shown) + " |",
        "|---|---|---|" + "---|" * len(shown),
    ]
    for row in summary:
        cells = []
        for m in shown:
            if f"{m}_mean" not in row:
                cells.append("—")
                continue
            cells.append(
                f"{row[f'{m}_mean']:.3f} ± {row[f'{m}_std']:.3f} [{row[f'{m}_min']:.3f}-{row[f'{m}_max']:.3f}]"
            )
        name = f"*{row['method']}*" if row["kind"] == "reference" else f"**{row['method']}**"
        minutes = f"{row['minutes_mean']:.1f}" if "minutes_mean" in row else "—"
        lines.append(f"| {name} | {row['n_seeds']} | {minutes} | " + " | ".join(cells) + " |")
    timed = [r.minutes for r in runs if r.minutes is not None]
    if timed:
        untimed = len({r.folder for r in runs if r.minutes is None and r.kind == "student"})
        lines += [
            "",
            f"Compute: {len(timed)} runs took {_duration(sum(timed))} in all (each run's own wall time,"
            " `time/total_s`: its invocations that finished, a re-evaluation's included; min/run is its"
            " mean over seeds; a record without it gives `time/run_s`, its last invocation's)"
            + (f"; {untimed} runs recorded no time." if untimed else "."),
        ]
    students = [r for r in summary if r["kind"] == "student" and "top1_std" in r]
    if students and max(r["n_seeds"] for r in students) > 1:
        noisiest = max(students, key=lambda r: r["top1_std"])
        lines += [
            "",
            f"Seed noise: the std of top-1 over seeds reaches {noisiest['top1_std']:.3f} ({noisiest['method']});",
            "two methods whose means differ by less than about twice that are not distinguishable here.",
        ]
    lines += ["", "| method | seed | " + " | ".join(f"{HEADERS[m]} [95% CI]" for m in shown) + " |"]
    lines.append("|---|---|" + "---|" * len(shown))
    order = {row["method"]: i for i, row in enumerate(summary)}
    for run in sorted(runs, key=lambda r: (order.get(r.method, len(order)), r.seed)):
        cells = []
        for m in shown:
            if m not in run.values:
                cells.append("—")
            elif f"{m}_ci_low" in run.values:
                cells.append(
                    f"{run.values[m]:.3f} [{run.values[f'{m}_ci_low']:.3f}, {run.values[f'{m}_ci_high']:.3f}]"
                )
            else:
                cells.append(f"{run.values[m]:.3f}")
        lines.append(f"| {run.method} | {run.seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(path: Path, task: str, summary: list[dict], runs: list[RunResult]) -> None:
    """Grouped bars (top-1, top-k) per method: mean over seeds, error bar = std, dots = seeds."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    names = [row["method"] for row in summary]
    x = np.arange(len(names))
    width = 0.38
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2.5, 4.0))
    for offset, metric, color in ((-width / 2, "top1", "tab:blue"), (width / 2, "topk", "tab:orange")):
        means = [row.get(f"{metric}_mean", np.nan) for row in summary]
        stds = [row.get(f"{metric}_std", 0.0) for row in summary]
        bars = ax.bar(x + offset, means, width, yerr=stds, capsize=3, color=color, label=HEADERS[metric])
        for bar, row in zip(bars, summary, strict=True):
            if row["kind"] == "reference":
                bar.set_hatch("//")
                bar.set_alpha(0.6)
        for i, name in enumerate(names):
            seeds = [r.values[metric] for r in runs if r.method == name and metric in r.values]
            ax.scatter(np.full(len(seeds), x[i] + offset), seeds, s=10, color="black", zorder=3)
    ax.set_xticks(x, names, rotation=20, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("test accuracy")
    n_seeds = max(row["n_seeds"] for row in summary)
    ax.set_title(
        f"MINT {task}: mean over {n_seeds} seed(s)\nerror bars = std over seeds, dots = seeds, hatched = teachers",
        fontsize=10,
    )
    ax.legend(loc="upper left")
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=120)
    plt.close(fig)
    write_atomic(path, image.getvalue())


def log_wandb(
    out_dir: Path, name: str, task: str, summary: list[dict], runs: list[RunResult], mode: str, project: str
) -> None:
    """The tables and the chart as one W&B run in the sweep's group (job_type = comparison)."""
    if mode == "disabled":
        return
    import wandb

    run = wandb.init(
        project=project,
        group=name,
        job_type="comparison",
        name=f"{name}-comparison",
        dir=str(out_dir),
        mode=mode,
        config={"task": task},
    )
    columns = _columns(summary, SUMMARY_COLUMNS)
    table = wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in summary])
    per_run = [_run_row(r) for r in runs]
    run_columns = _columns(per_run, RUN_COLUMNS)
    run.log(
        {
            "comparison/summary": table,
            "comparison/runs": wandb.Table(
                columns=run_columns, data=[[row.get(c) for c in run_columns] for row in per_run]
            ),
            "comparison/chart": wandb.Image(str(out_dir / "comparison.png")),
        }
    )
    run.finish()


# --- MINT against each method, case by case --------------------------------------------
PAIRED_REFERENCE = "orpo"  # the method under test (MINT)
PAIRED_METRIC = "top1"  # a per-case boolean of eval/predictions.jsonl


def _per_case(folder: Path, metric: str) -> dict[str, float]:
    """case id -> the metric (0/1) for one run, from its eval/predictions.jsonl."""
    path = folder / "eval" / "predictions.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if any(metric not in row or "id" not in row for row in rows):
        raise ValueError(f"{path}: every line needs 'id' and '{metric}'")
    return {row["id"]: float(row[metric]) for row in rows}


def paired_differences(
    runs: list[RunResult],
    order: list[str] | None = None,
    reference: str = PAIRED_REFERENCE,
    metric: str = PAIRED_METRIC,
    n_boot: int = 2000,
    seed: int = 0,
) -> list[dict]:
    """`reference` minus each other student row on the same test cases of the same seeds.

    The per-run CIs of the tables answer "how sure is this run's top-1"; two methods scored on
    the same cases are compared more sharply by their paired difference (their errors on hard
    cases move together). Per row: the mean over shared seeds of the per-seed mean difference, its
    95% paired bootstrap CI (cases resampled within each seed, the same draw for both methods
    and for every row),
    and on how many seeds the reference was ahead. Runs without eval/predictions.jsonl are left
    out; rows with no shared seed too. Rows follow `order` (the tables' order) where given."""

    def by_seed(method: str) -> dict[int, Path]:
        return {
            r.seed: r.folder
            for r in runs
            if r.method == method
            and r.kind == "student"
            and (r.folder / "eval" / "predictions.jsonl").is_file()
        }

    our_folders = by_seed(reference)
    ours = {s: _per_case(folder, metric) for s, folder in our_folders.items()}  # read once
    rows = []
    students = dict.fromkeys(r.method for r in runs if r.kind == "student" and r.method != reference)
    others = [m for m in order if m in students] if order is not None else list(students)
    for method in others:
        theirs = by_seed(method)
        seeds = sorted(set(ours) & set(theirs))
        if not seeds:
            continue
        diffs = []  # per seed: reference - method, case by case
        for s in seeds:
            a, b = ours[s], _per_case(theirs[s], metric)
            if set(a) != set(b):
                raise ValueError(
                    f"seed {s}: {our_folders[s]} and {theirs[s]} were scored on different test cases"
                )
            diffs.append(np.array([a[case] - b[case] for case in sorted(a)]))
        means = np.array([d.mean() for d in diffs])
        # One fixed draw of cases per seed, whatever the row: a row's CI does not depend on which
        # other rows the table holds (a shared stream would move it when a run is added).
        draws = [
            np.random.default_rng([seed, s]).integers(0, len(d), (n_boot, len(d)))
            for s, d in zip(seeds, diffs, strict=True)
        ]
        boot = np.mean([d[draw].mean(axis=1) for d, draw in zip(diffs, draws, strict=True)], axis=0)
        rows.append(
            {
                "reference": reference,
                "method": method,
                "metric": metric,
                "n_seeds": len(seeds),
                "diff_mean": float(means.mean()),
                "diff_ci_low": float(np.percentile(boot, 2.5)),
                "diff_ci_high": float(np.percentile(boot, 97.5)),
                "seeds_ahead": int((means > 0).sum()),
            }
        )
    return rows


def paired_markdown(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    first = rows[0]
    lines = [
        "",
        f"**{first['reference']} against each method, case by case** ({HEADERS[first['metric']]}: "
        f"{first['reference']} minus the method on the same test cases, mean over the seeds both ran;",
        "95% paired bootstrap CI, cases resampled within each seed; a CI above 0 means ahead beyond test-case noise):",
        "",
        f"| method | seeds | {first['reference']} minus method [95% CI] | seeds {first['reference']} is ahead |",
        "|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['method']} | {row['n_seeds']} | {row['diff_mean']:+.3f} "
            f"[{row['diff_ci_low']:+.3f}, {row['diff_ci_high']:+.3f}] | {row['seeds_ahead']} of {row['n_seeds']} |"
        )
    return lines


# What a comparison's tables are made of, per finished run: kept (`--keep DIR`), they let
# `--report-only --out DIR` re-table the comparison and `--resume --out DIR` skip those runs.
# Checkpoints, adapters and W&B files stay behind: a few hundred KB a run instead of megabytes.
RUN_RECORD = (
    "results.json",
    ".hydra/config.yaml",
    ".hydra/overrides.yaml",
    ".hydra/hydra.yaml",
    "eval/predictions.jsonl",
)
TABLES = (
    "comparison.md",
    "comparison.csv",
    "comparison_runs.csv",
    "comparison_paired.csv",
    "comparison.png",
    "sweep.json",
)


def keep_records(out_dir: Path, keep_dir: Path) -> int:
    """Copy the tables of the comparison in `out_dir` and each finished run's RUN_RECORD into
    `keep_dir` (e.g. experiments/results/<name>/), under the same relative paths. Files of the same
    name are replaced, one by one and atomically; nothing else in `keep_dir` is touched, so records
    of several machines or sessions add up there. Returns the number of runs kept."""
    finished = sorted(results.parent for results in (out_dir / "runs").glob("*/*/results.json"))
    for run in finished:
        for name in RUN_RECORD:
            if (run / name).is_file():
                write_atomic(keep_dir / run.relative_to(out_dir) / name, (run / name).read_bytes())
    for name in TABLES:
        if (out_dir / name).is_file():
            write_atomic(keep_dir / name, (out_dir / name).read_bytes())
    return len(finished)


def write_report(
    out_dir: Path,
    task: str,
    runs: list[RunResult],
    order: list[str],
    command: str,
    pending: list[str] = (),
    reference: str = PAIRED_REFERENCE,
) -> list[dict]:
    """comparison.md / .csv / _runs.csv / .png from the collected runs; returns the summary rows.
    `pending`: the runs not finished yet, named in the .md (`--report-only`); `reference`: the row
    the case-by-case table is about (its name in the tables)."""
    summary = summarize(runs, order)
    write_csv(out_dir / "comparison.csv", summary, SUMMARY_COLUMNS)
    per_run = [_run_row(r) for r in sorted(runs, key=lambda r: (order.index(r.method), r.seed))]
    write_csv(out_dir / "comparison_runs.csv", per_run, RUN_COLUMNS)
    paired = paired_differences(runs, order, reference=reference)
    if paired:
        write_csv(out_dir / "comparison_paired.csv", paired, list(paired[0]))
    else:  # no longer any pair to compare: no stale table from an earlier report
        (out_dir / "comparison_paired.csv").unlink(missing_ok=True)
    text = markdown(task, summary, runs, command, pending)
    write_atomic(out_dir / "comparison.md", text + "".join(line + "\n" for line in paired_markdown(paired)))
    plot(out_dir / "comparison.png", task, summary, runs)
    return summary


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run; task=... is required")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument(
        "--methods",
        nargs="*",
        default=list(METHODS),
        choices=METHODS,
        help="the methods to run (default all; none at all with --ablations: those rows alone)",
    )
    parser.add_argument(
        "--ablations",
        nargs="*",
        choices=list(ABLATIONS),
        default=None,
        help="extra student rows (alone: all of them): "
        + ", ".join(f"{k} = {a.row}" for k, a in ABLATIONS.items()),
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default outputs/comparisons/<name>)"
    )
    parser.add_argument(
        "--name",
        default=None,
        help="comparison name = W&B group (default: the --out folder's name, else compare-<task>-<time>)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="finish the comparison in --out: skip finished runs, resume interrupted ones",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: write the tables from the runs in --out finished so far, naming the others",
    )
    parser.add_argument(
        "--paired-against",
        default=PAIRED_REFERENCE,
        choices=[*METHODS, *ABLATIONS],
        help="the row the case-by-case table subtracts every other row from (default orpo: MINT), "
        "e.g. orpo_2x to set ORPO and SFT at equal, longer training side by side",
    )
    parser.add_argument(
        "--no-unimodal-teacher", action="store_true", help="skip the unimodal teacher's reference row"
    )
    parser.add_argument(
        "--keep",
        type=Path,
        default=None,
        help="after the report, copy the tables and every finished run's record (results.json, "
        ".hydra/*.yaml, eval/predictions.jsonl) into this folder, e.g. experiments/results/<name>",
    )
    parser.add_argument(
        "--wandb", choices=("offline", "online", "disabled"), default=os.environ.get("WANDB_MODE", "offline")
    )
    parser.add_argument("--wandb-project", default="mint")
    args = parser.parse_args(argv)
    # `--ablations` alone: all of them; absent: none.
    args.ablations = list(ABLATIONS) if args.ablations == [] else args.ablations or []

    task = task_name(args.overrides)
    if len(set(args.seeds)) != len(args.seeds) or len(set(args.methods)) != len(args.methods):
        raise SystemExit("--seeds and --methods must not repeat a value")
    if not args.methods and not args.ablations:
        raise SystemExit("--methods is empty and no --ablations are named: nothing to compare")
    for flag, given in (("--resume", args.resume), ("--report-only", args.report_only)):
        if given and args.out is None and args.name is None:
            raise SystemExit(f"{flag} needs the --out (or --name) of the comparison")
    # The name is the W&B group: a comparison resumed or re-tabled by its --out keeps its name.
    name = args.name or (
        Path(args.out).resolve().name if args.out else f"compare-{task}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    out_dir = (args.out or ROOT / "outputs" / "comparisons" / name).resolve()
    if args.keep is not None and args.keep.resolve() == out_dir:
        raise SystemExit(f"--keep {args.keep}: that is the comparison's own --out folder")
    runs_dir = out_dir / "runs"
    if args.report_only and not runs_dir.is_dir():
        raise SystemExit(f"--report-only: no comparison in {out_dir} (no runs/ folder)")
    if runs_dir.exists() and not (args.resume or args.report_only):
        raise SystemExit(
            f"{runs_dir} exists: pass --resume to finish that comparison, or pick another --out or --name"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    unimodal_name, unimodal = (None, None)
    if not args.no_unimodal_teacher:
        if task not in UNIMODAL_TEACHER:
            raise SystemExit(f"no unimodal teacher known for task={task}: pass --no-unimodal-teacher")
        unimodal_name, unimodal = UNIMODAL_TEACHER[task]

    max_steps = None
    if any(ABLATIONS[slug].steps_factor != 1 for slug in args.ablations):
        max_steps = composed_max_steps(args.overrides)
    started = time.time()
    jobs = comparison_jobs(
        overrides=args.overrides,
        seeds=args.seeds,
        methods=args.methods,
        name=name,
        runs_dir=runs_dir,
        unimodal=unimodal,
        wandb_mode=args.wandb,
        ablations=args.ablations,
        max_steps=max_steps,
    )
    if not args.report_only:
        run_jobs(jobs, args.wandb, args.resume)  # raises unless every job of this command finished
    # Not finished: this command's jobs (--report-only), and runs of the same comparison that
    # another command (other seeds or methods, run in parts) started and did not finish: the
    # report names them instead of failing after hours of work.
    pending = [str(job.folder.relative_to(runs_dir)) for job in jobs if not job.finished]
    pending += [p for p in started_unfinished(runs_dir) if p not in pending]
    runs = collect(runs_dir, unimodal_name)
    order = row_order(runs, args.methods, args.ablations, unimodal_name)
    shown_command = "python experiments/compare.py " + shlex.join(
        [*args.overrides, "--seeds", *map(str, args.seeds), "--methods", *args.methods]
        + (["--ablations", *args.ablations] if args.ablations else [])
        + (["--paired-against", args.paired_against] if args.paired_against != PAIRED_REFERENCE else [])
    )
    reference = (
        ABLATIONS[args.paired_against].row if args.paired_against in ABLATIONS else args.paired_against
    )
    summary = write_report(out_dir, task, runs, order, shown_command, pending, reference)
    if args.report_only:  # what ran stays recorded as the comparison's own run wrote it
        print((out_dir / "comparison.md").read_text())
        _keep(out_dir, args.keep)
        return out_dir
    write_atomic(
        out_dir / "sweep.json",
        json.dumps(
            {
                "name": name,
                "task": task,
                "seeds": args.seeds,
                "methods": args.methods,
                "ablations": args.ablations,
                "overrides": args.overrides,
                "commands": [job.command(resume=False) for job in jobs],
                "wall_s": round(time.time() - started, 1),
            },
            indent=2,
        )
        + "\n",
    )
    log_wandb(out_dir, name, task, summary, runs, args.wandb, args.wandb_project)
    print((out_dir / "comparison.md").read_text())
    print(f"written to {out_dir}")
    _keep(out_dir, args.keep)
    return out_dir


def _keep(out_dir: Path, keep_dir: Path | None) -> None:
    if keep_dir is not None:
        kept = keep_records(out_dir, keep_dir)
        print(f"kept the tables and the records of {kept} finished runs in {keep_dir}")


if __name__ == "__main__":
    main()
