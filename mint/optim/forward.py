"""The preference forward: answer log-probs of a collated batch, packed or unpacked.

Packed (`mint.pairs.packed`): each pair is ONE row [prompt, chosen, rejected], and two things
make the model see exactly what it would see in two separate forwards:
- an attention pattern in which the rejected tokens attend to the prompt and to themselves
  (causally) but never to the chosen tokens;
- position ids that restart after the prompt for the rejected tokens (set by the collator).
The first rejected token is predicted from the last *prompt* position, not from the token
just before it in the row; `PackedLogps` handles that with an explicit predictor index.

The pattern is one rule (`_attend`) used for every attention implementation: a dense
[B, 1, T, T] mask (boolean for "sdpa", additive float for "eager": transformers 5 passes a 4D
mask to the attention function unchanged, see `_preprocess_mask_arguments` in
transformers/masking_utils.py), or a FlexAttention `BlockMask` for "flex_attention" on GPUs,
where a dense mask would rule out the fused kernels.

Unpacked (`mint.pairs.text.PreferenceCollator`, or the image collator): chosen and rejected
sequences padded to one length; a `SidesForward` runs the sides it is asked for as one batch.
`text_sides_logits` is the text one; an image student supplies its own (mint.student.kinds).
Both layouts give the same log-probs (tests/test_packing.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from mint.pairs.packed import CHOSEN, PAD, PROMPT, REJECTED
from mint.pairs.text import SIDES

# forward(model, batch, sides, keep) -> logits of the given sides of an unpacked batch, concatenated
# along the batch dim in that order: with `keep` ([N, T] boolean) a `KeptLogits` holding the kept
# positions only (it may also return all logits, [N, T, V]; the log-probs are the same).
SidesForward = Callable[..., Any]


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


# --------------------------------------------------------------------------- packed forward


@dataclass(frozen=True)
class PackedLogps:
    """Per-pair answer log-prob sums and token counts, plus the NLL pieces of the SFT term.

    With answer-token weights (the batch's `token_weights`, mint.pairs.weights) the sums are
    weighted and the counts are the sums of the weights: the means become weighted means.
    """

    chosen_sum: torch.Tensor  # [B]
    rejected_sum: torch.Tensor  # [B]
    chosen_count: torch.Tensor  # [B]
    rejected_count: torch.Tensor  # [B]
    nll_sum: torch.Tensor  # scalar: -sum log-prob over the NLL targets of the whole batch
    nll_count: torch.Tensor  # scalar: number of NLL targets

    @property
    def nll(self) -> torch.Tensor:
        """Token-averaged NLL over the batch (as `nll_from` on the unpacked batch)."""
        return self.nll_sum / _at_least_one(self.nll_count)


def _at_least_one(count: torch.Tensor) -> torch.Tensor:
    """A divisor: the count, or 1 where it is 0 (no tokens: the sum is 0 too). Not a clamp: a
    weighted count may be a positive number below 1."""
    return torch.where(count > 0, count, torch.ones_like(count))


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
    `sft_on_prompt=True` (TRL's ORPO convention). The output layer runs only at the positions
    that predict a target (answer tokens, and prompt tokens with `sft_on_prompt`): with a large
    vocabulary it would otherwise cost more than the rest of the model (`logits_at`).
    """
    if "segment_ids" not in batch:
        raise ValueError(
            "optim.packed=true needs packed batches (mint.pairs.packed.PackedPreferenceCollator); "
            "this batch is unpacked: set optim.packed=false for this student"
        )
    segment_ids = batch["segment_ids"]
    prompt_lengths = batch["prompt_lengths"]
    length = segment_ids.shape[1]
    targets = batch["input_ids"]

    is_chosen = segment_ids == CHOSEN
    is_rejected = segment_ids == REJECTED
    nll_target = is_chosen
    if sft_on_prompt:
        not_first = torch.arange(length, device=targets.device)[None, :] > 0
        # An id past the output vocabulary (Mllama's <|image|>) has no logit: no target (as `sft_labels`).
        predictable = targets < output_vocab_size(model)
        nll_target = nll_target | ((segment_ids == PROMPT) & not_first & predictable)
    needed = is_chosen | is_rejected | nll_target  # positions whose token's log-prob is used

    source = _predictor_index(segment_ids, prompt_lengths)
    rows = torch.arange(targets.shape[0], device=targets.device)[:, None].expand_as(targets)
    keep = torch.zeros_like(needed)
    keep[rows[needed], source[needed]] = True  # the predictors: the only positions given logits
    inputs = dict(
        input_ids=batch["input_ids"],
        attention_mask=attention_mask_for(model, segment_ids),
        position_ids=batch["position_ids"],
    )
    if "pixel_values" in batch:  # an image student's batch (mint.pairs.vision.PackedVisionCollator)
        from mint.student.vision import image_batch_inputs  # that module builds on this one

        inputs |= image_batch_inputs(model, batch)
    kept = logits_at(model, inputs, keep, trunk=packed_trunk(batch))
    # log p(token | predictor) = logit of the token - logsumexp at the predictor, per needed position.
    kept_row = kept.index[rows[needed], source[needed]]
    logps = kept.logps(kept_row, targets[needed])
    token_logps = torch.zeros(needed.shape, dtype=logps.dtype, device=logps.device).masked_scatter(
        needed, logps
    )  # [B, T], 0 where not needed

    weights = batch.get("token_weights")  # rank-discounted answer tokens, 1 elsewhere (or none)
    if weights is not None:
        token_logps = token_logps * weights

    def count(where: torch.Tensor) -> torch.Tensor:
        return where.sum(-1) if weights is None else torch.where(where, weights, 0.0).sum(-1)

    zero = torch.zeros((), dtype=token_logps.dtype, device=token_logps.device)
    return PackedLogps(
        chosen_sum=torch.where(is_chosen, token_logps, zero).sum(-1),
        rejected_sum=torch.where(is_rejected, token_logps, zero).sum(-1),
        chosen_count=count(is_chosen),
        rejected_count=count(is_rejected),
        nll_sum=-torch.where(nll_target, token_logps, zero).sum(),
        nll_count=count(nll_target).sum(),
    )


# The per-position tensors [B, T, ...] a packed batch may carry: PackedPreferenceCollator's, an image
# collator's cross-attention mask, TrunkCollator's states.
POSITION_KEYS = (
    "input_ids",
    "segment_ids",
    "position_ids",
    "cross_attention_mask",
    "trunk_states",
    "token_weights",
)


def without_rejected(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A packed batch cut to [prompt, chosen]: all that SFT trains on (unpacked, it runs the chosen
    rows only). The rejected tokens end each row, so the rows are cut after the longest prompt +
    chosen and the rejected tokens before that become padding."""
    segment_ids = batch["segment_ids"]
    length = int(((segment_ids == PROMPT) | (segment_ids == CHOSEN)).sum(-1).max())
    cut = {key: value[:, :length] if key in POSITION_KEYS else value for key, value in batch.items()}
    cut["segment_ids"] = cut["segment_ids"].masked_fill(cut["segment_ids"] == REJECTED, PAD)
    return cut


# --------------------------------------------------------------------------- logits where needed


@dataclass(frozen=True)
class KeptLogits:
    """Logits at some positions of a batch only: those that predict a token the loss uses.

    `logits[k]` are the logits of the k-th kept position in row-major order; `index[n, t]` is k for
    a kept position (n, t) and -1 elsewhere. `log_norm` is their logsumexp (float32).
    """

    logits: torch.Tensor  # [K, V]
    index: torch.Tensor  # [N, T]
    log_norm: torch.Tensor  # [K]

    @classmethod
    def of(cls, logits: torch.Tensor, keep: torch.Tensor) -> KeptLogits:
        index = torch.where(keep, keep.flatten().long().cumsum(0).view(keep.shape) - 1, -1)
        # A constant to autograd: TokenLogps's backward differentiates through it itself.
        log_norm = torch.logsumexp(logits.detach().float(), dim=-1)
        return cls(logits=logits, index=index, log_norm=log_norm)

    @property
    def vocab_size(self) -> int:
        return self.logits.shape[-1]

    def logps(self, kept_rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """log p(tokens[i] | the kept position kept_rows[i]), float32."""
        return TokenLogps.apply(self.logits, self.log_norm, kept_rows, tokens)


class TokenLogps(torch.autograd.Function):
    """logits[rows, tokens] - log_norm[rows], where log_norm is the logsumexp of each logits row.

    The same values and gradient as autograd's logsumexp + indexing, with a leaner backward: the
    gradient, one-hot at the tokens minus the softmax times each row's summed incoming gradient, is
    built in one [K, V] tensor. Autograd's backward allocates and sweeps four of them (logsumexp's
    subtract, exp and multiply, the indexing's scatter), which over a 49k vocabulary costs about a
    fifth of the output layer's forward + backward on the CPU (experiments/bench_token_logps.py).
    A row may be indexed more than once: the last prompt position predicts both answers' first token.
    """

    @staticmethod
    def forward(ctx, logits, log_norm, rows, tokens):  # type: ignore[override]
        ctx.save_for_backward(logits, log_norm, rows, tokens)
        return logits[rows, tokens].float() - log_norm[rows]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        logits, log_norm, rows, tokens = ctx.saved_tensors
        row_grad = torch.zeros_like(log_norm).index_add_(0, rows, grad)
        grad_logits = (logits.float() - log_norm[:, None]).exp_().mul_(-row_grad[:, None])
        grad_logits.index_put_((rows, tokens), grad, accumulate=True)
        return grad_logits.to(logits.dtype), None, None, None


def logits_at(
    model: torch.nn.Module,
    inputs: dict[str, Any],
    keep: torch.Tensor,
    trunk: Any = None,
) -> KeptLogits:
    """The model's logits at the `keep` positions ([N, T] boolean) only.

    The output layer runs on the kept hidden states alone (transformers' boolean `logits_to_keep`,
    which the model's own forward applies before its head), so [N, T, V] logits never exist.
    `trunk`: cached hidden states below the trained layers (mint.optim.trunk), run from there on.
    """
    if trunk is not None:
        from mint.optim.trunk import top_logits

        return KeptLogits.of(top_logits(model, trunk, inputs, keep), keep)
    logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits
    if logits.ndim != 2:
        raise RuntimeError(
            "the model's forward ignored a boolean logits_to_keep (transformers >= 5 slices it per row "
            "in `slice_logits_to_keep`); upgrade transformers"
        )
    return KeptLogits.of(logits, keep)


def predictor_mask(labels: torch.Tensor) -> torch.Tensor:
    """[N, T] boolean: the positions whose logits predict a label (-100: no label) at the next one."""
    keep = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    keep[:, :-1] = labels[:, 1:] != -100
    return keep


def packed_trunk(batch: dict[str, torch.Tensor]) -> Any:
    """The cached trunk states of a packed batch, if it carries them (mint.optim.trunk)."""
    if "trunk_states" not in batch:
        return None
    return (batch["trunk_states"], int(batch["trunk_start"]))


# --------------------------------------------------------------------------- unpacked forward


def text_sides_logits(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    sides: tuple[str, ...] = SIDES,
    keep: torch.Tensor | None = None,
) -> torch.Tensor | KeptLogits:
    """Logits of the given sides of an unpacked text batch, concatenated along the batch dim:
    all of them ([N, T, V]), or with `keep` ([N, T] boolean) those at the kept positions only."""
    input_ids = torch.cat([batch[f"{side}_input_ids"] for side in sides])
    attention_mask = torch.cat([batch[f"{side}_attention_mask"] for side in sides])
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask)
    trunk = None
    if f"{sides[0]}_trunk" in batch:  # cached trunk states (mint.optim.trunk)
        trunk = (torch.cat([batch[f"{side}_trunk"] for side in sides]), int(batch["trunk_start"]))
    if keep is None:
        if trunk is not None:
            keep = torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device)
            return logits_at(model, inputs, keep, trunk).logits.view(*keep.shape, -1)
        return model(**inputs, use_cache=False).logits
    return logits_at(model, inputs, keep, trunk)


Logits = torch.Tensor | KeptLogits  # full [N, T, V] logits, or those at the kept positions


def token_logps(logits: Logits, labels: torch.Tensor) -> torch.Tensor:
    """Log-prob of each label token given its prefix, 0 where the label is -100.

    logits [N, T, V] predict the token at t+1 from position t; labels [N', T] (N' <= N: the first
    rows). `KeptLogits` must hold every position that predicts a label.
    """
    if isinstance(logits, KeptLogits):
        labelled = labels[:, 1:] != -100
        kept_rows = logits.index[: labels.shape[0], :-1][labelled]
        if bool((kept_rows < 0).any()):
            raise ValueError("a labelled position has no logits: keep its predictor (predictor_mask)")
        logps = logits.logps(kept_rows, labels[:, 1:][labelled])
        return torch.zeros(labelled.shape, dtype=logps.dtype, device=logps.device).masked_scatter(
            labelled, logps
        )
    shifted_logits = logits[: labels.shape[0], :-1].float()
    shifted_labels = labels[:, 1:]
    logps = -F.cross_entropy(
        shifted_logits.transpose(1, 2), shifted_labels, ignore_index=-100, reduction="none"
    )
    return logps  # [N, T-1], zeros at ignored positions


def vocab_size(logits: Logits) -> int:
    return logits.vocab_size if isinstance(logits, KeptLogits) else logits.shape[-1]


def answer_logps(
    logits: Logits, labels: torch.Tensor, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed answer log-prob per row and the number of answer tokens per row; with `weights` ([N, T],
    aligned with `labels`: mint.pairs.weights) the weighted sum and the sum of the weights."""
    logps = token_logps(logits, labels)
    labelled = labels[:, 1:] != -100
    if weights is None:
        return logps.sum(-1), labelled.sum(-1)
    return (logps * weights[:, 1:]).sum(-1), torch.where(labelled, weights[:, 1:], 0.0).sum(-1)


def nll_from(logits: Logits, labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Token-averaged negative log-likelihood over the positions that carry a label (with `weights`,
    the weighted average)."""
    logps = token_logps(logits, labels)
    labelled = labels[:, 1:] != -100
    if weights is None:
        return -logps.sum() / labelled.sum().clamp(min=1)
    return -(logps * weights[:, 1:]).sum() / _at_least_one(torch.where(labelled, weights[:, 1:], 0.0).sum())


def output_vocab_size(model: torch.nn.Module) -> int:
    """The number of logits per position (an image model's text vocabulary)."""
    return model.config.get_text_config().vocab_size


def sides_logps(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    forward: SidesForward,
    sides: tuple[str, ...],
    sft_on_prompt: bool | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Summed answer log-probs and answer token counts of the `sides` (concatenated), and the NLL of
    the SFT term on the chosen rows (None when `sft_on_prompt` is None: no NLL wanted). A batch with
    answer-token weights (`chosen_weights`, ...: mint.pairs.weights) gives weighted sums and counts.

    The forward is asked for the logits at the labelled positions only.
    """
    labels = torch.cat([batch[f"{side}_labels"] for side in sides])
    weights = None
    if f"{sides[0]}_weights" in batch:
        weights = torch.cat([batch[f"{side}_weights"] for side in sides])
    keep = predictor_mask(labels)
    nll_labels = None
    if sft_on_prompt is not None:
        nll_labels = sft_labels(batch, sft_on_prompt, output_vocab_size(model))
        keep[: nll_labels.shape[0]] |= predictor_mask(nll_labels)
    logits = forward(model, batch, sides, keep)
    sums, counts = answer_logps(logits, labels, weights)
    nll = None
    if nll_labels is not None:  # the chosen rows come first; weights are 1 on their prompts
        nll = nll_from(logits, nll_labels, None if weights is None else weights[: nll_labels.shape[0]])
    return sums, counts, nll


def sft_labels(
    batch: dict[str, torch.Tensor], on_prompt: bool, vocab_size: int | None = None
) -> torch.Tensor:
    """Targets of the NLL term: the chosen answer, or prompt + chosen (TRL's ORPO).

    With `on_prompt`, ids at or past `vocab_size` (the logits' last dim) are no targets: Mllama's
    `<|image|>` token has an input embedding but no output logit, so it cannot be predicted.
    """
    if not on_prompt:
        return batch["chosen_labels"]
    ids = batch["chosen_input_ids"]
    keep = batch["chosen_attention_mask"].bool()
    if vocab_size is not None:
        keep &= ids < vocab_size
    return torch.where(keep, ids, torch.full_like(ids, -100))


def summed_answer_logps(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], packed: bool, forward: SidesForward
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed chosen and rejected answer log-probs of one collated batch (DPO's reference)."""
    if packed:
        out = packed_logps(model, batch)
        return out.chosen_sum, out.rejected_sum
    n = batch["chosen_input_ids"].shape[0]
    sums, _, _ = sides_logps(model, batch, forward, SIDES, sft_on_prompt=None)
    return sums[:n], sums[n:]
