"""Preference pairs in TRL's formats: read and validate, tokenize with safe truncation, collate.

The three steps are separate so that the reference log-probs of DPO can be attached to the
tokenized pairs before collation, and so each step is testable on its own.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

log = logging.getLogger("mint.data")

ROLES = ("system", "user", "assistant")
PAIR_KEYS = ("prompt", "chosen", "rejected")
ACCEPTED_FORMS = "a .jsonl file or a folder written by datasets.Dataset.save_to_disk"


class _RowError(ValueError):
    """A problem with one row; the reader adds the file and the line/row to the message."""

    def __init__(self, key: str | None, problem: str):
        super().__init__(f"key '{key}': {problem}" if key else problem)


# --------------------------------------------------------------------------- reading


def read_preference_rows(path: str | Path, *, on_error: Literal["strict", "skip"] = "strict") -> list[dict]:
    """Read and validate preference rows from a `.jsonl` file or a `save_to_disk` folder.

    Every returned row has `prompt`, `chosen` and `rejected`, either all strings (standard format)
    or all message lists (conversational format); implicit-prompt rows get their shared prefix
    split off as `prompt`. Other keys are kept as they are.
    """
    if on_error not in ("strict", "skip"):
        raise ValueError(f"on_error must be 'strict' or 'skip', not {on_error!r}")
    path = Path(path)
    rows: list[dict] = []
    errors: list[str] = []
    first_format: tuple[str, str] | None = None  # (format, where) of the first good row
    for where, raw in _iter_raw_rows(path):
        try:
            if isinstance(raw, Exception):
                raise _RowError(None, f"invalid JSON ({raw})")
            row = _validate_row(raw)
            fmt = "conversational" if isinstance(row["prompt"], list) else "standard"
            if first_format is None:
                first_format = (fmt, where)
            elif fmt != first_format[0]:
                raise _RowError(
                    "prompt",
                    f"row is in {fmt} format but {first_format[1]} is {first_format[0]}; "
                    "mixed standard/conversational rows are not allowed",
                )
        except _RowError as err:
            message = f"{path}: {where}: {err}"
            if on_error == "strict":
                raise ValueError(message) from None
            errors.append(message)
            continue
        rows.append(row)
    if errors:
        log.warning(
            "Skipped %d of %d preference rows in %s; first problem: %s",
            len(errors),
            len(errors) + len(rows),
            path,
            errors[0],
        )
    if not rows:
        raise ValueError(f"{path}: no valid preference rows")
    return rows


def _iter_raw_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """Yield (where, row-or-JSON-error) with `where` = 'line N' (1-based) or 'row N' (0-based index)."""
    if path.is_file() and path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():  # a trailing newline or spacer line is not a row
                    continue
                try:
                    yield f"line {number}", json.loads(line)
                except json.JSONDecodeError as err:
                    yield f"line {number}", err
    elif path.is_dir() and (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
        import datasets  # heavy import; only this branch needs it

        for index, row in enumerate(datasets.Dataset.load_from_disk(str(path)).to_list()):
            yield f"row {index}", row
    elif path.is_dir() and (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise ValueError(
            f"{path} is a DatasetDict with splits {splits}; point at one split's folder (e.g. {path / 'train'})"
        )
    else:
        found = "found neither" if path.exists() else "the path does not exist"
        raise ValueError(f"{path}: expected {ACCEPTED_FORMS}; {found}")


def _validate_row(row: Any) -> dict:
    if not isinstance(row, dict):
        raise _RowError(None, f"a row must be a JSON object, got {type(row).__name__}")
    for key in ("chosen", "rejected"):
        if key not in row:
            raise _RowError(key, "missing")
    if "prompt" not in row:
        if not isinstance(row["chosen"], list):
            raise _RowError("prompt", "missing (an implicit prompt needs chosen/rejected as message lists)")
        row = {**row, **_split_implicit_prompt(row["chosen"], row["rejected"])}

    if isinstance(row["prompt"], str):
        for key in PAIR_KEYS:
            if not isinstance(row[key], str):
                raise _RowError(key, f"expected a string like 'prompt', got {type(row[key]).__name__}")
            if not row[key].strip():
                raise _RowError(key, "empty")
    elif isinstance(row["prompt"], list):
        for key in PAIR_KEYS:
            _check_messages(key, row[key])
        # The answer follows the template's generation prompt, which opens an assistant turn.
        if row["prompt"][-1]["role"] == "assistant":
            raise _RowError("prompt", "the last prompt message must not be from 'assistant'")
        for key in ("chosen", "rejected"):
            if row[key][0]["role"] != "assistant":
                raise _RowError(key, f"must start with an 'assistant' message, got '{row[key][0]['role']}'")
    else:
        raise _RowError(
            "prompt", f"expected a string or a list of messages, got {type(row['prompt']).__name__}"
        )

    if row["chosen"] == row["rejected"]:
        raise _RowError("rejected", "identical to 'chosen'")
    return row


def _check_messages(key: str, messages: Any) -> None:
    if not isinstance(messages, list):
        raise _RowError(key, f"expected a list of messages like 'prompt', got {type(messages).__name__}")
    if not messages:
        raise _RowError(key, "empty")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not _valid_content(message.get("content")):
            raise _RowError(
                key,
                f"message {i} must be an object whose 'content' is a string or a list of "
                "{'type': 'text', 'text': ...} / {'type': 'image'} parts",
            )
        if message.get("role") not in ROLES:
            raise _RowError(key, f"message {i} has role {message.get('role')!r}; expected one of {ROLES}")
    if not any(_content_text(message["content"]).strip() for message in messages):
        raise _RowError(key, "empty")


def _valid_content(content: Any) -> bool:
    """A string, or (vision prompts, as TRL writes them) a list of text and image parts."""
    if isinstance(content, str):
        return True
    return isinstance(content, list) and all(
        isinstance(part, dict)
        and (
            part.get("type") == "image" or (part.get("type") == "text" and isinstance(part.get("text"), str))
        )
        for part in content
    )


def _content_text(content: str | list[dict]) -> str:
    return (
        content if isinstance(content, str) else " ".join(p["text"] for p in content if p["type"] == "text")
    )


def _split_implicit_prompt(chosen: Any, rejected: Any) -> dict:
    """TRL's implicit prompt: the messages chosen and rejected share form the prompt."""
    _check_messages("chosen", chosen)
    _check_messages("rejected", rejected)
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise _RowError(
            "prompt", "missing, and chosen/rejected share no leading messages to use as the prompt"
        )
    return {"prompt": chosen[:shared], "chosen": chosen[shared:], "rejected": rejected[shared:]}


