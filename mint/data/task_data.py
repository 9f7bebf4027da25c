"""What every task source hands to the teacher, the preference builder and evaluation.

A task source (simulated HPO patients, a GMDB-format folder, simulated nuclei,
PanNuke) returns one `TaskData`: the label set and three patient-level splits of
`Sample`s. The teacher sees every modality a sample has; the student sees only
its own (the note for rare_disease, the image for tissue).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SPLITS = ("train", "val", "test")


def spread_indices(size: int, wanted: int | None) -> list[int]:
    """`wanted` indices spread evenly over a split of `size` (all of them when None or more): a
    split is often grouped by class, and its first N samples would be a few classes only."""
    if wanted is None or wanted >= size:
        return list(range(size))
    return [i * size // wanted for i in range(wanted)]


@dataclass(frozen=True)
class Sample:
    id: str  # unique across all splits (a patient / image id)
    label: int  # index into TaskData.labels
    text: str = ""  # rare_disease: the clinical note; tissue: the morphology description
    vector: np.ndarray | None = None  # rare_disease: facial-gestalt embedding (float32 [D])
    image: np.ndarray | None = None  # uint8 [H, W, 3]: a nucleus patch or a facial photo
    meta: dict[str, Any] = field(default_factory=dict)  # age, sex, source file, fold, ...


@dataclass
class TaskData:
    name: str  # "rare_disease" | "tissue"
    labels: list[str]  # the candidate set, in a fixed order
    splits: dict[str, list[Sample]]  # "train" / "val" / "test"

    def __post_init__(self) -> None:
        if set(self.splits) != set(SPLITS):
            raise ValueError(f"TaskData {self.name!r}: splits must be {SPLITS}, got {sorted(self.splits)}")
        seen: set[str] = set()
        for split, samples in self.splits.items():
            for s in samples:
                if not 0 <= s.label < len(self.labels):
                    raise ValueError(
                        f"{self.name} {split} sample {s.id!r}: label {s.label} outside 0..{len(self.labels) - 1}"
                    )
                if s.id in seen:
                    raise ValueError(f"{self.name}: sample id {s.id!r} appears in more than one split")
                seen.add(s.id)

    def label_counts(self, split: str) -> dict[str, int]:
        counts = Counter(self.labels[s.label] for s in self.splits[split])
        return {name: counts.get(name, 0) for name in self.labels}

    def fingerprint(self) -> str:
        """sha256 over labels and every sample's content: the cache key of what is built from it."""
        h = hashlib.sha256(json.dumps({"name": self.name, "labels": self.labels}).encode())
        for split in SPLITS:
            for s in self.splits[split]:
                h.update(
                    json.dumps([split, s.id, s.label, s.text, s.meta], sort_keys=True, default=str).encode()
                )
                for array in (s.vector, s.image):
                    if array is not None:
                        h.update(np.ascontiguousarray(array).tobytes())
        return h.hexdigest()


def stratified_split(
    labels: list[int], fractions: tuple[float, float, float], seed: int
) -> dict[str, list[int]]:
    """Indices per split, stratified by label: each class is shuffled and cut by `fractions`.

    Deterministic for a seed. Every class with at least 3 members lands in all three splits.
    """
    if abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise ValueError(f"split fractions {fractions} must be >= 0 and sum to 1")
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    out: dict[str, list[int]] = {split: [] for split in SPLITS}
    for label in sorted(by_class):
        members = np.array(by_class[label])
        rng.shuffle(members)
        n = len(members)
        n_val = max(int(round(n * fractions[1])), 1 if n >= 3 and fractions[1] > 0 else 0)
        n_test = max(int(round(n * fractions[2])), 1 if n >= 3 and fractions[2] > 0 else 0)
        n_train = n - n_val - n_test
        out["train"] += members[:n_train].tolist()
        out["val"] += members[n_train : n_train + n_val].tolist()
        out["test"] += members[n_train + n_val :].tolist()
    return {split: sorted(idx) for split, idx in out.items()}
