"""Image preference pairs for Llama-3.2-Vision (Mllama) students: encode and collate.

`encode_vision_pair` turns an image plus a preference row into token ids and the processor's
image tensors; `VisionPreferenceCollator` batches such pairs as the text collator does, and
`PackedVisionCollator` as the packed one does (one row [prompt, chosen, rejected] per pair), each
plus the image tensors and one cross-attention mask (`image_inputs` documents the batch contract).
The forwards that consume these batches are in mint.optim.forward (packed) and
mint.student.vision (unpacked).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mint.pairs.packed import PackedPreferenceCollator
from mint.pairs.text import PreferenceCollator, as_item

# The keys a VisionPreferenceCollator or PackedVisionCollator batch adds to the text batch.
IMAGE_KEYS = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask")
# A VisionPair's fields beyond the token ids of a text pair.
IMAGE_FIELDS = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "image_position")


@dataclass(frozen=True)
class VisionPair:
    """One tokenized preference pair with its image, for one-image one-tile-or-more Mllama inputs.

    `prompt_ids`/`chosen_ids`/`rejected_ids` mean what they mean in mint.data.TokenizedPair
    (answers carry no prompt token); the image tensors are the processor's output for one image:
    pixel_values [1, tiles, 3, H, W], aspect_ratio_ids [1], aspect_ratio_mask [1, tiles].
    `image_position` is the index of the <|image|> token in `prompt_ids`: every token from it on
    attends to the image.
    """

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    pixel_values: torch.Tensor
    aspect_ratio_ids: torch.Tensor
    aspect_ratio_mask: torch.Tensor
    image_position: int


def vision_messages(system: str | None, question: str) -> list[dict[str, Any]]:
    """A Llama-3.2-Vision prompt: optional system turn, then a user turn of image + question."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]})
    return messages


