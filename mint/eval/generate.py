"""Batched answer generation for the held-out split (what a user of the student sees).

Greedy decoding is the default, so the same seed gives the same answers; the
paper's sampling settings (temperature 0.8, top_p 0.8, top_k 10 for rare disease)
are a config away.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, LogitsProcessorList

from mint.eval.constraints import NoRepeatedNames


@dataclass(frozen=True)
class DecodingSettings:
    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    batch_size: int = 8
    # Mask tokens that can only repeat a name the answer already lists (mint.eval.constraints);
    # needs the label set passed to generate_answers.
    no_repeated_names: bool = False
    # Stronger: inside an item only a label not yet listed can be written (closed-set decoding).
    known_names_only: bool = False

    def generation_config(self, tokenizer: Any) -> GenerationConfig:
        sampling = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=self.do_sample,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **(sampling if self.do_sample else {}),
        )


@torch.inference_mode()
def generate_answers(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[list[dict]],
    settings: DecodingSettings,
    model_inputs: Callable[[list[str], range], Any] | None = None,
    labels: Sequence[str] | None = None,
    quote: str = "'",
) -> list[str]:
    """One answer per conversational prompt (message list), decoded without special tokens.

    `tokenizer` is the student's text tokenizer. `model_inputs(texts, indices)` turns the
    rendered prompts of `prompts[indices]` into the model's inputs; None tokenizes the text
    (an image student's kind passes one that adds each prompt's image, mint.student.kinds).
    `labels` and `quote` (the answer format's) are what `settings.no_repeated_names` reads.
    """
    constrained = settings.no_repeated_names or settings.known_names_only
    if constrained and labels is None:
        raise ValueError("no_repeated_names or known_names_only needs the label set: pass labels=")
    was_training = model.training
    model.eval()
    config = settings.generation_config(tokenizer)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only batched generation continues from the right edge
    answers: list[str] = []
    try:
        for start in tqdm(range(0, len(prompts), settings.batch_size), desc="generating", unit="batch"):
            indices = range(start, min(start + settings.batch_size, len(prompts)))
            texts = [
                tokenizer.apply_chat_template(prompts[i], add_generation_prompt=True, tokenize=False)
                for i in indices
            ]
            if model_inputs is None:
                batch = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
            else:
                batch = model_inputs(texts, indices)
            batch = batch.to(model.device)
            processors = LogitsProcessorList()
            if constrained:
                # Left padding: every row's answer starts after the same prompt width.
                prompt_length = batch["input_ids"].shape[1]
                processors.append(
                    NoRepeatedNames(tokenizer, labels, prompt_length, quote, settings.known_names_only)
                )
            output = model.generate(**batch, generation_config=config, logits_processor=processors)
            new_tokens = output[:, batch["input_ids"].shape[1] :]
            answers.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers
