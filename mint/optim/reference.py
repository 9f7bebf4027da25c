"""DPO reference log-probs, computed once before training.

The reference is the student as training starts: the base with a fresh LoRA
adapter (whose update is zero, so it equals the base) or with the adapter it was
loaded from (e.g. an SFT adapter). One model stays in memory.

With a `PackedPreferenceCollator` the reference uses the packed forward (each prompt
encoded once); pairs go through in order of length so that batches carry little padding.
Vision pairs (`VisionPair`, collated by a `VisionPreferenceCollator`) use the unpacked
forward with the image encoded once per pair (mint.optim.module.sides_logits); collate
the returned dicts with `VisionPreferenceCollator`, which keeps the reference log-probs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from mint.data import PreferenceCollator, TokenizedPair
from mint.optim.module import answer_logps, sides_logits
from mint.optim.packing import PackedPreferenceCollator, packed_length, packed_logps
from mint.student.vision import VisionPair, VisionPreferenceCollator


def _as_fields(pair: TokenizedPair | VisionPair) -> dict:
    """The pair's fields as a dict; a VisionPair's pixel tensors are shared, not deep-copied."""
    if isinstance(pair, TokenizedPair):
        return dataclasses.asdict(pair)
    return {f.name: getattr(pair, f.name) for f in dataclasses.fields(pair)}


def _summed_logps(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], packed: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed chosen and rejected answer log-probs of one collated batch."""
    batch = {k: v.to(model.device) for k, v in batch.items()}
    if packed:
        out = packed_logps(model, batch)
        return out.chosen_sum, out.rejected_sum
    n = batch["chosen_input_ids"].shape[0]
    logits = sides_logits(model, batch)
    sums, _ = answer_logps(logits, torch.cat([batch["chosen_labels"], batch["rejected_labels"]]))
    return sums[:n], sums[n:]


@torch.inference_mode()
def attach_reference_logps(
    model: torch.nn.Module,
    pairs: Sequence[TokenizedPair | VisionPair],
    collator: PreferenceCollator | PackedPreferenceCollator | VisionPreferenceCollator,
    batch_size: int,
) -> list[dict]:
    """Returns the pairs, in their order, as dicts carrying `ref_chosen_logps` / `ref_rejected_logps` (summed)."""
    packed = isinstance(collator, PackedPreferenceCollator)
    vision = any(isinstance(p, VisionPair) for p in pairs)
    if vision and not isinstance(collator, VisionPreferenceCollator):
        raise ValueError(
            f"vision pairs need a VisionPreferenceCollator (unpacked; packed image inputs are not "
            f"supported), got {type(collator).__name__}"
        )
    was_training = model.training
    model.eval()  # no dropout in the reference
    # packed_length reads token lists only; a VisionPair's are the same three fields.
    order = sorted(range(len(pairs)), key=lambda i: packed_length(_as_fields(pairs[i])))
    out: list[dict | None] = [None] * len(pairs)
    for start in tqdm(range(0, len(pairs), batch_size), desc="reference log-probs", unit="batch"):
        indices = order[start : start + batch_size]
        chosen, rejected = _summed_logps(model, collator([pairs[i] for i in indices]), packed)
        for row, index in enumerate(indices):
            out[index] = {
                **_as_fields(pairs[index]),
                "ref_chosen_logps": chosen[row].item(),
                "ref_rejected_logps": rejected[row].item(),
            }
    model.train(was_training)
    return out
