"""The output layer runs only where the loss needs it: the log-probs, losses and gradients equal
those of the full-logits forward (every position through the output layer)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from mint.optim.forward import (
    CHOSEN,
    PROMPT,
    REJECTED,
    KeptLogits,
    _predictor_index,
    answer_logps,
    attention_mask_for,
    nll_from,
    packed_logps,
    sft_labels,
    sides_logps,
    text_sides_logits,
)
from mint.optim.module import PreferenceModule
from mint.pairs.packed import PackedPreferenceCollator
from mint.pairs.text import PreferenceCollator
from tests.conftest import random_llama
from tests.test_packing import PAD, VOCAB, random_pairs


def lora_llama(seed: int):
    torch.manual_seed(seed)
    model = get_peft_model(
        random_llama(VOCAB, 128, seed=seed),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    )
    return model


def full_packed(model, batch, sft_on_prompt):
    """The packed log-probs from logits at every position (the forward before answer-only logits)."""
    segment_ids, prompt_lengths, targets = batch["segment_ids"], batch["prompt_lengths"], batch["input_ids"]
    logits = model(
        input_ids=targets,
        attention_mask=attention_mask_for(model, segment_ids),
        position_ids=batch["position_ids"],
        use_cache=False,
    ).logits.float()
    source = _predictor_index(segment_ids, prompt_lengths)
    rows = torch.arange(targets.shape[0])[:, None]
    logps = logits[rows, source, targets] - torch.logsumexp(logits, -1).gather(1, source)
    is_chosen, is_rejected = segment_ids == CHOSEN, segment_ids == REJECTED
    nll_target = is_chosen
    if sft_on_prompt:
        nll_target = nll_target | ((segment_ids == PROMPT) & (torch.arange(targets.shape[1]) > 0))
    chosen = torch.where(is_chosen, logps, 0.0).sum(-1)
    rejected = torch.where(is_rejected, logps, 0.0).sum(-1)
    nll = -torch.where(nll_target, logps, 0.0).sum() / nll_target.sum()
    return chosen, rejected, nll


def full_unpacked(model, batch, sft_on_prompt):
    n = batch["chosen_input_ids"].shape[0]
    logits = text_sides_logits(model, batch)  # no `keep`: every position
    assert logits.ndim == 3
    sums, _ = answer_logps(logits, torch.cat([batch["chosen_labels"], batch["rejected_labels"]]))
    nll = nll_from(logits[:n], sft_labels(batch, sft_on_prompt))
    return sums[:n], sums[n:], nll


def kept_packed(model, batch, sft_on_prompt):
    out = packed_logps(model, batch, sft_on_prompt=sft_on_prompt)
    return out.chosen_sum, out.rejected_sum, out.nll


def kept_unpacked(model, batch, sft_on_prompt):
    n = batch["chosen_input_ids"].shape[0]
    sums, _, nll = sides_logps(model, batch, text_sides_logits, ("chosen", "rejected"), sft_on_prompt)
    return sums[:n], sums[n:], nll


def grads_of(model, outputs):
    model.zero_grad()
    chosen, rejected, nll = outputs
    (chosen.sum() - 0.7 * rejected.sum() + 3 * nll).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("sft_on_prompt", [False, True])
@pytest.mark.parametrize(
    ("collator", "full", "kept"),
    [
        (PackedPreferenceCollator(PAD), full_packed, kept_packed),
        (PreferenceCollator(PAD), full_unpacked, kept_unpacked),
    ],
    ids=["packed", "unpacked"],
)
def test_answer_only_logits_equal_full_logits_with_gradients(collator, full, kept, sft_on_prompt):
    model = lora_llama(seed=5)
    batch = collator(random_pairs(6, seed=6))
    reference = full(model, batch, sft_on_prompt)
    ref_grads = grads_of(model, reference)
    out = kept(model, batch, sft_on_prompt)
    grads = grads_of(model, out)
    for got, want in zip(out, reference, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert ref_grads.keys() == grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_the_output_layer_sees_the_answer_positions_only():
    """packed, sft_on_prompt off: as many head rows as distinct predictors of answer tokens."""
    model = random_llama(VOCAB, 128)
    pairs = random_pairs(4, seed=7)
    rows = []
    model.lm_head.register_forward_hook(lambda module, args, out: rows.append(args[0].shape))
    with torch.no_grad():
        packed_logps(model, PackedPreferenceCollator(PAD)(pairs))
        # chosen: the last prompt position and every chosen position but the last; rejected: the
        # same last prompt position (shared), then every rejected position but the last
        assert rows == [(sum(len(p.chosen_ids) + len(p.rejected_ids) - 1 for p in pairs), 32)]
        rows.clear()
        module = PreferenceModule(model, method="orpo", packed=False)
        module.compute_loss(PreferenceCollator(PAD)(pairs))
        assert rows == [(sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs), 32)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logps_have_autograds_values_and_gradient_with_rows_used_twice(dtype):
    """KeptLogits.logps (its own backward) against logsumexp + indexing differentiated by autograd,
    with a row that predicts two tokens and two calls on one KeptLogits (the unpacked SFT term)."""
    torch.manual_seed(0)
    logits = (3 * torch.randn(5, 40)).to(dtype).requires_grad_()
    rows = torch.tensor([0, 1, 1, 2, 4, 4, 4])  # row 3 unused: its gradient is zero
    tokens = torch.tensor([3, 7, 9, 0, 39, 39, 1])
    weights = torch.randn(2, len(rows))

    kept = KeptLogits.of(logits, torch.ones(1, 5, dtype=torch.bool))
    got = [kept.logps(rows, tokens) for _ in range(2)]
    (sum((w * g).sum() for w, g in zip(weights, got, strict=True))).backward()
    got_grad, logits.grad = logits.grad, None

    log_norm = torch.logsumexp(logits.float(), -1)
    want = [logits[rows, tokens].float() - log_norm[rows] for _ in range(2)]
    (sum((w * g).sum() for w, g in zip(weights, want, strict=True))).backward()

    assert got[0].dtype == torch.float32
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=0)
    assert got_grad.dtype == dtype and bool(got_grad[3].eq(0).all())
    torch.testing.assert_close(got_grad, logits.grad, atol=1e-6 if dtype == torch.float32 else 1e-2, rtol=0)
