"""Closed-set ranking: prompt KV cache shared by all candidates vs separate full sequences.

C=19 candidates (PanNuke's tissue count) of 3-12 tokens after a 256-token prompt, a small random
Llama built from config (hidden 256, 4 layers, vocab 2048, float32, CPU). The methods alternate
within each repeat so that drifting load on a shared machine hits both alike; medians reported.

    .venv/bin/python experiments/bench_ranking.py [--repeats 7] [--threads N]

`--trunk`: the ranking of a student trained on its top 4 layers (mint/eval/trunk_ranking.py)
against the KV-cache path, on SmolLM2-135M-Instruct in bfloat16 (`--dtype float32`: the two agree
to 1e-4) with a random LoRA on its top layers, rare-disease shapes (30 labels after a shared 8-token header, 200-token prompts): the
trunk build (once per test split and base) and the top-layer scoring, per prompt.

    PYTHONPATH=. .venv/bin/python experiments/bench_ranking.py --trunk [--prompts 24] [--tiny]

`--run DIR`: a finished run's trained student (its config, adapter and task), its test split
(`--prompts` samples, spread) ranked both ways as its evaluation would: at full depth with the KV
cache, and on the trunk (a student with train_top_layers; an image student's rows share one trunk
sequence, the image entering above it). Prints each path's time, the largest score difference and
how often the two put the same label first.

    PYTHONPATH=. .venv/bin/python experiments/bench_ranking.py --run outputs/.../sft_seed1 [--prompts 48]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from mint.eval.ranking import score_candidates, score_candidates_full  # noqa: E402
from mint.eval.trunk_ranking import candidate_row, ranking_trunk, trunk_label_scores  # noqa: E402

VOCAB = 2048


def build_model(hidden: int, layers: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 32 * 32,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=2048,
        pad_token_id=0,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).float().eval()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--candidates", type=int, default=19)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--trunk", action="store_true", help="top-layer ranking on a cached trunk vs KV cache"
    )
    parser.add_argument("--prompts", type=int, default=24, help="--trunk: test prompts")
    parser.add_argument(
        "--dtype", default="bfloat16", help="--trunk: SmolLM2's dtype (float32 shows exactness)"
    )
    parser.add_argument(
        "--tiny", action="store_true", help="--trunk: this benchmark's small Llama, not SmolLM2"
    )
    parser.add_argument("--run", type=Path, help="a finished run folder: its test split ranked both ways")
    cli = parser.parse_args()
    torch.set_num_threads(cli.threads)
    if cli.run is not None:
        return run_main(cli)
    if cli.trunk:
        return trunk_main(cli)

    rng = random.Random(0)
    model = build_model(cli.hidden, cli.layers)
    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=0)
    prompt = [rng.randrange(1, VOCAB) for _ in range(cli.prompt_len)]
    candidates = [[rng.randrange(1, VOCAB) for _ in range(rng.randint(3, 12))] for _ in range(cli.candidates)]
    c = len(candidates)

    methods = {
        "kv_cache (batch C)": lambda: score_candidates(model, tokenizer, prompt, candidates, batch_size=c),
        "full sequences (batch C)": lambda: score_candidates_full(
            model, tokenizer, prompt, candidates, batch_size=c
        ),
        "full sequences (one by one)": lambda: score_candidates_full(
            model, tokenizer, prompt, candidates, batch_size=1
        ),
    }
    scores = {name: run() for name, run in methods.items()}  # also the warm-up
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(cli.repeats):
        for name, run in methods.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)

    print(
        f"C={c} candidates of {min(map(len, candidates))}-{max(map(len, candidates))} tokens, "
        f"prompt {len(prompt)} tokens, Llama hidden {cli.hidden} x {cli.layers} layers, "
        f"{torch.get_num_threads()} threads, {cli.repeats} repeats"
    )
    cached = scores["kv_cache (batch C)"]
    print("| method | median s | ratio to kv_cache | max abs score diff (summed / mean) |")
    print("|---|---|---|---|")
    base = statistics.median(times["kv_cache (batch C)"])
    for name in methods:
        med = statistics.median(times[name])
        diff_sum = (scores[name].summed - cached.summed).abs().max().item()
        diff_mean = (scores[name].mean - cached.mean).abs().max().item()
        print(f"| {name} | {med:.4f} | {med / base:.1f}x | {diff_sum:.2e} / {diff_mean:.2e} |")


def trunk_main(cli: argparse.Namespace) -> None:
    import tempfile

    from peft import LoraConfig, get_peft_model

    from mint.optim.trunk import top_lora

    top = 4 if not cli.tiny else 2
    if cli.tiny:
        model, vocab, name = build_model(cli.hidden, cli.layers), VOCAB, "small Llama, float32"
    else:
        from mint.student.gguf import smollm2_gguf
        from mint.student.load import load_student

        folder, gguf_file = smollm2_gguf()
        model, _ = load_student(folder, cache_dir="outputs/cache", gguf_file=gguf_file, dtype=cli.dtype)
        vocab, name = model.config.vocab_size, f"SmolLM2-135M-Instruct, {cli.dtype}"
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    torch.manual_seed(0)
    model = get_peft_model(model, top_lora(lora, model, top)).eval()
    rng = random.Random(0)
    header = [rng.randrange(1, vocab) for _ in range(8)]
    candidates = [header + [rng.randrange(1, vocab) for _ in range(rng.randint(4, 10))] for _ in range(30)]
    prompts = [[rng.randrange(1, vocab) for _ in range(rng.randint(180, 220))] for _ in range(cli.prompts)]
    rows = [candidate_row(p, candidates) for p in prompts]
    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=0)

    with tempfile.TemporaryDirectory() as cache:
        started = time.perf_counter()
        trunk = ranking_trunk(
            model,
            rows,
            top_layers=top,
            pad_token_id=0,
            batch_size=8,
            cache_dir=Path(cache),
            base={"bench": 1},
        )
        build = time.perf_counter() - started
        times: dict[str, list[float]] = {"kv_cache": [], "top layers on the trunk": []}
        for _ in range(cli.repeats):
            started = time.perf_counter()
            kv = torch.stack([score_candidates(model, tokenizer, p, candidates).summed for p in prompts])
            times["kv_cache"].append(time.perf_counter() - started)
            started = time.perf_counter()
            on_trunk = trunk_label_scores(model, trunk, rows, batch_size=8)
            times["top layers on the trunk"].append(time.perf_counter() - started)
    reference = None
    if not cli.tiny and cli.dtype != "float32":  # how far each path lies from float32 scores
        model_f32, _ = load_student(folder, cache_dir="outputs/cache", gguf_file=gguf_file, dtype="float32")
        torch.manual_seed(0)
        model_f32 = get_peft_model(model_f32, top_lora(lora, model_f32, top)).eval()
        reference = torch.stack(
            [score_candidates(model_f32, tokenizer, p, candidates).summed for p in prompts]
        )
    n = len(prompts)
    kv_s = statistics.median(times["kv_cache"]) / n
    top_s = statistics.median(times["top layers on the trunk"]) / n
    diff = (torch.from_numpy(on_trunk) - kv.float()).abs().max().item()
    print(
        f"{name}, LoRA on the top {top} layers; {n} prompts of {min(map(len, prompts))}-"
        f"{max(map(len, prompts))} tokens, C=30 candidates (8 shared + 4-10 own tokens); "
        f"{torch.get_num_threads()} threads, {cli.repeats} repeats"
    )
    print("| path | s per prompt | ratio to kv_cache |")
    print("|---|---|---|")
    print(f"| kv_cache (full depth) | {kv_s:.3f} | 1.0x |")
    print(f"| trunk build (once per test split and base) | {build / n:.3f} | {build / n / kv_s:.2f}x |")
    print(f"| top layers on the trunk (each evaluation) | {top_s:.3f} | {top_s / kv_s:.2f}x |")
    print(f"max abs score difference: {diff:.2e} (mean |score| {kv.float().abs().mean().item():.1f})")
    if reference is not None:  # in bfloat16 the two paths round differently: compare both to float32
        kv_off = (kv.float() - reference).abs().max().item()
        trunk_off = (torch.from_numpy(on_trunk) - reference).abs().max().item()
        print(f"max abs difference to the float32 scores: kv_cache {kv_off:.2e}, trunk {trunk_off:.2e}")
    print(f"speedup of each evaluation vs kv_cache: {kv_s / top_s:.1f}x")


def run_main(cli: argparse.Namespace) -> None:
    import tempfile

    import numpy as np

    from mint.commands.trained import load_trained, open_run
    from mint.data.task_data import spread_indices
    from mint.eval.ranking import label_candidates
    from mint.stages.evaluate import eval_job, label_scores, trunk_scorer
    from mint.stages.teacher import load_task

    run = open_run(cli.run)
    job = eval_job(run.cfg)
    if job.top_layers is None:
        raise SystemExit(f"--run {cli.run}: its student has no train_top_layers, so no trunk to rank on")
    model, processor = load_trained(run)
    task = load_task(run.cfg.task)
    split = task.splits["test"]
    samples = [split[i] for i in spread_indices(len(split), cli.prompts)]
    prompts = [run.kind.prompt(job.template, s) for s in samples]
    images = [s.image for s in samples]
    candidates = label_candidates(run.kind.tokenizer(processor), task.labels, job.answer)

    started = time.perf_counter()
    full = label_scores(run.kind, model, processor, prompts, samples, candidates)
    full_s = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as cache:
        started = time.perf_counter()
        scorer = trunk_scorer(
            run.kind, model, processor, prompts, images, candidates,
            top_layers=job.top_layers, cache_dir=Path(cache), base=job.base,
        )  # fmt: skip
        build_s = time.perf_counter() - started
        started = time.perf_counter()
        on_trunk = scorer(model)
        top_s = time.perf_counter() - started
    truths = np.array([s.label for s in samples])
    n = len(samples)
    print(
        f"{cli.run}: {run.cfg.student.name} ({run.cfg.student.dtype}), top {job.top_layers} layers; "
        f"{n} test samples of task={run.cfg.task.name}, "
        f"{len(candidates)} labels; {torch.get_num_threads()} threads"
    )
    print("| path | s | s per sample | ratio to kv_cache |")
    print("|---|---|---|---|")
    print(f"| kv_cache (full depth) | {full_s:.1f} | {full_s / n:.3f} | 1.0x |")
    print(
        f"| trunk build (once per split and base) | {build_s:.1f} | {build_s / n:.3f} | {build_s / full_s:.2f}x |"
    )
    print(f"| top layers on the trunk | {top_s:.1f} | {top_s / n:.3f} | {top_s / full_s:.2f}x |")
    print(
        f"max abs score difference {np.abs(on_trunk - full).max():.2e} (mean |score| {np.abs(full).mean():.1f}); "
        f"same first label {np.mean(on_trunk.argmax(1) == full.argmax(1)):.3f}; rank top-1 "
        f"{np.mean(full.argmax(1) == truths):.3f} (kv_cache) / {np.mean(on_trunk.argmax(1) == truths):.3f} (trunk)"
    )
    if run.spec.dtype != "float32":  # in bfloat16 the two paths round differently: compare both to float32
        import dataclasses

        model, processor = load_trained(run, dataclasses.replace(run.spec, dtype="float32"))
        reference = label_scores(run.kind, model, processor, prompts, samples, candidates)
        print(
            f"max abs difference to the float32 (kv_cache) scores: kv_cache {np.abs(full - reference).max():.2e}, "
            f"trunk {np.abs(on_trunk - reference).max():.2e}; same first label as float32: kv_cache "
            f"{np.mean(full.argmax(1) == reference.argmax(1)):.3f}, trunk {np.mean(on_trunk.argmax(1) == reference.argmax(1)):.3f}"
        )
    print(f"speedup of the ranking, trunk build included: {full_s / (build_s + top_s):.1f}x")


if __name__ == "__main__":
    main()
