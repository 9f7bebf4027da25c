"""An image student's training step: packed pairs (one row [prompt, chosen, rejected]) vs unpacked.

Unpacked, every pair is two rows, prompt+chosen and prompt+rejected, so the prompt (and the image's
cross-attention) runs twice; packed (`mint.pairs.vision.PackedVisionCollator`), once. On the tissue
task the prompt is about 165 tokens and each answer about 40, so a packed pair is about 245 tokens
against 410.

`--run DIR`: a finished run of an image student with `student.train_top_layers` (e.g. one of the
SmolLM2 tissue comparison's). Its own config decides everything: the student (its base, loaded with
a fresh LoRA as training loads it), the training pairs (the run's preference rows, from the stage
cache: `--pairs` of them, spread), the method, batch size and precision. For each layout the
trunk of those pairs is built in a temporary cache (timed: once per pair set), then training steps
(forward and backward, no optimizer step, so both layouts see the same weights) alternate between
the layouts; medians reported, with the loss difference. SFT is timed too (`--methods`): unpacked,
its training step runs the chosen rows only, packed, the whole row.

    PYTHONPATH=. .venv/bin/python experiments/bench_vision_packing.py \
        --run outputs/comparisons/smollm2-tissue-frozen-300/runs/methods/orpo_seed1 [--pairs 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from mint.commands.trained import open_run  # noqa: E402
from mint.config import Method  # noqa: E402
from mint.data.task_data import spread_indices  # noqa: E402
from mint.optim.module import PreferenceModule  # noqa: E402
from mint.optim.trunk import TrunkCollator, cached_trunk, with_trunk_rows  # noqa: E402
from mint.stages.prefs import prefs_stage  # noqa: E402
from mint.stages.student import base_identity, student_job  # noqa: E402
from mint.stages.teacher import load_task, teacher_stage  # noqa: E402

LAYOUTS = {"unpacked": False, "packed": True}


@dataclasses.dataclass
class Setup:
    """A run's student (fresh LoRA, eval mode), its settings, and the same training batches collated
    in each layout, with their cached trunk states."""

    cfg: Any
    kind: Any
    model: torch.nn.Module
    settings: Any
    pairs: list
    collated: dict[str, list[dict[str, torch.Tensor]]]
    build_s: dict[str, float]
    top_layers: int

    def autocast(self) -> Any:
        """What Lightning's precision plugin wraps a step in."""
        if str(self.cfg.trainer.precision).startswith("bf16"):
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def module(self, method: str, packed: bool) -> PreferenceModule:
        settings = self.settings
        module = PreferenceModule(
            self.model,
            method=Method(method),
            beta=settings.beta,
            sft_on_prompt=settings.sft_on_prompt,
            packed=packed,
            forward=self.kind.sides_forward,
        ).train()  # SFT's training loss (chosen rows only, unpacked)
        self.model.eval()  # no dropout: both layouts compute the same function, so their losses compare
        return module


def setup(run_dir: Path, n_pairs: int) -> Setup:
    run = open_run(run_dir)
    cfg, kind = run.cfg, run.kind
    job = student_job(cfg, kind)
    if job.student.train_top_layers is None or str(kind.modality) != "image":
        raise SystemExit(f"--run {run_dir}: needs an image student with student.train_top_layers")
    task = load_task(cfg.task)
    teacher, teacher_key = teacher_stage(cfg, task)  # from the stage cache: the run made it
    rows, _ = prefs_stage(cfg, kind, task, teacher, teacher_key)
    train_rows = [rows.train[i] for i in spread_indices(len(rows.train), n_pairs)]
    # The run's base (a built student by its folder) with a fresh LoRA, as training starts.
    spec = dataclasses.replace(run.spec, adapter_path=None)
    model, processor = kind.load(spec, cache_dir=str(job.cache_dir), corpus=None, with_adapter=True)
    pairs, _ = kind.encode(processor, train_rows, job.lengths)
    model.eval()
    settings, top_layers = job.method, job.student.train_top_layers
    size = settings.batch_size
    starts = range(0, len(pairs) - size + 1, size)  # whole batches only
    collated, build_s = {}, {}
    with tempfile.TemporaryDirectory() as cache:
        for name, packed in LAYOUTS.items():
            inner = kind.collator(processor, packed)
            started = time.perf_counter()
            trunk = cached_trunk(
                model, pairs, inner,
                top_layers=top_layers, batch_size=settings.eval_batch_size,
                cache_dir=Path(cache) / name, base=base_identity(job.identity["student"]),
            )  # fmt: skip
            build_s[name] = time.perf_counter() - started
            collator, items = TrunkCollator(inner, trunk), with_trunk_rows(pairs)
            collated[name] = [collator(items[i : i + size]) for i in starts]
    return Setup(cfg, kind, model, settings, pairs, collated, build_s, top_layers)