def pairs_to_texts(rows: Sequence[dict]) -> list[str]:
    """All prompt/chosen/rejected text of the rows (each message's content), e.g. to train a tokenizer."""
    texts: list[str] = []
    for row in rows:
        for key in PAIR_KEYS:
            value = row[key]
            texts.extend([value] if isinstance(value, str) else [_content_text(m["content"]) for m in value])
    return texts


# --------------------------------------------------------------------------- tokenizing


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
    """Right-pads chosen and rejected sequences to one common length so they can be concatenated."""

    def __init__(self, pad_token_id: int, label_pad_id: int = -100):
        self.pad_token_id = pad_token_id
        self.label_pad_id = label_pad_id

    def __call__(self, pairs: Sequence[TokenizedPair | dict]) -> dict[str, torch.Tensor]:
        items = [dataclasses.asdict(p) if isinstance(p, TokenizedPair) else p for p in pairs]
        length = max(
            len(it["prompt_ids"]) + len(it[f"{side}_ids"]) for it in items for side in ("chosen", "rejected")
        )
        batch = {"prompt_lengths": torch.tensor([len(it["prompt_ids"]) for it in items], dtype=torch.long)}
        for side in ("chosen", "rejected"):
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
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in items[0]:
                batch[key] = torch.tensor([float(it[key]) for it in items], dtype=torch.float32)
        return batch
