"""Vision students: Llama-3.2-Vision (Mllama) models that see an image and answer in text.

Two sources end in the same `from_pretrained` call, as for text students (mint.student.load):
- a tiny random-init `MllamaForConditionalGeneration` built from config with an offline
  processor (`build_tiny_mllama`), for tests and `debug=smoke`;
- a local copy or hub id of `meta-llama/Llama-3.2-11B-Vision-Instruct`, the paper's student.

LoRA goes on the language layers (self- and cross-attention, MLP) and the multi-modal
projector, as in the paper; the vision tower stays frozen. `encode_vision_pair` and
`VisionPreferenceCollator` turn an image plus a preference pair into the tensors the
preference module feeds to the model (`image_inputs` and the collator document the batch contract).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import peft
import torch
import transformers
from tokenizers import AddedToken
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    MllamaConfig,
    MllamaForConditionalGeneration,
    MllamaImageProcessor,
    MllamaProcessor,
    MllamaTextConfig,
    MllamaVisionConfig,
)

from mint.data.preference import PreferenceCollator
from mint.student.load import (
    DTYPES,
    attach_adapter,
    built_source,
    check_load_settings,
    log_parameters,
    not_found,
    prepare_for_training,
)
from mint.student.tiny import train_tokenizer

log = logging.getLogger("mint.student")

IMAGE_TOKEN = "<|image|>"

# ChatML (the tiny tokenizer's turn markers) over Llama-3.2-Vision content lists: a message's
# content is a string or a list of {"type": "image"} / {"type": "text", "text": ...} parts, and
# an image part renders as <|image|> where it stands in the turn. Prefix-stable: the prompt with
# the generation prompt is a prefix of prompt + answer.
VISION_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|image|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# The paper's LoRA targets: every linear layer of the language model (self- and cross-attention,
# MLP) and the projector from vision features to text hidden size. A regex (peft full-matches it
# against module names) because "all-linear" would also reach the vision tower.
LANGUAGE_AND_PROJECTOR_TARGETS = (
    r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)|.*multi_modal_projector"
)


# --------------------------------------------------------------------------- building


def build_tiny_mllama(
    out_dir: str | Path,
    corpus: Sequence[str],
    *,
    image_size: int = 64,
    patch_size: int = 16,
    vision_hidden_size: int = 32,
    vision_intermediate_size: int = 64,
    vision_layers: int = 2,
    vision_global_layers: int = 1,
    vision_heads: int = 2,
    vocab_size: int = 512,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    text_layers: int = 3,
    cross_attention_layers: Sequence[int] = (1,),
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    max_position_embeddings: int = 2048,
    cross_attention_gate: float = 1.0,
    seed: int = 0,
) -> Path:
    """Train a tokenizer on `corpus`, build a random one-tile `MllamaForConditionalGeneration`,
    save model and `MllamaProcessor` to `out_dir`. Deterministic for the same arguments and seed.

    As in Llama-3.2-Vision, `<|image|>` is the last token id, equal to the text vocab size: it has
    an input embedding (Mllama keeps 8 spare rows) but no output logit, so it is never generated.
    Mllama initializes its cross-attention gates to 0, which shuts the image out of the text
    until full fine-tuning opens them; LoRA leaves the gates frozen, so a fresh tiny student
    opens them to `cross_attention_gate` (tanh-ed by the model), as a pretrained one has them.
    """
    if any(not 0 <= i < text_layers for i in cross_attention_layers):
        raise ValueError(
            f"cross_attention_layers {list(cross_attention_layers)} must lie in 0..{text_layers - 1}"
        )
    out_dir = Path(out_dir)
    tokenizer = train_tokenizer(corpus, vocab_size)
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    tokenizer.chat_template = VISION_CHAT_TEMPLATE
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    # The BPE trainer may stop short of `vocab_size`; the text vocab is whatever it produced.
    text_vocab = len(tokenizer) - 1
    if image_token_id != text_vocab:
        raise RuntimeError(f"{IMAGE_TOKEN} got id {image_token_id}, expected the last id {text_vocab}")

    intermediate_layers = [0] if vision_layers == 1 else [0, vision_layers - 1]
    vision_config = MllamaVisionConfig(
        hidden_size=vision_hidden_size,
        intermediate_size=vision_intermediate_size,
        num_hidden_layers=vision_layers,
        num_global_layers=vision_global_layers,
        attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        max_num_tiles=1,
        supported_aspect_ratios=[[1, 1]],
        intermediate_layers_indices=intermediate_layers,
        # The vision output concatenates the last hidden state with each intermediate layer's.
        vision_output_dim=vision_hidden_size * (1 + len(intermediate_layers)),
    )
    text_config = MllamaTextConfig(
        vocab_size=text_vocab,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=text_layers,
        cross_attention_layers=list(cross_attention_layers),
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = MllamaConfig(
        vision_config=vision_config, text_config=text_config, image_token_index=image_token_id
    )
    # Top-level ids are what generate() reads.
    config.pad_token_id, config.bos_token_id, config.eos_token_id = (
        tokenizer.pad_token_id,
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
    )
    # Seed a forked RNG so that building a student does not reset the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MllamaForConditionalGeneration(config)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            if hasattr(layer, "cross_attn_attn_gate"):
                layer.cross_attn_attn_gate.fill_(cross_attention_gate)
                layer.cross_attn_mlp_gate.fill_(cross_attention_gate)
    image_processor = MllamaImageProcessor(
        size={"height": image_size, "width": image_size}, max_image_tiles=1
    )
    processor = MllamaProcessor(image_processor, tokenizer, chat_template=VISION_CHAT_TEMPLATE)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


# --------------------------------------------------------------------------- loading


def load_vision_student(
    name_or_path: str | None,
    *,
    cache_dir: str,
    build: Callable[..., Path] | None = None,
    corpus: Sequence[str] | None = None,
    dtype: str = "float32",
    quantization: transformers.BitsAndBytesConfig | None = None,
    lora: peft.LoraConfig | None = None,
    adapter_path: str | None = None,
    gradient_checkpointing: bool = False,
    trust_remote_code: bool = False,
    attn_implementation: str = "sdpa",
) -> tuple[torch.nn.Module, transformers.ProcessorMixin]:
    """Return `(model, processor)` in train mode; the vision tower never trains.

    `name_or_path=None` builds a tiny Mllama with `build(out_dir, corpus)` once into
    `cache_dir/students/`. A LoRA config whose `target_modules` is None or "all-linear" is
    narrowed to the language layers and the projector (LANGUAGE_AND_PROJECTOR_TARGETS).
    """
    check_load_settings(dtype, quantization)
    if name_or_path is None:
        source = built_source(Path(cache_dir) / "students", "tiny-mllama", build, corpus)
    else:
        source = Path(name_or_path).expanduser()

    processor = _load_processor(name_or_path, source, trust_remote_code)
    model = AutoModelForImageTextToText.from_pretrained(
        str(source),
        dtype=DTYPES[dtype],
        trust_remote_code=trust_remote_code,
        attn_implementation=attn_implementation,
        quantization_config=quantization,
    )
    vision_tower = _vision_tower(model)
    vision_tower.requires_grad_(False)

    model = prepare_for_training(model, quantization, gradient_checkpointing)
    model = attach_adapter(model, lora, adapter_path, default_targets=LANGUAGE_AND_PROJECTOR_TARGETS)

    trainable_vision = [n for n, p in _vision_tower(model).named_parameters() if p.requires_grad]
    if trainable_vision:
        raise ValueError(
            f"student.lora.target_modules reaches the frozen vision tower ({trainable_vision[:3]} ...); "
            f"target the language layers and projector, e.g. {LANGUAGE_AND_PROJECTOR_TARGETS!r}"
        )
    log_parameters("vision student", source, model)
    return model, processor


def _load_processor(
    name_or_path: str | None, source: Path, trust_remote_code: bool
) -> transformers.ProcessorMixin:
    try:
        processor = AutoProcessor.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    except OSError as err:
        if source.exists():
            raise
        raise not_found(name_or_path, source, err) from err
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None or not hasattr(processor, "image_processor"):
        raise ValueError(
            f"student.name_or_path={name_or_path!r}: {source} holds no image+text processor "
            f"(got {type(processor).__name__}); a vision student needs e.g. an MllamaProcessor"
        )
    if processor.chat_template is None and tokenizer.chat_template is None:
        raise ValueError(f"student.name_or_path={name_or_path!r}: the processor has no chat template")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return processor


def _vision_tower(model: torch.nn.Module) -> torch.nn.Module:
    """The `vision_model` submodule, through any PEFT wrapper."""
    for name, module in model.named_modules():
        if name.endswith("vision_model"):
            return module
    raise ValueError(f"{type(model).__name__} has no vision_model: not a Mllama-style vision student")


# --------------------------------------------------------------------------- encoding


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
        fields = [f.name for f in dataclasses.fields(VisionPair)]
        items = [{k: getattr(p, k) for k in fields} if isinstance(p, VisionPair) else p for p in pairs]
        batch = self.text(items)
        vision_pairs = [VisionPair(**{k: item[k] for k in fields}) for item in items]
        return batch | image_inputs(vision_pairs, batch["chosen_input_ids"].shape[1])


def image_states(
    model: torch.nn.Module,
    pixel_values: torch.Tensor,
    aspect_ratio_ids: torch.Tensor,
    aspect_ratio_mask: torch.Tensor,
) -> torch.Tensor:
    """Vision tower + projector once, as `cross_attention_states` for forward(): reuse it for the
    chosen and rejected rows (repeat along dim 0) instead of encoding the image twice."""
    mllama = _mllama_model(model)
    vision = mllama.vision_model(
        pixel_values=pixel_values, aspect_ratio_ids=aspect_ratio_ids, aspect_ratio_mask=aspect_ratio_mask
    ).last_hidden_state
    projected = mllama.multi_modal_projector(vision)
    return projected.reshape(-1, vision.shape[-2], mllama.hidden_size)


def _mllama_model(model: torch.nn.Module) -> torch.nn.Module:
    """The inner `MllamaModel` (vision tower, projector, language model), through any PEFT wrapper."""
    base = model.get_base_model() if isinstance(model, peft.PeftModel) else model
    inner = getattr(base, "model", None)
    if inner is None or not hasattr(inner, "multi_modal_projector"):
        raise ValueError(f"{type(base).__name__} is not a Mllama-style vision student")
    return inner
