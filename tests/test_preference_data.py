"""Preference data: reading TRL formats, validation messages, truncation, collation, the toy set."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from mint.data.example_prefs import CONDITIONS, _findings, main, make_example_prefs, write_jsonl
from mint.pairs.rows import pairs_to_texts, read_preference_rows
from mint.pairs.text import PreferenceCollator, TokenizedPair, TruncationReport, tokenize_preference_rows

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SYS = {"role": "system", "content": "You are a clinical assistant."}


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def bot(text: str) -> dict:
    return {"role": "assistant", "content": text}


def conv_row(
    question: str = "Which condition?", chosen: str = "Velmora syndrome", rejected: str = "Ostrand disease"
):
    return {"prompt": [SYS, user(question)], "chosen": [bot(chosen)], "rejected": [bot(rejected)]}


def write_lines(path: Path, lines: list) -> Path:
    """Lines are dicts (dumped as JSON) or raw strings (written as they are, e.g. broken JSON)."""
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


# --------------------------------------------------------------------------- tokenizers


@pytest.fixture(scope="module")
def backend() -> Tokenizer:
    """A byte-level BPE trained on the toy set: any text encodes, and decoding is exact."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(pairs_to_texts(make_example_prefs(40)), trainer=trainer)
    return tok


@pytest.fixture(scope="module")
def chatml_tok(backend) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<pad>", chat_template=CHATML
    )


@pytest.fixture(scope="module")
def bos_tok(backend) -> PreTrainedTokenizerFast:
    """A Llama-like tokenizer: adds BOS itself, no chat template."""
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        add_bos_token=True,
    )


# --------------------------------------------------------------------------- reading


def test_read_standard_jsonl_keeps_extra_keys_and_skips_blank_lines(tmp_path):
    rows = [
        {"prompt": "p1", "chosen": "c1", "rejected": "r1", "id": 7},
        {"prompt": "p2", "chosen": "c2", "rejected": "r2"},
    ]
    path = write_lines(tmp_path / "std.jsonl", [rows[0], "", rows[1]])
    assert read_preference_rows(path) == rows


def test_read_conversational_jsonl(tmp_path):
    rows = [{**conv_row(), "id": "a", "images": ["x.png"]}, conv_row("Another?")]
    assert read_preference_rows(write_lines(tmp_path / "conv.jsonl", rows)) == rows


def test_read_implicit_prompt_splits_the_shared_prefix(tmp_path):
    turns = [SYS, user("Q1"), bot("A1"), user("Q2")]
    row = {"id": 1, "chosen": [*turns, bot("good")], "rejected": [*turns, bot("bad"), user("more")]}
    (got,) = read_preference_rows(write_lines(tmp_path / "implicit.jsonl", [row]))
    assert got == {"id": 1, "prompt": turns, "chosen": [bot("good")], "rejected": [bot("bad"), user("more")]}


def test_read_save_to_disk_folder(tmp_path):
    import datasets

    rows = [{**conv_row(), "id": "a"}, {**conv_row("Q?"), "id": "b"}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    assert read_preference_rows(tmp_path / "ds") == rows

    bad = [conv_row(), conv_row(chosen="same", rejected="same")]
    datasets.Dataset.from_list(bad).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(ValueError, match=r"bad: row 1: key 'rejected': identical"):
        read_preference_rows(tmp_path / "bad")

    datasets.DatasetDict(train=datasets.Dataset.from_list(rows)).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match=r"DatasetDict with splits \['train'\]"):
        read_preference_rows(tmp_path / "dd")


@pytest.mark.parametrize("name", ["prefs.txt", "missing.jsonl", "empty_dir"])
def test_read_rejects_other_paths_naming_both_forms(tmp_path, name):
    path = tmp_path / name
    if name == "prefs.txt":
        path.write_text("[]")
    if name == "empty_dir":
        path.mkdir()
    with pytest.raises(ValueError) as err:
        read_preference_rows(path)
    assert str(path) in str(err.value) and ".jsonl" in str(err.value) and "save_to_disk" in str(err.value)


