"""Closed-set ranking: the log-likelihood of each of C candidate answers after one prompt.

`closed_set_metrics` turns a [prompts, labels] score matrix into `rank_top1` / `rank_topk`.

Scoring C candidates as C full sequences runs the (long) prompt C times. Here the prompt
goes through the model once; its key/value cache (transformers' `DynamicCache`) is then
shared by every batch of candidates, which only run their own few tokens. The cache's
tensors are expanded (views, no copy) to the batch size; each layer's `update` concatenates
the candidates' keys onto them, which leaves the prompt's tensors untouched for the next batch.
The tokens every candidate starts with (the answer's header and "1. '") go through the model
once too, with the prompt: a label candidate is then only its name's few tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from mint.metrics import bootstrap_ci, topk_hits
from mint.prefs.formats import AnswerFormat


class CandidateScores(NamedTuple):
    summed: torch.Tensor  # [C] summed log-prob of each candidate's tokens given the prompt
    mean: torch.Tensor  # [C] the same per token (comparable across candidate lengths)


def _pad_right(candidates: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(c) for c in candidates)
    ids = torch.full((len(candidates), length), pad_token_id, dtype=torch.long)
    real = torch.zeros((len(candidates), length), dtype=torch.bool)
    for row, candidate in enumerate(candidates):
        ids[row, : len(candidate)] = torch.tensor(list(candidate), dtype=torch.long)
        real[row, : len(candidate)] = True
    return ids, real


def expanded_cache(cache: DynamicCache, batch: int) -> DynamicCache:
    """A new cache whose layers view the prompt's keys/values `batch` times (no copy)."""
    layers = []
    for keys, values, sliding in cache:
        expanded = (keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1))
        layers.append(expanded if sliding is None else (*expanded, sliding))
    return DynamicCache(ddp_cache_data=layers)


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def shared_candidate_prefix(candidates: Sequence[Sequence[int]]) -> int:
    """How many leading tokens every candidate has in common, leaving each at least one of its own."""
    shortest = min(len(c) for c in candidates)
    length = 0
    while length < shortest - 1 and all(c[length] == candidates[0][length] for c in candidates):
        length += 1
    return length


# extra_inputs(rows, start, stop): more forward kwargs for `rows` copies of the context's token
# positions [start, stop) (an image student's cross-attention states and mask: the start=0 call
# carries the image, whose keys and values the later calls read from the cache).
ExtraInputs = Callable[[int, int, int], dict[str, Any]]


@torch.inference_mode()
def score_candidates(
    model: torch.nn.Module,
    tokenizer,
    prompt_ids: Sequence[int],
    candidate_ids_list: Sequence[Sequence[int]],
    *,
    batch_size: int = 32,
    extra_inputs: ExtraInputs | None = None,
) -> CandidateScores:
    """Log-prob of each candidate (token ids, non-empty) as the answer to `prompt_ids`.

    The prompt and the candidates' shared first tokens are encoded once. Candidates are
    right-padded: under the causal mask a real token never sees the padding after it, so no
    attention mask is needed.
    """
    if not candidate_ids_list or any(len(c) == 0 for c in candidate_ids_list):
        raise ValueError("score_candidates needs at least one candidate and no empty candidate")
    device = next(model.parameters()).device
    shared = shared_candidate_prefix(candidate_ids_list)
    head = list(candidate_ids_list[0][:shared])
    context = list(prompt_ids) + head
    extra = extra_inputs or (lambda rows, start, stop: {})
    # Logits at the last shared + 1 positions only: the one before candidate token j predicts it.
    out = model(
        input_ids=torch.tensor([context], dtype=torch.long, device=device),
        use_cache=True,
        logits_to_keep=shared + 1,
        **extra(1, 0, len(context)),
    )
    context_cache = out.cache
    logps = F.log_softmax(out.logits[0].float(), dim=-1)
    head_logp = logps[
        torch.arange(shared, device=device), torch.tensor(head, dtype=torch.long, device=device)
    ].sum()
    first_logps = logps[shared]

    summed, counts = [], []
    for start in range(0, len(candidate_ids_list), batch_size):
        chunk = [c[shared:] for c in candidate_ids_list[start : start + batch_size]]
        ids, real = _pad_right(chunk, _pad_id(tokenizer))
        ids, real = ids.to(device), real.to(device)
        logits = model(
            input_ids=ids,
            cache=expanded_cache(context_cache, len(chunk)),
            use_cache=True,
            **extra(len(chunk), len(context), len(context) + ids.shape[1]),
        ).logits
        # position j predicts token j + 1; the first token comes from the context's last position
        rest = F.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        rest = torch.where(real[:, 1:], rest, 0.0)
        summed.append(head_logp + first_logps[ids[:, 0]] + rest.sum(-1))
        counts.append(real.sum(-1) + shared)
    total, count = torch.cat(summed), torch.cat(counts)
    return CandidateScores(summed=total.cpu(), mean=(total / count).cpu())


