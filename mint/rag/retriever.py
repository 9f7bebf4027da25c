"""The knowledge base on disk, top-k retrieval with a similarity cutoff, and prompt augmentation."""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mint.rag.knowledge import Passage


@dataclass
class KnowledgeBase:
    """Passages with one L2-normalised embedding each, and what they were built from.

    `modality` says how queries are embedded: "text" (MiniLM of the query text) or "image"
    (stain statistics of the query image, standardised with `feature_mean`/`feature_std`,
    which come from the training images). `source_ids` are every sample the builder read.
    """

    passages: list[Passage]
    embeddings: np.ndarray  # [N, D] float32, unit rows
    modality: str
    source_ids: list[str]
    feature_mean: np.ndarray | None = None
    feature_std: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.modality not in ("text", "image"):
            raise ValueError(f"knowledge base modality {self.modality!r}: expected 'text' or 'image'")
        if self.embeddings.shape[0] != len(self.passages):
            raise ValueError(f"{len(self.passages)} passages but {self.embeddings.shape[0]} embeddings")

    def save(self, folder: Path) -> None:
        with open(folder / "passages.jsonl", "w") as f:
            for passage in self.passages:
                f.write(json.dumps(asdict(passage), ensure_ascii=False) + "\n")
        np.save(folder / "embeddings.npy", self.embeddings)
        info = {"modality": self.modality, "source_ids": self.source_ids}
        (folder / "info.json").write_text(json.dumps(info, indent=1) + "\n")
        if self.feature_mean is not None:
            np.savez(folder / "feature_stats.npz", mean=self.feature_mean, std=self.feature_std)

    @classmethod
    def load(cls, folder: Path) -> KnowledgeBase:
        rows = [json.loads(line) for line in (folder / "passages.jsonl").read_text().splitlines()]
        info = json.loads((folder / "info.json").read_text())
        stats = np.load(folder / "feature_stats.npz") if (folder / "feature_stats.npz").exists() else None
        return cls(
            passages=[Passage(r["text"], r["label"], tuple(r["sample_ids"])) for r in rows],
            embeddings=np.load(folder / "embeddings.npy"),
            modality=info["modality"],
            source_ids=info["source_ids"],
            feature_mean=stats["mean"] if stats is not None else None,
            feature_std=stats["std"] if stats is not None else None,
        )

    def sample_ids(self) -> set[str]:
        """Every sample id the knowledge base was built from (for leakage checks)."""
        return set(self.source_ids) | {i for p in self.passages for i in p.sample_ids}


@dataclass(frozen=True)
class Hit:
    index: int  # into KnowledgeBase.passages
    score: float  # cosine similarity to the query


def retrieve(embeddings: np.ndarray, queries: np.ndarray, *, top_k: int, cutoff: float) -> list[list[Hit]]:
    """Per query, the `top_k` most similar passages whose cosine similarity is >= `cutoff`.

    Both arrays hold unit rows. Ties keep passage order (stable sort), so retrieval is
    deterministic. A query with no passage above the cutoff gets an empty list.
    """
    if top_k < 1:
        raise ValueError(f"optim.rag.top_k={top_k}: expected >= 1")
    if queries.shape[1] != embeddings.shape[1]:
        raise ValueError(f"query dim {queries.shape[1]} != knowledge base dim {embeddings.shape[1]}")
    similarity = queries @ embeddings.T  # [Q, N]
    hits = []
    for row in similarity:
        best = np.argsort(-row, kind="stable")[:top_k]
        hits.append([Hit(int(i), float(row[i])) for i in best if row[i] >= cutoff])
    return hits


def render_passages(passages: list[Passage]) -> str:
    return "\n".join(f"[{i}] {p.text}" for i, p in enumerate(passages, start=1))


def augment_prompt(
    messages: list[dict[str, Any]], passages: list[Passage], template: str
) -> list[dict[str, Any]]:
    """The prompt with the passages put into its user turn through `template`.

    `template` is a str.format string with `{passages}` (the numbered passages) and `{user}`
    (the original user text). Without passages the prompt is returned unchanged: a retriever
    that found nothing relevant adds nothing. Works for plain-text turns and for the vision
    chat format (the text part of the user turn is augmented, the image part kept).
    """
    missing = [name for name in ("{passages}", "{user}") if name not in template]
    if missing:
        raise ValueError(f"optim.rag.template must contain {missing}; got {template!r}")
    if not passages:
        return messages
    augmented = copy.deepcopy(messages)
    users = [m for m in augmented if m["role"] == "user"]
    if not users:
        raise ValueError("the prompt has no user turn to put the retrieved passages into")
    user = users[-1]
    context = render_passages(passages)
    if isinstance(user["content"], str):
        user["content"] = template.format(passages=context, user=user["content"])
        return augmented
    texts = [part for part in user["content"] if part.get("type") == "text"]
    if not texts:
        raise ValueError("the user turn has no text part to put the retrieved passages into")
    texts[-1]["text"] = template.format(passages=context, user=texts[-1]["text"])
    return augmented
