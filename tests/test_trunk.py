"""Training the top N layers on cached trunk states is exact: the loss and the LoRA gradients equal
those of the same partial-LoRA model run in full (mint/optim/trunk.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

import mint.optim.trunk
from mint.optim.module import PreferenceModule
from mint.optim.reference import attach_reference_logps
from mint.optim.trunk import TrunkCollator, cached_trunk, check_top_only, top_lora, with_trunk_rows
from mint.pairs.packed import PackedPreferenceCollator
from mint.pairs.text import PreferenceCollator, as_item
from tests.conftest import random_llama
from tests.test_packing import PAD, VOCAB, random_pairs

LAYERS, TOP = 4, 2


def partial_lora_llama(seed: int = 11, modules_to_save=("lm_head",)):
    model = random_llama(VOCAB, 128, seed=seed, layers=LAYERS)
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules="all-linear",
        modules_to_save=list(modules_to_save),
        init_lora_weights=False,
    )
    torch.manual_seed(seed)
    return get_peft_model(model, top_lora(lora, model, TOP))


def test_lora_sits_on_the_top_layers_only():
    model = partial_lora_llama()
    adapted = {name for name, p in model.named_parameters() if p.requires_grad}
    layers = {int(name.split(".layers.")[1].split(".")[0]) for name in adapted if ".layers." in name}
    assert layers == {2, 3}
    assert any("lm_head" in name for name in adapted)
    assert {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n in adapted if "lora_A" in n} >= {
        "q_proj",
        "down_proj",
    }
    check_top_only(model, LAYERS - TOP)
    with pytest.raises(ValueError, match="lie below layer 3"):
        check_top_only(model, 3)
    with pytest.raises(ValueError, match="modules_to_save"):
        partial_lora_llama(modules_to_save=("embed_tokens", "lm_head"))
    with pytest.raises(ValueError, match="between 1 and 3"):
        top_lora(LoraConfig(target_modules="all-linear"), random_llama(VOCAB, 128, layers=LAYERS), LAYERS)


def loss_and_grads(model, batch, packed, method, sft_on_prompt):
    module = PreferenceModule(model, method=method, beta=0.3, sft_on_prompt=sft_on_prompt, packed=packed)
    module.train()
    model.zero_grad()
    loss, _ = module.compute_loss(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    ("packed", "method", "sft_on_prompt", "weighted"),
    [
        (True, "orpo", False, False),
        (True, "dpo", True, False),
        (False, "orpo", True, False),
        (False, "dpo", False, False),
        (True, "orpo", True, True),  # rank-discounted answer tokens (optim.answer_rank_decay)
        (False, "dpo", False, True),
    ],
)
def test_trunk_cache_gives_the_loss_and_gradients_of_the_full_model(
    tmp_path, packed, method, sft_on_prompt, weighted
):
    model = partial_lora_llama()
    model.eval()  # no dropout anywhere: the two runs must see the same function
    pairs = random_pairs(6, seed=12)
    if weighted:
        pairs = [
            {
                **as_item(p),
                "chosen_weights": [0.5] * len(p.chosen_ids),
                "rejected_weights": [0.2] * len(p.rejected_ids),
            }
            for p in pairs
        ]
    inner = PackedPreferenceCollator(PAD) if packed else PreferenceCollator(PAD)
    trunk = cached_trunk(model, pairs, inner, top_layers=TOP, batch_size=4, cache_dir=tmp_path, base={"t": 1})
    assert isinstance(trunk.states, np.memmap) and trunk.start == LAYERS - TOP
    collator = TrunkCollator(inner, trunk)
    items = with_trunk_rows(pairs)
    if method == "dpo":  # the reference through the trunk equals the full one
        reference = random_llama(VOCAB, 128, seed=13, layers=LAYERS)
        full_ref = attach_reference_logps(model, pairs, inner, batch_size=4)
        items = attach_reference_logps(model, items, collator, batch_size=4)
        for a, b in zip(items, full_ref, strict=True):
            assert abs(a["ref_chosen_logps"] - b["ref_chosen_logps"]) < 1e-5
            assert abs(a["ref_rejected_logps"] - b["ref_rejected_logps"]) < 1e-5
        # a reference other than the policy, so the DPO loss has a gradient worth comparing
        items = [
            {**it, **r}
            for it, r in zip(items, attach_reference_logps(reference, pairs, inner, 4), strict=True)
        ]
        pairs = [{k: v for k, v in it.items() if k != "trunk_row"} for it in items]
    batch_full, batch_trunk = inner(pairs), collator(items)
    assert ("trunk_states" in batch_trunk) == packed and ("chosen_trunk" in batch_trunk) != packed
    full_loss, full_grads = loss_and_grads(model, batch_full, packed, method, sft_on_prompt)
    trunk_loss, trunk_grads = loss_and_grads(model, batch_trunk, packed, method, sft_on_prompt)
    torch.testing.assert_close(trunk_loss, full_loss, atol=1e-5, rtol=0)
    assert trunk_grads.keys() == full_grads.keys()
    for name, grad in full_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(trunk_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_trunk_is_cached_per_rows_base_and_layers(tmp_path, monkeypatch):
    builds = []
    real = mint.optim.trunk.build_trunk
    monkeypatch.setattr(mint.optim.trunk, "build_trunk", lambda *a, **k: builds.append(1) or real(*a, **k))
    model = partial_lora_llama()
    pairs, inner = random_pairs(5, seed=14), PackedPreferenceCollator(PAD)
    args = dict(top_layers=TOP, batch_size=2, cache_dir=tmp_path, base={"t": 1})
    first = cached_trunk(model, pairs, inner, **args)
    again = cached_trunk(partial_lora_llama(seed=15), pairs, inner, **args)  # another adapter: same trunk
    assert len(builds) == 1
    assert np.array_equal(first.states, again.states)
    cached_trunk(model, random_pairs(5, seed=16), inner, **args)  # other rows
    cached_trunk(model, pairs, inner, **{**args, "base": {"t": 2}})  # another base
    assert len(builds) == 3


def packed_trunk_states(model, batch):
    """The trunk states of a packed batch's rows, run directly (no cache, no shared prefix)."""
    from mint.optim.forward import attention_mask_for
    from mint.optim.trunk import trunk_states

    inputs = dict(
        input_ids=batch["input_ids"],
        attention_mask=attention_mask_for(model, batch["segment_ids"]),
        position_ids=batch["position_ids"],
    )
    return trunk_states(model, LAYERS - TOP, inputs)


