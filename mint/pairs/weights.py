"""Rank-discounted answer weights: the first items of a ranked answer count most in the loss.

A MINT answer is a header line and then one ranked item per line ("POTENTIAL_DISEASES:\\n1. 'A'\\n
2. 'B'..."). With a uniform token loss, a 10-name answer spends nine tenths of its loss on names
2-10, and the tiny rare-disease student learns the teacher's lists but not which name comes first
(experiments/probe_answer_targets.py: 0.23 top-1 from the lists, 0.57 from the true name alone).
`optim.answer_rank_decay: p` weighs every answer token k^-p, k the rank of the item its line holds
(the header line counts as item 1: it is what every answer starts with). p = 0 weighs every token 1,
today's losses exactly. The item of a token is the number of newlines before it in the answer, read
from the token ids themselves, so any tokenizer and chat template serves (the end-of-turn token
closes the last item and takes its weight).

The weights ride along with each pair (`chosen_weights`, `rejected_weights`: one per answer token)
and the collators turn them into tensors aligned with the labels (mint.pairs.text, .packed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mint.pairs.text import as_item

SIDES = ("chosen", "rejected")


def newline_counts(tokenizer: Any, ids: set[int]) -> dict[int, int]:
    """How many newlines each token's text holds. A newline is one byte that no multi-byte character
    contains, so decoding a token alone finds it (byte-level BPE, SentencePiece's <0x0A> alike)."""
    ordered = sorted(ids)
    texts = tokenizer.batch_decode([[i] for i in ordered], skip_special_tokens=False)
    return {i: text.count("\n") for i, text in zip(ordered, texts, strict=True)}


def item_ranks(ids: Sequence[int], newlines: dict[int, int]) -> list[int]:
    """The item rank of each answer token: newlines before it, the header line counting as item 1."""
    ranks, seen = [], 0
    for token in ids:
        ranks.append(max(seen, 1))
        seen += newlines[token]
    return ranks


def answer_weights(ids: Sequence[int], newlines: dict[int, int], decay: float) -> list[float]:
    """k^-decay for each answer token, k its item's rank."""
    return [float(k) ** -decay for k in item_ranks(ids, newlines)]


def with_answer_weights(pairs: Sequence[Any], tokenizer: Any, decay: float) -> list[dict]:
    """The pairs as dicts (their fields, see mint.pairs.text.as_item) plus `chosen_weights` and
    `rejected_weights`, the weight of each answer token. `decay` = 0 returns them unchanged."""
    if decay < 0:
        raise ValueError(f"optim.answer_rank_decay={decay}: expected a value >= 0 (0: every token weighs 1)")
    if decay == 0 or not pairs:
        return list(pairs)
    items = [as_item(pair) for pair in pairs]
    newlines = newline_counts(tokenizer, {t for item in items for side in SIDES for t in item[f"{side}_ids"]})
    return [
        {
            **item,
            **{f"{side}_weights": answer_weights(item[f"{side}_ids"], newlines, decay) for side in SIDES},
        }
        for item in items
    ]
