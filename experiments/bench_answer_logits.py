"""Time one training step (forward + backward) with logits at every position vs at answer positions only.

A SmolLM2-shaped random Llama (vocab 49,152, width 576; few layers, to keep it quick) with LoRA on all
linear layers, packed and unpacked batches of rows of about 420 tokens (prompt ~400, answers ~10).
Prints the seconds per step of each and their ratio. Usage:
    python experiments/bench_answer_logits.py [--layers 4] [--batch 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

from experiments.shapes import smollm2_shaped
from mint.optim.forward import (
    SIDES,
    answer_logps,
    attention_mask_for,
    nll_from,
    packed_logps,
    sides_logps,
    text_sides_logits,
)
from mint.pairs.packed import PackedPreferenceCollator
from mint.pairs.text import PreferenceCollator, TokenizedPair


def full_packed(model, batch):
    """Logits at every position of the packed rows (as before answer-only logits)."""
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=attention_mask_for(model, batch["segment_ids"]),
        position_ids=batch["position_ids"],
        use_cache=False,
    ).logits.float()
    return torch.logsumexp(logits, -1).sum()


def tail_packed(model, batch):
    """Logits from the shortest prompt's end on (the packed forward before answer-only logits)."""
    first = int(batch["prompt_lengths"].min()) - 1
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=attention_mask_for(model, batch["segment_ids"]),
        position_ids=batch["position_ids"],
        use_cache=False,
        logits_to_keep=batch["input_ids"].shape[1] - first,
    ).logits.float()
    return torch.logsumexp(logits, -1).sum()


def full_unpacked(model, batch):
    n = batch["chosen_input_ids"].shape[0]
    logits = text_sides_logits(model, batch)
    sums, _ = answer_logps(logits, torch.cat([batch["chosen_labels"], batch["rejected_labels"]]))
    return sums.sum() + nll_from(logits[:n], batch["chosen_labels"])


def kept_unpacked(model, batch):
    sums, _, nll = sides_logps(model, batch, text_sides_logits, SIDES, False)
    return sums.sum() + nll


def step_time(fn, model, batch, repeats):
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        start = time.perf_counter()
        loss = fn(model, batch)
        loss.backward()
        model.zero_grad()
        times.append(time.perf_counter() - start)
    return min(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = smollm2_shaped(args.layers)
    model = get_peft_model(
        LlamaForCausalLM(config).float(), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
    )
    model.train()
    rng = random.Random(0)

    def ids(n):
        return [rng.randrange(1, 49152) for _ in range(n)]

    pairs = [TokenizedPair(ids(rng.randint(390, 410)), ids(10), ids(10)) for _ in range(args.batch)]
    packed = PackedPreferenceCollator(0)(pairs)
    unpacked = PreferenceCollator(0)(pairs)
    cases = {
        "packed": (full_packed, lambda m, b: packed_logps(m, b).nll, packed),
        "unpacked": (full_unpacked, kept_unpacked, unpacked),
    }
    print(f"{args.layers} layers, batch {args.batch}, torch threads {torch.get_num_threads()}")
    t_tail = step_time(tail_packed, model, packed, args.repeats)
    for name, (full, kept, batch) in cases.items():
        t_full = step_time(full, model, batch, args.repeats)
        t_kept = step_time(kept, model, batch, args.repeats)
        if name == "packed":
            print(
                f"packed, from the shortest prompt's end (before): {t_tail:.3f} s/step, "
                f"ratio to answer positions {t_tail / t_kept:.2f}x"
            )
        print(
            f"{name}: all positions {t_full:.3f} s/step, answer positions {t_kept:.3f} s/step, "
            f"ratio {t_full / t_kept:.2f}x"
        )


if __name__ == "__main__":
    main()
