"""Model shapes the benchmarks share: a random Llama with SmolLM2-135M's vocabulary and width, and
Llama-3.2-1B's dimensions (bench_preference.py --model llama1b, the GPU suite)."""

from __future__ import annotations

from transformers import LlamaConfig


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