GOOD_STD = {"prompt": "p", "chosen": "c", "rejected": "r"}
MALFORMED = {  # bad line (always line 2, after a good standard row) -> (key, fragment of the message)
    "invalid_json": ('{"prompt": "p", "chosen": ', None, "invalid JSON"),
    "not_an_object": ("[1, 2]", None, "JSON object"),
    "missing_chosen": ({"prompt": "p", "rejected": "r"}, "chosen", "missing"),
    "missing_prompt": ({"chosen": "c", "rejected": "r"}, "prompt", "missing"),
    "wrong_type": ({"prompt": "p", "chosen": 3, "rejected": "r"}, "chosen", "expected a string"),
    "wrong_prompt_type": (
        {"prompt": 3, "chosen": "c", "rejected": "r"},
        "prompt",
        "expected a string or a list",
    ),
    "empty_rejected": ({"prompt": "p", "chosen": "c", "rejected": " "}, "rejected", "empty"),
    "identical": ({"prompt": "p", "chosen": "same", "rejected": "same"}, "rejected", "identical"),
    "mixed": (conv_row(), "prompt", "mixed standard/conversational"),
}
MALFORMED_CONV = {  # bad line 2 after a good conversational row
    "bad_role": ({**conv_row(), "chosen": [{"role": "bot", "content": "x"}]}, "chosen", "role 'bot'"),
    "answer_not_assistant": ({**conv_row(), "rejected": [user("x")]}, "rejected", "'assistant' message"),
    "prompt_ends_with_assistant": (
        {**conv_row(), "prompt": [user("q"), bot("a")]},
        "prompt",
        "last prompt message",
    ),
    "content_not_str": (
        {**conv_row(), "chosen": [{"role": "assistant", "content": 1}]},
        "chosen",
        "'content' is a string or a list",
    ),
    "empty_messages": ({**conv_row(), "chosen": []}, "chosen", "empty"),
    "messages_wrong_type": ({**conv_row(), "chosen": "text"}, "chosen", "list of messages"),
    "implicit_no_shared_prefix": (
        {"chosen": [user("a"), bot("b")], "rejected": [user("c"), bot("d")]},
        "prompt",
        "share no",
    ),
}
CASES = {name: (GOOD_STD, *case) for name, case in MALFORMED.items()} | {
    name: (conv_row(), *case) for name, case in MALFORMED_CONV.items()
}


@pytest.mark.parametrize("name", CASES)
def test_malformed_row_error_names_file_line_and_key(tmp_path, name):
    good, bad, key, fragment = CASES[name]
    path = write_lines(tmp_path / f"{name}.jsonl", [good, bad, good])
    with pytest.raises(ValueError) as err:
        read_preference_rows(path)
    message = str(err.value)
    assert f"{name}.jsonl: line 2:" in message and fragment in message
    if key:
        assert f"key '{key}'" in message


def test_skip_mode_keeps_good_rows_and_logs_the_count(tmp_path, caplog):
    bad = [case[0] for case in MALFORMED.values()]
    path = write_lines(tmp_path / "mixed_quality.jsonl", [GOOD_STD, *bad, {**GOOD_STD, "id": 2}])
    with caplog.at_level(logging.WARNING, logger="mint.data"):
        rows = read_preference_rows(path, on_error="skip")
    assert rows == [GOOD_STD, {**GOOD_STD, "id": 2}]
    assert f"Skipped {len(bad)} of {len(bad) + 2} preference rows" in caplog.text
    assert "mixed_quality.jsonl" in caplog.text


def test_no_valid_rows_is_an_error(tmp_path):
    path = write_lines(tmp_path / "all_bad.jsonl", ["{", {"prompt": "p"}])
    with pytest.raises(ValueError, match="all_bad.jsonl: no valid preference rows"):
        read_preference_rows(path, on_error="skip")


# --------------------------------------------------------------------------- tokenizing


def tokenize(rows, tok, max_length=4096, max_prompt_length=2048, **kwargs):
    return tokenize_preference_rows(
        rows, tok, max_length=max_length, max_prompt_length=max_prompt_length, **kwargs
    )


def test_untruncated_pair_decodes_to_the_chat_template_text(chatml_tok):
    rows = make_example_prefs(8)
    pairs, report = tokenize(rows, chatml_tok)
    assert report == TruncationReport(total=8, kept=8, prompt_truncated=0, answer_truncated=0, dropped=0)
    for row, pair in zip(rows, pairs, strict=True):
        for side, ids in (("chosen", pair.chosen_ids), ("rejected", pair.rejected_ids)):
            expected = chatml_tok.apply_chat_template(row["prompt"] + row[side], tokenize=False)
            assert chatml_tok.decode(pair.prompt_ids + ids) == expected
            assert chatml_tok.eos_token_id in ids  # the answer carries the end-of-turn the model must learn
        assert chatml_tok.decode(pair.prompt_ids).endswith("<|im_start|>assistant\n")


def test_long_chosen_is_cut_and_short_rejected_untouched(chatml_tok):
    row = conv_row(chosen="Velmora syndrome " * 40, rejected="Ostrand disease")
    (full,), _ = tokenize([row], chatml_tok)
    max_length = len(full.prompt_ids) + len(full.rejected_ids) + 5
    (pair,), report = tokenize([row], chatml_tok, max_length=max_length, max_prompt_length=max_length - 1)
    assert pair.prompt_ids == full.prompt_ids and pair.rejected_ids == full.rejected_ids
    assert pair.chosen_ids == full.chosen_ids[: max_length - len(full.prompt_ids)]  # keeps the answer's start
    assert len(pair.prompt_ids) + len(pair.chosen_ids) == max_length
    assert (report.answer_truncated, report.prompt_truncated, report.dropped) == (1, 0, 0)


