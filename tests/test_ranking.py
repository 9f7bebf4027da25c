"""Closed-set ranking with a shared prompt KV cache gives the full-sequence scores."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

from mint.eval.ranking import score_candidates, score_candidates_full
from tests.conftest import random_llama

VOCAB = 101
TOKENIZER = SimpleNamespace(pad_token_id=0, eos_token_id=1)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    return random_llama(VOCAB, 256, seed=seed)


def candidates(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, VOCAB) for _ in range(rng.randint(1, 9))] for _ in range(n)]


@pytest.mark.parametrize("batch_size", [1, 4, 32])
def test_cached_scores_equal_full_sequences(batch_size):
    model = tiny_llama()
    prompt = [rng_id for rng_id in range(2, 50)]
    cands = candidates(11, seed=batch_size)
    cached = score_candidates(model, TOKENIZER, prompt, cands, batch_size=batch_size)
    full = score_candidates_full(model, TOKENIZER, prompt, cands, batch_size=5)
    assert cached.summed.shape == (11,)
    torch.testing.assert_close(cached.summed, full.summed, atol=1e-4, rtol=0)
    torch.testing.assert_close(cached.mean, full.mean, atol=1e-4, rtol=0)
    lengths = torch.tensor([len(c) for c in cands], dtype=torch.float32)
    torch.testing.assert_close(cached.mean * lengths, cached.summed, atol=1e-5, rtol=0)


def test_cached_scores_equal_single_unbatched_forward_under_lora():
    """Each candidate alone, no padding anywhere: the plainest possible reference."""
    model = get_peft_model(
        tiny_llama(1), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    )
    model.eval()
    prompt = [3, 9, 27, 81, 5, 15, 45]
    cands = candidates(6, seed=7)
    cached = score_candidates(model, TOKENIZER, prompt, cands, batch_size=4)
    for i, cand in enumerate(cands):
        ids = torch.tensor([prompt + cand])
        with torch.no_grad():
            logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
        expected = sum(logps[len(prompt) - 1 + j, tok].item() for j, tok in enumerate(cand))
        assert abs(cached.summed[i].item() - expected) < 1e-4


@pytest.mark.parametrize("batch_size", [2, 32])
def test_a_header_every_candidate_starts_with_is_scored_once_and_counted(batch_size):
    """Label candidates share their first tokens (header, "1. '"): those go through the model with
    the prompt, and the scores, per token means included, stay the full-sequence ones."""
    model = tiny_llama(2)
    prompt = list(range(2, 40))
    header = [7, 8, 9, 10]
    cands = [header + c for c in candidates(9, seed=3)] + [header[:3]]  # one is the header's start
    seen: list[tuple[int, ...]] = []  # the shape of every input the model embeds
    hook = model.model.embed_tokens.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    cached = score_candidates(model, TOKENIZER, prompt, cands, batch_size=batch_size)
    hook.remove()
    # Shared: header[:2] (the 3-token candidate keeps its last token as its own). One forward for
    # the prompt and those 2 tokens, then each batch of candidates without them.
    chunks = [cands[i : i + batch_size] for i in range(0, len(cands), batch_size)]
    assert seen == [(1, len(prompt) + 2), *((len(c), max(map(len, c)) - 2) for c in chunks)]
    full = score_candidates_full(model, TOKENIZER, prompt, cands, batch_size=5)
    torch.testing.assert_close(cached.summed, full.summed, atol=1e-4, rtol=0)
    torch.testing.assert_close(cached.mean, full.mean, atol=1e-4, rtol=0)


def test_rejects_empty_candidates():
    with pytest.raises(ValueError, match="empty"):
        score_candidates(tiny_llama(), TOKENIZER, [2, 3], [[4], []])
