"""Prefix-shared preference forward: each pair is ONE row [prompt, chosen, rejected].

TRL (and `PreferenceCollator`) run every prompt twice, once before each answer. MINT's
prompts are long (clinical notes) and its answers short, so that doubles most of the work.
Here the rejected answer follows the chosen one in the same row, and two things make the
model see exactly what it would see in two separate forwards:
- an attention pattern in which the rejected tokens attend to the prompt and to themselves
  (causally) but never to the chosen tokens;
- position ids that restart after the prompt for the rejected tokens.
The first rejected token is predicted from the last *prompt* position, not from the token
just before it in the row; `PackedLogps` handles that with an explicit predictor index.

The pattern is one rule (`_attend`) used for every attention implementation: a dense
[B, 1, T, T] mask (boolean for "sdpa", additive float for "eager": transformers 5 passes a 4D
mask to the attention function unchanged, see `_preprocess_mask_arguments` in
transformers/masking_utils.py), or a FlexAttention `BlockMask` for "flex_attention" on GPUs,
where a dense mask would rule out the fused kernels.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Sampler

from mint.data import TokenizedPair

# Segment ids of the packed layout.
PAD, PROMPT, CHOSEN, REJECTED = -1, 0, 1, 2


# --------------------------------------------------------------------------- collating


def _as_dict(pair: TokenizedPair | dict) -> dict:
    return dataclasses.asdict(pair) if isinstance(pair, TokenizedPair) else pair


def packed_length(pair: TokenizedPair | dict) -> int:
    """Tokens of one packed row: prompt + chosen + rejected."""
    item = _as_dict(pair)
    return len(item["prompt_ids"]) + len(item["chosen_ids"]) + len(item["rejected_ids"])


class PackedPreferenceCollator:
    """Right-padded rows [prompt, chosen, rejected] with segment and position ids.

    The 4D mask is not built here: it is B·T² values, so the forward builds it on the
    model's device from `segment_ids` (or a BlockMask from the same ids).
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, pairs: Sequence[TokenizedPair | dict]) -> dict[str, torch.Tensor]:
        items = [_as_dict(p) for p in pairs]
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
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in items[0]:
                batch[key] = torch.tensor([float(it[key]) for it in items], dtype=torch.float32)
        return batch


# --------------------------------------------------------------------------- masks


def _attend(
    seg_q: torch.Tensor, seg_kv: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
) -> torch.Tensor:
    """May query q attend to key kv? Broadcasts, so it serves the dense mask and FlexAttention.

    Causal within the row; a key in the prompt or in the query's own segment only (so rejected
    never sees chosen). A padding query attends to itself alone: no softmax row is empty
    (an all-masked row is NaN in SDPA's math kernel), and padding never reaches a real token.
    """
    real = (seg_q != PAD) & (seg_kv != PAD)
    visible = (seg_kv == PROMPT) | (seg_kv == seg_q)
    pad_self = (seg_q == PAD) & (q_idx == kv_idx)
    return (real & visible & (kv_idx <= q_idx)) | pad_self


