"""The RAG knowledge base's passages, built from the training side of a task only.

- rare_disease: each candidate disease's HPO annotation profile (its OMIM-annotated
  phenotypic-abnormality terms, from the ontology in `hpo3`), rendered as text
  "<disease>: <term>, <term>, ..." and cut into chunks on term boundaries. The builder
  reads only the training split (to map labels to OMIM entries); no note is used.
- tissue: one passage per training image, "A training image of <tissue> tissue:
  <its morphology description>". The description alone never names the tissue, so the
  passage carries the image's training label: that label is the knowledge retrieved.

Every passage records the sample ids it was built from, so a leakage check can prove
that no validation or test sample is in the knowledge base.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mint.data.omim import disease_annotations
from mint.data.task_data import SPLITS, TaskData


@dataclass(frozen=True)
class Passage:
    text: str  # what goes into the prompt
    label: str  # the label the passage is about (a disease, a training image's tissue)
    sample_ids: tuple[str, ...] = ()  # the training samples whose content it holds (none: ontology knowledge)


def training_view(task: TaskData) -> TaskData:
    """The task with its validation and test splits emptied: what a knowledge base may read."""
    return TaskData(task.name, task.labels, {split: [] for split in SPLITS} | {"train": task.splits["train"]})


def chunk_units(
    units: Sequence[str],
    *,
    prefix: str,
    joiner: str,
    count_tokens: Callable[[str], int],
    max_tokens: int,
    overlap_tokens: int,
) -> list[str]:
    """`prefix` + units joined by `joiner`, cut into chunks of at most `max_tokens` tokens.

    Chunks break between units (a term, a word), never inside one, so every chunk reads as
    text. Each chunk after the first starts with the previous chunk's last units, up to
    `overlap_tokens` of them, so a finding near a border is seen whole by one chunk. A unit
    too long for a chunk on its own becomes a chunk of its own (the encoder truncates it).
    """
    if max_tokens <= count_tokens(prefix):
        raise ValueError(f"optim.rag.chunk_tokens={max_tokens} leaves no room after the prefix {prefix!r}")
    if not 0 <= overlap_tokens < max_tokens:
        raise ValueError(f"optim.rag.chunk_overlap={overlap_tokens}: expected 0 <= overlap < chunk_tokens")
    chunks: list[str] = []
    start = 0
    while start < len(units):
        end = start + 1  # at least one unit per chunk
        while end < len(units) and count_tokens(prefix + joiner.join(units[start : end + 1])) <= max_tokens:
            end += 1
        chunks.append(prefix + joiner.join(units[start:end]))
        if end == len(units):
            break
        # step back over the tail units that fit in the overlap, but always move forward
        back = end
        while back - 1 > start and count_tokens(joiner.join(units[back - 1 : end])) <= overlap_tokens:
            back -= 1
        start = back
    return chunks


def disease_profile_passages(
    task: TaskData, count_tokens: Callable[[str], int], max_tokens: int, overlap_tokens: int
) -> list[Passage]:
    """rare_disease: every label's HPO annotation profile as text chunks (ontology knowledge)."""
    # The builder reads the training samples only to map labels to OMIM entries.
    annotations = disease_annotations(training_view(task))
    passages = []
    for disease, terms in annotations.items():
        for chunk in chunk_units(
            terms,
            prefix=f"{disease}: ",
            joiner=", ",
            count_tokens=count_tokens,
            max_tokens=max_tokens,
            overlap_tokens=overlap_tokens,
        ):
            passages.append(Passage(text=chunk + ".", label=disease))
    return passages


def training_image_passages(
    task: TaskData, count_tokens: Callable[[str], int], max_tokens: int, overlap_tokens: int
) -> list[Passage]:
    """tissue: one passage (or a few chunks, for a long description) per training image."""
    passages = []
    for sample in training_view(task).splits["train"]:
        if sample.image is None:
            raise ValueError(f"{task.name} training sample {sample.id!r} has no image to retrieve it by")
        label = task.labels[sample.label]
        for chunk in chunk_units(
            sample.text.split(),
            prefix=f"A training image of {label} tissue: ",
            joiner=" ",
            count_tokens=count_tokens,
            max_tokens=max_tokens,
            overlap_tokens=overlap_tokens,
        ):
            passages.append(Passage(text=chunk, label=label, sample_ids=(sample.id,)))
    return passages
