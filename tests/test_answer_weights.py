"""optim.answer_rank_decay: answer tokens weighed k^-p by the rank k of their item, in every loss."""

from __future__ import annotations

import csv
import random

import numpy as np
import pytest
import torch

from mint.optim.module import PreferenceModule
from mint.pairs.packed import PackedPreferenceCollator
from mint.pairs.text import PreferenceCollator, TokenizedPair, as_item
from mint.pairs.weights import answer_weights, name_ranks, token_texts, with_answer_weights
from mint.run import run
from mint.student.tiny import train_tokenizer
from tests.conftest import random_llama
from tests.test_losses import _hand_logps
from tests.test_packing import random_pairs

ANSWER = "POTENTIAL_DISEASES:\n1. 'Alpha syndrome'\n2. 'Beta'\n3. 'Gamma disease'<|im_end|>\n"


@pytest.fixture(scope="module")
def tokenizer():
    corpus = [ANSWER.replace("<|im_end|>", ""), "Alpha Beta Gamma syndrome disease\n\n1. 2. 3."] * 20
    return train_tokenizer(corpus, vocab_size=300)


def test_each_name_token_takes_its_rank_and_the_format_keeps_weight_one(tokenizer):
    ids = tokenizer(ANSWER, add_special_tokens=False)["input_ids"]
    texts = token_texts(tokenizer, set(ids))
    ranks = name_ranks(ids, texts)
    text_of = {k: "".join(texts[t] for t, r in zip(ids, ranks, strict=True) if r == k) for k in range(4)}
    assert text_of == {
        0: "POTENTIAL_DISEASES:\n1. ''\n2. ''\n3. ''<|im_end|>\n",  # header, numbers, quotes, the end
        1: "Alpha syndrome",
        2: "Beta",
        3: "Gamma disease",
    }
    weights = answer_weights(ids, texts, decay=2.0)
    assert weights == [1.0 if k < 2 else pytest.approx(k**-2.0) for k in ranks]
    assert sorted(set(weights), reverse=True) == [1.0, 0.25, pytest.approx(1 / 9)]
    # a name's rank is its line's number, wherever the line is (a blank line, a two-line header)
    shifted = tokenizer("POTENTIAL\nDISEASES:\n\n2. 'Beta'", add_special_tokens=False)["input_ids"]
    texts = token_texts(tokenizer, set(shifted))
    assert {texts[t] for t, r in zip(shifted, name_ranks(shifted, texts), strict=True) if r} == {"Beta"}
    assert set(name_ranks(shifted, texts)) == {0, 2}
    # free text (no quoted names on numbered lines) keeps weight 1 throughout
    free = tokenizer("Alpha syndrome\nBeta\nGamma disease", add_special_tokens=False)["input_ids"]
    assert set(answer_weights(free, token_texts(tokenizer, set(free)), decay=2.0)) == {1.0}


def test_decay_zero_leaves_the_pairs_as_they_are_and_a_negative_one_is_refused(tokenizer):
    pairs = random_pairs(3)
    assert with_answer_weights(pairs, tokenizer, 0.0) == pairs
    with pytest.raises(ValueError, match="optim.answer_rank_decay=-1"):
        with_answer_weights(pairs, tokenizer, -1.0)


def _weighted(pairs: list[TokenizedPair], seed: int, ones: bool = False) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            **as_item(pair),
            **{
                f"{side}_weights": [
                    1.0 if ones else rng.uniform(0.05, 1.0) for _ in getattr(pair, f"{side}_ids")
                ]
                for side in ("chosen", "rejected")
            },
        }
        for pair in pairs
    ]


def _module(model, method: str, packed: bool, beta: float) -> PreferenceModule:
    module = PreferenceModule(model, method=method, beta=beta, packed=packed)
    return module.train() if method == "sft" else module.eval()  # SFT trains on chosen only


