"""Closed-set ranking of a student trained on its top N layers, on cached trunk states.

A student trained with `student.train_top_layers: N` has the base's weights below layer L-N, so
those layers compute the same states for the test prompts whatever was trained on top: every
method (and optim=none|rag, which train nothing) and every seed from the same base. Here they
run once per test split and base (the stage cache's `ranking_trunk`), and each evaluation runs
only the top N layers and the output layer, at the positions that predict a candidate's token.

A prompt and its C candidate answers are ONE packed row [context, candidate 1, ..., candidate C]:
the context is the prompt and the tokens every candidate starts with (scored once, counted for
all); candidate c is segment c, its position ids restart after the context, and the packed
attention rule of training (`mint.optim.forward._attend`: a token sees the context and its own
segment, causally) keeps the candidates apart. It is the [prompt, chosen, rejected] row with C
answers: each token runs once, as with `mint.eval.ranking.score_candidates`' shared KV cache.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mint.cache import cached
from mint.eval.ranking import shared_candidate_prefix
from mint.optim.forward import attention_mask_for
from mint.optim.trunk import Trunk, check_top_only, decoder_of, top_logits, top_start, write_trunk
from mint.pairs.packed import PAD, PROMPT

SHARED = -1  # `owners` of a context token every candidate starts with
# row_inputs(model, indices, length): more forward kwargs for rows `indices` of a batch padded to
# `length`: an image student's cross-attention inputs (mint.student.vision.image_row_inputs).
RowInputs = Callable[[torch.nn.Module, Sequence[int], int], dict[str, Any]]


@dataclass(frozen=True)
class CandidateRow:
    """One prompt and its candidates as a packed row, and what scores them: target i is the token
    `targets[i]`, predicted by the logits at row position `predictors[i]`, and part of candidate
    `owners[i]` (SHARED: of every candidate)."""

    input_ids: list[int]
    segment_ids: list[int]
    position_ids: list[int]
    predictors: list[int]
    targets: list[int]
    owners: list[int]
    candidates: int


def candidate_row(prompt_ids: Sequence[int], candidate_ids_list: Sequence[Sequence[int]]) -> CandidateRow:
    """The packed row of `prompt_ids` and its candidates (token ids, each non-empty)."""
    if not candidate_ids_list or any(len(c) == 0 for c in candidate_ids_list):
        raise ValueError("ranking needs at least one candidate and no empty candidate")
    shared = shared_candidate_prefix(candidate_ids_list)
    context = [*prompt_ids, *candidate_ids_list[0][:shared]]
    n = len(context)
    input_ids, segments, positions = list(context), [PROMPT] * n, list(range(n))
    # The shared tokens are predicted from the context itself; each candidate's first own token
    # from the context's last position, its others from the token before them in the row.
    predictors = [len(prompt_ids) - 1 + j for j in range(shared)]
    targets, owners = list(context[len(prompt_ids) :]), [SHARED] * shared
    for index, candidate in enumerate(candidate_ids_list):
        own = list(candidate[shared:])
        first = len(input_ids)
        predictors += [n - 1] + [first + j for j in range(len(own) - 1)]
        targets += own
        owners += [index] * len(own)
        input_ids += own
        segments += [index + 1] * len(own)
        positions += range(n, n + len(own))
    return CandidateRow(input_ids, segments, positions, predictors, targets, owners, len(candidate_ids_list))


def collate_rows(rows: Sequence[CandidateRow], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input, segment (PAD on padding) and position ids of `rows`."""
    length = max(len(row.input_ids) for row in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    segment_ids = torch.full((len(rows), length), PAD, dtype=torch.long)
    position_ids = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        input_ids[i, :n] = torch.tensor(row.input_ids)
        segment_ids[i, :n] = torch.tensor(row.segment_ids)
        position_ids[i, :n] = torch.tensor(row.position_ids)
    return {"input_ids": input_ids, "segment_ids": segment_ids, "position_ids": position_ids}


def predictor_mask(rows: Sequence[CandidateRow], length: int) -> torch.Tensor:
    """[rows, length] boolean: the positions whose logits some target needs."""
    keep = torch.zeros((len(rows), length), dtype=torch.bool)
    for i, row in enumerate(rows):
        keep[i, row.predictors] = True
    return keep


def row_scores(logits: torch.Tensor, keep: torch.Tensor, rows: Sequence[CandidateRow]) -> list[torch.Tensor]:
    """Each row's summed candidate log-probs ([C]) from the logits at the `keep` positions ([K, V],
    row-major, as `hidden[keep]` orders them)."""
    logps = F.log_softmax(logits.float(), dim=-1)
    kept_index = keep.flatten().long().cumsum(0).view(keep.shape) - 1  # position -> row of `logps`
    out = []
    for i, row in enumerate(rows):
        at = kept_index[i, row.predictors]
        token = logps[at, torch.tensor(row.targets, device=logps.device)]
        owners = torch.tensor(row.owners, device=logps.device)
        own = torch.zeros(row.candidates, dtype=token.dtype, device=token.device)
        own.index_add_(0, owners.clamp(min=0), torch.where(owners >= 0, token, 0.0))
        out.append(own + token[owners == SHARED].sum())
    return out


@torch.inference_mode()
def score_rows_full(
    model: torch.nn.Module, rows: Sequence[CandidateRow], pad_token_id: int
) -> list[torch.Tensor]:
    """The candidates' summed log-probs from the whole model on the packed rows (the reference the
    trunk path is checked against)."""
    batch = collate_rows(rows, pad_token_id)
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=attention_mask_for(model, batch["segment_ids"]),
        position_ids=batch["position_ids"],
    ).logits
    keep = predictor_mask(rows, batch["input_ids"].shape[1])
    return row_scores(logits[keep], keep, rows)


