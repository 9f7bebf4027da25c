"""Model shapes and random data the benchmarks share: a random Llama with SmolLM2-135M's vocabulary
and width, rare-disease-shaped packed pairs, and Llama-3.2-1B's dimensions (bench_preference.py
--model llama1b, the GPU suite)."""

from __future__ import annotations

import random

from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from mint.pairs.packed import PackedPreferenceCollator
from mint.pairs.text import TokenizedPair


def smollm2_shaped(layers: int) -> LlamaConfig:
    """SmolLM2-135M's shape (vocabulary 49,152, width 576, 9 heads / 3 KV heads) with `layers` layers."""
    return LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )


def smollm2_lora(layers: int) -> PeftModel:
    """A random SmolLM2-shaped Llama of `layers` layers in float32, LoRA r=16 on all its linear layers."""
    return get_peft_model(
        LlamaForCausalLM(smollm2_shaped(layers)).float(),
        LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0),
    )


def rare_disease_shaped_batches(n_batches: int, batch: int, vocab: int) -> list[dict]:
    """Packed batches of random pairs shaped like the rare-disease ones (prompt 190-210 tokens,
    answers 110 each), the same for a given call."""
    rng = random.Random(0)

    def ids(n: int) -> list[int]:
        return [rng.randrange(1, vocab) for _ in range(n)]

    collate = PackedPreferenceCollator(0)
    return [
        collate([TokenizedPair(ids(rng.randint(190, 210)), ids(110), ids(110)) for _ in range(batch)])
        for _ in range(n_batches)
    ]


# Llama-3.2-1B's config.json dimensions (tied embeddings).
LLAMA1B = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)
