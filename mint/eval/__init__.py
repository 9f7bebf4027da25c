"""Evaluation of a student on the held-out split: generation, closed-set ranking, metrics.

Submodules are imported where used (`from mint.eval.ranking import score_candidates`), so
importing one does not pull in the others.
"""