def _with_reference(items: list[dict], seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    ref = torch.randn(len(items), 2, generator=gen, dtype=torch.float64) - 20
    return [
        {**item, "ref_chosen_logps": float(c), "ref_rejected_logps": float(r)}
        for item, (c, r) in zip(items, ref, strict=True)
    ]


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("method", ["orpo", "dpo", "sft"])
def test_weighted_losses_equal_a_hand_gather(method, packed):
    """ORPO: weighted mean log-probs in the odds ratio and a weighted NLL; DPO: weighted sums;
    SFT: the weighted NLL; packed and unpacked alike."""
    model = random_llama(97, 128)
    pairs = random_pairs(5, seed=12)
    items = _with_reference(_weighted(pairs, seed=3), seed=4)
    beta = 0.3
    chosen, rejected = _hand_logps(model, pairs)
    w_c = [torch.tensor(item["chosen_weights"], dtype=torch.float64) for item in items]
    w_r = [torch.tensor(item["rejected_weights"], dtype=torch.float64) for item in items]
    collator = PackedPreferenceCollator(0) if packed else PreferenceCollator(0)
    with torch.no_grad():
        loss, metrics = _module(model, method, packed, beta).compute_loss(collator(items))

    logsigmoid = torch.nn.functional.logsigmoid
    nll = -sum((w * t).sum() for w, t in zip(w_c, chosen, strict=True)) / sum(w.sum() for w in w_c)
    if method == "orpo":
        mean_c = torch.stack([(w * t).sum() / w.sum() for w, t in zip(w_c, chosen, strict=True)])
        mean_r = torch.stack([(w * t).sum() / w.sum() for w, t in zip(w_r, rejected, strict=True)])
        odds = lambda m: m - torch.log1p(-m.exp())  # noqa: E731  log(P / (1 - P)), P = exp(mean)
        expected = nll - beta * logsigmoid(odds(mean_c) - odds(mean_r)).mean()
        assert metrics["logps/chosen"].item() == pytest.approx(mean_c.mean().item(), abs=1e-5)
    elif method == "dpo":
        sum_c = torch.stack([(w * t).sum() for w, t in zip(w_c, chosen, strict=True)])
        sum_r = torch.stack([(w * t).sum() for w, t in zip(w_r, rejected, strict=True)])
        ref_c = torch.tensor([item["ref_chosen_logps"] for item in items], dtype=torch.float64)
        ref_r = torch.tensor([item["ref_rejected_logps"] for item in items], dtype=torch.float64)
        expected = -logsigmoid(beta * ((sum_c - ref_c) - (sum_r - ref_r))).mean()
    else:
        expected = nll
    assert metrics["nll_loss"].item() == pytest.approx(nll.item(), abs=1e-5)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("method", ["orpo", "dpo", "sft"])
def test_weights_of_one_give_exactly_the_unweighted_losses(method, packed):
    model = random_llama(97, 128)
    pairs = random_pairs(6, seed=13)
    plain = _with_reference([as_item(pair) for pair in pairs], seed=5)
    ones = _with_reference(_weighted(pairs, seed=0, ones=True), seed=5)
    collator = PackedPreferenceCollator(0) if packed else PreferenceCollator(0)
    module = _module(model, method, packed, beta=0.2)
    with torch.no_grad():
        loss, metrics = module.compute_loss(collator(plain))
        loss_ones, metrics_ones = module.compute_loss(collator(ones))
    assert torch.equal(loss, loss_ones)
    assert all(torch.equal(metrics[key], metrics_ones[key]) for key in metrics)


def test_sft_on_prompt_weighs_prompt_tokens_one():
    """TRL's ORPO NLL over prompt + chosen: the prompt's tokens keep weight 1, packed and unpacked."""
    model = random_llama(97, 128)
    pairs = random_pairs(4, seed=14)
    items = _weighted(pairs, seed=6)
    total = count = 0.0
    for pair, item in zip(pairs, items, strict=True):
        sequence = torch.tensor([pair.prompt_ids + pair.chosen_ids])
        with torch.no_grad():
            logps = torch.log_softmax(model(input_ids=sequence).logits[0].double(), -1)
        token_logps = logps[:-1].gather(-1, sequence[0, 1:, None])[:, 0]
        weights = torch.tensor(
            [1.0] * (len(pair.prompt_ids) - 1) + item["chosen_weights"], dtype=torch.float64
        )
        total += -(weights * token_logps).sum().item()
        count += weights.sum().item()
    for packed in (False, True):
        module = PreferenceModule(model, method="orpo", beta=0.1, packed=packed, sft_on_prompt=True).eval()
        collator = PackedPreferenceCollator(0) if packed else PreferenceCollator(0)
        with torch.no_grad():
            _, metrics = module.compute_loss(collator(items))
        assert metrics["nll_loss"].item() == pytest.approx(total / count, abs=1e-5)


def _train_losses(folder) -> list[float]:
    with open(folder / "csv" / "metrics.csv") as f:
        return [float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")]


def test_the_student_stage_trains_on_the_weighted_losses(make_cfg, tmp_path):
    """`optim.answer_rank_decay` reaches the losses of a run: other losses than with 0, the
    same packed and unpacked (the rare-disease answers: a header and the teacher's names, one a line)."""
    common = ("task=rare_disease", "optim=orpo", "debug=smoke", "stage=student")
    run(make_cfg(*common, "optim.answer_rank_decay=0", output_dir=tmp_path / "plain"))
    for name, packed in (("packed", "true"), ("unpacked", "false")):
        overrides = (*common, "optim.answer_rank_decay=2", f"optim.packed={packed}")
        run(make_cfg(*overrides, output_dir=tmp_path / name))
    plain, packed, unpacked = (_train_losses(tmp_path / n) for n in ("plain", "packed", "unpacked"))
    assert len(plain) == len(packed) == len(unpacked) > 0
    assert packed == pytest.approx(unpacked, abs=1e-4)
    assert packed != pytest.approx(plain, abs=1e-2)


@pytest.mark.parametrize("packed", [False, True])
def test_dpo_reference_log_probs_are_weighted_and_cached_apart(tmp_path, packed):
    """The reference's summed log-probs are weighted as the policy's are; the stage cache keeps
    weighted and unweighted ones apart (a DPO run with the option after one without)."""
    from mint.optim.forward import text_sides_logits
    from mint.optim.reference import reference_logps

    model = random_llama(97, 128)
    pairs = random_pairs(4, seed=15)
    collator = PackedPreferenceCollator(0) if packed else PreferenceCollator(0)

    def reference(items):
        scored = reference_logps(
            model,
            items,
            collator,
            batch_size=2,
            forward=text_sides_logits,
            cache_dir=tmp_path,
            student={"s": 1},
        )
        return [(item["ref_chosen_logps"], item["ref_rejected_logps"]) for item in scored]

    plain, weighted = reference(pairs), reference(_weighted(pairs, seed=7))
    chosen, rejected = _hand_logps(model, pairs)
    expected_plain, expected_weighted = [], []
    for item, c, r in zip(_weighted(pairs, seed=7), chosen, rejected, strict=True):
        expected_plain.append((c.sum().item(), r.sum().item()))
        w_c, w_r = (
            torch.tensor(item[f"{side}_weights"], dtype=torch.float64) for side in ("chosen", "rejected")
        )
        expected_weighted.append(((w_c * c).sum().item(), (w_r * r).sum().item()))
    assert np.allclose(plain, expected_plain, atol=1e-4)
    assert np.allclose(weighted, expected_weighted, atol=1e-4)
