"""Vision students: Llama-3.2-Vision (Mllama) models that see an image and answer in text.

Two sources end in the same `from_pretrained` call, as for text students (mint.student.load):
- a tiny random-init `MllamaForConditionalGeneration` built from config with an offline
  processor (`build_tiny_mllama`), for tests and `debug=smoke`;
- a local copy or hub id of `meta-llama/Llama-3.2-11B-Vision-Instruct`, the paper's student.

LoRA goes on the language layers (self- and cross-attention, MLP) and the multi-modal
projector, as in the paper; the vision tower stays frozen. The forwards below read the
batches of `mint.pairs.vision` and encode each image once (`image_states`), for training
(`image_sides_logits`) and for scoring candidate answers (`image_prompt_inputs`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path

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

from mint.eval.trunk_ranking import RowInputs
from mint.optim.forward import KeptLogits, logits_at
from mint.pairs.text import SIDES
from mint.pairs.vision import IMAGE_KEYS, VisionPair, image_inputs
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

    vision_config = one_tile_vision_config(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=vision_hidden_size,
        intermediate_size=vision_intermediate_size,
        layers=vision_layers,
        global_layers=vision_global_layers,
        heads=vision_heads,
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
    model = new_mllama(vision_config, text_config, tokenizer, image_token_id, seed)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            if hasattr(layer, "cross_attn_attn_gate"):
                layer.cross_attn_attn_gate.fill_(cross_attention_gate)
                layer.cross_attn_mlp_gate.fill_(cross_attention_gate)
    model.save_pretrained(out_dir)
    offline_processor(tokenizer, image_size).save_pretrained(out_dir)
    return out_dir


def new_mllama(
    vision_config: MllamaVisionConfig,
    text_config: MllamaTextConfig,
    tokenizer: transformers.PreTrainedTokenizerBase,
    image_token_id: int,
    seed: int,
) -> MllamaForConditionalGeneration:
    """A randomly initialised Mllama of these configs, the tokenizer's special ids at the top level."""
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
        return MllamaForConditionalGeneration(config)


def one_tile_vision_config(
    *,
    image_size: int,
    patch_size: int,
    hidden_size: int,
    intermediate_size: int,
    layers: int,
    global_layers: int,
    heads: int,
) -> MllamaVisionConfig:
    """A small Mllama vision tower for square one-tile images (no pretrained weights: it trains or
    stays random)."""
    intermediate_layers = [0] if layers == 1 else [0, layers - 1]
    return MllamaVisionConfig(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_global_layers=global_layers,
        attention_heads=heads,
        image_size=image_size,
        patch_size=patch_size,
        max_num_tiles=1,
        supported_aspect_ratios=[[1, 1]],
        intermediate_layers_indices=intermediate_layers,
        # The vision output concatenates the last hidden state with each intermediate layer's.
        vision_output_dim=hidden_size * (1 + len(intermediate_layers)),
    )


def offline_processor(tokenizer: transformers.PreTrainedTokenizerBase, image_size: int) -> MllamaProcessor:
    """An `MllamaProcessor` for one-tile `image_size` images over `tokenizer` (which holds
    `<|image|>`), with the vision chat template: made here, nothing downloaded."""
    tokenizer.chat_template = VISION_CHAT_TEMPLATE
    image_processor = MllamaImageProcessor(
        size={"height": image_size, "width": image_size}, max_image_tiles=1
    )
    return MllamaProcessor(image_processor, tokenizer, chat_template=VISION_CHAT_TEMPLATE)


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
    train_top_layers: int | None = None,
) -> tuple[torch.nn.Module, transformers.ProcessorMixin]:
    """Return `(model, processor)` in train mode.

    `name_or_path=None` builds the student with `build(out_dir, corpus)` once into
    `cache_dir/students/` (a tiny Mllama, or one grown from a Llama: mint.student.llama_vision).
    A LoRA config whose `target_modules` is None or "all-linear" is narrowed to the language
    layers and the projector (LANGUAGE_AND_PROJECTOR_TARGETS), or with `train_top_layers` to the
    top layers' linear modules (mint.optim.trunk.top_lora). The vision tower trains only when
    `lora.modules_to_save` names it (a random tower, trained in full); LoRA never reaches it.
    """
    check_load_settings(dtype, quantization)
    if name_or_path is None:
        builder = getattr(build, "func", build)
        prefix = (
            "tiny-mllama" if builder in (None, build_tiny_mllama) else builder.__name__.removeprefix("build_")
        )
        source = built_source(Path(cache_dir) / "students", prefix.replace("_", "-"), build, corpus)
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
    if train_top_layers is not None and lora is not None and adapter_path is None:
        from mint.optim.trunk import top_lora

        lora = top_lora(lora, model, train_top_layers)  # LoRA on the top layers' linear modules only
    model = attach_adapter(model, lora, adapter_path, default_targets=LANGUAGE_AND_PROJECTOR_TARGETS)

    # A full copy of the tower in modules_to_save is asked for; LoRA inside it is not.
    trainable_vision = [
        n
        for n, p in _vision_tower(model).named_parameters()
        if p.requires_grad and "modules_to_save" not in n
    ]
    if trainable_vision:
        raise ValueError(
            f"student.lora.target_modules reaches the frozen vision tower ({trainable_vision[:3]} ...); "
            f"target the language layers and projector, e.g. {LANGUAGE_AND_PROJECTOR_TARGETS!r}, or "
            "train the tower in full with student.lora.modules_to_save=[vision_model, ...]"
        )
    _check_gates_open_or_trained(model)
    log_parameters("vision student", source, model)
    return model, processor


