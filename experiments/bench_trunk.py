"""Time one training step of a top-N LoRA student run in full vs on cached trunk states.

A SmolLM2-shaped random Llama (vocab 49,152, width 576; `--layers` layers, LoRA on the top `--top`),
packed rows of about 420 tokens. Both run the output layer at answer positions only. Prints the
seconds per step of each and their ratio (building the trunk is a one-off, printed too). Usage:
    PYTHONPATH=. python experiments/bench_trunk.py [--layers 8] [--top 2] [--batch 4] [--repeats 2]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

from experiments.shapes import smollm2_shaped
from mint.optim.forward import packed_logps
from mint.optim.trunk import TrunkCollator, cached_trunk, top_lora, with_trunk_rows
from mint.pairs.packed import PackedPreferenceCollator
from mint.pairs.text import TokenizedPair


def step_time(model, batch, repeats):
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        start = time.perf_counter()
        out = packed_logps(model, batch)
        (out.nll - (out.chosen_sum - out.rejected_sum).mean()).backward()
        model.zero_grad()
        times.append(time.perf_counter() - start)
    return min(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--top", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = smollm2_shaped(args.layers)
    base = LlamaForCausalLM(config).float()
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)
    model = get_peft_model(base, top_lora(lora, base, args.top))
    model.train()
    rng = random.Random(0)

    def ids(n):
        return [rng.randrange(1, 49152) for _ in range(n)]

    pairs = [TokenizedPair(ids(rng.randint(390, 410)), ids(10), ids(10)) for _ in range(args.batch)]
    inner = PackedPreferenceCollator(0)
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        trunk = cached_trunk(
            model, pairs, inner, top_layers=args.top, batch_size=args.batch, cache_dir=Path(cache), base={}
        )
        built = time.perf_counter() - start
        cached_batch = TrunkCollator(inner, trunk)(with_trunk_rows(pairs))
        full = step_time(model, inner(pairs), args.repeats)
        top = step_time(model, cached_batch, args.repeats)
    print(
        f"{args.layers} layers, LoRA on the top {args.top}, batch {args.batch}, threads {torch.get_num_threads()}"
    )
    print(
        f"trunk build (once) {built:.3f} s; full forward {full:.3f} s/step, on the trunk {top:.3f} s/step, "
        f"ratio {full / top:.2f}x"
    )


if __name__ == "__main__":
    main()
