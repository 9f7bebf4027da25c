"""optim=rag: build (or reuse) the task's knowledge base, retrieve for each prompt, augment it.

No training happens: the student is the base model, as with optim=none; only its prompts
change. The knowledge base goes through the stage cache (mint.cache), keyed by the data's
fingerprint and the settings that shape it (chunking, encoder length, embedding kind), so
every RAG run on the same data reuses one. Top-k, cutoff and template act at query time and
are not part of the key.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from mint.cache import cached
from mint.data.task_data import Sample, TaskData
from mint.leakage import check_disjoint, held_out_ids
from mint.rag.embed import embed_images, embed_texts, stain_features, text_token_counter
from mint.rag.knowledge import disease_profile_passages, training_image_passages
from mint.rag.retriever import Hit, KnowledgeBase, augment_prompt, retrieve

log = logging.getLogger("mint")
LAYOUT = 1  # bump when the entry's files or their meaning change


@dataclass(frozen=True)
class RagSettings:
    top_k: int
    text_cutoff: float  # MiniLM cosine similarity (query note vs passage)
    image_cutoff: float  # stain-statistics cosine similarity (query image vs training image)
    chunk_tokens: int  # MiniLM tokens per chunk, the disease name included
    chunk_overlap: int
    text_max_length: int  # MiniLM's input length for passages and queries
    template: str  # with {passages} and {user}

    @classmethod
    def from_config(cls, node: DictConfig | None) -> RagSettings:
        if node is None:
            raise ValueError(
                "optim=rag needs optim.rag (top_k, cutoffs, chunking, template); see conf/optim/rag.yaml"
            )
        settings = cls(**{name: node[name] for name in cls.__dataclass_fields__})
        if settings.chunk_tokens > settings.text_max_length - 2:  # [CLS] and [SEP]
            raise ValueError(
                f"optim.rag.chunk_tokens={settings.chunk_tokens} exceeds optim.rag.text_max_length="
                f"{settings.text_max_length} - 2: MiniLM would cut every chunk"
            )
        return settings


def _build(task: TaskData, settings: RagSettings) -> KnowledgeBase:
    count = text_token_counter(settings.text_max_length)
    chunking = dict(
        count_tokens=count, max_tokens=settings.chunk_tokens, overlap_tokens=settings.chunk_overlap
    )
    train = task.splits["train"]
    if task.name == "rare_disease":
        passages = disease_profile_passages(task, **chunking)
        embeddings = embed_texts([p.text for p in passages], max_length=settings.text_max_length)
        return KnowledgeBase(passages, embeddings, "text", source_ids=[s.id for s in train])
    if task.name == "tissue":
        passages = training_image_passages(task, **chunking)
        by_id = {s.id: s for s in train}
        features = stain_features([s.image for s in train])
        mean, std = features.mean(axis=0), features.std(axis=0) + 1e-6
        embedded = dict(zip(by_id, embed_images([s.image for s in train], mean, std), strict=True))
        embeddings = np.stack([embedded[p.sample_ids[0]] for p in passages])
        return KnowledgeBase(passages, embeddings, "image", [s.id for s in train], mean, std)
    raise ValueError(
        f"optim=rag has no knowledge base for task {task.name!r}: expected rare_disease or tissue"
    )


def check_no_leakage(kb: KnowledgeBase, task: TaskData) -> None:
    """Stop (mint.leakage.LeakageError) when any validation or test sample went into the knowledge base."""
    check_disjoint("RAG knowledge base", kb.sample_ids(), held_out_ids(task))


def knowledge_base(task: TaskData, settings: RagSettings, cache_dir: Path) -> KnowledgeBase:
    """The task's knowledge base from the stage cache (built on first use), checked for leakage."""
    key = {
        "layout": LAYOUT,
        "data": task.fingerprint(),
        "task": task.name,
        "chunk_tokens": settings.chunk_tokens,
        "chunk_overlap": settings.chunk_overlap,
        "text_max_length": settings.text_max_length,
        "text_encoder": "all-MiniLM-L6-v2",
        "image_embedding": "stain_statistics",
    }
    entry = cached(Path(cache_dir), "rag", key, lambda folder: _build(task, settings).save(folder))
    kb = KnowledgeBase.load(entry)
    check_no_leakage(kb, task)
    log.info("rag: %d passages (%s retrieval) from %s", len(kb.passages), kb.modality, entry)
    return kb


def retrieve_for(
    kb: KnowledgeBase, samples: list[Sample], settings: RagSettings, embed_cache_dir: Path | None = None
) -> list[list[Hit]]:
    """The hits for each sample, queried with what the student sees (the note or the image)."""
    if kb.modality == "text":
        queries = embed_texts(
            [s.text for s in samples], max_length=settings.text_max_length, cache_dir=embed_cache_dir
        )
        cutoff = settings.text_cutoff
    else:
        queries = embed_images([s.image for s in samples], kb.feature_mean, kb.feature_std)
        cutoff = settings.image_cutoff
    return retrieve(kb.embeddings, queries, top_k=settings.top_k, cutoff=cutoff)


def augment_prompts(
    kb: KnowledgeBase,
    samples: list[Sample],
    prompts: list[list[dict[str, Any]]],
    settings: RagSettings,
    embed_cache_dir: Path | None = None,
) -> tuple[list[list[dict[str, Any]]], list[list[dict[str, Any]]]]:
    """(augmented prompts, per sample the retrieved passages with their scores for predictions.jsonl)."""
    hits = retrieve_for(kb, samples, settings, embed_cache_dir)
    augmented = [
        augment_prompt(prompt, [kb.passages[h.index] for h in row], settings.template)
        for prompt, row in zip(prompts, hits, strict=True)
    ]
    records = [
        [{"passage": h.index, "label": kb.passages[h.index].label, "score": round(h.score, 4)} for h in row]
        for row in hits
    ]
    return augmented, records
