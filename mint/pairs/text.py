"""Text preference pairs: tokenize rows with safe truncation, and the unpacked collator.

Tokenizing and collating are separate steps so that DPO's reference log-probs can be attached
to the tokenized pairs before collation. The packed layout (one row per pair) is in
`mint.pairs.packed`; image pairs are in `mint.pairs.vision`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

log = logging.getLogger("mint.pairs")
SIDES = ("chosen", "rejected")  # the two answers of a pair, in the order every batch stacks them


def as_item(pair: Any) -> dict[str, Any]:
    """A pair dataclass as a dict of its fields (shallow: token lists and tensors are shared), or
    the dict it already is (a pair with DPO's reference log-probs attached)."""
    if dataclasses.is_dataclass(pair):
        return {f.name: getattr(pair, f.name) for f in dataclasses.fields(pair)}
    return pair


@dataclass(frozen=True)
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]  # answer tokens only, ending with the template's end-of-turn (or eos)
    rejected_ids: list[int]


@dataclass(frozen=True)
class TruncationReport:
    total: int
    kept: int
    prompt_truncated: int  # kept rows whose prompt was cut to max_prompt_length
    answer_truncated: int  # kept rows with at least one answer cut to fit max_length
    dropped: int  # rows whose chosen and rejected ids are identical once truncated


def tokenize_preference_rows(
    rows: Sequence[dict],
    tokenizer: Any,
    *,
    max_length: int,
    max_prompt_length: int,
    prompt_truncation: Literal["keep_end", "keep_start"] = "keep_end",
) -> tuple[list[TokenizedPair], TruncationReport]:
    """Tokenize validated rows so that prompt + each answer fits `max_length` and no answer is empty."""
    if not 0 < max_prompt_length < max_length:
        raise ValueError(
            f"task.max_prompt_length ({max_prompt_length}) must be > 0 and < task.max_length ({max_length})"
        )
    if prompt_truncation not in ("keep_end", "keep_start"):
        raise ValueError(f"prompt_truncation must be 'keep_end' or 'keep_start', not {prompt_truncation!r}")

    prompts, chosens, rejecteds = _encode(rows, tokenizer)
    bos = tokenizer.bos_token_id
    pairs: list[TokenizedPair] = []
    prompt_cut = answer_cut = dropped = 0
    for prompt, chosen, rejected in zip(prompts, chosens, rejecteds, strict=True):
        if bos is not None and prompt[:2] == [bos, bos]:  # template text and tokenizer both added BOS
            prompt = prompt[1:]
        cut_p = cut_a = False
        if len(prompt) + max(len(chosen), len(rejected)) > max_length:
            if len(prompt) > max_prompt_length:
                keep_end = prompt_truncation == "keep_end"
                prompt = prompt[-max_prompt_length:] if keep_end else prompt[:max_prompt_length]
                cut_p = True
            # >= 1 because the prompt is now at most max_prompt_length < max_length: no answer is emptied.
            budget = max_length - len(prompt)
            cut_a = len(chosen) > budget or len(rejected) > budget
            chosen, rejected = chosen[:budget], rejected[:budget]
        if chosen == rejected:  # answers that only differ past the cut carry no preference signal
            dropped += 1
            continue
        prompt_cut += cut_p
        answer_cut += cut_a
        pairs.append(TokenizedPair(prompt, chosen, rejected))

    report = TruncationReport(len(rows), len(pairs), prompt_cut, answer_cut, dropped)
    if dropped or prompt_cut or answer_cut:
        log.warning(
            "Preference tokenization of %d rows: %d dropped (chosen and rejected identical once truncated), "
            "%d prompts cut to task.max_prompt_length=%d (%s), %d rows with answers cut to fit task.max_length=%d",
            report.total,
            dropped,
            prompt_cut,
            max_prompt_length,
            prompt_truncation,
            answer_cut,
            max_length,
        )
    if not pairs:
        raise ValueError(f"no preference pair left after truncation to task.max_length={max_length}")
    return pairs, report


