"""Retrieval-augmented generation baseline (optim=rag): a knowledge base from the training side,
top-k retrieval with a similarity cutoff, retrieved passages inserted into the student's prompt."""

from mint.rag.knowledge import Passage, chunk_units, disease_profile_passages, training_image_passages
from mint.rag.retriever import Hit, KnowledgeBase, augment_prompt, retrieve
from mint.rag.stage import RagSettings, augment_prompts, check_no_leakage, knowledge_base, retrieve_for

__all__ = [
    "Hit",
    "KnowledgeBase",
    "Passage",
    "RagSettings",
    "augment_prompt",
    "augment_prompts",
    "check_no_leakage",
    "chunk_units",
    "disease_profile_passages",
    "knowledge_base",
    "retrieve",
    "retrieve_for",
    "training_image_passages",
]
