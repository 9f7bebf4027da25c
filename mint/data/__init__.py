"""Data sources and the preference-pair pipeline (read -> tokenize -> collate).

`mint.data.example_prefs` is not re-exported here: importing it from the package would make
`python -m mint.data.example_prefs` warn that the module was imported before it ran.
"""

from mint.data.preference import (
    PreferenceCollator,
    TokenizedPair,
    TruncationReport,
    pairs_to_texts,
    read_preference_rows,
    tokenize_preference_rows,
)

__all__ = [
    "PreferenceCollator",
    "TokenizedPair",
    "TruncationReport",
    "pairs_to_texts",
    "read_preference_rows",
    "tokenize_preference_rows",
]
