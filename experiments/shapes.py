"""Model shapes the benchmarks share: a random Llama with SmolLM2-135M's vocabulary and width."""

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
