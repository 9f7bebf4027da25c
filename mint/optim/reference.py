"""DPO reference log-probs, computed once before training.

The reference is the student as training starts: the base with a fresh LoRA
adapter (whose update is zero, so it equals the base) or with the adapter it was
loaded from (e.g. an SFT adapter). One model stays in memory.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from mint.data import PreferenceCollator, TokenizedPair
from mint.optim.module import answer_logps


@torch.inference_mode()
def attach_reference_logps(
    model: torch.nn.Module, pairs: list[TokenizedPair], collator: PreferenceCollator, batch_size: int
) -> list[dict]:
    """Returns the pairs as dicts carrying `ref_chosen_logps` / `ref_rejected_logps` (summed)."""
    was_training = model.training
    model.eval()  # no dropout in the reference
    out: list[dict] = []
    for start in tqdm(range(0, len(pairs), batch_size), desc="reference log-probs", unit="batch"):
        chunk = pairs[start : start + batch_size]
        batch = collator(chunk)
        n = len(chunk)
        logits = model(
            input_ids=torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]]).to(model.device),
            attention_mask=torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]]).to(
                model.device
            ),
            use_cache=False,
        ).logits
        labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]]).to(model.device)
        sums, _ = answer_logps(logits, labels)
        for i, pair in enumerate(chunk):
            out.append(
                {
                    "prompt_ids": pair.prompt_ids,
                    "chosen_ids": pair.chosen_ids,
                    "rejected_ids": pair.rejected_ids,
                    "ref_chosen_logps": sums[i].item(),
                    "ref_rejected_logps": sums[n + i].item(),
                }
            )
    model.train(was_training)
    return out
