"""The teacher stage on synthetic TaskData made here: learning, fusion modes, cross-fitting, artifacts."""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from mint.data.task_data import SPLITS, Sample, TaskData, stratified_split  # noqa: E402
from mint.metrics import bootstrap_ci, mrr, ranking_metrics, ranks, topk_accuracy  # noqa: E402
from mint.sentence_encoder import TextEncoder, embed_frozen  # noqa: E402
from mint.teacher import FusionTeacher, TeacherModule, TeacherResult, fit_teacher, fusion_teacher  # noqa: E402
from mint.teacher.crossfit import DictDataset, stratified_folds  # noqa: E402

# Classes come in look-alike pairs (0,1), (2,3), (4,5) that share their note vocabulary:
# text alone cannot tell a pair apart (~50% top-1), the vector can.
PAIR_FINDINGS = [
    ["seizures", "developmental delay", "microcephaly", "hypotonia", "ataxia"],
    ["cleft palate", "micrognathia", "low-set ears", "hearing loss", "ptosis"],
    ["short stature", "brachydactyly", "scoliosis", "joint laxity", "clubfoot"],
]
N_CLASSES = 6


def synthetic_task(
    per_class: int = 20, seed: int = 0, vector_noise: float = 0.5, image_size: int | None = None
) -> TaskData:
    rng = np.random.default_rng(seed)
    centroids = rng.normal(size=(N_CLASSES, 16))
    colours = rng.integers(0, 256, size=(N_CLASSES, 3))
    samples = []
    for label in range(N_CLASSES):
        for j in range(per_class):
            findings = rng.choice(PAIR_FINDINGS[label // 2], size=3, replace=False)
            text = f"A {rng.integers(2, 15)} year old with {', '.join(findings)}."
            vector = (centroids[label] + vector_noise * rng.normal(size=16)).astype(np.float32)
            image = None
            if image_size is not None:  # a class colour plus noise: learnable by a CNN in a few steps
                noise = rng.integers(-40, 40, size=(image_size, image_size, 3))
                image = np.clip(colours[label] + noise, 0, 255).astype(np.uint8)
            samples.append(
                Sample(
                    id=f"s{label}_{j}",
                    label=label,
                    text=text,
                    vector=None if image_size else vector,
                    image=image,
                )
            )
    index = stratified_split([s.label for s in samples], (0.6, 0.2, 0.2), seed)
    splits = {split: [samples[i] for i in rows] for split, rows in index.items()}
    return TaskData("synthetic", [f"Disease {c}" for c in range(N_CLASSES)], splits)


@pytest.fixture(scope="module")
def task() -> TaskData:
    return synthetic_task()


def stage(
    task: TaskData,
    out_dir: Path,
    folds: int = 0,
    seed: int = 0,
    max_epochs: int = 25,
    fit_workers: int = 1,
    **teacher: Any,
) -> TeacherResult:
    make = partial(fusion_teacher, lr=3e-3, hidden_dim=64, **teacher)
    return fit_teacher(
        task,
        make_teacher=make,
        trainer_kwargs={"max_epochs": max_epochs, "accelerator": "cpu"},
        batch_size=32,
        folds=folds,
        k=3,
        out_dir=out_dir,
        seed=seed,
        fit_workers=fit_workers,
    )


def fit_small(task: TaskData, make_teacher: Any, out_dir: Path, **kwargs: Any) -> TeacherResult:
    """fit_teacher with the small settings the planted teachers below share (overridable)."""
    settings: dict[str, Any] = {
        "trainer_kwargs": {"max_epochs": 2, "accelerator": "cpu"},
        "batch_size": 16,
        "folds": 0,
        "k": 3,
        "seed": 0,
    }
    return fit_teacher(task, make_teacher=make_teacher, out_dir=out_dir, **(settings | kwargs))


# --- metrics -----------------------------------------------------------------


def test_metrics_against_hand_computed_values() -> None:
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.3, 0.1, 0.4], [0.2, 0.2, 0.2]])
    labels = np.array([1, 2, 0, 1])
    # ranks: 1; 3; 2 (0.4 beats it); 3 (a full tie counts against the prediction)
    assert ranks(scores, labels).tolist() == [1, 3, 2, 3]
    assert topk_accuracy(scores, labels, 1) == 0.25
    assert topk_accuracy(scores, labels, 2) == 0.5
    assert topk_accuracy(scores, labels, 3) == 1.0
    assert mrr(scores, labels) == pytest.approx((1 + 1 / 3 + 1 / 2 + 1 / 3) / 4)

    mean, low, high = bootstrap_ci(np.array([0.0, 1.0] * 50), n_boot=2000, seed=0)
    assert mean == 0.5 and 0.38 < low < 0.45 and 0.55 < high < 0.62  # ~ 0.5 ± 1.96 * 0.05
    assert bootstrap_ci(np.ones(10)) == (1.0, 1.0, 1.0)
    assert bootstrap_ci(np.arange(20.0), seed=3) == bootstrap_ci(np.arange(20.0), seed=3)

    out = ranking_metrics(scores, labels, k=2, prefix="teacher/test", n_boot=50)
    assert out["teacher/test/topk"] == 0.5 and {
        "teacher/test/top1_ci_low",
        "teacher/test/mrr_ci_high",
    } <= set(out)


