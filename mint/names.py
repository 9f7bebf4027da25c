"""Label names compared loosely: case, punctuation and spacing do not count."""

from __future__ import annotations

import functools
import string


@functools.cache
def _table(punctuation: str) -> dict[int, str]:
    return str.maketrans(dict.fromkeys(string.punctuation, punctuation))


def normalize_name(name: str, punctuation: str = " ") -> str:
    """Lower-case, each ASCII punctuation mark replaced by `punctuation`, whitespace collapsed.

    'Smith-Lemli-Opitz syndrome' -> 'smith lemli opitz syndrome', or with `punctuation=""`
    'smithlemliopitz syndrome'. The default is how answers are matched to labels
    (`mint.prefs.formats.match_label`); `punctuation=""` is how OMIM names are looked up.
    """
    return " ".join(name.lower().translate(_table(punctuation)).split())
