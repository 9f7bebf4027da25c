"""Vision students: the tiny Mllama builds, loads back, trains with (Q)LoRA, and encodes preference pairs."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import peft
import pytest
import torch
import transformers

from mint.optim.forward import answer_logps
from mint.pairs.vision import VisionPreferenceCollator, encode_vision_pair, vision_messages
from mint.student.vision import (
    LANGUAGE_AND_PROJECTOR_TARGETS,
    build_tiny_mllama,
    image_states,
    load_vision_student,
)

CORPUS = [
    "You are a professional pathologist analyzing nucleus images.",
    "Which tissue does this nucleus image come from? Answer with MOST_LIKELY_TISSUE: and 5 tissues.",
    "MOST_LIKELY_TISSUE: 1. Breast 2. Colon 3. Liver 4. Lung 5. Skin",
    "MOST_LIKELY_TISSUE: 1. Kidney 2. Testis 3. Thyroid 4. Uterus 5. Bladder",
] * 5
PROMPT = vision_messages("You are a professional pathologist.", "Which tissue is this?")
CHOSEN, REJECTED = "MOST_LIKELY_TISSUE: 1. Breast 2. Colon", "MOST_LIKELY_TISSUE: 1. Liver 2. Lung"
LORA = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0)


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_mllama(tmp_path_factory.mktemp("tiny") / "mllama", CORPUS)


def _forward(model: torch.nn.Module, batch: dict[str, torch.Tensor], side: str = "chosen") -> torch.Tensor:
    return model(
        input_ids=batch[f"{side}_input_ids"],
        attention_mask=batch[f"{side}_attention_mask"],
        cross_attention_mask=batch["cross_attention_mask"],
        pixel_values=batch["pixel_values"],
        aspect_ratio_ids=batch["aspect_ratio_ids"],
        aspect_ratio_mask=batch["aspect_ratio_mask"],
        use_cache=False,
    ).logits


def _batch(processor, seeds=(0, 1), answers=((CHOSEN, REJECTED), (REJECTED, CHOSEN + " 3. Skin"))):
    pairs = [
        encode_vision_pair(processor, _image(seed), PROMPT, chosen, rejected, max_length=128)
        for seed, (chosen, rejected) in zip(seeds, answers, strict=True)
    ]
    return VisionPreferenceCollator(pad_token_id=processor.tokenizer.pad_token_id)(pairs)


def test_build_is_deterministic_and_loads_back(tiny: Path, tmp_path: Path) -> None:
    again = build_tiny_mllama(tmp_path / "again", CORPUS)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (tiny / name).read_bytes(), name
    model, processor = load_vision_student(str(tiny), cache_dir=str(tmp_path))
    assert isinstance(model, transformers.MllamaForConditionalGeneration) and model.training
    assert isinstance(processor, transformers.MllamaProcessor)
    tokenizer = processor.tokenizer
    # As in Llama-3.2-Vision: <|image|> is the id just past the text vocabulary, never generated.
    assert tokenizer.convert_tokens_to_ids("<|image|>") == model.config.image_token_id
    assert model.config.image_token_id == model.config.text_config.vocab_size
    assert max(tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id) < len(tokenizer)


def test_builder_is_cached_when_no_path_is_given(tmp_path: Path) -> None:
    build = functools.partial(build_tiny_mllama, text_layers=2, cross_attention_layers=(1,))
    model, _ = load_vision_student(None, cache_dir=str(tmp_path), build=build, corpus=CORPUS)
    (built,) = (tmp_path / "students").iterdir()
    assert built.name.startswith("tiny-mllama-") and model.config.text_config.num_hidden_layers == 2


def test_lora_trains_language_and_projector_only(tiny: Path, tmp_path: Path) -> None:
    model, processor = load_vision_student(str(tiny), cache_dir=str(tmp_path), lora=LORA)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("multi_modal_projector" in n for n in trainable)
    assert any("cross_attn" in n for n in trainable) and any("self_attn" in n for n in trainable)
    assert not any("vision_model" in n for n in trainable)

    batch = _batch(processor)
    logits = _forward(model, batch)
    sums, counts = answer_logps(logits, batch["chosen_labels"])
    (-sums.sum()).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    # LoRA B starts at zero, so A gets no gradient yet; B of the projector does: the image reaches the loss.
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "multi_modal_projector.lora_B" in n)
    assert all(p.grad is None for n, p in model.named_parameters() if "vision_model" in n)


def test_lora_on_the_vision_tower_is_refused(tiny: Path, tmp_path: Path) -> None:
    vision_lora = peft.LoraConfig(r=4, target_modules=["q_proj", "fc1"])
    with pytest.raises(ValueError, match="vision tower"):
        load_vision_student(str(tiny), cache_dir=str(tmp_path), lora=vision_lora)


def test_missing_or_text_only_model_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a local directory"):
        load_vision_student(str(tmp_path / "nowhere"), cache_dir=str(tmp_path))
    from mint.student.tiny import build_tiny_llama

    text_only = build_tiny_llama(tmp_path / "llama", CORPUS)
    with pytest.raises(ValueError, match="image\\+text processor"):
        load_vision_student(str(text_only), cache_dir=str(tmp_path))


def test_encoded_pair_matches_the_processor_and_masks_the_prompt(tiny: Path, tmp_path: Path) -> None:
    model, processor = load_vision_student(str(tiny), cache_dir=str(tmp_path))
    pair = encode_vision_pair(
        processor, _image(0), PROMPT, CHOSEN, [{"role": "assistant", "content": REJECTED}], 128
    )
    # The prompt encodes exactly as the processor would encode it, image tensors included.
    text = processor.tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    reference = processor(images=[[_image(0)]], text=[text], return_tensors="pt")
    assert reference["input_ids"][0].tolist() == pair.prompt_ids
    assert torch.equal(reference["pixel_values"][0], pair.pixel_values)
    assert processor.tokenizer.decode(pair.chosen_ids).startswith(CHOSEN)

    batch = _batch(processor)
    prompt_length = batch["prompt_lengths"][0]
    assert (batch["chosen_labels"][0, :prompt_length] == -100).all()
    assert torch.equal(
        batch["cross_attention_mask"][0, :prompt_length, 0, 0],
        reference["cross_attention_mask"][0, :, 0, 0],
    )
    assert (batch["cross_attention_mask"][:, prompt_length:] == 1).all()  # answers see the image
    model.eval()
    with torch.no_grad():
        logits = _forward(model, batch)
        sums, counts = answer_logps(logits, batch["chosen_labels"])
        assert torch.isfinite(sums).all() and (sums < 0).all() and (counts > 0).all()
        # The image changes the answer's log-prob, and encoding it once gives the same logits.
        swapped = dict(batch, pixel_values=batch["pixel_values"].flip(0))
        assert not torch.allclose(_forward(model, swapped), logits)
        states = image_states(
            model, batch["pixel_values"], batch["aspect_ratio_ids"], batch["aspect_ratio_mask"]
        )
        reused = model(
            input_ids=batch["chosen_input_ids"],
            attention_mask=batch["chosen_attention_mask"],
            cross_attention_mask=batch["cross_attention_mask"],
            cross_attention_states=states,
            use_cache=False,
        ).logits
        assert torch.allclose(reused, logits, atol=1e-5)


def test_encoding_errors(tiny: Path, tmp_path: Path) -> None:
    _, processor = load_vision_student(str(tiny), cache_dir=str(tmp_path))
    text_prompt = [{"role": "user", "content": "Which tissue?"}]
    with pytest.raises(ValueError, match="exactly one <\\|image\\|>"):
        encode_vision_pair(processor, _image(0), text_prompt, CHOSEN, REJECTED, 128)
    with pytest.raises(ValueError, match="no room for an answer"):
        encode_vision_pair(processor, _image(0), PROMPT, CHOSEN, REJECTED, 8)
    with pytest.raises(ValueError, match="uint8"):
        encode_vision_pair(processor, _image(0).astype(float), PROMPT, CHOSEN, REJECTED, 128)


def test_adapter_reloads_with_identical_logits(tiny: Path, tmp_path: Path) -> None:
    model, processor = load_vision_student(str(tiny), cache_dir=str(tmp_path), lora=LORA)
    batch = _batch(processor)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # two steps, so that both LoRA matrices move away from their init
        sums, _ = answer_logps(_forward(model, batch), batch["chosen_labels"])
        (-sums.mean()).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(tmp_path / "adapter")
    reloaded, _ = load_vision_student(
        str(tiny), cache_dir=str(tmp_path), adapter_path=str(tmp_path / "adapter")
    )
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        assert torch.equal(_forward(model, batch), _forward(reloaded, batch))
        with reloaded.disable_adapter():  # the adapter did change the model
            assert not torch.allclose(_forward(reloaded, batch), _forward(model, batch))
        assert torch.equal(_forward(model, batch, "rejected"), _forward(reloaded, batch, "rejected"))


def test_qlora_4bit_step_on_cpu(tiny: Path, tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    quantization = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    model, processor = load_vision_student(
        str(tiny), cache_dir=str(tmp_path), lora=LORA, quantization=quantization, gradient_checkpointing=True
    )
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    batch = _batch(processor)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sums, _ = answer_logps(_forward(model, batch), batch["chosen_labels"])
    (-sums.mean()).backward()
    optimizer.step()
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any("language_model" in n for n in moved) and any("multi_modal_projector" in n for n in moved)


def test_lora_target_regex_matches_the_11b_module_names() -> None:
    import re

    # Module names of meta-llama/Llama-3.2-11B-Vision-Instruct under transformers 5.
    names = {
        "model.language_model.layers.3.cross_attn.q_proj": True,
        "model.language_model.layers.4.self_attn.o_proj": True,
        "model.language_model.layers.4.mlp.down_proj": True,
        "model.multi_modal_projector": True,
        "model.vision_model.transformer.layers.0.self_attn.q_proj": False,
        "model.vision_model.global_transformer.layers.0.mlp.fc1": False,
        "lm_head": False,
    }
    for name, expected in names.items():
        assert bool(re.fullmatch(LANGUAGE_AND_PROJECTOR_TARGETS, name)) is expected, name


def test_generate_from_processor_inputs(tiny: Path, tmp_path: Path) -> None:
    model, processor = load_vision_student(str(tiny), cache_dir=str(tmp_path), lora=LORA)
    model.eval()
    text = processor.tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[[_image(0)], [_image(1)]], text=[text, text], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1] :]
    assert new.shape == (2, 4) and (new < model.config.text_config.vocab_size).all()


def test_the_wide_tower_student_config_builds_the_tower_it_names(tmp_path: Path) -> None:
    """student=tiny_mllama_tower128: 8-pixel patches (64 per 64x64 image), width 128, 4 layers, frozen
    under LoRA, and an image reaches the text as one state per patch (plus the class token)."""
    from hydra.utils import instantiate

    from mint.cli import compose_config

    build = instantiate(compose_config(["task=tissue", "student=tiny_mllama_tower128"]).student.build)
    model, processor = load_vision_student(
        None, cache_dir=str(tmp_path), build=build, corpus=CORPUS, lora=LORA
    )
    vision = model.get_base_model().config.vision_config
    assert (vision.patch_size, vision.hidden_size, vision.num_hidden_layers, vision.attention_heads) == (
        8,
        128,
        4,
        4,
    )
    assert not any(p.requires_grad for n, p in model.named_parameters() if "vision_model" in n)
    batch = _batch(processor)
    states = image_states(model, batch["pixel_values"], batch["aspect_ratio_ids"], batch["aspect_ratio_mask"])
    assert states.shape[0] == 2 and 64 + 1 <= states.shape[1] < 64 + 8  # patches, class token, padding to 8
