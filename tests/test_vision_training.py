"""The preference module trains a tiny Mllama vision student with ORPO, DPO and SFT on image + prompt pairs."""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import lightning as L
import numpy as np
import peft
import pytest
import torch
from torch.utils.data import DataLoader

from mint.config import Modality
from mint.optim.forward import answer_logps, sft_labels
from mint.optim.module import PreferenceModule
from mint.optim.reference import attach_reference_logps
from mint.pairs.packed import PackedPreferenceCollator
from mint.pairs.vision import (
    PackedVisionCollator,
    VisionPreferenceCollator,
    encode_vision_pair,
    vision_messages,
)
from mint.student.kinds import KINDS
from mint.student.vision import build_tiny_mllama, image_sides_logits, load_vision_student

IMAGE = KINDS[Modality.image]  # what a run with an image student uses

COLOURS = {"Red": (220, 30, 30), "Blue": (30, 30, 220)}
PROMPT = vision_messages("You name colours.", "Which colour is this image?")
CORPUS = [
    "You name colours.",
    "Which colour is this image?",
    "The colour is Red.",
    "The colour is Blue.",
] * 5
LORA = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0)


def _image(colour: str, seed: int) -> np.ndarray:
    # One flat colour plus a little noise, so that no two images are the same.
    noise = np.random.default_rng(seed).integers(-20, 21, (64, 64, 3))
    return np.clip(np.array(COLOURS[colour]) + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_mllama(tmp_path_factory.mktemp("tiny") / "mllama", CORPUS, text_layers=2)


def _pairs(processor, seeds=range(8)) -> list:
    """Four red and four blue images; chosen names the image's colour, rejected the other one."""
    pairs = []
    for seed in seeds:
        right, wrong = ("Red", "Blue") if seed % 2 == 0 else ("Blue", "Red")
        pairs.append(
            encode_vision_pair(
                processor,
                _image(right, seed),
                PROMPT,
                f"The colour is {right}.",
                f"The colour is {wrong}.",
                max_length=64,
            )
        )
    return pairs


def _module(model: torch.nn.Module, loss: str, **kwargs) -> PreferenceModule:
    optimizer = functools.partial(torch.optim.AdamW, lr=1e-2)
    return PreferenceModule(
        model, method=loss, beta=0.1, optimizer=optimizer, forward=IMAGE.sides_forward, **kwargs
    )


def _loss(module: PreferenceModule, batch: dict[str, torch.Tensor]) -> float:
    """The method's training loss on `batch`, without dropout or gradients."""
    with torch.no_grad():
        return module.compute_loss(batch)[0].item()


@pytest.mark.parametrize("method", ["orpo", "dpo", "sft"])
def test_training_on_images_ranks_the_right_answer_first_on_held_out_images_and_the_adapter_reloads(
    tiny: Path, tmp_path: Path, method: str
) -> None:
    torch.manual_seed(0)
    model, processor = load_vision_student(str(tiny), cache_dir=str(tmp_path), lora=LORA)
    pad = processor.tokenizer.pad_token_id
    pairs = _pairs(processor)
    collator = VisionPreferenceCollator(pad)
    if method == "dpo":
        collator = VisionPreferenceCollator(pad)
        pairs = attach_reference_logps(model, pairs, collator, batch_size=3, forward=IMAGE.sides_forward)
    everything = collator(pairs)
    module = _module(model, method)
    if method == "dpo":
        # The fresh adapter is the reference, so DPO starts at -log sigmoid(0).
        assert _loss(module, everything) == pytest.approx(math.log(2), abs=1e-4)
    before = _loss(module, everything)

    trainer = L.Trainer(
        max_steps=12,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(pairs, batch_size=4, shuffle=True, collate_fn=collator))
    module.train()  # the same loss as in training (SFT scores the chosen side only)
    # Every pair has the same prompt and half the pairs prefer each answer, so DPO can only
    # fall below log 2 (it went to about 0.57 in 12 steps) by telling the images apart.
    assert _loss(module, everything) < before

    model.eval()
    with torch.no_grad():
        logits = image_sides_logits(model, everything)
        # Held-out images (other noise): the prompt is the same for every pair and half the pairs
        # prefer each answer, so only a student that reads the image puts every chosen answer first.
        held_out = collator(_pairs(processor, seeds=range(100, 108)))
        chosen, rejected = answer_logps(
            image_sides_logits(model, held_out),
            torch.cat([held_out["chosen_labels"], held_out["rejected_labels"]]),
        )[0].chunk(2)
        assert (chosen > rejected).all(), (chosen - rejected).tolist()

    model.save_pretrained(tmp_path / "adapter")
    reloaded, _ = load_vision_student(
        str(tiny), cache_dir=str(tmp_path), adapter_path=str(tmp_path / "adapter")
    )
    reloaded.eval()
    with torch.no_grad():
        assert torch.equal(image_sides_logits(reloaded, everything), logits)


def test_encoding_the_image_once_equals_repeating_the_pixels(tiny: Path, tmp_path: Path) -> None:
    model, processor = load_vision_student(str(tiny), cache_dir=str(tmp_path), lora=LORA)
    model.eval()
    batch = VisionPreferenceCollator(processor.tokenizer.pad_token_id)(_pairs(processor)[:3])
    twice = lambda key: torch.cat([batch[key], batch[key]])  # noqa: E731
    with torch.no_grad():
        pixels = model(
            input_ids=torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]]),
            attention_mask=torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]]),
            pixel_values=twice("pixel_values"),
            aspect_ratio_ids=twice("aspect_ratio_ids"),
            aspect_ratio_mask=twice("aspect_ratio_mask"),
            cross_attention_mask=twice("cross_attention_mask"),
            use_cache=False,
        ).logits
        assert torch.allclose(image_sides_logits(model, batch), pixels, atol=1e-5)