def test_stratified_folds_are_balanced_and_deterministic() -> None:
    labels = [0] * 7 + [1] * 5 + [2] * 3
    folds = stratified_folds(labels, 3, seed=1)
    assert np.bincount(folds).tolist() == [5, 5, 5]
    for label in range(3):  # each class spread over the folds as evenly as it can be
        counts = np.bincount(folds[np.array(labels) == label], minlength=3)
        assert counts.max() - counts.min() <= 1
    assert (folds == stratified_folds(labels, 3, seed=1)).all()


# --- text tower ----------------------------------------------------------------


def test_text_encoder_embeds_each_text_once_and_caches_on_disk(tmp_path: Path) -> None:
    encoder = TextEncoder()
    texts = ["seizures and hypotonia", "cleft palate", "seizures and hypotonia"]
    calls: list[int] = []
    encoder.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    emb = encoder.embed(texts, cache_dir=tmp_path, progress=False)
    assert emb.shape == (3, 384) and calls == [2]  # the duplicate text is encoded once
    assert torch.allclose(emb[0], emb[2]) and torch.allclose(emb.norm(dim=-1), torch.ones(3))
    assert torch.allclose(emb[:2], encoder(texts[:2]).detach(), atol=1e-5)  # padding does not change it
    calls.clear()
    again = encoder.embed(texts, cache_dir=tmp_path, progress=False)
    assert calls == [] and torch.equal(again, emb)  # read back from the .npy cache
    assert torch.allclose(embed_frozen(texts, progress=False), emb, atol=1e-6)


def test_trainable_text_tower_gets_gradients() -> None:
    teacher = FusionTeacher(num_labels=3, modalities=["text"], text_trainable=True, hidden_dim=16)
    batch = {"text": ["seizures", "cleft palate"], "label": torch.tensor([0, 1])}
    teacher.train()
    loss = nn.functional.cross_entropy(teacher(batch), batch["label"])
    loss.backward()
    assert teacher.text_encoder is not None and teacher.text_encoder.model.training
    assert any(p.grad is not None for p in teacher.text_encoder.parameters())


# --- learning -------------------------------------------------------------------


@pytest.mark.parametrize("fusion", ["concat", "gated", "cross_attention"])
def test_each_fusion_learns(task: TaskData, tmp_path: Path, fusion: str) -> None:
    result = stage(task, tmp_path / fusion, fusion=fusion)
    # chance is 1/6; text alone tops out near 1/2 on these look-alike pairs
    assert result.metrics["teacher/test/top1"] >= 0.75, result.metrics


def test_multimodal_beats_text_only_when_the_text_is_ambiguous(task: TaskData, tmp_path: Path) -> None:
    both = stage(task, tmp_path / "both", modalities=["text", "image"]).metrics
    text = stage(task, tmp_path / "text", modalities=["text"]).metrics
    image = stage(task, tmp_path / "image", modalities=["image"]).metrics
    assert text["teacher/test/top1"] <= 0.65 and text["teacher/test/topk"] >= 0.9  # the pair, not the member
    assert both["teacher/test/top1"] >= text["teacher/test/top1"] + 0.2
    assert image["teacher/test/top1"] >= 0.5


def test_timm_image_path_fits_on_tiny_images(tmp_path: Path) -> None:
    task = synthetic_task(per_class=8, image_size=16)
    # timm's own tiny test network (0.4M parameters): the resnet18 default is the same code path.
    make = partial(fusion_teacher, modalities=["image"], image_backbone="test_resnet", image_size=32, lr=3e-3)
    result = fit_small(task, make, tmp_path / "cnn")
    assert result.scores["test"].shape == (len(task.splits["test"]), N_CLASSES)
    assert np.isfinite(result.scores["test"]).all()


