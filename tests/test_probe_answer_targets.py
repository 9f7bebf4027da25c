"""experiments/probe_answer_targets.py: each answer token's weight follows the rank of its item."""

from __future__ import annotations

import pytest

from mint.student.tiny import train_tokenizer
from tests.conftest import load_experiment

probe = load_experiment("probe_answer_targets")

ANSWER = "POTENTIAL_DISEASES:\n1. 'Noonan syndrome'\n2. 'Kabuki syndrome'\n3. 'Sotos syndrome'"


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([ANSWER, "Williams syndrome"], vocab_size=300)


def test_header_and_first_item_weigh_one_and_item_k_weighs_k_to_the_minus_power(tokenizer) -> None:
    ids, weights = probe.answer_with_weights(tokenizer, ANSWER, power=2.0)
    assert ids == tokenizer(ANSWER + tokenizer.eos_token)["input_ids"]
    assert len(weights) == len(ids)
    # Each token's item, read off where its decoded text starts: the header and item 1 weigh 1,
    # item 2 1/4, item 3 (and the EOS after it) 1/9.
    second_item, third_item = ANSWER.index("\n2."), ANSWER.index("\n3.")
    start = 0
    for token_id, weight in zip(ids, weights, strict=True):
        expected = 1.0 if start <= second_item else (0.25 if start <= third_item else 1 / 9)
        assert weight == pytest.approx(expected), (tokenizer.decode([token_id]), start)
        start += len(tokenizer.decode([token_id]))
    assert weights[0] == 1.0 and weights[-1] == pytest.approx(1 / 9)


def test_power_zero_weighs_every_token_alike(tokenizer) -> None:
    _, weights = probe.answer_with_weights(tokenizer, ANSWER, power=0.0)
    assert set(weights) == {1.0}
