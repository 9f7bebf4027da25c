"""Rank-discounted answer weights: the first names of a ranked answer count most in the loss.

A MINT answer is a header line and then one ranked name per line ("POTENTIAL_DISEASES:\n1. 'A'\n
2. 'B'..."). With a uniform token loss, a 10-name answer spends most of its loss on names 2-10, and
the tiny rare-disease student learns the teacher's lists but not which name comes first
(experiments/probe_answer_targets.py: 0.23 top-1 from the lists, 0.57 from the true name alone).
`optim.answer_rank_decay: p` weighs the tokens of the k-th name (on the line numbered k) k^-p. The
format keeps weight 1: the header, the numbers, the quotes, the newlines and the end of the answer
(weighing those down too left the student unsure where a list ends: 11% of its answers had 9 or 11
names). p = 0 weighs every token 1, today's losses exactly. A name is what lies between the first
and the last quote of its line (the answer format's quote, `'`); the lines and each token's span of
characters are read from the token ids themselves, so any tokenizer and chat template serves. A
token that overlaps a name takes the name's weight; an answer without numbered, quoted names keeps
weight 1 throughout.

The weights ride along with each pair (`chosen_weights`, `rejected_weights`: one per answer token)
and the collators turn them into tensors aligned with the labels (mint.pairs.text, .packed).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from mint.pairs.text import SIDES, as_item

_NUMBERED = re.compile(
    r"\s*(\d{1,3})\s*[.):-]"
)  # "3. 'Name'": the name of rank 3 (as mint.prefs.formats reads it)


def token_texts(tokenizer: Any, ids: set[int]) -> dict[int, str]:
    """Each token's text, decoded on its own. Newlines and quotes are one byte that no multi-byte
    character contains, so a token alone shows them (byte-level BPE, SentencePiece's <0x0A> alike)."""
    ordered = sorted(ids)
    texts = tokenizer.batch_decode([[i] for i in ordered], skip_special_tokens=False)
    return dict(zip(ordered, texts, strict=True))


def name_ranks(ids: Sequence[int], texts: dict[int, str], quote: str = "'") -> list[int]:
    """For each answer token, the rank k of the name it overlaps (on the line numbered k, between
    its first and last quote), or 0 when it overlaps none (the header, numbers, quotes, newlines,
    the end)."""
    text = "".join(texts[token] for token in ids)
    rank_at = [0] * len(text)  # the rank of the name each character belongs to
    line_start = 0
    for line in text.split("\n"):
        numbered = _NUMBERED.match(line)
        first, last = line.find(quote), line.rfind(quote)
        if numbered and last > first >= numbered.end():
            for char in range(line_start + first + 1, line_start + last):
                rank_at[char] = int(numbered.group(1))
        line_start += len(line) + 1
    ranks, start = [], 0
    for token in ids:
        end = start + len(texts[token])
        ranks.append(max(rank_at[start:end], default=0))
        start = end
    return ranks


def answer_weights(ids: Sequence[int], texts: dict[int, str], decay: float) -> list[float]:
    """k^-decay for each token of the k-th name, 1 for every other answer token."""
    return [float(k) ** -decay if k else 1.0 for k in name_ranks(ids, texts)]


def with_answer_weights(pairs: Sequence[Any], tokenizer: Any, decay: float) -> list[dict]:
    """The pairs as dicts (their fields, see mint.pairs.text.as_item) plus `chosen_weights` and
    `rejected_weights`, the weight of each answer token. `decay` = 0 returns them unchanged."""
    if decay < 0:
        raise ValueError(f"optim.answer_rank_decay={decay}: expected a value >= 0 (0: every token weighs 1)")
    if decay == 0 or not pairs:
        return list(pairs)
    items = [as_item(pair) for pair in pairs]
    texts = token_texts(tokenizer, {t for item in items for side in SIDES for t in item[f"{side}_ids"]})
    return [
        {
            **item,
            **{f"{side}_weights": answer_weights(item[f"{side}_ids"], texts, decay) for side in SIDES},
        }
        for item in items
    ]
