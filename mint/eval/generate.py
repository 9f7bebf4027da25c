"""Batched answer generation for the held-out split (what a user of the student sees).

The decoding strategy is the `generation` config node (conf/generation/), passed key for key to
`transformers.GenerationConfig`: any of its fields can be set, and transformers checks them.
Greedy decoding is the default, so the same seed gives the same answers; `generation=paper` is
the paper's sampling, seeded by the run's seed. Generation stops at any of the model's own end
ids, the tokenizer's eos and the chat template's end-of-turn token.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, LogitsProcessorList
from transformers.generation import logits_process

from mint.config import ConfigError
from mint.eval.constraints import NoRepeatedNames

GREEDY = {"do_sample": False, "num_beams": 1}  # conf/generation/greedy.yaml
# GenerationConfig's fields (metadata such as transformers_version left out).
GENERATION_FIELDS = frozenset(GenerationConfig().to_dict()) - {"transformers_version", "_from_model_config"}
# Values transformers checks only inside generate(), by the logits processor it builds for each
# (none for the value that switches it off): built here at start-up, so that a bad value stops the
# run before training, not after it.
CHECKED_BY_PROCESSOR = {
    "temperature": (logits_process.TemperatureLogitsWarper, 1.0),
    "top_k": (logits_process.TopKLogitsWarper, 0),
    "top_p": (logits_process.TopPLogitsWarper, 1.0),
    "min_p": (logits_process.MinPLogitsWarper, None),
    "typical_p": (logits_process.TypicalLogitsWarper, 1.0),
    "repetition_penalty": (logits_process.RepetitionPenaltyLogitsProcessor, 1.0),
    "no_repeat_ngram_size": (logits_process.NoRepeatNGramLogitsProcessor, 0),
}


@dataclass(frozen=True)
class DecodingSettings:
    # The `generation` node: GenerationConfig fields (None values count as not set).
    generation: Mapping[str, Any] = field(default_factory=lambda: dict(GREEDY))
    max_new_tokens: int = 512  # task.eval.max_new_tokens; generation.max_new_tokens wins when set
    batch_size: int = 8
    # Mask tokens that can only repeat a name the answer already lists (mint.eval.constraints);
    # needs the label set passed to generate_answers.
    no_repeated_names: bool = False
    # Stronger: inside an item only a label not yet listed can be written (closed-set decoding).
    known_names_only: bool = False
    seed: int = 0  # torch's generator is set to this before each generate_answers call (sampling)


def check_generation(node: Mapping[str, Any]) -> dict[str, Any]:
    """The node's set keys as GenerationConfig kwargs; an unknown key or a value transformers refuses
    is a ConfigError naming it."""
    values = {str(k): v for k, v in dict(node).items() if v is not None}
    for key in values:
        if key not in GENERATION_FIELDS:
            close = difflib.get_close_matches(key, sorted(GENERATION_FIELDS), n=1)
            hint = f" (did you mean generation.{close[0]}?)" if close else ""
            raise ConfigError(f"generation.{key}: not a field of transformers.GenerationConfig{hint}")
    for key, (processor, off) in CHECKED_BY_PROCESSOR.items():
        if key in values and values[key] != off:
            try:
                processor(values[key])
            except (ValueError, TypeError) as err:
                raise ConfigError(f"generation.{key}={values[key]!r}: {err}") from err
    try:
        GenerationConfig(**values).validate(strict=True)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"generation ({values}): {err}") from err
    return values


def end_of_turn_id(tokenizer: Any) -> int | None:
    """The special token the chat template writes right after an assistant message (Llama 3's
    <|eot_id|>, ChatML's <|im_end|>): where a chat model ends its answer. None without a template."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "MINT-END-OF-ANSWER"
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}]
    text = tokenizer.apply_chat_template(chat, tokenize=False)
    after = text.split(marker, 1)[1] if marker in text else ""
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    return ids[0] if ids and ids[0] in set(tokenizer.all_special_ids) else None


def end_token_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    """Every id that ends an answer: the model's own (its generation_config may list several, as
    Llama 3's does), the tokenizer's eos and the chat template's end-of-turn token."""
    own = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids: list[int] = []
    for value in (own, tokenizer.eos_token_id, end_of_turn_id(tokenizer)):
        for token in value if isinstance(value, list | tuple) else [value]:
            if token is not None and int(token) not in ids:
                ids.append(int(token))
    return ids


def generation_config(settings: DecodingSettings, model: torch.nn.Module, tokenizer: Any) -> GenerationConfig:
    """The node's fields, plus max_new_tokens, pad and end ids where the node leaves them unset."""
    values = check_generation(settings.generation)
    values.setdefault("max_new_tokens", settings.max_new_tokens)
    ends = end_token_ids(model, tokenizer)
    values.setdefault("eos_token_id", ends)
    pad = tokenizer.pad_token_id
    values.setdefault("pad_token_id", pad if pad is not None else (ends[0] if ends else None))
    return GenerationConfig(**values)


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
    config = generation_config(settings, model, tokenizer)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only batched generation continues from the right edge
    answers: list[str] = []
    # A generator of its own, set from the settings' seed: sampled answers repeat for the same seed
    # whatever ran before, and the caller's random state is left as it was.
    cuda = [model.device] if model.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(settings.seed)
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
