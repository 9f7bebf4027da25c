"""A decoding constraint for numbered answer lists: never write a name twice.

A weak student decoding greedily tends to name its most likely label again at later
positions of the list (`1. 'Breast'`, `2. 'Breast'`, ...): the later positions are
conditioned mostly on the answer's format, and greedy decoding takes the same arg-max each
time. `NoRepeatedNames` masks every next token that can only lead to a label already listed
in this answer, so the next-best label is written instead. It never adds a name, changes
the number of items or the header: whatever the student writes is still parsed and scored
as before (`mint.prefs.formats`). Greedy decoding stays deterministic.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from typing import Any

import torch
from transformers import LogitsProcessor

from mint.prefs.formats import match_label


class NoRepeatedNames(LogitsProcessor):
    """Masks tokens that would continue the current item towards a label the answer already lists.

    Items are lines `N. <quote>Name<quote>` (the answer format's). Inside an item, with the text
    written so far `partial`, a token is masked when `partial + token` is on the way to (or past)
    `<listed label><quote>` and on the way to no label not yet listed. Listed labels are the
    completed items matched to the label set as the metric matches them (difflib ratio >= 0.8).
    Works on decoded text, so it holds for any tokenizer whose single tokens decode to their text
    (byte-level BPE as in the tiny students, SmolLM2 and Llama 3).
    """

    def __init__(
        self,
        tokenizer: Any,
        labels: Sequence[str],
        prompt_length: int,
        quote: str = "'",
        known_names_only: bool = False,
    ):
        """`known_names_only`: inside an item, allow only tokens on the way to a label not yet
        listed (closed-set decoding), not merely forbid the listed ones."""
        self.known_names_only = known_names_only
        self.tokenizer = tokenizer
        self.labels = list(labels)
        self.prompt_length = prompt_length
        self.quote = quote
        q = re.escape(quote)
        self._open_item = re.compile(rf"^\s*\d{{1,3}}\s*[.)]\s*{q}(?P<partial>[^{q}\n]*)$")
        self._done_item = re.compile(rf"^\s*\d{{1,3}}\s*[.)]\s*{q}(?P<name>[^{q}\n]+){q}")
        pieces = [tokenizer.decode([i], skip_special_tokens=False) for i in range(len(tokenizer))]
        self._ids_by_piece: dict[str, list[int]] = {}
        for token_id, piece in enumerate(pieces):
            if piece:
                self._ids_by_piece.setdefault(piece, []).append(token_id)
        self._sorted_pieces = sorted(self._ids_by_piece)
        self._matched: dict[str, str | None] = {}  # written name -> label: difflib is slow, names repeat

    def _label(self, name: str) -> str | None:
        if name not in self._matched:
            self._matched[name] = match_label(name, self.labels)
        return self._matched[name]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for row in range(input_ids.shape[0]):
            text = self.tokenizer.decode(input_ids[row, self.prompt_length :], skip_special_tokens=True)
            allowed = self.allowed_tokens(text) if self.known_names_only else None
            if allowed:
                keep = scores[row, allowed].clone()
                scores[row] = -float("inf")
                scores[row, allowed] = keep
                continue
            banned = self.banned_tokens(text)
            if banned:
                # `banned` holds ids of the tokenizer; a model may have a few extra output rows.
                scores[row, [i for i in banned if i < scores.shape[1]]] = -float("inf")
        return scores

    def allowed_tokens(self, text: str) -> list[int]:
        """Inside an item: the token ids that keep it on the way to a label not yet listed
        (closing quote included). Empty outside an item, or when no such label is left."""
        *done_lines, current = text.split("\n")
        inside = self._open_item.match(current)
        if inside is None:
            return []
        partial = inside.group("partial")
        listed = {
            label
            for line in done_lines
            if (item := self._done_item.match(line)) is not None
            and (label := self._label(item.group("name").strip()))
        }
        allowed: set[int] = set()
        for label in self.labels:
            target = label + self.quote
            if label not in listed and target.startswith(partial):
                for piece in self._pieces_towards(target[len(partial) :]):
                    allowed.update(self._ids_by_piece[piece])
        return sorted(allowed)

    def banned_tokens(self, text: str) -> list[int]:
        """Token ids that, appended to the answer `text`, can only repeat a listed label."""
        *done_lines, current = text.split("\n")
        inside = self._open_item.match(current)
        if inside is None:
            return []
        partial = inside.group("partial")
        listed = set()
        for line in done_lines:
            item = self._done_item.match(line)
            if item is not None and (label := self._label(item.group("name").strip())):
                listed.add(label)
        if not listed:
            return []
        # What each label still needs after `partial`, closing quote included.
        rest_listed, rest_free = [], []
        for label in self.labels:
            target = label + self.quote
            if target.startswith(partial):
                (rest_listed if label in listed else rest_free).append(target[len(partial) :])
        banned: list[int] = []
        for rest in rest_listed:
            for piece in self._pieces_towards(rest):
                if not any(_compatible(piece, free) for free in rest_free):
                    banned.extend(self._ids_by_piece[piece])
        return banned

    def _pieces_towards(self, rest: str) -> set[str]:
        """Token texts compatible with `rest`: its prefixes, and pieces that write all of it and more."""
        found = {rest[:end] for end in range(1, len(rest) + 1) if rest[:end] in self._ids_by_piece}
        start = bisect.bisect_left(self._sorted_pieces, rest)
        for piece in self._sorted_pieces[start:]:
            if not piece.startswith(rest):
                break
            found.add(piece)
        return found


def _compatible(piece: str, rest: str) -> bool:
    return rest.startswith(piece) or piece.startswith(rest)
