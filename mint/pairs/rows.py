"""Preference rows in TRL's formats: read and validate them, split off validation rows.

A row is a dict with `prompt`, `chosen` and `rejected`, all strings (standard format) or all
message lists (conversational format); other keys (`id`, `truth`, `images`) ride along.
Turning rows into model batches is the job of `mint.pairs.text` and `mint.pairs.vision`.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mint.files import decode_utf8

log = logging.getLogger("mint.pairs")

ROLES = ("system", "user", "assistant")
PAIR_KEYS = ("prompt", "chosen", "rejected")
ACCEPTED_FORMS = (
    "a .jsonl, .json, .parquet or .csv file, a folder written by datasets.Dataset.save_to_disk, "
    "a folder of such data files, or a Hub dataset id (online only)"
)
# Files read through `datasets.load_dataset(<builder>, data_files=...)`, by suffix. JSONL keeps
# its own reader: line numbers in errors, and the UTF-8 check before any parsing.
DATA_FILE_BUILDERS = {".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass(frozen=True)
class Rows:
    """The student's preference rows: what it trains on and what it is validated on."""

    train: list[dict]
    val: list[dict]
    # Where they were read from (a stage cache entry or the user's file or folder; None for a Hub
    # id): what the run logs as its preference dataset artifact.
    source: Path | None = None


class _RowError(ValueError):
    """A problem with one row; the reader adds the file and the line/row to the message."""

    def __init__(self, key: str | None, problem: str):
        super().__init__(f"key '{key}': {problem}" if key else problem)


# --------------------------------------------------------------------------- reading


def read_preference_rows(
    path: str | Path, *, on_error: Literal["strict", "skip"] = "strict", split: str = "train"
) -> list[dict]:
    """Read and validate preference rows from any of ACCEPTED_FORMS (`split`: the split of a
    data folder or Hub dataset that holds them).

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
    for where, raw in _iter_raw_rows(path, split):
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


def _iter_raw_rows(path: Path, split: str) -> Iterator[tuple[str, Any]]:
    """Yield (where, row-or-JSON-error) with `where` = 'line N' (1-based) or 'row N' (0-based index)."""
    if path.is_file() and path.suffix == ".jsonl":
        with path.open("rb") as f:
            for number, raw in enumerate(f, start=1):
                # A file that is binary or not UTF-8 is refused whole, whatever `on_error` says:
                # skipping its lines would hide that the file itself is the wrong one.
                line = decode_utf8(path, raw, first_line=number)
                if not line.strip():  # a trailing newline or spacer line is not a row
                    continue
                try:
                    yield f"line {number}", json.loads(line)
                except json.JSONDecodeError as err:
                    yield f"line {number}", err
    elif path.is_file() and path.suffix in DATA_FILE_BUILDERS:
        yield from _rows_of(path, DATA_FILE_BUILDERS[path.suffix], data_files=str(path), split="train")
    elif path.is_dir() and (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
        import datasets  # heavy import; only this branch needs it

        for index, row in enumerate(datasets.Dataset.load_from_disk(str(path)).to_list()):
            yield f"row {index}", row
    elif path.is_dir() and (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise ValueError(
            f"{path} is a DatasetDict with splits {splits}; point at one split's folder (e.g. {path / 'train'})"
        )
    elif path.is_dir() and any(p.suffix in (".jsonl", *DATA_FILE_BUILDERS) for p in path.rglob("*")):
        yield from _rows_of(path, str(path), split=split)  # datasets picks the builder and the splits
    elif not path.exists() and looks_like_hub_id(str(path)):
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
            raise ValueError(
                f"{path}: no such file or folder, and a Hub dataset cannot be fetched with HF_HUB_OFFLINE=1; "
                "download it first or point at a local copy"
            )
        yield from _rows_of(path, str(path), split=split)
    else:
        found = "found none of them" if path.exists() else "the path does not exist"
        raise ValueError(f"{path}: expected {ACCEPTED_FORMS}; {found}")


def looks_like_hub_id(text: str) -> bool:
    """'owner/name' (one slash, no dot-segments): a Hub dataset id rather than a local path."""
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~"))


def _rows_of(path: Path, *args: Any, **kwargs: Any) -> Iterator[tuple[str, Any]]:
    """The rows `datasets.load_dataset(*args, **kwargs)` reads, its errors naming `path`."""
    import datasets  # heavy import; only these forms need it

    try:
        table = datasets.load_dataset(*args, **kwargs)
    except (ValueError, OSError, UnicodeDecodeError, datasets.exceptions.DatasetGenerationError) as err:
        cause = err.__cause__ or err
        raise ValueError(f"{path}: cannot read it as a dataset ({type(cause).__name__}: {cause})") from None
    for index, row in enumerate(table.to_list()):
        yield f"row {index}", row


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


def split_rows(rows: list[dict], val_fraction: float, seed: int) -> Rows:
    """A seeded shuffle, then the last `val_fraction` of it held out."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"task.val_fraction={val_fraction}: expected 0 <= value < 1")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_val = round(len(rows) * val_fraction)
    if val_fraction > 0 and len(rows) >= 2:
        n_val = max(n_val, 1)
    if len(rows) - n_val < 1:
        raise ValueError(
            f"{len(rows)} preference rows leave none to train on (task.val_fraction={val_fraction})"
        )
    train = [rows[i] for i in order[: len(rows) - n_val]]
    val = [rows[i] for i in order[len(rows) - n_val :]]
    return Rows(train=train, val=val)
