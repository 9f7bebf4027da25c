"""A simulated image-caption corpus for pretraining the tissue teacher, as PLIP was pretrained.

PLIP knows pathology from 208k image-caption pairs (OpenPath: pathologists' posts), not from
any one task's labels. This corpus plays that role for the simulated tissue task: patches drawn
by the same simulator (mint.data.tissue) under their own seed, each with a caption that names
the tissue in varied wording (organ, adjective, informal tag) and describes what the patch
shows. None of the task's samples is in it: its ids say `corpus-`, its seed differs from the
task's, and `check_corpus_disjoint` refuses a corpus that shares pixels with any task split.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mint.data.task_data import Sample, TaskData
from mint.data.tissue import TISSUES, simulate_tissue
from mint.files import sha256_hex
from mint.leakage import LeakageError

# How captions name each tissue: the label first, then what people also write.
TISSUE_WORDS: dict[str, list[str]] = {
    "Adrenal Glands": ["adrenal glands", "adrenal", "adrenal cortex"],
    "Bile Duct": ["bile duct", "biliary", "cholangiocyte-lined duct"],
    "Bladder": ["bladder", "urinary bladder", "urothelial"],
    "Breast": ["breast", "mammary", "breast parenchyma"],
    "Cervix": ["cervix", "cervical", "cervical epithelium"],
    "Colon": ["colon", "colonic", "large bowel"],
    "Esophagus": ["esophagus", "esophageal", "oesophageal"],
    "Head & Neck": ["head & neck", "head and neck", "oral mucosa"],
    "Kidney": ["kidney", "renal", "renal cortex"],
    "Liver": ["liver", "hepatic", "liver parenchyma"],
    "Lung": ["lung", "pulmonary", "lung parenchyma"],
    "Ovarian": ["ovarian", "ovary", "ovarian stroma"],
    "Pancreatic": ["pancreatic", "pancreas", "pancreatic parenchyma"],
    "Prostate": ["prostate", "prostatic", "prostate gland"],
    "Skin": ["skin", "cutaneous", "dermal"],
    "Stomach": ["stomach", "gastric", "gastric mucosa"],
    "Testis": ["testis", "testicular", "seminiferous"],
    "Thyroid": ["thyroid", "thyroid gland", "thyroidal"],
    "Uterus": ["uterus", "uterine", "endometrial"],
}
# A caption: the tissue named once ({tissue}), the morphology description ({description}).
CAPTION_TEMPLATES = [
    "H&E of {tissue} tissue. {description}",
    "{Tissue} section, H&E stain: {description}",
    "{description} Typical {tissue} histology.",
    "Nuclei in {tissue} tissue: {description}",
    "#pathology {tissue}. {description}",
    "{description} From a {tissue} biopsy.",
    "High-power view of {tissue}: {description}",
]


def caption(tissue: str, description: str, rng: np.random.Generator) -> str:
    """One caption naming `tissue` (a TISSUES label) in a random wording around `description`."""
    words = TISSUE_WORDS[tissue]
    name = words[rng.integers(len(words))]
    template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
    return template.format(tissue=name, Tissue=name[0].upper() + name[1:], description=description)


def simulate_tissue_corpus(
    *, train_per_tissue: int = 360, val_per_tissue: int | None = None, image_size: int = 64, seed: int = 1000
) -> TaskData:
    """Captioned patches: `train_per_tissue` to train on and `val_per_tissue` (default a tenth of
    the corpus, at least 1) that only decide when pretraining stops (zero-shot, on the tissue
    prompts). No test split; the task's own splits are never seen. Deterministic for a seed;
    use a seed no task uses."""
    val = max(1, round(train_per_tissue / 9)) if val_per_tissue is None else val_per_tissue
    if train_per_tissue < 1 or val < 1:
        raise ValueError(f"train_per_tissue={train_per_tissue} and val_per_tissue={val} must be >= 1")
    total = train_per_tissue + val
    drawn = simulate_tissue(
        n_per_tissue=total,
        image_size=image_size,
        seed=seed,
        split_fractions=(train_per_tissue / total, val / total, 0.0),
    )
    # Its own stream for the wording: the pixels do not move when the captions change.
    rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(5)[4])
    splits: dict[str, list[Sample]] = {}
    for split, samples in drawn.splits.items():
        splits[split] = [
            dataclasses.replace(
                s,
                id=s.id.replace("tissue-", "corpus-", 1),
                text=caption(TISSUES[s.label], s.text, rng),
            )
            for s in samples
        ]
    return TaskData(name="tissue_corpus", labels=list(TISSUES), splits=splits)


def image_digest(sample: Sample) -> str:
    return sha256_hex(np.ascontiguousarray(sample.image).tobytes())


def corpus_digests(corpus: TaskData) -> dict[str, str]:
    """Sample id -> pixel digest of every corpus sample: what the disjointness check needs,
    small enough to keep beside the pretrained tower so a cached run need not redraw the corpus."""
    return {s.id: image_digest(s) for samples in corpus.splits.values() for s in samples}


def check_corpus_disjoint(corpus: dict[str, str], task: TaskData) -> None:
    """Refuse a pretraining corpus (`corpus_digests`) that holds any task sample, by id or by pixels."""
    task_samples = {s.id: (split, s.id) for split, samples in task.splits.items() for s in samples}
    task_samples |= {
        image_digest(s): (split, s.id) for split, samples in task.splits.items() for s in samples
    }
    for sample_id, digest in corpus.items():
        found = task_samples.get(sample_id) or task_samples.get(digest)
        if found:
            raise LeakageError(
                f"teacher pretraining corpus sample {sample_id!r} is {task.name} {found[0]} sample {found[1]!r} "
                "(same id or same pixels): the corpus must be disjoint from every split of the task; "
                "give teacher.pretrain.corpus a seed the task does not use"
            )
