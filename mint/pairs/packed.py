"""The packed preference layout: each pair is ONE row [prompt, chosen, rejected].

TRL (and `mint.pairs.text.PreferenceCollator`) run every prompt twice, once before each
answer. MINT's prompts are long (clinical notes) and its answers short, so that doubles most
of the work. Here the rejected answer follows the chosen one in the same row; `segment_ids`
say which part each token belongs to and `position_ids` restart after the prompt for the
rejected tokens. The attention masks that make the row equal to two separate forwards, and
the forward itself, are in `mint.optim.forward`.

The length-grouped sampler puts rows of similar length in a batch, so little of it is padding.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from mint.pairs.text import TokenizedPair, as_item

# Segment ids of the packed layout.
PAD, PROMPT, CHOSEN, REJECTED = -1, 0, 1, 2


def packed_length(pair: TokenizedPair | dict) -> int:
    """Tokens of one packed row: prompt + chosen + rejected."""
    item = as_item(pair)
    return len(item["prompt_ids"]) + len(item["chosen_ids"]) + len(item["rejected_ids"])


class PackedPreferenceCollator:
    """Right-padded rows [prompt, chosen, rejected] with segment and position ids.

    The 4D mask is not built here: it is B·T² values, so the forward builds it on the
    model's device from `segment_ids` (or a BlockMask from the same ids). Pairs carrying
    answer-token weights (mint.pairs.weights) give `token_weights` [B, T] too (1 off the answers).
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, pairs: Sequence[TokenizedPair | dict]) -> dict[str, torch.Tensor]:
        items = [as_item(p) for p in pairs]
        if "pixel_values" in items[0]:
            raise ValueError(
                "image pairs need mint.pairs.vision.PackedVisionCollator (or VisionPreferenceCollator, "
                "unpacked): this collator carries no cross-attention inputs"
            )
        length = max(packed_length(it) for it in items)
        n = len(items)
        input_ids = torch.full((n, length), self.pad_token_id, dtype=torch.long)
        segment_ids = torch.full((n, length), PAD, dtype=torch.long)
        position_ids = torch.zeros((n, length), dtype=torch.long)
        for row, it in enumerate(items):
            prompt, chosen, rejected = it["prompt_ids"], it["chosen_ids"], it["rejected_ids"]
            p, c, r = len(prompt), len(chosen), len(rejected)
            input_ids[row, : p + c + r] = torch.tensor(prompt + chosen + rejected, dtype=torch.long)
            segment_ids[row, :p] = PROMPT
            segment_ids[row, p : p + c] = CHOSEN
            segment_ids[row, p + c : p + c + r] = REJECTED
            position_ids[row, : p + c] = torch.arange(p + c)
            position_ids[row, p + c : p + c + r] = torch.arange(p, p + r)  # as if right after the prompt
        batch = {
            "input_ids": input_ids,
            "segment_ids": segment_ids,
            "position_ids": position_ids,
            "prompt_lengths": torch.tensor([len(it["prompt_ids"]) for it in items], dtype=torch.long),
            "chosen_lengths": torch.tensor([len(it["chosen_ids"]) for it in items], dtype=torch.long),
            "rejected_lengths": torch.tensor([len(it["rejected_ids"]) for it in items], dtype=torch.long),
        }
        if "chosen_weights" in items[0]:  # rank-discounted answer tokens (mint.pairs.weights)
            weights = torch.ones((n, length), dtype=torch.float32)
            for row, it in enumerate(items):
                answers = it["chosen_weights"] + it["rejected_weights"]
                start = len(it["prompt_ids"])
                weights[row, start : start + len(answers)] = torch.tensor(answers)
            batch["token_weights"] = weights
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in items[0]:
                batch[key] = torch.tensor([float(it[key]) for it in items], dtype=torch.float32)
        return batch


# --------------------------------------------------------------------------- batching


class LengthGroupedSampler(Sampler[int]):
    """Seeded shuffle, then sorting by length inside mega-batches, so a batch holds similar lengths.

    Each epoch: shuffle all indices (seed + epoch), cut them into mega-batches of
    `batch_size * mega_batches` and sort each by length (longest first), cut those into batches,
    and shuffle the batch order so lengths do not cycle. Use with a DataLoader whose
    `batch_size` equals this one's. Stateful (`state_dict`/`load_state_dict`), so a
    `StatefulDataLoader` resumed mid-epoch sees the same batches.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, *, seed: int, mega_batches: int = 50):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.mega = batch_size * mega_batches
        self.epoch = 0
        self._start = 0  # where a resumed epoch continues
        self._yielded = 0

    def __len__(self) -> int:
        return len(self.lengths)

    def order(self, epoch: int) -> list[int]:
        rng = random.Random(self.seed + epoch)
        indices = list(range(len(self.lengths)))
        rng.shuffle(indices)
        batches: list[list[int]] = []
        for start in range(0, len(indices), self.mega):
            mega = sorted(indices[start : start + self.mega], key=lambda i: -self.lengths[i])
            batches.extend(mega[b : b + self.batch_size] for b in range(0, len(mega), self.batch_size))
        # Keep a short last batch last: a DataLoader batches consecutive indices.
        tail = [batches.pop()] if len(batches[-1]) < self.batch_size else []
        rng.shuffle(batches)
        return [i for batch in batches + tail for i in batch]

    def __iter__(self) -> Iterator[int]:
        order = self.order(self.epoch)
        for position in range(self._start, len(order)):
            self._yielded = position + 1
            yield order[position]
        self.epoch += 1
        self._start = self._yielded = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "yielded": self._yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = state["epoch"]
        self._start = self._yielded = state["yielded"]


def padding_waste(lengths: Sequence[int], batch_order: Sequence[int], batch_size: int) -> float:
    """Share of the padded token grid that is padding when batching `batch_order` consecutively."""
    padded = real = 0
    for start in range(0, len(batch_order), batch_size):
        batch = [lengths[i] for i in batch_order[start : start + batch_size]]
        padded += max(batch) * len(batch)
        real += sum(batch)
    return 1.0 - real / padded
