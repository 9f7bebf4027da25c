"""The packed [prompt, chosen, rejected] forward equals two separate forwards."""

from __future__ import annotations

import random

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import LlamaForCausalLM

from mint.optim.forward import (
    answer_logps,
    nll_from,
    packed_additive_mask,
    packed_bool_mask,
    packed_logps,
    packed_mask_mod,
    sft_labels,
    without_rejected,
)
from mint.optim.module import PreferenceModule
from mint.optim.reference import attach_reference_logps
from mint.pairs.packed import (
    REJECTED,
    LengthGroupedSampler,
    PackedPreferenceCollator,
    packed_length,
    padding_waste,
)
from mint.pairs.text import PreferenceCollator, TokenizedPair
from tests.conftest import random_llama

VOCAB, PAD = 97, 0


def tiny_llama(attn: str = "sdpa", seed: int = 0) -> LlamaForCausalLM:
    return random_llama(VOCAB, 128, attn=attn, seed=seed)


def random_pairs(n: int, seed: int = 0) -> list[TokenizedPair]:
    rng = random.Random(seed)

    def ids(lo: int, hi: int) -> list[int]:
        return [rng.randrange(1, VOCAB) for _ in range(rng.randint(lo, hi))]

    return [TokenizedPair(ids(1, 20), ids(1, 9), ids(1, 9)) for _ in range(n)]


def separate(model, pairs, *, sft_on_prompt: bool = False):
    """Reference: the unpacked path, every chosen and rejected sequence on its own row."""
    batch = PreferenceCollator(pad_token_id=PAD)(pairs)
    n = len(pairs)
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    sums, counts = answer_logps(logits, labels)
    nll = nll_from(logits[:n], sft_labels(batch, sft_on_prompt))
    return sums[:n], sums[n:], counts[:n], counts[n:], nll, logits