@torch.inference_mode()
def score_candidates_full(
    model: torch.nn.Module,
    tokenizer,
    prompt_ids: Sequence[int],
    candidate_ids_list: Sequence[Sequence[int]],
    *,
    batch_size: int = 32,
) -> CandidateScores:
    """The same scores from C full sequences [prompt, candidate]: the reference `score_candidates`
    is checked against (and the baseline of experiments/bench_ranking.py)."""
    if not candidate_ids_list or any(len(c) == 0 for c in candidate_ids_list):
        raise ValueError("scoring needs at least one candidate and no empty candidate")
    device = next(model.parameters()).device
    prompt = list(prompt_ids)
    summed, counts = [], []
    for start in range(0, len(candidate_ids_list), batch_size):
        chunk = candidate_ids_list[start : start + batch_size]
        ids, real = _pad_right([prompt + list(c) for c in chunk], _pad_id(tokenizer))
        ids, real = ids.to(device), real.to(device)
        logits = model(input_ids=ids, attention_mask=real.long(), use_cache=False).logits
        token_logps = F.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        is_answer = real[:, 1:].clone()
        is_answer[:, : len(prompt) - 1] = False  # targets before the first answer token are the prompt's
        summed.append(torch.where(is_answer, token_logps, 0.0).sum(-1))
        counts.append(is_answer.sum(-1))
    total, count = torch.cat(summed), torch.cat(counts)
    return CandidateScores(summed=total.cpu(), mean=(total / count).cpu())


def label_candidates(tokenizer: Any, labels: Sequence[str], fmt: AnswerFormat) -> list[list[int]]:
    """One candidate per label: the answer naming it first (header + "1. 'Label'"), as token ids.

    Its summed log-prob is the probability of opening the list with that label. The closing
    quote ends the name, so a name that is the prefix of another ("X syndrome" / "X syndrome,
    X-linked") is not favoured.
    """
    return [
        tokenizer(f"{fmt.header}\n1. {fmt.quote}{label}{fmt.quote}", add_special_tokens=False)["input_ids"]
        for label in labels
    ]


def closed_set_metrics(
    scores: np.ndarray, truths: Sequence[int], k: int, *, n_boot: int, seed: int, prefix: str = "test"
) -> dict[str, float]:
    """`<prefix>/rank_top1`, `<prefix>/rank_topk` (with 95% bootstrap CIs) from scores [N, labels]."""
    targets = np.asarray(truths)
    metrics: dict[str, float] = {}
    for name, top in (("rank_top1", 1), ("rank_topk", k)):
        mean, low, high = bootstrap_ci(topk_hits(scores, targets, top), n_boot=n_boot, seed=seed)
        metrics |= {
            f"{prefix}/{name}": mean,
            f"{prefix}/{name}_ci_low": low,
            f"{prefix}/{name}_ci_high": high,
        }
    return metrics
