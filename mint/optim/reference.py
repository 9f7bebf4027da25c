"""DPO reference log-probs, computed once before training.

The reference is the student as training starts: the base with a fresh LoRA
adapter (whose update is zero, so it equals the base) or with the adapter it was
loaded from (e.g. an SFT adapter). One model stays in memory.

With a `PackedPreferenceCollator` the reference uses the packed forward (each prompt
encoded once); pairs go through in order of length so that batches carry little padding.
"""

from __future__ import annotations

import dataclasses

import torch
from tqdm.auto import tqdm

from mint.data import PreferenceCollator, TokenizedPair
from mint.optim.module import answer_logps
from mint.optim.packing import PackedPreferenceCollator, packed_length, packed_logps


def _summed_logps(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], packed: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed chosen and rejected answer log-probs of one collated batch."""
    batch = {k: v.to(model.device) for k, v in batch.items()}
    if packed:
        out = packed_logps(model, batch)
        return out.chosen_sum, out.rejected_sum
    n = batch["chosen_input_ids"].shape[0]
    logits = model(
        input_ids=torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]]),
        attention_mask=torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]]),
        use_cache=False,
    ).logits
    sums, _ = answer_logps(logits, torch.cat([batch["chosen_labels"], batch["rejected_labels"]]))
    return sums[:n], sums[n:]


@torch.inference_mode()
def attach_reference_logps(
    model: torch.nn.Module,
    pairs: list[TokenizedPair],
    collator: PreferenceCollator | PackedPreferenceCollator,
    batch_size: int,
) -> list[dict]:
    """Returns the pairs, in their order, as dicts carrying `ref_chosen_logps` / `ref_rejected_logps` (summed)."""
    packed = isinstance(collator, PackedPreferenceCollator)
    was_training = model.training
    model.eval()  # no dropout in the reference
    order = sorted(range(len(pairs)), key=lambda i: packed_length(pairs[i]))
    out: list[dict | None] = [None] * len(pairs)
    for start in tqdm(range(0, len(pairs), batch_size), desc="reference log-probs", unit="batch"):
        indices = order[start : start + batch_size]
        chosen, rejected = _summed_logps(model, collator([pairs[i] for i in indices]), packed)
        for row, index in enumerate(indices):
            out[index] = {
                **dataclasses.asdict(pairs[index]),
                "ref_chosen_logps": chosen[row].item(),
                "ref_rejected_logps": rejected[row].item(),
            }
    model.train(was_training)
    return out