def packed_bool_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T] boolean, True where attention is allowed."""
    length = segment_ids.shape[1]
    idx = torch.arange(length, device=segment_ids.device)
    return _attend(segment_ids[:, None, :, None], segment_ids[:, None, None, :], idx[:, None], idx[None, :])


def packed_additive_mask(segment_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, T, T] float: 0 where allowed, the dtype's minimum elsewhere (added to the scores)."""
    allowed = packed_bool_mask(segment_ids)
    zero = torch.zeros((), dtype=dtype, device=segment_ids.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def packed_mask_mod(segment_ids: torch.Tensor):
    """FlexAttention mask_mod(b, h, q_idx, kv_idx) giving the same pattern as `packed_bool_mask`."""

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return _attend(segment_ids[b, q_idx], segment_ids[b, kv_idx], q_idx, kv_idx)

    return mask_mod


def packed_block_mask(segment_ids: torch.Tensor):
    """The packed layout as a FlexAttention BlockMask (for `attn_implementation="flex_attention"`).

    Blocks that lie wholly in the chosen/rejected cross region or above the diagonal are
    skipped by the fused kernel, so the GPU does no work for them.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    batch, length = segment_ids.shape
    # Rows padded up to the kernel's block size must stay in range for the mask_mod's lookups.
    block = 128
    padded = -(-length // block) * block
    ids = torch.nn.functional.pad(segment_ids, (0, padded - length), value=PAD)
    return create_block_mask(
        packed_mask_mod(ids), B=batch, H=None, Q_LEN=length, KV_LEN=length, device=segment_ids.device
    )


def attention_mask_for(model: torch.nn.Module, segment_ids: torch.Tensor) -> Any:
    """The 4D mask in the form the model's attention implementation takes, as transformers builds it.

    sdpa: boolean (True = attend; 1/4 of a float mask's memory, and no dtype to match under
    autocast); eager: additive in the activations' dtype (it adds the mask to the scores);
    flex_attention: a BlockMask. Kernels that take no 4D mask (flash_attention_2/3) cannot pack.
    """
    implementation = getattr(model.config, "_attn_implementation", None)
    if implementation == "flex_attention":
        return packed_block_mask(segment_ids)
    if implementation == "sdpa":
        return packed_bool_mask(segment_ids)
    if implementation == "eager":
        return packed_additive_mask(segment_ids, model.get_input_embeddings().weight.dtype)
    raise ValueError(
        f"packed preference batches need attn_implementation sdpa, eager or flex_attention, not "
        f"{implementation!r}; use the unpacked path (PreferenceModule(packed=False)) with it"
    )


# --------------------------------------------------------------------------- forward


@dataclass(frozen=True)
class PackedLogps:
    """Per-pair answer log-prob sums and token counts, plus the NLL pieces of the SFT term."""

    chosen_sum: torch.Tensor  # [B]
    rejected_sum: torch.Tensor  # [B]
    chosen_count: torch.Tensor  # [B]
    rejected_count: torch.Tensor  # [B]
    nll_sum: torch.Tensor  # scalar: -sum log-prob over the NLL targets of the whole batch
    nll_count: torch.Tensor  # scalar: number of NLL targets

    @property
    def nll(self) -> torch.Tensor:
        """Token-averaged NLL over the batch (as `nll_from` on the unpacked batch)."""
        return self.nll_sum / self.nll_count.clamp(min=1)


def _predictor_index(segment_ids: torch.Tensor, prompt_lengths: torch.Tensor) -> torch.Tensor:
    """For each position, the position whose logits predict its token.

    The previous position, except for the first rejected token: it follows the prompt,
    so the last prompt position predicts it. Position 0 predicts nothing (index 0, unused).
    """
    length = segment_ids.shape[1]
    source = torch.arange(length, device=segment_ids.device).expand_as(segment_ids) - 1
    first_rejected = (segment_ids == REJECTED) & (segment_ids.roll(1, dims=1) != REJECTED)
    source = torch.where(first_rejected, (prompt_lengths - 1)[:, None], source)
    return source.clamp(min=0)


def packed_logps(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], *, sft_on_prompt: bool = False
) -> PackedLogps:
    """One forward over a packed batch -> chosen/rejected answer log-probs and the NLL pieces.

    The NLL targets are the chosen tokens, and the prompt's tokens too with
    `sft_on_prompt=True` (TRL's ORPO convention). Without it no prompt position needs
    logits, so only the rows' tails go through the output layer (`logits_to_keep`): with a
    128k vocabulary that saves more memory than anything else here.
    """
    segment_ids = batch["segment_ids"]
    prompt_lengths = batch["prompt_lengths"]
    length = segment_ids.shape[1]
    # Positions before `first` are never predictors; the earliest one is the shortest prompt's end.
    first = 0 if sft_on_prompt else int(prompt_lengths.min()) - 1
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=attention_mask_for(model, segment_ids),
        position_ids=batch["position_ids"],
        use_cache=False,
        logits_to_keep=length - first,
    ).logits.float()  # [B, T - first, V]

    source = _predictor_index(segment_ids, prompt_lengths) - first
    targets = batch["input_ids"]
    # log p(token | predictor) = logit of the token - logsumexp at the predictor. Both are
    # gathered per position, so no [B, T, V] log-softmax is materialised.
    log_norm = torch.logsumexp(logits, dim=-1)  # [B, T - first]
    rows = torch.arange(targets.shape[0], device=targets.device)[:, None]
    valid_source = source.clamp(min=0)
    token_logps = logits[rows, valid_source, targets] - log_norm.gather(1, valid_source)  # [B, T]

    is_chosen = segment_ids == CHOSEN
    is_rejected = segment_ids == REJECTED
    nll_target = is_chosen
    if sft_on_prompt:
        not_first = torch.arange(length, device=targets.device)[None, :] > 0
        nll_target = nll_target | ((segment_ids == PROMPT) & not_first)
    zero = torch.zeros((), dtype=token_logps.dtype, device=token_logps.device)
    return PackedLogps(
        chosen_sum=torch.where(is_chosen, token_logps, zero).sum(-1),
        rejected_sum=torch.where(is_rejected, token_logps, zero).sum(-1),
        chosen_count=is_chosen.sum(-1),
        rejected_count=is_rejected.sum(-1),
        nll_sum=-torch.where(nll_target, token_logps, zero).sum(),
        nll_count=nll_target.sum(),
    )


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
