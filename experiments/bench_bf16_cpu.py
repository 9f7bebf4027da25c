"""bf16-mixed against float32 on the CPU: the same LoRA training steps, timed and compared.

A SmolLM2-shaped random Llama (vocab 49,152, width 576; `--layers` layers, LoRA r=16 on all
linear layers), packed preference rows of about 420 tokens (the rare-disease pair shape), the
ORPO-style packed loss with logits at answer positions only. Both runs start from the same
weights and see the same batches; bf16-mixed is what Lightning's `precision=bf16-mixed` does on
the CPU: float32 weights and optimizer, the forward under `torch.autocast("cpu", bfloat16)`.
Prints seconds per step for each (median of the steps after a warm-up), their ratio, and the
largest per-step loss difference relative to the float32 loss. Usage:

    PYTHONPATH=. python experiments/bench_bf16_cpu.py [--layers 4] [--batch 8] [--steps 6]

The CPU's bf16 support decides the result: `lscpu | grep -o 'avx512_bf16\\|amx_bf16'`.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from experiments.shapes import rare_disease_shaped_batches, smollm2_lora, smollm2_shaped
from mint.optim.forward import packed_logps


def train(layers: int, data: list[dict], bf16: bool) -> tuple[list[float], list[float]]:
    """(losses, seconds) per step, from a fixed seed."""
    torch.manual_seed(0)
    model = smollm2_lora(layers)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses, seconds = [], []
    for batch in data:
        start = time.perf_counter()
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with autocast:
            out = packed_logps(model, batch)
            margin = (out.chosen_sum - out.rejected_sum).float()
            loss = out.nll.float() - torch.nn.functional.logsigmoid(margin / 100).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        seconds.append(time.perf_counter() - start)
        losses.append(loss.item())
    return losses, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6, help="timed steps (one more runs as warm-up)")
    args = parser.parse_args()
    data = rare_disease_shaped_batches(args.steps + 1, args.batch, smollm2_shaped(1).vocab_size)
    fp32_losses, fp32_s = train(args.layers, data, bf16=False)
    bf16_losses, bf16_s = train(args.layers, data, bf16=True)
    fp32, bf16 = statistics.median(fp32_s[1:]), statistics.median(bf16_s[1:])
    worst = max(abs(a - b) / abs(a) for a, b in zip(fp32_losses, bf16_losses, strict=True))
    print(
        f"layers {args.layers}, batch {args.batch}, {args.steps} timed steps, {torch.get_num_threads()} threads"
    )
    print(f"float32:    {fp32:.2f} s/step   losses {[round(x, 4) for x in fp32_losses]}")
    print(f"bf16-mixed: {bf16:.2f} s/step   losses {[round(x, 4) for x in bf16_losses]}")
    print(f"largest relative loss difference: {worst:.2e}")
    print(f"speedup bf16-mixed vs float32: {fp32 / bf16:.2f}")


if __name__ == "__main__":
    main()
