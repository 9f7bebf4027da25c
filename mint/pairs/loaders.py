"""DataLoaders over encoded pairs: a resumable shuffled (or length-grouped) train loader, a plain val loader."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from mint.pairs.packed import LengthGroupedSampler, packed_length


def make_loaders(
    train: Sequence[Any],
    val: Sequence[Any],
    collator: Callable[[Sequence[Any]], dict[str, torch.Tensor]],
    *,
    batch_size: int,
    eval_batch_size: int,
    seed: int,
    length_grouped: bool = False,
) -> tuple[StatefulDataLoader, DataLoader | None]:
    # StatefulDataLoader saves its position and shuffling state in Lightning's
    # checkpoints, so a run resumed mid-epoch sees exactly the batches it would have.
    if length_grouped:  # similar lengths in a batch: less padding (the sampler is stateful too)
        sampler = LengthGroupedSampler([packed_length(p) for p in train], batch_size, seed=seed)
        train_loader = StatefulDataLoader(train, batch_size=batch_size, sampler=sampler, collate_fn=collator)
    else:
        generator = torch.Generator().manual_seed(seed)
        train_loader = StatefulDataLoader(
            train, batch_size=batch_size, shuffle=True, collate_fn=collator, generator=generator
        )
    val_loader = (
        DataLoader(val, batch_size=eval_batch_size, shuffle=False, collate_fn=collator) if val else None
    )
    return train_loader, val_loader
