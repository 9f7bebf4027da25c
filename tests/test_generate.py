"""Batched generation gives what one-at-a-time generation gives, in the caller's order."""

from pathlib import Path

import pytest
import torch

from mint.data.example_prefs import make_example_prefs
from mint.eval.generate import DecodingSettings, generate_answers
from mint.pairs.rows import pairs_to_texts
from mint.student import build_tiny_llama, load_student


def test_batched_greedy_generation_matches_single_prompts(tmp_path: Path):
    rows = make_example_prefs(n=24, seed=1)
    torch.manual_seed(0)
    model, tokenizer = load_student(
        None, cache_dir=str(tmp_path), build=build_tiny_llama, corpus=pairs_to_texts(rows)
    )
    prompts = [row["prompt"] for row in rows[:5]]
    settings = DecodingSettings(max_new_tokens=12, batch_size=3)
    batched = generate_answers(model, tokenizer, prompts, settings)
    single = [generate_answers(model, tokenizer, [p], settings)[0] for p in prompts]
    assert batched == single and len(batched) == 5
    assert all(isinstance(a, str) for a in batched)
    assert tokenizer.padding_side == "right" and model.training  # restored for training

    # The no-repeated-names constraint runs inside generate() (batched and single agree), and
    # needs the label set.
    constrained = DecodingSettings(max_new_tokens=12, batch_size=3, no_repeated_names=True)
    labels = ["Breast", "Colon"]
    batched = generate_answers(model, tokenizer, prompts, constrained, labels=labels)
    assert batched == [
        generate_answers(model, tokenizer, [p], constrained, labels=labels)[0] for p in prompts
    ]
    with pytest.raises(ValueError, match="needs the label set"):
        generate_answers(model, tokenizer, prompts, constrained)