def _check_gates_open_or_trained(model: torch.nn.Module) -> None:
    """A cross-attention layer whose tanh gates are 0 and frozen shuts the image out for good: the
    layer's output is multiplied by 0, so neither the layer's weights nor the projector and vision
    tower behind them get a gradient. Refused when the model trains (an untouched base, optim=none,
    may hold closed gates)."""
    if not any(p.requires_grad for p in model.parameters()):
        return
    closed = [
        name
        for name, p in model.named_parameters()
        if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate"))
        and "original_module" not in name  # the frozen original beside a modules_to_save copy
        and not p.requires_grad
        and not bool(p.detach().ne(0).any())
    ]
    if closed:
        layers = sorted({int(m.group(1)) for m in map(re.compile(r"\.layers\.(\d+)\.").search, closed) if m})
        raise ValueError(
            f"{len(closed)} cross-attention gate(s) are 0 and frozen (e.g. {closed[0]}): the image can never "
            "reach the text; train the cross-attention layers in full, e.g. student.lora.modules_to_save="
            f"[{', '.join(f'language_model.layers.{i}' for i in layers)}, ...]"
        )


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


def image_sides_logits(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    sides: tuple[str, ...] = SIDES,
    keep: torch.Tensor | None = None,
) -> torch.Tensor | KeptLogits:
    """Logits of the given sides of a VisionPreferenceCollator batch, concatenated along the batch:
    all of them, or with `keep` ([N, T] boolean) those at the kept positions only (`logits_at`).

    Each image goes through the vision tower and projector once (`image_states`); its states and
    the shared cross-attention mask are repeated for every side: the sides share the prompt and
    so the image. A batch with cached trunk states (`chosen_trunk`, mint.optim.trunk) runs only the
    top layers, where the image enters, from them.
    """
    input_ids = torch.cat([batch[f"{side}_input_ids"] for side in sides])
    attention_mask = torch.cat([batch[f"{side}_attention_mask"] for side in sides])
    image = image_batch_inputs(model, batch)
    # The states hold images*tiles rows per pair, in batch order; the model groups them back by row.
    n = len(sides)
    inputs = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        cross_attention_states=image["cross_attention_states"].repeat(n, 1, 1),
        cross_attention_mask=image["cross_attention_mask"].repeat(n, 1, 1, 1),
    )
    trunk = None
    if f"{sides[0]}_trunk" in batch:  # cached trunk states (mint.optim.trunk)
        trunk = (torch.cat([batch[f"{side}_trunk"] for side in sides]), int(batch["trunk_start"]))
        if keep is None:
            keep = torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device)
            return logits_at(model, inputs, keep, trunk).logits.view(*keep.shape, -1)
    if keep is not None:
        return logits_at(model, inputs, keep, trunk)
    return model(**inputs, use_cache=False).logits


def image_batch_inputs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The cross-attention inputs of a collated image batch, one per row: each image through the
    vision tower and projector once (`image_states`), and the batch's cross-attention mask."""
    missing = [key for key in IMAGE_KEYS if key not in batch]
    if missing:
        raise ValueError(
            f"an image student's batch lacks {missing}; use an image collator (mint.pairs.vision)"
        )
    states = image_states(model, batch["pixel_values"], batch["aspect_ratio_ids"], batch["aspect_ratio_mask"])
    return {"cross_attention_states": states, "cross_attention_mask": batch["cross_attention_mask"]}


def image_row_inputs(pairs: Sequence[VisionPair]) -> RowInputs:
    """For closed-set ranking on trunk states: rows i start with `pairs[i]`'s prompt, and get its
    image's cross-attention states (through the given model's tower and projector, once a batch:
    the trained ones, whatever model the trunk was built with) and mask (every token from the
    image token on sees it, the candidates too)."""

    def inputs(model: torch.nn.Module, indices: Sequence[int], length: int) -> dict:
        device = next(model.parameters()).device
        tensors = {k: v.to(device) for k, v in image_inputs([pairs[i] for i in indices], length).items()}
        states = image_states(
            model, tensors["pixel_values"], tensors["aspect_ratio_ids"], tensors["aspect_ratio_mask"]
        )
        return {"cross_attention_states": states, "cross_attention_mask": tensors["cross_attention_mask"]}

    return inputs


def image_prompt_inputs(model: torch.nn.Module, pair: VisionPair) -> Callable[[int, int, int], dict]:
    """mint.eval.ranking's extra_inputs(rows, start, stop) for contexts that start with `pair`'s
    prompt: the image goes through the vision tower once, here; the call that starts at position
    0 passes its states, and the later ones (candidates after the cached context) only their rows
    of the cross-attention mask, the image's keys and values being in the cache."""
    device = next(model.parameters()).device
    states = image_states(
        model,
        pair.pixel_values[None].to(device),
        pair.aspect_ratio_ids[None].to(device),
        pair.aspect_ratio_mask[None].to(device),
    )

    def inputs(rows: int, start: int, stop: int) -> dict:
        mask = image_inputs([pair] * rows, stop)["cross_attention_mask"][:, start:stop].to(device)
        if start > 0:
            return {"cross_attention_mask": mask}
        return {"cross_attention_states": states.repeat(rows, 1, 1), "cross_attention_mask": mask}

    return inputs