# --- cross-fitting, artifacts, determinism ------------------------------------------


class IdMemoriser(TeacherModule):
    """A planted teacher that can only memorise: one free score row per sample id, no features."""

    def __init__(self, task: TaskData) -> None:
        super().__init__()
        ids = sorted(s.id for split in SPLITS for s in task.splits[split])
        self.slot = {sample_id: i for i, sample_id in enumerate(ids)}
        self.table = nn.Embedding(len(ids), len(task.labels))
        nn.init.normal_(self.table.weight, std=0.01)

    def make_dataset(self, samples: list[Sample]) -> DictDataset:
        return DictDataset(
            {
                "slot": torch.tensor([self.slot[s.id] for s in samples]),
                "label": torch.tensor([s.label for s in samples]),
            }
        )

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.table(batch["slot"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=5.0)


class BrokenTeacher(IdMemoriser):
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        raise RuntimeError("the teacher's loss went NaN")


def test_a_failing_fit_in_a_worker_fails_the_stage_and_leaves_nothing(task: TaskData, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="the teacher's loss went NaN"):
        fit_small(task, BrokenTeacher, tmp_path / "teacher", folds=3, fit_workers=2)
    assert list(tmp_path.iterdir()) == []  # neither the result nor its temp folder


def test_out_of_fold_rankings_are_not_in_sample(task: TaskData, tmp_path: Path) -> None:
    def run(folds: int) -> TeacherResult:
        return fit_small(
            task,
            IdMemoriser,
            tmp_path / f"folds{folds}",
            trainer_kwargs={"max_epochs": 15, "accelerator": "cpu"},
            folds=folds,
            patience=15,  # val is at chance for a memoriser: let it memorise train anyway
        )

    in_sample = run(folds=1).metrics["teacher/train_oof/top1"]
    out_of_fold = run(folds=4)
    assert in_sample >= 0.95  # memorised: this is what `chosen` would copy without cross-fitting
    assert out_of_fold.metrics["teacher/train_oof/top1"] <= 0.4  # chance is 1/6
    assert (np.abs(out_of_fold.scores["train"]).sum(axis=1) > 0).all()  # every row was scored


def test_artifacts_metrics_and_determinism(task: TaskData, tmp_path: Path) -> None:
    first = stage(task, tmp_path / "a", folds=2, seed=7, max_epochs=6)
    # The same fits two at a time in forked workers: the same scores, bit for bit.
    second = stage(task, tmp_path / "b", folds=2, seed=7, max_epochs=6, fit_workers=2)
    out = tmp_path / "a"
    for split in SPLITS:
        n = len(task.splits[split])
        scores = np.load(out / f"scores_{split}.npy")
        assert scores.shape == (n, N_CLASSES) and scores.dtype == np.float32
        assert json.loads((out / f"ids_{split}.json").read_text()) == [s.id for s in task.splits[split]]
        np.testing.assert_array_equal(first.scores[split], second.scores[split])
    assert json.loads((out / "labels.json").read_text()) == task.labels
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left
    metrics = json.loads((out / "metrics.json").read_text())
    for split in ("val", "test"):
        for name in ("top1", "topk", "mrr"):
            key = f"teacher/{split}/{name}"
            assert metrics[f"{key}_ci_low"] <= metrics[key] <= metrics[f"{key}_ci_high"]
    assert {"teacher/train_oof/top1", "teacher/time/total_s", "teacher/time/fits_s"} <= set(metrics)
    assert first.checkpoint.read_bytes() == second.checkpoint.read_bytes()

    ranked = first.ranked_labels("test", 0)
    assert sorted(ranked) == sorted(task.labels)
    assert ranked[0] == task.labels[int(first.scores["test"][0].argmax())]
    assert (first.ranked_indices("test")[:, 0] == first.scores["test"].argmax(axis=1)).all()

    # the checkpoint is the full-train teacher, reloadable on its own
    teacher = FusionTeacher.load_from_checkpoint(first.checkpoint, map_location="cpu").eval()
    with torch.inference_mode():
        batch = teacher.make_dataset(task.splits["test"]).columns
        np.testing.assert_allclose(teacher(batch).numpy(), first.scores["test"], atol=1e-5)