def _encode(rows: Sequence[dict], tokenizer: Any) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """Token ids of prompts and answers, one batched tokenizer call each."""
    if not rows:
        raise ValueError("no preference rows to tokenize")
    if isinstance(rows[0]["prompt"], list):
        if tokenizer.chat_template is None:
            raise ValueError(
                "the rows are conversational but the tokenizer has no chat template; "
                "set tokenizer.chat_template or use standard (string) rows"
            )
        prompt_texts, chosen_texts, rejected_texts = [], [], []
        for row in rows:
            prompt_text = tokenizer.apply_chat_template(
                row["prompt"], add_generation_prompt=True, tokenize=False
            )
            prompt_texts.append(prompt_text)
            chosen_texts.append(_answer_text(tokenizer, row["prompt"], row["chosen"], prompt_text))
            rejected_texts.append(_answer_text(tokenizer, row["prompt"], row["rejected"], prompt_text))
        # The template text already holds every special token (BOS included) it wants.
        prompts = tokenizer(prompt_texts, add_special_tokens=False)["input_ids"]
        return prompts, _ids(tokenizer, chosen_texts), _ids(tokenizer, rejected_texts)

    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("standard (string) rows need a tokenizer with an eos token to end each answer")
    prompts = tokenizer([row["prompt"] for row in rows], add_special_tokens=True)["input_ids"]
    chosens = [ids + [eos] for ids in _ids(tokenizer, [row["chosen"] for row in rows])]
    rejecteds = [ids + [eos] for ids in _ids(tokenizer, [row["rejected"] for row in rows])]
    return prompts, chosens, rejecteds


def _answer_text(tokenizer: Any, prompt: list[dict], answer: list[dict], prompt_text: str) -> str:
    full_text = tokenizer.apply_chat_template(prompt + answer, tokenize=False)
    if not full_text.startswith(prompt_text):
        raise ValueError(
            "the chat template is not prefix-stable: rendering prompt + answer does not start with the "
            f"rendered prompt (with add_generation_prompt=True).\nprompt: {prompt_text!r}\nfull:   {full_text!r}"
        )
    answer_text = full_text[len(prompt_text) :]
    if not answer_text:
        raise ValueError(
            f"the chat template rendered an empty answer for {answer!r}; it must render the message"
        )
    return answer_text


def _ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------- collating


class PreferenceCollator:
    """Right-pads chosen and rejected sequences to one common length so they can be concatenated.

    Pairs carrying answer-token weights (mint.pairs.weights) give `chosen_weights` /
    `rejected_weights` [B, T] too: each token's weight at its label's position, 1 elsewhere.
    """

    def __init__(self, pad_token_id: int, label_pad_id: int = -100):
        self.pad_token_id = pad_token_id
        self.label_pad_id = label_pad_id

    def __call__(self, pairs: Sequence[TokenizedPair | dict]) -> dict[str, torch.Tensor]:
        items = [as_item(p) for p in pairs]
        length = max(len(it["prompt_ids"]) + len(it[f"{side}_ids"]) for it in items for side in SIDES)
        batch = {"prompt_lengths": torch.tensor([len(it["prompt_ids"]) for it in items], dtype=torch.long)}
        for side in SIDES:
            ids = torch.full((len(items), length), self.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(items), length), dtype=torch.long)
            labels = torch.full((len(items), length), self.label_pad_id, dtype=torch.long)
            for row, it in enumerate(items):
                prompt, answer = it["prompt_ids"], it[f"{side}_ids"]
                end = len(prompt) + len(answer)
                ids[row, :end] = torch.tensor(prompt + answer, dtype=torch.long)
                mask[row, :end] = 1
                labels[row, len(prompt) : end] = torch.tensor(answer, dtype=torch.long)
            batch[f"{side}_input_ids"] = ids
            batch[f"{side}_attention_mask"] = mask
            batch[f"{side}_labels"] = labels
            if f"{side}_weights" in items[0]:  # rank-discounted answer tokens (mint.pairs.weights)
                weights = torch.ones((len(items), length), dtype=torch.float32)
                for row, it in enumerate(items):
                    start = len(it["prompt_ids"])
                    weights[row, start : start + len(it[f"{side}_ids"])] = torch.tensor(it[f"{side}_weights"])
                batch[f"{side}_weights"] = weights
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in items[0]:
                batch[key] = torch.tensor([float(it[key]) for it in items], dtype=torch.float32)
        return batch