def test_image_token_is_no_sft_target_and_packed_images_are_refused(tiny: Path, tmp_path: Path) -> None:
    model, processor = load_vision_student(str(tiny), cache_dir=str(tmp_path), lora=LORA)
    batch = VisionPreferenceCollator(processor.tokenizer.pad_token_id)(_pairs(processor)[:2])
    image_id = model.config.image_token_id
    vocab = model.config.text_config.vocab_size
    assert (batch["chosen_input_ids"] == image_id).any() and image_id >= vocab
    labels = sft_labels(batch, on_prompt=True, vocab_size=vocab)
    assert (labels[batch["chosen_input_ids"] == image_id] == -100).all()
    assert (labels[batch["chosen_attention_mask"].bool() & (batch["chosen_input_ids"] < vocab)] >= 0).all()

    # ORPO with the NLL on the prompt runs although the prompt holds <|image|>.
    loss, _ = _module(model, "orpo", sft_on_prompt=True).compute_loss(batch)
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="packed"):
        _module(model, "orpo", packed=True).compute_loss(batch)
    with pytest.raises(ValueError, match="VisionPreferenceCollator"):
        attach_reference_logps(model, _pairs(processor), PackedPreferenceCollator(0), batch_size=2)


@pytest.mark.parametrize("method", ["orpo", "dpo", "sft"])
def test_packed_image_pairs_give_the_unpacked_loss_and_gradients(tiny: Path, tmp_path: Path, method) -> None:
    """One row [prompt, chosen, rejected] per image pair (PackedVisionCollator): the method's loss,
    its metrics, DPO's reference log-probs and every trained weight's gradient (LoRA, cross-attention,
    projector; the random vision tower is frozen here, as by default) equal those of the two unpacked
    rows, within 1e-5 in float32."""
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False)
    model, processor = load_vision_student(str(tiny), cache_dir=str(tmp_path), lora=lora)
    model.eval()  # no dropout: both layouts see the same function
    pad = processor.tokenizer.pad_token_id
    # Answers of different lengths, so the packed rows' rejected parts start at different places.
    pairs = [
        dataclasses.replace(pair, chosen_ids=pair.chosen_ids + pair.chosen_ids[-2:] * (i % 3))
        for i, pair in enumerate(_pairs(processor, seeds=range(5)))
    ]
    unpacked, packed = VisionPreferenceCollator(pad), PackedVisionCollator(pad)
    items = {False: pairs, True: pairs}
    if method == "dpo":
        items = {
            False: attach_reference_logps(model, pairs, unpacked, 2, forward=IMAGE.sides_forward),
            True: attach_reference_logps(model, pairs, packed, 2, forward=IMAGE.sides_forward),
        }
        for a, b in zip(items[False], items[True], strict=True):
            assert abs(a["ref_chosen_logps"] - b["ref_chosen_logps"]) < 1e-5
            assert abs(a["ref_rejected_logps"] - b["ref_rejected_logps"]) < 1e-5
        # A reference other than the policy, so that DPO's gradient is not 0.
        items = {
            k: [{**it, "ref_chosen_logps": it["ref_chosen_logps"] - 0.5} for it in v]
            for k, v in items.items()
        }
    results = {}
    for is_packed, collator in ((False, unpacked), (True, packed)):
        batch = collator(items[is_packed])
        assert ("segment_ids" in batch) is is_packed and "cross_attention_mask" in batch
        module = _module(model, method, sft_on_prompt=True, rpo_alpha=0.5, packed=is_packed)
        module.train(method != "sft")  # SFT's validation loss: it compares both answers
        model.eval()
        model.zero_grad()
        loss, metrics = module.compute_loss(batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results[is_packed] = (loss.detach(), metrics, grads)
    (loss, metrics, grads), (packed_loss, packed_metrics, packed_grads) = results[False], results[True]
    torch.testing.assert_close(packed_loss, loss, atol=1e-5, rtol=0)
    assert packed_metrics.keys() == metrics.keys()
    for key, value in metrics.items():
        torch.testing.assert_close(packed_metrics[key], value, atol=1e-5, rtol=0, msg=key)
    assert packed_grads.keys() == grads.keys()
    assert grads[next(n for n in grads if "multi_modal_projector" in n)].abs().max() > 0  # the image counts
    for name, grad in grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_closed_set_scores_with_an_image_equal_the_training_forward(tiny: Path, tmp_path: Path) -> None:
    """Ranking candidates for an image scores each one as the training forward scores an answer."""
    import dataclasses

    model, processor = load_vision_student(str(tiny), cache_dir=str(tmp_path), lora=LORA)
    model.eval()
    pad = processor.tokenizer.pad_token_id
    pair = encode_vision_pair(processor, _image("Red", 0), PROMPT, "-", "-", max_length=64)
    candidates = [
        processor.tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("Red.", "Blue.", "A")
    ]
    scores = IMAGE.label_scores(model, processor, PROMPT, _image("Red", 0), candidates)
    for i, ids in enumerate(candidates):
        one = dataclasses.replace(pair, chosen_ids=ids, rejected_ids=ids)
        batch = VisionPreferenceCollator(pad)([one])
        with torch.no_grad():
            expected = answer_logps(
                image_sides_logits(model, batch, sides=("chosen",)), batch["chosen_labels"]
            )[0]
        assert scores[i].item() == pytest.approx(expected.item(), abs=1e-4)
    other = IMAGE.label_scores(model, processor, PROMPT, _image("Blue", 1), candidates)
    assert not torch.allclose(scores, other)  # the image is part of what is scored


@pytest.mark.parametrize("sft_on_prompt", [False, True])
def test_answer_only_logits_equal_full_logits_for_the_image_student(
    tiny: Path, tmp_path: Path, sft_on_prompt
):
    """The image student's forward runs its output layer at the labelled positions only; log-probs,
    NLL and LoRA gradients are those of the full-logits forward."""
    from mint.optim.forward import nll_from, sides_logps

    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False)
    model, processor = load_vision_student(str(tiny), cache_dir=str(tmp_path), lora=lora)
    model.eval()
    batch = VisionPreferenceCollator(processor.tokenizer.pad_token_id)(_pairs(processor)[:4])
    n = batch["chosen_input_ids"].shape[0]

    def grads(outputs):
        model.zero_grad()
        sums, nll = outputs
        (sums[:n].sum() - 0.5 * sums[n:].sum() + 2 * nll).backward()
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}

    logits = image_sides_logits(model, batch)
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    full = (
        answer_logps(logits, labels)[0],
        nll_from(logits, sft_labels(batch, sft_on_prompt, logits.shape[-1])),
    )
    full_grads = grads(full)
    sums, _, nll = sides_logps(model, batch, IMAGE.sides_forward, ("chosen", "rejected"), sft_on_prompt)
    kept_grads = grads((sums, nll))
    torch.testing.assert_close(sums, full[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(nll, full[1], atol=1e-5, rtol=0)
    assert kept_grads.keys() == full_grads.keys() and kept_grads
    for name, grad in full_grads.items():
        torch.testing.assert_close(kept_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