def step(setup: Setup, module: PreferenceModule, batch: dict[str, torch.Tensor]) -> float:
    """One training step's forward and backward (no optimizer step: the weights stay); its loss."""
    with setup.autocast():
        loss, _ = module.compute_loss(batch)
    loss.backward()
    setup.model.zero_grad(set_to_none=True)
    return loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", type=Path, required=True, help="a finished run of an image student")
    parser.add_argument("--pairs", type=int, default=64, help="training pairs to time on (spread)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per layout and method")
    parser.add_argument("--methods", nargs="+", default=["orpo", "sft"], choices=["orpo", "sft"])
    parser.add_argument("--threads", type=int, default=None)
    cli = parser.parse_args()
    if cli.threads:
        torch.set_num_threads(cli.threads)
    s = setup(cli.run, cli.pairs)
    pairs, batches = s.pairs, len(s.collated["packed"])
    tokens = {
        "unpacked": sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs),
        "packed": sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs),
    }
    print(
        f"{cli.run}: {s.cfg.student.name} ({s.cfg.student.dtype}, {s.cfg.trainer.precision}), top "
        f"{s.top_layers} layers; {len(pairs)} training pairs of task={s.cfg.task.name} in "
        f"batches of {s.settings.batch_size}; {torch.get_num_threads()} threads"
    )
    print(
        f"tokens per pair: unpacked {tokens['unpacked'] / len(pairs):.0f}, packed {tokens['packed'] / len(pairs):.0f}; "
        f"trunk build: unpacked {s.build_s['unpacked']:.1f} s, packed {s.build_s['packed']:.1f} s"
    )
    print("| method | unpacked s/step | packed s/step | packed/unpacked | max loss difference |")
    print("|---|---|---|---|---|")
    ratios = {}
    for method in cli.methods:
        modules = {name: s.module(method, packed) for name, packed in LAYOUTS.items()}
        times: dict[str, list[float]] = {name: [] for name in LAYOUTS}
        losses: dict[str, list[float]] = {name: [] for name in LAYOUTS}
        for repeat in range(cli.repeats + 1):  # the first round is a warm-up
            for name in LAYOUTS:  # alternating: drifting load hits both layouts alike
                started = time.perf_counter()
                loss = step(s, modules[name], s.collated[name][repeat % batches])
                if repeat:
                    times[name].append(time.perf_counter() - started)
                    losses[name].append(loss)
        unpacked, packed = (statistics.median(times[name]) for name in LAYOUTS)
        ratios[method] = unpacked / packed
        difference = max(abs(a - b) for a, b in zip(losses["unpacked"], losses["packed"], strict=True))
        print(f"| {method} | {unpacked:.2f} | {packed:.2f} | {packed / unpacked:.2f} | {difference:.1e} |")
    for method, ratio in ratios.items():
        print(f"speedup of a {method} step, packed vs unpacked: {ratio:.2f}x")


if __name__ == "__main__":
    main()
