"""Each disease label's OMIM entry and its HPO annotation profile: knowledge, never patients.

What the HPO-overlap ranker and the RAG knowledge base know about a disease, from the
ontology in `hpo3` alone. A label maps to its OMIM entry through the samples' metadata
(simulated tasks) or through its name (GMDB folders).
"""

from __future__ import annotations

import functools

from mint.data import hpo_sim
from mint.data.task_data import TaskData
from mint.names import normalize_name


@functools.cache
def _omim_by_name() -> dict[str, int]:
    """Normalised OMIM name (with and without subtype number) -> best-annotated OMIM id."""
    best: dict[str, tuple[int, int]] = {}
    for disease in hpo_sim.ontology().omim_diseases:
        size = sum(1 for t in disease.hpo if hpo_sim.is_phenotypic(t))
        for key in {
            normalize_name(disease.name, punctuation=""),
            normalize_name(hpo_sim.strip_subtype(disease.name), punctuation=""),
        }:
            if key not in best or (size, -int(disease.id)) > (best[key][0], -best[key][1]):
                best[key] = (size, int(disease.id))
    return {key: omim_id for key, (_, omim_id) in best.items()}


def disease_annotations(task: TaskData) -> dict[str, list[str]]:
    """Disease name -> names of its OMIM-annotated phenotypic-abnormality terms (sorted).

    The knowledge base of the overlap ranker and RAG: built from the ontology, never from
    patients. The OMIM entry comes from `meta["omim_id"]` (simulated tasks) or else from
    the label matched to an OMIM name, with or without its subtype number (GMDB folders).
    """
    omim_ids: dict[str, int] = {}
    for samples in task.splits.values():
        for s in samples:
            if "omim_id" in s.meta:
                omim_ids.setdefault(task.labels[s.label], int(s.meta["omim_id"]))
    by_name = _omim_by_name()
    missing = [
        label
        for label in task.labels
        if label not in omim_ids and normalize_name(label, punctuation="") not in by_name
    ]
    if missing:
        raise ValueError(f"{task.name}: no OMIM entry named like {missing[:5]} (of {len(missing)} labels)")
    out: dict[str, list[str]] = {}
    for label in task.labels:
        omim_id = omim_ids.get(label) or by_name[normalize_name(label, punctuation="")]
        out[label] = sorted(hpo_sim.term_name(t) for t in hpo_sim.omim_terms(omim_id))
    return out
