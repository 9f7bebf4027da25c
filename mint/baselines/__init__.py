"""Reference rankers that need no training: the rows a learned method has to beat."""

from mint.baselines.hpo_overlap import TermOverlapRanker, evaluate_ranker, rank_by_term_overlap

__all__ = ["TermOverlapRanker", "evaluate_ranker", "rank_by_term_overlap"]
