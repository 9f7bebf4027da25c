"""Time a packed preference step with the answer log-probs' own backward (`TokenLogps`) against the
same log-probs differentiated by autograd (logsumexp + indexing, the code before it).

A SmolLM2-shaped random Llama (vocabulary 49,152, width 576) with `--layers` layers stands for the
top layers a trunk-cached SmolLM2 student trains (`student.train_top_layers: 4`); LoRA on all its
linear layers; packed pairs of the rare-disease shape (prompt ~200 tokens, answers 110 each). Both
variants run in this process, alternating, and give the same gradients (checked here, and in
tests/test_answer_logits.py). Usage:
    PYTHONPATH=. python experiments/bench_token_logps.py [--layers 4] [--batch 8] [--repeats 4]
"""

from __future__ import annotations

import argparse
import time

import torch

from experiments.shapes import rare_disease_shaped_batches, smollm2_lora
from mint.optim.forward import KeptLogits, packed_logps
from mint.pairs.packed import PROMPT


def autograd_logps(self: KeptLogits, kept_rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The log-probs as before TokenLogps: autograd differentiates logsumexp and the indexing."""
    return self.logits[kept_rows, tokens].float() - torch.logsumexp(self.logits.float(), -1)[kept_rows]


def step(model, batch) -> tuple[float, list[torch.Tensor]]:
    """Seconds for one forward + backward of an ORPO-like loss, and the LoRA gradients."""
    start = time.perf_counter()
    out = packed_logps(model, batch, sft_on_prompt=False)
    (out.nll - (out.chosen_sum / out.chosen_count - out.rejected_sum / out.rejected_count).mean()).backward()
    seconds = time.perf_counter() - start
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    return seconds, grads


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = smollm2_lora(args.layers)
    model.train()
    (batch,) = rare_disease_shaped_batches(1, args.batch, model.config.vocab_size)
    own_logps = KeptLogits.logps
    times: dict[str, list[float]] = {"autograd": [], "TokenLogps": []}
    grads: dict[str, list[torch.Tensor]] = {}
    for repeat in range(args.repeats + 1):  # the first round is a warm-up
        for name, logps in (("autograd", autograd_logps), ("TokenLogps", own_logps)):
            KeptLogits.logps = logps
            seconds, grads[name] = step(model, batch)
            if repeat:
                times[name].append(seconds)
    KeptLogits.logps = own_logps
    worst = max(
        (a - b).abs().max().item() for a, b in zip(grads["autograd"], grads["TokenLogps"], strict=True)
    )
    answer_positions = int((batch["segment_ids"] > PROMPT).sum())
    print(
        f"{args.layers} layers, {args.batch} packed pairs, {answer_positions} answer tokens, "
        f"torch threads {torch.get_num_threads()}; largest LoRA gradient difference {worst:.1e}"
    )
    best = {name: min(values) for name, values in times.items()}
    for name, seconds in best.items():
        print(f"{name}: {seconds:.3f} s/step (best of {args.repeats})")
    print(f"speedup of TokenLogps over autograd: {best['autograd'] / best['TokenLogps']:.2f}x")


if __name__ == "__main__":
    main()