def test_prompt_alone_too_long(chatml_tok, caplog):
    """The prompt is cut to max_prompt_length; a pair whose answers then agree on every kept token is dropped."""
    long_question = "broad thumbs and sparse eyebrows " * 60
    same_start = conv_row(long_question, chosen="MOST_LIKELY: Velmora", rejected="MOST_LIKELY: Ostrand")
    differ_early = conv_row(long_question, chosen="Velmora syndrome", rejected="Ostrand disease")
    with caplog.at_level(logging.WARNING, logger="mint.data"):
        pairs, report = tokenize([same_start, differ_early], chatml_tok, max_length=40, max_prompt_length=38)
    assert report == TruncationReport(total=2, kept=1, prompt_truncated=1, answer_truncated=1, dropped=1)
    (pair,) = pairs
    assert len(pair.prompt_ids) == 38 and len(pair.chosen_ids) == len(pair.rejected_ids) == 2
    assert "1 dropped" in caplog.text and "1 prompts cut to task.max_prompt_length=38" in caplog.text


@pytest.mark.parametrize("mode", ["keep_end", "keep_start"])
def test_prompt_truncation_side(chatml_tok, mode):
    row = conv_row("short stature " * 50)
    (full,), _ = tokenize([row], chatml_tok)
    (pair,), report = tokenize([row], chatml_tok, max_length=30, max_prompt_length=20, prompt_truncation=mode)
    assert pair.prompt_ids == (full.prompt_ids[-20:] if mode == "keep_end" else full.prompt_ids[:20])
    assert pair.chosen_ids == full.chosen_ids and report.prompt_truncated == 1


@pytest.mark.parametrize(("max_length", "max_prompt_length"), [(16, 8), (40, 30), (64, 12), (200, 150)])
def test_random_batch_never_exceeds_max_length_nor_empties_an_answer(
    chatml_tok, max_length, max_prompt_length
):
    rng = random.Random(max_length)
    rows = make_example_prefs(24, seed=3)
    for _ in range(16):  # rows of random prompt and answer lengths, some far beyond max_length
        words = list(CONDITIONS)
        rows.append(
            conv_row(
                " ".join(rng.choices(words, k=rng.randint(1, 60))),
                chosen=" ".join(rng.choices(words, k=rng.randint(1, 60))),
                rejected="x " + " ".join(rng.choices(words, k=rng.randint(1, 60))),
            )
        )
    pairs, report = tokenize(rows, chatml_tok, max_length=max_length, max_prompt_length=max_prompt_length)
    assert report.kept == len(pairs) and report.kept + report.dropped == report.total == len(rows)
    assert report.kept > 0  # truncation keeps pairs (the checks below would pass on none)
    for pair in pairs:
        assert pair.chosen_ids and pair.rejected_ids and pair.chosen_ids != pair.rejected_ids
        assert len(pair.prompt_ids) + len(pair.chosen_ids) <= max_length
        assert len(pair.prompt_ids) + len(pair.rejected_ids) <= max_length


def test_standard_rows_get_one_bos_and_an_eos(bos_tok):
    rows = [
        {"prompt": "<s>short stature", "chosen": "Velmora syndrome", "rejected": "Ostrand disease"},
        {"prompt": "short stature", "chosen": "Velmora syndrome", "rejected": "Ostrand disease"},
    ]
    pairs, _ = tokenize(rows, bos_tok)
    bos, eos = bos_tok.bos_token_id, bos_tok.eos_token_id
    assert bos_tok("x")["input_ids"][0] == bos  # the tokenizer does add BOS, so the first row had two
    for pair in pairs:
        assert pair.prompt_ids[0] == bos and pair.prompt_ids[1] != bos
        assert pair.prompt_ids == pairs[1].prompt_ids
        assert pair.chosen_ids[-1] == eos and pair.rejected_ids[-1] == eos
    assert bos_tok.decode(pairs[0].chosen_ids) == "Velmora syndrome<|im_end|>"


