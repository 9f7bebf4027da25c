"""The tissue teacher's pretraining corpus (captions, determinism, disjointness) and its wiring:
the pretrained tower is cached once, starts the task teacher, and zero-shot it is used as is."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from mint.data.task_data import SPLITS
from mint.data.tissue import TISSUES, simulate_tissue
from mint.data.tissue_corpus import (
    TISSUE_WORDS,
    check_corpus_disjoint,
    corpus_digests,
    image_digest,
    simulate_tissue_corpus,
)
from mint.leakage import LeakageError
from mint.stages.teacher import load_task, teacher_stage
from mint.teacher.clip import ClipTeacher
from mint.teacher.crossfit import load_state_dict

SMALL = {"train_per_tissue": 5, "image_size": 32}
TASK = {"n_per_tissue": 6, "image_size": 32}
# Small enough for a test: 6 captioned patches per tissue, 2 epochs, the smoke task.
PRETRAIN_OVERRIDES = (
    "task=tissue",
    "teacher=clip_pretrained",
    "debug=smoke",
    "stage=teacher",
    "task.source.n_per_tissue=6",
    "teacher.pretrain.scale=1.5",
    "teacher.trainer.max_epochs=2",
)


def test_every_caption_names_its_own_tissue_and_no_other() -> None:
    corpus = simulate_tissue_corpus(seed=5, **SMALL)
    words = {tissue: [re.escape(w) for w in TISSUE_WORDS[tissue]] for tissue in TISSUES}
    for samples in corpus.splits.values():
        for s in samples:
            text = s.text.casefold()
            named = [t for t in TISSUES if re.search(r"\b(" + "|".join(words[t]) + r")\b", text)]
            assert named == [TISSUES[s.label]], (s.id, s.text)
    wordings = {s.text.split(".")[0] for s in corpus.splits["train"]}
    assert len(wordings) > len(TISSUES)  # varied, not one sentence per tissue


def test_corpus_is_deterministic_and_has_no_test_split() -> None:
    a, b = simulate_tissue_corpus(seed=5, **SMALL), simulate_tissue_corpus(seed=5, **SMALL)
    assert a.fingerprint() == b.fingerprint()
    assert simulate_tissue_corpus(seed=6, **SMALL).fingerprint() != a.fingerprint()
    assert a.splits["test"] == [] and len(a.splits["val"]) == len(TISSUES)  # one val patch per tissue
    assert all(s.id.startswith("corpus-5-") for split in SPLITS for s in a.splits[split])


def test_corpus_pixels_are_the_simulators_under_the_corpus_seed() -> None:
    """Same simulator, own seed: the corpus with the task's seed would be the task's images."""
    corpus = simulate_tissue_corpus(seed=0, **SMALL)
    task = simulate_tissue(seed=0, **TASK)
    task_digests = {image_digest(s) for split in SPLITS for s in task.splits[split]}
    corpus_pixels = {image_digest(s) for split in SPLITS for s in corpus.splits[split]}
    assert corpus_pixels == task_digests


def test_a_corpus_sharing_a_task_image_is_refused_naming_the_split_and_key() -> None:
    task = simulate_tissue(seed=0, **TASK)
    check_corpus_disjoint(
        corpus_digests(simulate_tissue_corpus(seed=1000, **SMALL)), task
    )  # disjoint: passes
    with pytest.raises(LeakageError, match=r"tissue (train|val|test) sample .*teacher\.pretrain\.corpus"):
        check_corpus_disjoint(corpus_digests(simulate_tissue_corpus(seed=0, **SMALL)), task)


def test_the_stage_refuses_a_corpus_drawn_with_the_tasks_seed(make_cfg) -> None:
    # scale 1.25: 5 training + 1 val patches per tissue, the task's 6 per tissue under its seed.
    cfg = make_cfg(*PRETRAIN_OVERRIDES, "teacher.pretrain.corpus.seed=0", "teacher.pretrain.scale=1.25")
    with pytest.raises(LeakageError, match="is tissue (train|val|test) sample"):
        teacher_stage(cfg, load_task(cfg.task))


def test_pretraining_is_cached_once_for_all_seeds_and_starts_the_task_teacher(make_cfg, tmp_path) -> None:
    """Two run seeds, zero-shot and fine-tuned: one pretrained tower (its own cache entry).
    Zero-shot, the task teacher's weights are the pretrained ones, untouched, and its metrics
    carry the pretraining's; fine-tuned, they start there and move."""
    cache = tmp_path / "private_cache"
    results = []
    for seed, zero_shot in ((1, "true"), (2, "true"), (2, "false")):
        cfg = make_cfg(*PRETRAIN_OVERRIDES, f"seed={seed}", f"teacher.pretrain.zero_shot={zero_shot}")
        cfg.paths.cache_dir = str(cache)
        task = load_task(cfg.task)
        results.append(teacher_stage(cfg, task)[0])
    # scale=1.5: 1.5 corpus training images per task training image, rounded up per tissue
    per_tissue = math.ceil(1.5 * len(task.splits["train"]) / len(TISSUES))
    (entry,) = (cache / "teacher_pretrain").iterdir()  # zero-shot or fine-tuned: one tower
    assert len(list((cache / "teacher").iterdir())) == 3
    pretrained = load_state_dict(entry / "pretrained.ckpt")
    saved = json.loads((entry / "metrics.json").read_text())  # the pretraining's own record
    tuned = load_state_dict(results[2].checkpoint)
    moved = [name for name in pretrained if not torch.equal(tuned[name], pretrained[name])]
    assert any(name.startswith("cnn.") for name in moved)  # fine-tuning starts there and moves
    # ... and stays near it: each conv weight moved by about 1% of its norm (0.012 at most, seen);
    # a tower that ignored init_from would sit a fresh init away (relative distance 1.45, seen).
    convs = [
        n for n, w in pretrained.items() if n.startswith("cnn.") and n.endswith(".weight") and w.dim() > 1
    ]
    assert convs and all((tuned[n] - pretrained[n]).norm() < 0.3 * pretrained[n].norm() for n in convs)
    for result in results[:2]:
        weights = load_state_dict(result.checkpoint)
        assert weights.keys() == pretrained.keys()
        assert all(torch.equal(weights[name], pretrained[name]) for name in pretrained)
        assert result.metrics["teacher/pretrain/images"] == per_tissue * len(TISSUES)
        assert result.metrics["teacher/pretrain/top1"] == pytest.approx(saved["teacher/pretrain/top1"])


def test_zero_shot_without_a_pretrained_tower_is_refused() -> None:
    task = simulate_tissue(seed=0, **TASK)
    with pytest.raises(ValueError, match="init_from"):
        ClipTeacher(labels=task.labels, image_backbone="resnet10t", finetune=False)
