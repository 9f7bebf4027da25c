"""A tiny random-init Llama student with its own byte-level BPE tokenizer, built from config.

Tests and `debug=smoke` runs need a student that exists without the model hub; this
one is written with `save_pretrained` so that `load_student` reads it back through
the same `from_pretrained` path as a real checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD_TOKEN = "<|endoftext|>"  # also unk: byte-level BPE never needs it, but HF wants one
BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN]  # ids 0, 1, 2 (as in SmolLM2)

# ChatML without a default system prompt. The generation prompt is exactly the text that
# precedes an assistant answer, so prompt+generation prompt is a prefix of the full chat.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_tokenizer(corpus: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE on `corpus`; any text encodes, because all 256 bytes are in the alphabet."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=PAD_TOKEN,
        # The chat template already opens every turn with <|im_start|>; adding a BOS
        # here would double it.
        add_bos_token=False,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,  # keep decode(encode(text)) == text
        chat_template=CHAT_TEMPLATE,
        padding_side="right",
    )


def build_tiny_llama(
    out_dir: str | Path,
    corpus: Sequence[str],
    *,
    vocab_size: int = 512,
    hidden_size: int = 64,
    intermediate_size: int = 192,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    max_position_embeddings: int = 2048,
    seed: int = 0,
) -> Path:
    """Train a tokenizer on `corpus`, build a random `LlamaForCausalLM`, save both to `out_dir`.

    Deterministic: the same corpus, arguments and seed give identical files.
    """
    out_dir = Path(out_dir)
    tokenizer = train_tokenizer(corpus, vocab_size)
    config = LlamaConfig(
        # A small corpus can run out of merges before `vocab_size`; size the
        # embeddings to the tokenizer so that no row is unreachable.
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    # Seed a forked RNG so that building a student does not reset the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