def candidates_digest(rows: Sequence[CandidateRow]) -> str:
    """sha256 of the packed candidate rows' token ids and positions (the ranking trunk's key)."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps([row.input_ids, row.segment_ids, row.position_ids]).encode())
    return digest.hexdigest()


def ranking_trunk(
    model: torch.nn.Module,
    rows: Sequence[CandidateRow],
    *,
    top_layers: int,
    pad_token_id: int,
    batch_size: int,
    cache_dir: Path,
    base: dict[str, Any],
) -> Trunk:
    """The states after layer L-N-1 of every row, built once per (rows, base, dtype, N) through the
    stage cache. `base`: what identifies the frozen base (`mint.stages.student.base_identity`)."""
    start = top_start(model, top_layers)
    # An adapter below the top layers would make the states stale. What is trainable does not
    # matter here: an untrained base (optim=none) may have every weight trainable.
    check_top_only(model, start, trainable=False)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].input_ids))

    def batches() -> Iterator[tuple[dict[str, torch.Tensor], list[int]]]:
        for first in range(0, len(rows), batch_size):
            indices = order[first : first + batch_size]
            batch = collate_rows([rows[i] for i in indices], pad_token_id)
            mask = attention_mask_for(model, batch["segment_ids"])
            yield (
                dict(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"]),
                indices,
            )

    key = {
        "rows": candidates_digest(rows),
        "base": base,
        "dtype": str(decoder_of(model).norm.weight.dtype),
        "top_layers": top_layers,
    }
    lengths = [len(row.input_ids) for row in rows]
    total = -(-len(rows) // batch_size)
    folder = cached(
        cache_dir,
        "ranking_trunk",
        key,
        lambda out: write_trunk(model, start, out, lengths, True, batches(), total),
    )
    return Trunk.load(folder)


@torch.inference_mode()
def trunk_label_scores(
    model: torch.nn.Module,
    trunk: Trunk,
    rows: Sequence[CandidateRow],
    batch_size: int,
    *,
    sequences: Sequence[int] | None = None,
    row_inputs: RowInputs | None = None,
) -> np.ndarray:
    """[rows, C]: every row's candidate scores from its trunk states, through the top layers only.

    `sequences[i]`: row i's sequence in the trunk (default: i; rows alike can share one).
    `row_inputs`: what else a batch of rows needs (an image student's image: it enters in the top
    layers, so the trunk below is the same for every image asked the same question)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores: list[torch.Tensor] = []
    for first in tqdm(range(0, len(rows), batch_size), desc="ranking labels (top layers)", unit="batch"):
        indices = range(first, min(first + batch_size, len(rows)))
        chunk = [rows[i] for i in indices]
        batch = collate_rows(chunk, pad_token_id=0)  # the ids are not read: the states replace them
        length = batch["input_ids"].shape[1]
        states = trunk.padded([sequences[i] for i in indices] if sequences else indices, length).to(device)
        inputs = {
            "attention_mask": attention_mask_for(model, batch["segment_ids"].to(device)),
            "position_ids": batch["position_ids"].to(device),
        }
        if row_inputs is not None:
            inputs |= row_inputs(model, indices, length)
        keep = predictor_mask(chunk, length).to(device)
        scores += row_scores(top_logits(model, (states, trunk.start), inputs, keep), keep, chunk)
    model.train(was_training)
    return torch.stack(scores).cpu().numpy()