@pytest.mark.parametrize(("attn", "sft_on_prompt"), [("sdpa", False), ("sdpa", True), ("eager", False)])
def test_packed_logps_equal_separate_forwards(attn, sft_on_prompt):
    model = tiny_llama(attn)
    pairs = random_pairs(7)
    with torch.no_grad():
        ref = separate(model, pairs, sft_on_prompt=sft_on_prompt)
        out = packed_logps(model, PackedPreferenceCollator(PAD)(pairs), sft_on_prompt=sft_on_prompt)
    torch.testing.assert_close(out.chosen_sum, ref[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.rejected_sum, ref[1], atol=1e-5, rtol=0)
    assert out.chosen_count.tolist() == ref[2].tolist() and out.rejected_count.tolist() == ref[3].tolist()
    torch.testing.assert_close(out.nll, ref[4], atol=1e-5, rtol=0)


def test_packed_logits_equal_separate_logits():
    """Position by position, the answer logits of the packed row are those of the separate rows."""
    model = tiny_llama()
    pairs = random_pairs(5, seed=1)
    packed = PackedPreferenceCollator(PAD)(pairs)
    with torch.no_grad():
        packed_logits = model(
            input_ids=packed["input_ids"],
            attention_mask=packed_additive_mask(packed["segment_ids"], torch.float32),
            position_ids=packed["position_ids"],
            use_cache=False,
        ).logits
        sep_logits = separate(model, pairs)[5]
    for row, pair in enumerate(pairs):
        p, c, r = len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
        torch.testing.assert_close(packed_logits[row, : p + c], sep_logits[row, : p + c], atol=1e-5, rtol=0)
        rejected_row = sep_logits[len(pairs) + row]
        torch.testing.assert_close(
            packed_logits[row, p + c : p + c + r], rejected_row[p : p + r], atol=1e-5, rtol=0
        )


def test_packed_equals_separate_under_lora_with_gradients():
    model = get_peft_model(
        tiny_llama(seed=2),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    )
    pairs = random_pairs(6, seed=2)
    out = packed_logps(model, PackedPreferenceCollator(PAD)(pairs))
    (out.chosen_sum - out.rejected_sum).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    ref = separate(model, pairs)
    torch.testing.assert_close(out.chosen_sum, ref[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.rejected_sum, ref[1], atol=1e-5, rtol=0)
    (ref[0] - ref[1]).sum().backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(packed_grads[name], param.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("loss", ["orpo", "dpo", "sft"])
def test_module_loss_packed_equals_unpacked(loss):
    model = tiny_llama(seed=3)
    # A reference other than the policy, so DPO's rewards are not rounding noise around 0.
    reference = tiny_llama(seed=4)
    pairs = random_pairs(6, seed=3)
    items = attach_reference_logps(reference, pairs, PreferenceCollator(PAD), batch_size=4)
    items_packed = attach_reference_logps(reference, pairs, PackedPreferenceCollator(PAD), batch_size=4)
    for a, b in zip(items, items_packed, strict=True):
        assert abs(a["ref_chosen_logps"] - b["ref_chosen_logps"]) < 1e-5
        assert abs(a["ref_rejected_logps"] - b["ref_rejected_logps"]) < 1e-5
    results = {}
    for packed, collator in ((False, PreferenceCollator(PAD)), (True, PackedPreferenceCollator(PAD))):
        module = PreferenceModule(model, method=loss, sft_on_prompt=True, rpo_alpha=0.5, packed=packed)
        module.train(loss == "sft")  # sft training uses chosen only; evaluation compares both
        with torch.no_grad():
            results[packed] = module.compute_loss(collator(items))
    torch.testing.assert_close(results[True][0], results[False][0], atol=1e-5, rtol=0)
    assert results[True][1].keys() == results[False][1].keys()
    for key, value in results[False][1].items():
        torch.testing.assert_close(results[True][1][key], value, atol=1e-5, rtol=0, msg=key)


def test_sft_trains_on_the_packed_rows_cut_before_the_rejected_answers():
    """SFT's training step needs [prompt, chosen] only: the cut batch is as long as the longest
    prompt + chosen, holds no rejected token, and gives the chosen log-probs and NLL of the whole row."""
    model = tiny_llama(seed=5)
    pairs = random_pairs(6, seed=5)
    batch = PackedPreferenceCollator(PAD)(pairs)
    cut = without_rejected(batch)
    assert cut["input_ids"].shape[1] == max(len(p.prompt_ids) + len(p.chosen_ids) for p in pairs)
    assert cut["input_ids"].shape[1] < batch["input_ids"].shape[1]
    assert not (cut["segment_ids"] == REJECTED).any() and cut["position_ids"].shape == cut["input_ids"].shape
    with torch.no_grad():
        whole, part = (
            packed_logps(model, batch, sft_on_prompt=True),
            packed_logps(model, cut, sft_on_prompt=True),
        )
    torch.testing.assert_close(part.chosen_sum, whole.chosen_sum, atol=1e-5, rtol=0)
    torch.testing.assert_close(part.nll, whole.nll, atol=1e-5, rtol=0)
    assert part.rejected_count.sum() == 0


def test_flex_mask_mod_matches_dense_mask():
    segment_ids = PackedPreferenceCollator(PAD)(random_pairs(5, seed=4))["segment_ids"]
    batch, length = segment_ids.shape
    b = torch.arange(batch)[:, None, None, None]
    q = torch.arange(length)[None, None, :, None]
    kv = torch.arange(length)[None, None, None, :]
    from_mod = packed_mask_mod(segment_ids)(b, torch.zeros(()), q, kv)
    assert torch.equal(from_mod, packed_bool_mask(segment_ids))


@pytest.mark.slow
def test_flex_attention_forward_equals_sdpa():
    """The BlockMask path end to end (forward only: torch 2.14 has no FlexAttention backward on CPU).

    Compiles the flex kernel for the CPU, about a minute on 2 cores; on a GPU it is the training path.
    """
    batch = PackedPreferenceCollator(PAD)(random_pairs(5, seed=5))
    with torch.no_grad():
        dense = packed_logps(tiny_llama("sdpa"), batch)
        flex = packed_logps(tiny_llama("flex_attention"), batch)
    torch.testing.assert_close(flex.chosen_sum, dense.chosen_sum, atol=1e-5, rtol=0)
    torch.testing.assert_close(flex.rejected_sum, dense.rejected_sum, atol=1e-5, rtol=0)


def test_mask_pattern_by_hand():
    """prompt 2, chosen 2, rejected 1, one pad: rows are queries, columns keys."""
    segment_ids = PackedPreferenceCollator(PAD)(
        [TokenizedPair([5, 6], [7, 8], [9]), TokenizedPair([5] * 3, [7, 8], [9])]
    )["segment_ids"]
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 0, 0, 1, 0],  # rejected: prompt and itself, not chosen
            [0, 0, 0, 0, 0, 1],  # padding: itself only
        ],
        dtype=torch.bool,
    )
    assert torch.equal(packed_bool_mask(segment_ids)[0, 0], expected)


def test_length_grouped_sampler_cuts_padding_and_resumes():
    rng = random.Random(0)
    lengths = [rng.randint(10, 400) for _ in range(203)]
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=1, mega_batches=10)
    first = list(sampler)
    assert sorted(first) == list(range(len(lengths)))
    shuffled = list(range(len(lengths)))
    random.Random(1).shuffle(shuffled)
    assert padding_waste(lengths, first, 8) < 0.5 * padding_waste(lengths, shuffled, 8)
    assert list(sampler) != first  # a new epoch, a new order
    assert sampler.order(0) == first  # ... reproducible from the seed

    def batches(iterator, n):
        return [next(iterator).tolist() for _ in range(n)]

    data = list(range(len(lengths)))
    loader = StatefulDataLoader(data, batch_size=8, sampler=LengthGroupedSampler(lengths, 8, seed=5))
    iterator = iter(loader)
    head = batches(iterator, 3)
    state = loader.state_dict()
    tail = batches(iterator, 4)
    resumed = StatefulDataLoader(data, batch_size=8, sampler=LengthGroupedSampler(lengths, 8, seed=5))
    resumed.load_state_dict(state)
    assert batches(iter(resumed), 4) == tail
    assert head[0] != tail[0]


def test_unsupported_attention_is_refused():
    model = tiny_llama()
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="sdpa, eager or flex_attention"):
        packed_logps(model, PackedPreferenceCollator(PAD)(random_pairs(2)))


def test_packed_length():
    assert packed_length(TokenizedPair([1, 2, 3], [4], [5, 6])) == 6
