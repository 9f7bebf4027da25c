"""A knowledge-based rare-disease ranker: HPO terms found in the note vs each disease's annotations.

A reference, not a method under test: `rare_disease_data.py` uses it to calibrate the
simulated task (the defaults keep it far from perfect) and for the README's knowledge-only
row. No run of `mint.run` uses it.

What phenotype-only tools do, in its plainest form:
1. find HPO findings in the note: exact phrase matches (word boundaries, plural "s" folded)
   of each candidate term's name and wordings (`hpo_sim.wordings`), skipping sentences with
   a negation cue ("no", "not", "without", "denies": pertinent negatives are not findings);
2. score each disease by the information content (OMIM IC) summed over the found terms that
   lie in its annotations' closure: an annotated term or an ancestor of one (the true-path
   rule, so "abnormal eye morphology" still counts for a disease annotated with hypertelorism),
   divided by the square root of the closure's total IC, so that a disease is not favoured
   merely for having many annotations: the cosine between sqrt(IC)-weighted indicator
   vectors of note and disease, up to a per-note constant. (An unnormalised sum scored
   0.28 vs 0.30 top-1 at 30 diseases and 0.10 vs 0.21 at 100 on the default simulation.);
3. rank by score, ties in the order of `annotations`.

It reads only the note text: `Sample.meta` holds the simulated truth and is never touched.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from mint.data import hpo_sim
from mint.data.omim import disease_annotations
from mint.data.task_data import Sample, TaskData

_NEGATION = re.compile(r"\b(no|not|without|denies|negative)\b")
_SENTENCE_END = re.compile(r"(?<=[.;!?])\s+")


def _tokens(text: str) -> tuple[str, ...]:
    """Lower-case words, hyphens split, a plural "s" folded ("seizures" == "seizure")."""
    words = re.sub(r"[^\w\s]", " ", text.lower().replace("-", " ")).split()
    return tuple(
        w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith(("ss", "us", "is")) else w for w in words
    )


class TermOverlapRanker:
    """Built once per knowledge base; `rank(text)` is then cheap."""

    def __init__(self, annotations: Mapping[str, list[str]]) -> None:
        self.diseases = list(annotations)
        self.closures = [
            hpo_sim.closure([hpo_sim.term_by_name(n) for n in names]) for names in annotations.values()
        ]
        self.norms = [math.sqrt(sum(hpo_sim.information_content(t) for t in c)) or 1.0 for c in self.closures]
        # phrase tokens grouped by first token: a note is scanned once, word by word
        self.phrases: dict[str, list[tuple[tuple[str, ...], int]]] = {}
        for term in sorted(set().union(*self.closures)):
            for wording in hpo_sim.wordings(term):
                tokens = _tokens(wording)
                if tokens:
                    self.phrases.setdefault(tokens[0], []).append((tokens, term))

    def findings(self, text: str) -> set[int]:
        """HPO ids stated (not negated) in the note."""
        found: set[int] = set()
        for sentence in _SENTENCE_END.split(text):
            if _NEGATION.search(sentence.lower()):
                continue
            words = _tokens(sentence)
            for i, word in enumerate(words):
                for tokens, term in self.phrases.get(word, ()):
                    if words[i : i + len(tokens)] == tokens:
                        found.add(term)
        return found

    def scores(self, text: str) -> list[float]:
        found = self.findings(text)
        return [
            sum(hpo_sim.information_content(t) for t in found & closure) / norm
            for closure, norm in zip(self.closures, self.norms, strict=True)
        ]

    def rank(self, text: str) -> list[str]:
        scores = self.scores(text)
        order = sorted(range(len(self.diseases)), key=lambda i: -scores[i])
        return [self.diseases[i] for i in order]


def rank_by_term_overlap(note_or_sample: str | Sample, annotations: Mapping[str, list[str]]) -> list[str]:
    """All disease names of `annotations`, best first, from the note text alone."""
    text = note_or_sample.text if isinstance(note_or_sample, Sample) else note_or_sample
    return TermOverlapRanker(annotations).rank(text)


def evaluate_ranker(
    task: TaskData, split: str, k: int = 10, *, annotations: Mapping[str, list[str]] | None = None
) -> dict[str, float]:
    """Top-1 and top-k accuracy of the overlap ranker on one split (knowledge base:
    `disease_annotations(task)` unless given)."""
    ranker = TermOverlapRanker(annotations if annotations is not None else disease_annotations(task))
    samples = task.splits[split]
    hits1 = hitsk = 0
    for sample in samples:
        ranking = ranker.rank(sample.text)
        truth = task.labels[sample.label]
        hits1 += ranking[0] == truth
        hitsk += truth in ranking[:k]
    n = max(len(samples), 1)
    return {"top1": hits1 / n, "topk": hitsk / n}
