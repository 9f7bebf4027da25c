"""The no-repeated-names decoding constraint: what it masks, and greedy lists that stay distinct."""

import torch

from mint.eval.constraints import NoRepeatedNames
from mint.prefs.formats import AnswerFormat
from mint.student.tiny import train_tokenizer

LABELS = ["Bile Duct", "Bladder", "Breast", "Head & Neck", "Colon"]
FORMAT = AnswerFormat(header="TISSUE:", n=3)


def tokenizer():
    answers = [FORMAT.render([LABELS[i % 5], LABELS[(i + 1) % 5], LABELS[(i + 2) % 5]]) for i in range(50)]
    return train_tokenizer(answers, vocab_size=300)


def token_id(tok, piece: str) -> int:
    ids = tok(piece, add_special_tokens=False).input_ids
    assert len(ids) == 1, f"{piece!r} is not one token here: {ids}"
    return ids[0]


def test_masks_only_tokens_that_lead_to_a_listed_name():
    tok = tokenizer()
    constraint = NoRepeatedNames(tok, LABELS, prompt_length=0)
    banned = set(constraint.banned_tokens("TISSUE:\n1. 'Breast'\n2. 'Bile Duct'\n3. '"))
    assert token_id(tok, "Breast") in banned and token_id(tok, "Bile") in banned
    assert token_id(tok, "Bladder") not in banned and token_id(tok, "Colon") not in banned
    # Mid-name: the rest of a listed name is masked; a name shared by no listed label is free.
    assert token_id(tok, " Duct") in set(constraint.banned_tokens("TISSUE:\n1. 'Bile Duct'\n2. 'Bile"))
    assert constraint.banned_tokens("TISSUE:\n1. 'Bladder'\n2. 'Bile") == []
    # Outside an item, or with nothing listed yet, nothing is masked.
    assert constraint.banned_tokens("TISSUE:\n1. 'Breast'\n2.") == []
    assert constraint.banned_tokens("TISSUE:\n1. '") == []


def test_greedy_decoding_of_a_model_that_repeats_its_favourite_name_lists_distinct_names():
    """A 'model' that always scores the next token of `1. 'Breast'` best and the other names after
    it: unconstrained it repeats Breast; constrained, it writes its next-best names in order."""
    tok = tokenizer()
    preference = ["Breast", "Colon", "Bladder"]  # the model's favourite names, best first

    def next_scores(text: str) -> torch.Tensor:
        scores = torch.zeros(len(tok))
        line = text.split("\n")[-1]
        rank = len(text.split("\n")) - 1
        if "'" not in line:  # write the numbering and the opening quote
            wanted = f"{rank}. '"[len(line) :]
            scores[tok(wanted, add_special_tokens=False).input_ids[0]] = 10.0
            return scores
        partial = line.split("'", 1)[1]
        for weight, name in zip([3.0, 2.0, 1.0], preference, strict=True):
            target = name + "'\n"
            if target.startswith(partial):
                scores[tok(target[len(partial) :], add_special_tokens=False).input_ids[0]] += weight
        return scores

    def greedy(constrained: bool) -> str:
        prompt = tok("TISSUE:\n", add_special_tokens=False).input_ids
        ids = torch.tensor([prompt])
        constraint = NoRepeatedNames(tok, LABELS, prompt_length=0)
        while ids.shape[1] < 60 and tok.decode(ids[0]).count("\n") <= FORMAT.n:
            scores = next_scores(tok.decode(ids[0]))[None]
            if constrained:
                scores = constraint(ids, scores)
            ids = torch.cat([ids, scores.argmax(-1, keepdim=True)], dim=1)
        return tok.decode(ids[0]).strip()

    parsed = FORMAT.parse(greedy(constrained=False), LABELS)
    assert parsed.matched == ["Breast", "Breast", "Breast"] and not FORMAT.is_valid(parsed)
    parsed = FORMAT.parse(greedy(constrained=True), LABELS)
    assert parsed.matched == preference and FORMAT.is_valid(parsed)


def test_the_task_eval_knob_reaches_decoding(make_cfg):
    from mint.stages.evaluate import eval_job

    # On by default for both pipeline tasks (the tiny students repeat names without it) ...
    assert eval_job(make_cfg("task=tissue")).decoding.no_repeated_names
    assert eval_job(make_cfg("task=rare_disease")).decoding.no_repeated_names
    # ... off where asked, and in the paper's experiments (their own decoding settings).
    cfg = make_cfg("task=rare_disease", "task.eval.no_repeated_names=false")
    assert not eval_job(cfg).decoding.no_repeated_names
    assert not eval_job(make_cfg("experiment=paper_tissue")).decoding.no_repeated_names
    paper = eval_job(make_cfg("experiment=paper_rare_disease")).decoding
    assert not paper.no_repeated_names and not paper.known_names_only  # open decoding, as the paper's


def test_a_listed_name_that_opens_a_longer_label_leaves_the_longer_one_free():
    labels = ["Noonan syndrome", "Noonan syndrome with lentigines", "Colon"]
    fmt = AnswerFormat(header="D:", n=2)
    tok = train_tokenizer([fmt.render([a, b]) for a in labels for b in labels if a != b] * 5, vocab_size=300)
    constraint = NoRepeatedNames(tok, labels, prompt_length=0)
    banned = {
        tok.decode([i]) for i in constraint.banned_tokens("D:\n1. 'Noonan syndrome'\n2. 'Noonan syndrome")
    }
    assert " with" in {tok.decode([i]) for i in range(len(tok))}
    assert "'" in banned and " with" not in banned  # closing the listed name is masked, going on is not


def test_known_names_only_allows_just_the_unlisted_labels_inside_an_item():
    """Closed-set decoding: a misspelling ('Bladdr') is impossible, and so is a listed name."""
    tok = tokenizer()
    constraint = NoRepeatedNames(tok, LABELS, prompt_length=0, known_names_only=True)
    allowed = set(constraint.allowed_tokens("TISSUE:\n1. 'Breast'\n2. '"))
    assert {token_id(tok, "Bladder"), token_id(tok, "Colon"), token_id(tok, "Bile")} <= allowed
    assert token_id(tok, "Breast") not in allowed
    # Every allowed token keeps the item on the way to an unlisted label, quote included.
    for token in allowed:
        piece = tok.decode([token])
        assert any(
            (label + "'").startswith(piece) or piece.startswith(label + "'")
            for label in LABELS
            if label != "Breast"
        ), piece
    # Mid-name only that name's continuation; outside an item nothing is restricted.
    mid = {tok.decode([t]) for t in constraint.allowed_tokens("TISSUE:\n1. 'Breast'\n2. 'Bl")}
    assert mid and all("adder'".startswith(p) or p.startswith("adder'") for p in mid)
    assert constraint.allowed_tokens("TISSUE:\n1. 'Breast'\n2.") == []