def encode_vision_pair(
    processor: Any,
    image: np.ndarray,
    prompt_messages: list[dict[str, Any]],
    chosen: str | list[dict[str, Any]],
    rejected: str | list[dict[str, Any]],
    max_length: int,
) -> VisionPair:
    """Tokenize prompt + both answers through the chat template and preprocess the image.

    The prompt must hold exactly one image part (see `vision_messages`); answers are strings
    or TRL assistant-message lists, and are cut so that prompt + answer fits `max_length`.
    The prompt itself is never cut (that could drop the image token): too long is an error.
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} {tuple(image.shape)}")
    tokenizer = processor.tokenizer
    prompt_text = tokenizer.apply_chat_template(prompt_messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    image_token_id = tokenizer.convert_tokens_to_ids(processor.image_token)
    positions = [i for i, t in enumerate(prompt_ids) if t == image_token_id]
    if len(positions) != 1:
        raise ValueError(
            f"the prompt must hold exactly one {processor.image_token} token (one {{'type': 'image'}} part "
            f"in a user turn), found {len(positions)}: {prompt_text!r}"
        )
    if len(prompt_ids) >= max_length:
        raise ValueError(
            f"the prompt has {len(prompt_ids)} tokens, no room for an answer in max_length={max_length}"
        )

    answers = []
    for answer in (chosen, rejected):
        messages = [{"role": "assistant", "content": answer}] if isinstance(answer, str) else answer
        full_text = tokenizer.apply_chat_template(prompt_messages + messages, tokenize=False)
        if not full_text.startswith(prompt_text):
            raise ValueError(
                "the chat template is not prefix-stable: prompt + answer does not start with the prompt "
                f"rendered with add_generation_prompt=True.\nprompt: {prompt_text!r}\nfull:   {full_text!r}"
            )
        ids = tokenizer(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"]
        answers.append(ids[: max_length - len(prompt_ids)])
    if not answers[0] or not answers[1]:
        raise ValueError("the chat template rendered an empty answer")

    pixels = processor.image_processor(images=[[image]], return_tensors="pt")
    return VisionPair(
        prompt_ids=prompt_ids,
        chosen_ids=answers[0],
        rejected_ids=answers[1],
        pixel_values=pixels["pixel_values"][0],
        aspect_ratio_ids=pixels["aspect_ratio_ids"][0],
        aspect_ratio_mask=pixels["aspect_ratio_mask"][0],
        image_position=positions[0],
    )


def image_inputs(pairs: Sequence[VisionPair], length: int) -> dict[str, torch.Tensor]:
    """The image tensors of a batch of pairs whose token rows are padded to `length`.

    - pixel_values [B, 1, tiles, 3, H, W] float, aspect_ratio_ids [B, 1] long,
      aspect_ratio_mask [B, 1, tiles] long: one image per pair (tiles = the processor's
      max_image_tiles, 1 for the tiny model);
    - cross_attention_mask [B, length, 1, tiles] long: row t is the image's tile mask for every
      position t >= the <|image|> token and 0 before it. Everything after the image token sees
      the image: the rest of the prompt, chosen and rejected answers (also when packed into one
      row after the prompt) and padding, as the processor and generate() extend it.
    """
    pixel_values = torch.stack([p.pixel_values for p in pairs])
    aspect_ratio_mask = torch.stack([p.aspect_ratio_mask for p in pairs])
    mask = torch.zeros((len(pairs), length, 1, aspect_ratio_mask.shape[-1]), dtype=torch.long)
    for row, pair in enumerate(pairs):
        mask[row, pair.image_position :, 0, :] = pair.aspect_ratio_mask[0]
    return {
        "pixel_values": pixel_values,
        "aspect_ratio_ids": torch.stack([p.aspect_ratio_ids for p in pairs]),
        "aspect_ratio_mask": aspect_ratio_mask,
        "cross_attention_mask": mask,
    }


class VisionPreferenceCollator:
    """mint.data.PreferenceCollator's text batch plus `image_inputs` for the same rows.

    chosen_/rejected_input_ids, _attention_mask, _labels [B, T] and prompt_lengths [B] are as in
    PreferenceCollator (right padding to one T for both sides, labels -100 on prompt and
    padding); chosen and rejected rows share the prompt, so one `cross_attention_mask` [B, T, 1,
    tiles] serves both. To run both sides in one forward, concatenate the sides along the batch
    and repeat the image tensors and the mask twice (or encode each image once with
    `image_states` and repeat its output).
    """

    def __init__(self, pad_token_id: int, label_pad_id: int = -100):
        self.text = PreferenceCollator(pad_token_id=pad_token_id, label_pad_id=label_pad_id)

    def __call__(self, pairs: Sequence[VisionPair | dict]) -> dict[str, torch.Tensor]:
        # Dicts are what mint.optim.reference.attach_reference_logps returns: a pair's fields
        # plus its reference log-probs, which the text collator passes through.
        items = [as_item(p) for p in pairs]
        batch = self.text(items)
        return batch | image_inputs(
            [_vision_pair(item) for item in items], batch["chosen_input_ids"].shape[1]
        )


class PackedVisionCollator(PackedPreferenceCollator):
    """mint.pairs.packed's batch (one row [prompt, chosen, rejected] per pair: the prompt, and so
    the image, once) plus `image_inputs` for the same rows. Every token from the image token on
    sees the image, the rejected answer's too: it continues the same prompt."""

    def __call__(self, pairs: Sequence[VisionPair | dict]) -> dict[str, torch.Tensor]:
        items = [as_item(p) for p in pairs]
        text = [{k: v for k, v in item.items() if k not in IMAGE_FIELDS} for item in items]
        batch = super().__call__(text)
        return batch | image_inputs([_vision_pair(item) for item in items], batch["input_ids"].shape[1])


def _vision_pair(item: dict[str, Any]) -> VisionPair:
    """A collator's item (a VisionPair's fields plus what a stage added: reference log-probs, a
    trunk row) as the VisionPair it came from."""
    return VisionPair(**{field.name: item[field.name] for field in dataclasses.fields(VisionPair)})
