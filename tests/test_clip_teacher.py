"""The tissue teachers: ClipTeacher through the stage, image-only prediction, the CLIP-checkpoint path."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer  # noqa: E402

from mint.data.task_data import SPLITS, Sample, TaskData, stratified_split  # noqa: E402
from mint.teacher.clip import ClipTeacher, PlipTeacher, clip_teacher, plip_teacher  # noqa: E402
from mint.teacher.crossfit import fit_teacher  # noqa: E402

N_CLASSES = 4
# One description per class (two wordings each): the text is a clean signal for the contrastive term.
WORDINGS = [
    ["Sparse small round nuclei.", "Few small rounded nuclei."],
    ["Crowded large nuclei with coarse chromatin.", "Tightly packed enlarged nuclei."],
    ["Spindle-shaped stromal nuclei in pink stroma.", "Elongated nuclei set in pink stroma."],
    ["Many inflammatory cells around open lumens.", "A prominent infiltrate between clear spaces."],
]
# A small narrow timm ResNet: the test is about wiring, not capacity.
BACKBONE: dict[str, Any] = {
    "image_backbone": "resnet10t",
    "backbone_kwargs": {"channels": (8, 16, 16, 32), "stem_width": 8},
}


def colour_task(per_class: int = 16, image_size: int = 16, seed: int = 0) -> TaskData:
    """4 classes, each a colour plus noise (a CNN learns it in a few steps) with a class wording."""
    rng = np.random.default_rng(seed)
    colours = np.array([[200, 60, 60], [60, 200, 60], [60, 60, 200], [200, 200, 60]])
    samples = []
    for label in range(N_CLASSES):
        for j in range(per_class):
            noise = rng.integers(-50, 50, size=(image_size, image_size, 3))
            image = np.clip(colours[label] + noise, 0, 255).astype(np.uint8)
            text = WORDINGS[label][j % 2]
            samples.append(Sample(id=f"c{label}_{j}", label=label, text=text, image=image))
    index = stratified_split([s.label for s in samples], (0.6, 0.2, 0.2), seed)
    return TaskData(
        "colours",
        [f"Tissue {c}" for c in range(N_CLASSES)],
        {s: [samples[i] for i in index[s]] for s in SPLITS},
    )


@pytest.fixture(scope="module")
def task() -> TaskData:
    return colour_task()


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models on 2 busy shared cores: a second torch thread mostly waits (measured ~20x slower)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_clip_teacher_learns_through_the_stage(task: TaskData, tmp_path: Path) -> None:
    make = partial(clip_teacher, image_size=16, embed_dim=32, lr=3e-3, **BACKBONE)
    result = fit_teacher(
        task,
        make_teacher=make,
        trainer_kwargs={"max_epochs": 6, "accelerator": "cpu"},
        batch_size=16,
        folds=2,
        k=2,
        out_dir=tmp_path / "teacher",
        seed=0,
        patience=6,
        fit_threads=1,
        n_boot=50,
    )
    for name in ("teacher.ckpt", "metrics.json", "labels.json", *(f"scores_{s}.npy" for s in SPLITS)):
        assert (tmp_path / "teacher" / name).exists(), name
    metrics = json.loads((tmp_path / "teacher" / "metrics.json").read_text())
    for key in ("teacher/test/top1", "teacher/test/topk", "teacher/train_oof/top1", "teacher/time/total_s"):
        assert key in metrics
    assert result.scores["train"].shape == (len(task.splits["train"]), N_CLASSES)
    # NaN scores would rank every label first and pass as perfect accuracy.
    assert all(np.isfinite(result.scores[split]).all() for split in SPLITS)
    # Chance is 0.25; colours are separable, so held-out top-1 should be far above it.
    assert metrics["teacher/test/top1"] >= 0.6
    assert metrics["teacher/train_oof/top1"] >= 0.5


def test_forward_needs_only_the_image(task: TaskData) -> None:
    teacher = clip_teacher(task, image_size=16, embed_dim=32, head=True, **BACKBONE).eval()
    data = teacher.make_dataset(task.splits["test"][:3])
    assert "text_emb" in data.columns  # training signal...
    with torch.no_grad():
        logits = teacher({"image": data.columns["image"]})  # ...that prediction never reads
    assert logits.shape == (3, N_CLASSES) and torch.isfinite(logits).all()
    # The image-only baseline does not embed the descriptions at all.
    baseline = clip_teacher(task, image_size=16, embed_dim=32, contrastive_weight=0.0, **BACKBONE)
    assert "text_emb" not in baseline.make_dataset(task.splits["test"][:3]).columns


@pytest.mark.filterwarnings("ignore:.*self.log.*:UserWarning")  # no Trainer attached: log is a no-op
def test_contrastive_loss_decreases_on_a_fixed_batch(task: TaskData) -> None:
    torch.manual_seed(0)
    # class_weight=0: the training loss is the contrastive term alone.
    teacher = clip_teacher(task, image_size=16, embed_dim=32, class_weight=0.0, augment=False, **BACKBONE)
    batch = teacher.make_dataset(task.splits["train"][:16]).columns
    optimizer = torch.optim.Adam(teacher.parameters(), lr=3e-3)
    teacher.train()
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = teacher.training_step(batch, 0)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0], losses


def _tiny_clip_dir(path: Path) -> Path:
    """A random tiny CLIPModel + an offline character-level CLIP tokenizer, saved like a hub checkpoint."""
    chars = sorted({c for c in "abcdefghijklmnopqrstuvwxyz0123456789&.,-"})
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:  # CLIP's BPE marks a word's last symbol with </w>; single characters need both forms
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    config = CLIPConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 64,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(path)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


@pytest.mark.parametrize("finetune", [False, True])
def test_plip_path_loads_a_saved_clip_and_scores_every_label(
    task: TaskData, tmp_path: Path, finetune: bool
) -> None:
    model_dir = _tiny_clip_dir(tmp_path / "tiny_clip")
    result = fit_teacher(
        task,
        make_teacher=partial(plip_teacher, model_path=str(model_dir), finetune=finetune, lr=1e-3),
        trainer_kwargs={"max_epochs": 2, "accelerator": "cpu"},
        batch_size=16,
        folds=2,
        k=2,
        out_dir=tmp_path / "teacher",
        seed=0,
        patience=1,
        fit_threads=1,
        n_boot=20,
    )
    for split in SPLITS:
        scores = result.scores[split]
        assert scores.shape == (len(task.splits[split]), N_CLASSES) and np.isfinite(scores).all()
    teacher = plip_teacher(task, model_path=str(model_dir), finetune=finetune)
    assert isinstance(teacher, PlipTeacher)
    # Zero-shot the only trainable weights are none; fine-tuned, the whole CLIP model trains.
    assert any(p.requires_grad for p in teacher.parameters()) == finetune


def test_missing_or_wrong_checkpoint_names_the_config_key(task: TaskData, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"teacher\.model\.model_path"):
        plip_teacher(task, model_path=str(tmp_path / "nowhere"))
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match=r"teacher\.model\.model_path.*not a CLIP checkpoint"):
        plip_teacher(task, model_path=str(tmp_path / "bert"))


def test_clip_teacher_rejects_untrainable_settings(task: TaskData) -> None:
    with pytest.raises(ValueError, match="not both 0"):
        ClipTeacher(labels=task.labels, contrastive_weight=0.0, class_weight=0.0, **BACKBONE)
    with pytest.raises(ValueError, match="head=True needs class_weight"):
        ClipTeacher(labels=task.labels, head=True, class_weight=0.0, **BACKBONE)
