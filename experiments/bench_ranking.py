"""Closed-set ranking: prompt KV cache shared by all candidates vs separate full sequences.

C=19 candidates (PanNuke's tissue count) of 3-12 tokens after a 256-token prompt, a small random
Llama built from config (hidden 256, 4 layers, vocab 2048, float32, CPU). The methods alternate
within each repeat so that drifting load on a shared machine hits both alike; medians reported.

    .venv/bin/python experiments/bench_ranking.py [--repeats 7] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from mint.eval.ranking import score_candidates, score_candidates_full  # noqa: E402

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
    cli = parser.parse_args()
    torch.set_num_threads(cli.threads)

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


if __name__ == "__main__":
    main()
