"""The answer formats of the two tasks, and a forgiving parser for what students write.

    POTENTIAL_DISEASES:            MOST_LIKELY_TISSUE:
    1. 'Disease one'               1. 'Breast'
    ...                            ...
    10. 'Disease ten'              5. 'Colon'

Rendering is exact (it makes `chosen`/`rejected`); parsing is lenient about what
a generated answer adds around the list (prose, missing header, bullets, quotes)
and strict about what counts as valid (the right number of distinct known
labels). Names are matched to the label set as in the paper: difflib ratio
>= 0.8 after lower-casing and turning punctuation into spaces (`mint.names`).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from mint.names import normalize_name

# "1. 'Name'", "1) Name", "- Name", "* 'Name'" — one answer line each.
_ITEM = re.compile(r"^\s*(?:\d{1,3}\s*[.):-]|[-*•])\s*(?P<name>.+?)\s*$")


def match_label(name: str, labels: list[str], threshold: float = 0.8) -> str | None:
    """The label most similar to `name` if its difflib ratio reaches `threshold`."""
    target = normalize_name(name)
    if not target:
        return None
    best, best_ratio = None, 0.0
    for label in labels:
        ratio = difflib.SequenceMatcher(None, target, normalize_name(label)).ratio()
        if ratio > best_ratio:
            best, best_ratio = label, ratio
    return best if best_ratio >= threshold else None


@dataclass(frozen=True)
class ParsedAnswer:
    items: list[str]  # the names as written, in order
    matched: list[str | None]  # each item mapped onto the label set (None: no label within the threshold)
    has_header: bool

    def ranked_labels(self) -> list[str]:
        """Distinct matched labels in the order given: what top-k metrics read."""
        seen: list[str] = []
        for label in self.matched:
            if label is not None and label not in seen:
                seen.append(label)
        return seen


@dataclass(frozen=True)
class AnswerFormat:
    header: str  # e.g. "POTENTIAL_DISEASES:"
    n: int  # how many names an answer lists
    quote: str = "'"

    def render(self, names: list[str]) -> str:
        if len(names) != self.n:
            raise ValueError(f"an answer lists {self.n} names, got {len(names)}")
        lines = [f"{rank}. {self.quote}{name}{self.quote}" for rank, name in enumerate(names, start=1)]
        return "\n".join([self.header, *lines])

    def parse(self, text: str, labels: list[str], threshold: float = 0.8) -> ParsedAnswer:
        """Reads the list after the header (or the first list in the text when the header is missing)."""
        # Found in the text itself, not in text.lower(): lower-casing can change a string's length
        # ("İ" becomes two characters), and an index into the lowered text would then be off.
        header = re.search(re.escape(self.header), text, flags=re.IGNORECASE)
        has_header = header is not None
        body = text[header.end() :] if header is not None else text
        items: list[str] = []
        for line in body.splitlines():
            found = _ITEM.match(line)
            if found is None:
                if items and line.strip():
                    break  # prose after the list ends it
                continue
            name = found.group("name").strip().strip("'\"`*").strip()
            if name:
                items.append(name)
        return ParsedAnswer(items, [match_label(i, labels, threshold) for i in items], has_header)

    def is_valid(self, parsed: ParsedAnswer) -> bool:
        """The paper's 'hallucination-free': exactly n items, each a distinct known label, under the header."""
        return (
            parsed.has_header
            and len(parsed.items) == self.n
            and None not in parsed.matched
            and len(set(parsed.matched)) == self.n
        )