@pytest.mark.parametrize("packed", [False, True])
def test_rows_with_one_prompt_run_it_once_and_keep_every_rows_states(tmp_path, monkeypatch, packed):
    """An image task's prompt is the same for every row: the trunk build runs it once (a KV cache
    the rows continue) and stores what each row alone would give, within 1e-5. Packed, the shared
    part may run into the chosen answers (here a common header), which the rejected ones must not see."""
    import random

    from mint.optim.trunk import trunk_states
    from mint.pairs.text import TokenizedPair

    runs = []
    real = mint.optim.trunk.shared_prefix_states
    monkeypatch.setattr(mint.optim.trunk, "shared_prefix_states", lambda *a: runs.append(a[3]) or real(*a))
    rng = random.Random(18)
    prompt = [rng.randrange(1, VOCAB) for _ in range(24)]
    header = [rng.randrange(1, VOCAB) for _ in range(3)]
    answer = lambda: header + [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 9))]  # noqa: E731
    pairs = [TokenizedPair(prompt, answer(), answer()) for _ in range(5)]
    model = partial_lora_llama()
    model.eval()
    inner = PackedPreferenceCollator(PAD) if packed else PreferenceCollator(PAD)
    trunk = cached_trunk(model, pairs, inner, top_layers=TOP, batch_size=2, cache_dir=tmp_path, base={})
    # every batch ran the prompt once (and the chosen answers' header with it)
    assert runs and min(runs) == len(prompt) + len(header)
    for index, pair in enumerate(pairs):
        if packed:
            alone = packed_trunk_states(model, PackedPreferenceCollator(PAD)([pair]))
            torch.testing.assert_close(trunk.sequence(index), alone[0], atol=1e-5, rtol=0)
            continue
        for side, sequence in (("chosen", 2 * index), ("rejected", 2 * index + 1)):
            ids = torch.tensor([pair.prompt_ids + getattr(pair, f"{side}_ids")])
            alone = trunk_states(
                model, LAYERS - TOP, dict(input_ids=ids, attention_mask=torch.ones_like(ids))
            )
            torch.testing.assert_close(trunk.sequence(sequence), alone[0], atol=1e-5, rtol=0)


def test_bfloat16_trunk_round_trips(tmp_path):
    model = partial_lora_llama().to(torch.bfloat16)
    pairs, inner = random_pairs(3, seed=17), PackedPreferenceCollator(PAD)
    trunk = cached_trunk(model, pairs, inner, top_layers=TOP, batch_size=2, cache_dir=tmp_path, base={})
    assert trunk.states.dtype == np.uint16 and trunk.dtype == torch.bfloat16
    batch = collated = TrunkCollator(inner, trunk)(with_trunk_rows(pairs))
    assert collated["trunk_states"].dtype == torch.bfloat16
    direct = packed_trunk_states(model, batch)
    real = batch["segment_ids"] != 0
    assert torch.equal(collated["trunk_states"][real], direct[real])


def test_one_trunk_serves_orpo_dpo_its_sft_start_and_a_beta_sweep(make_cfg, tmp_path, monkeypatch):
    """student.train_top_layers through the student stage: the trunk is built once for the rows."""
    from mint.data.example_prefs import make_example_prefs, write_jsonl
    from mint.run import run

    builds = []
    real = mint.optim.trunk.build_trunk
    monkeypatch.setattr(mint.optim.trunk, "build_trunk", lambda *a, **k: builds.append(1) or real(*a, **k))
    prefs = write_jsonl(make_example_prefs(n=60, seed=3), tmp_path / "prefs.jsonl")
    common = (
        "task=custom",
        f"task.prefs_path={prefs}",
        "debug=smoke",
        "trainer.max_steps=2",
        "task.max_samples=30",
        "student.train_top_layers=1",
        "student.lora.modules_to_save=[lm_head]",
    )

    def run_with(*overrides: str, name: str) -> dict:
        cfg = make_cfg(*common, *overrides, output_dir=tmp_path / name)
        cfg.paths.cache_dir = str(tmp_path / "cache")  # a cache of this test's own
        return run(cfg)

    orpo = run_with("optim=orpo", name="orpo")
    assert len(builds) == 1
    dpo = run_with("optim=dpo", name="dpo")  # its SFT start, the reference and DPO itself
    run_with("optim=dpo", "optim.beta=0.5", name="dpo_beta")
    assert len(builds) == 1
    assert orpo["train/steps"] == dpo["train/steps"] == 2
    assert orpo["time/student/trunk_s"] > 0 and dpo["time/student/reference_s"] > 0
    assert "time/student/reference_s" not in orpo  # ORPO has no reference model
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "dpo" / "student" / "adapter" / "adapter_model.safetensors")
    assert weights and all(".layers.1." in k or "lm_head" in k for k in weights)