def test_tokenize_errors(chatml_tok, bos_tok, backend):
    with pytest.raises(
        ValueError, match=r"task.max_prompt_length \(64\) must be > 0 and < task.max_length \(64\)"
    ):
        tokenize([conv_row()], chatml_tok, max_length=64, max_prompt_length=64)
    with pytest.raises(ValueError, match="no chat template"):
        tokenize([conv_row()], bos_tok)
    unstable = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        # The generation prompt says 'assistant' but rendered answers say 'bot': not a prefix.
        chat_template=CHATML.replace(
            "{{ m['role'] }}", "{{ 'bot' if m['role'] == 'assistant' else m['role'] }}"
        ),
    )
    with pytest.raises(ValueError, match="not prefix-stable"):
        tokenize([conv_row()], unstable)
    silent = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        chat_template="{% for m in messages if m['role'] != 'assistant' %}{{ m['content'] }}\n{% endfor %}",
    )
    with pytest.raises(ValueError, match="rendered an empty answer"):
        tokenize([conv_row()], silent)


# --------------------------------------------------------------------------- collating


def test_collator_pads_both_sides_to_one_length():
    pairs = [
        TokenizedPair([1, 2, 3], [4, 5], [6]),
        TokenizedPair([1], [7, 8, 9, 10, 11], [12, 13]),
        TokenizedPair([1, 2], [14], [15, 16, 17]),
    ]
    batch = PreferenceCollator(pad_token_id=0)(pairs)
    length = 6  # the longest sequence: prompt 1 + chosen 5
    names = ("input_ids", "attention_mask", "labels")
    assert set(batch) == {
        "prompt_lengths",
        *(f"{side}_{name}" for side in ("chosen", "rejected") for name in names),
    }
    assert batch["prompt_lengths"].tolist() == [3, 1, 2] and batch["prompt_lengths"].dtype == torch.long
    for side in ("chosen", "rejected"):
        ids, mask, labels = (batch[f"{side}_{name}"] for name in names)
        assert ids.shape == mask.shape == labels.shape == (3, length)
        for row, pair in enumerate(pairs):
            seq = pair.prompt_ids + getattr(pair, f"{side}_ids")
            n_prompt, pad = len(pair.prompt_ids), length - len(seq)
            assert ids[row].tolist() == seq + [0] * pad
            assert mask[row].tolist() == [1] * len(seq) + [0] * pad
            assert labels[row].tolist() == [-100] * n_prompt + seq[n_prompt:] + [-100] * pad


def test_collator_passes_reference_logps_through():
    items = [
        {
            "prompt_ids": [1],
            "chosen_ids": [2],
            "rejected_ids": [3, 4],
            "ref_chosen_logps": -1.5,
            "ref_rejected_logps": -2.0,
        },
        {
            "prompt_ids": [1, 2],
            "chosen_ids": [5],
            "rejected_ids": [6],
            "ref_chosen_logps": -0.5,
            "ref_rejected_logps": -3.25,
        },
    ]
    batch = PreferenceCollator(pad_token_id=9, label_pad_id=-1)(items)
    assert batch["ref_chosen_logps"].dtype == torch.float32
    assert batch["ref_chosen_logps"].tolist() == [-1.5, -0.5]
    assert batch["ref_rejected_logps"].tolist() == [-2.0, -3.25]
    assert batch["chosen_labels"].tolist() == [[-1, 2, -1], [-1, -1, 5]]
    assert "ref_chosen_logps" not in PreferenceCollator(0)([TokenizedPair([1], [2], [3])])


# --------------------------------------------------------------------------- the toy set


def test_example_prefs_are_deterministic(tmp_path):
    assert make_example_prefs(50, seed=0) == make_example_prefs(50, seed=0)
    assert make_example_prefs(50, seed=0) != make_example_prefs(50, seed=1)
    main([str(tmp_path / "a.jsonl"), "--n", "50"])
    write_jsonl(make_example_prefs(50), tmp_path / "b.jsonl")
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert not list(tmp_path.glob(".*.tmp"))  # the temp file was renamed, not left behind


def test_example_prefs_are_valid_and_learnable(tmp_path):
    rows = make_example_prefs(80, seed=5)
    assert read_preference_rows(write_jsonl(rows, tmp_path / "ex.jsonl")) == rows
    assert len({row["id"] for row in rows}) == 80 and len({row["truth"] for row in rows}) == len(CONDITIONS)
    for row in rows:
        question = row["prompt"][-1]["content"]
        assert len(" ".join(m["content"] for m in row["prompt"]).split()) < 80
        # The condition with most of its findings in the prompt is the answer chosen puts first.
        overlap = {name: sum(f in question for f in _findings(name)) for name in CONDITIONS}
        best = max(overlap, key=overlap.get)
        assert overlap[best] == 3 and sorted(overlap.values())[-2] <= 1
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert chosen.splitlines()[:2] == ["MOST_LIKELY:", f"1. '{best}'"] and row["truth"] == best
        assert len(chosen.splitlines()) == len(rejected.splitlines()) == 4 and f"'{best}'" not in rejected
