"""DPO's reference log-probs: computed once before training and kept in the stage cache.

The reference is the student as training starts: the base with a fresh LoRA adapter (whose
update is zero, so it equals the base) or with the adapter it was loaded from (e.g. the SFT
start). One model stays in memory. `reference_logps` owns both the computing and the caching
(as TRL's `_precompute_ref_logps` does): the entry is keyed by the tokenized pairs (an image
pair's pixels included) and whatever identifies the starting student, so a sweep over seeds or
betas on the same preference set computes them once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mint.cache import cached
from mint.optim.forward import SidesForward, summed_answer_logps, text_sides_logits
from mint.pairs.packed import PackedPreferenceCollator, packed_length
from mint.pairs.text import as_item

Collator = Callable[[Sequence[Any]], dict[str, torch.Tensor]]


def is_packed(collator: Collator) -> bool:
    """Does `collator` (or the one it wraps, e.g. mint.optim.trunk.TrunkCollator) pack its pairs?"""
    return isinstance(getattr(collator, "inner", collator), PackedPreferenceCollator)


def pairs_digest(pairs: Sequence[Any]) -> str:
    """sha256 of the token ids of every pair, and of its pixels when it carries an image."""
    digest = hashlib.sha256()
    for pair in map(as_item, pairs):
        digest.update(json.dumps([pair["prompt_ids"], pair["chosen_ids"], pair["rejected_ids"]]).encode())
        if "pixel_values" in pair:  # an image pair: the image is part of what is scored
            digest.update(pair["pixel_values"].float().numpy().tobytes())
    return digest.hexdigest()


@torch.inference_mode()
def attach_reference_logps(
    model: torch.nn.Module,
    pairs: Sequence[Any],
    collator: Collator,
    batch_size: int,
    forward: SidesForward = text_sides_logits,
) -> list[dict]:
    """The pairs, in their order, as dicts carrying `ref_chosen_logps` / `ref_rejected_logps` (summed).

    A `PackedPreferenceCollator` runs the packed forward (each prompt once); any other collator's
    batches run through `forward`. The collators pass the two keys on into their batches.
    """
    packed = is_packed(collator)
    was_training = model.training
    model.eval()  # no dropout in the reference
    # In order of length, so that batches carry little padding.
    order = sorted(range(len(pairs)), key=lambda i: packed_length(pairs[i]))
    out: list[dict | None] = [None] * len(pairs)
    for start in tqdm(range(0, len(pairs), batch_size), desc="reference log-probs", unit="batch"):
        indices = order[start : start + batch_size]
        batch = {k: v.to(model.device) for k, v in collator([pairs[i] for i in indices]).items()}
        chosen, rejected = summed_answer_logps(model, batch, packed, forward)
        for row, index in enumerate(indices):
            out[index] = {
                **as_item(pairs[index]),
                "ref_chosen_logps": chosen[row].item(),
                "ref_rejected_logps": rejected[row].item(),
            }
    model.train(was_training)
    return out


def reference_logps(
    model: torch.nn.Module,
    pairs: Sequence[Any],
    collator: Collator,
    *,
    batch_size: int,
    forward: SidesForward,
    cache_dir: Path,
    student: dict[str, Any],
) -> list[dict]:
    """`attach_reference_logps` through the stage cache. `student`: what identifies the starting
    student (its whole config: base, adapter, dtype, quantization)."""
    if not pairs:
        return []
    key = {
        "pairs": pairs_digest(pairs),
        "student": student,
        "packed": is_packed(collator),
    }
    # Weighted sums (mint.pairs.weights) are other numbers; keys without weights stay as they were.
    if "chosen_weights" in as_item(pairs[0]):
        weights = [[item["chosen_weights"], item["rejected_weights"]] for item in map(as_item, pairs)]
        key["answer_weights"] = hashlib.sha256(json.dumps(weights).encode()).hexdigest()

    def make(folder: Path) -> None:
        scored = attach_reference_logps(model, pairs, collator, batch_size, forward)
        np.save(
            folder / "ref_logps.npy",
            np.array([[d["ref_chosen_logps"], d["ref_rejected_logps"]] for d in scored]),
        )

    ref = np.load(cached(cache_dir, "reference", key, make) / "ref_logps.npy")
    return [
        {**as_item(pair), "ref_chosen_logps": float(c), "ref_rejected_logps": float(r)}
        for pair, (c, r) in zip(pairs, ref, strict=True)
    ]
