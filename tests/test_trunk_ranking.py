"""Closed-set ranking of a top-N student on cached trunk states gives the full model's scores, and
one trunk serves every adapter trained on the same base (mint/eval/trunk_ranking.py)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

import mint.optim.trunk
from mint.eval.ranking import score_candidates_full
from mint.eval.trunk_ranking import candidate_row, ranking_trunk, score_rows_full, trunk_label_scores
from mint.optim.trunk import top_lora
from tests.conftest import random_llama
from tests.test_ranking import TOKENIZER, VOCAB

LAYERS, TOP = 4, 2
HEADER = [7, 8, 9]  # what every candidate starts with, as the answer's header and "1. '" do


def prompts_and_candidates(n_prompts: int, n_candidates: int, seed: int):
    rng = random.Random(seed)
    prompts = [[rng.randrange(2, VOCAB) for _ in range(rng.randint(5, 30))] for _ in range(n_prompts)]
    cands = [
        HEADER + [rng.randrange(2, VOCAB) for _ in range(rng.randint(1, 6))] for _ in range(n_candidates)
    ]
    return prompts, cands


def top_lora_llama(seed: int):
    model = random_llama(VOCAB, 256, seed=0, layers=LAYERS)  # the same base for every seed
    torch.manual_seed(seed)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(model, top_lora(lora, model, TOP))
    return model.eval()


def test_one_packed_row_scores_every_candidate_as_its_own_sequence():
    model = random_llama(VOCAB, 256, seed=3, layers=LAYERS).eval()
    prompts, cands = prompts_and_candidates(3, 9, seed=4)
    rows = [candidate_row(p, cands) for p in prompts]
    assert rows[0].owners[: len(HEADER)] == [-1] * len(HEADER)  # the header is scored once
    packed = score_rows_full(model, rows, TOKENIZER.pad_token_id)
    for prompt, scores in zip(prompts, packed, strict=True):
        full = score_candidates_full(model, TOKENIZER, prompt, cands, batch_size=4).summed
        torch.testing.assert_close(scores, full, atol=1e-4, rtol=0)


def test_top_layers_on_the_cached_trunk_give_the_full_models_scores(tmp_path, monkeypatch):
    builds = []
    real = mint.optim.trunk.write_trunk
    monkeypatch.setattr(
        "mint.eval.trunk_ranking.write_trunk", lambda *a, **k: builds.append(1) or real(*a, **k)
    )
    prompts, cands = prompts_and_candidates(7, 6, seed=5)
    rows = [candidate_row(p, cands) for p in prompts]
    args = dict(top_layers=TOP, pad_token_id=0, batch_size=3, cache_dir=tmp_path, base={"t": 1})
    results = []
    for seed in (1, 2):  # two students trained on the same base: one trunk
        model = top_lora_llama(seed)
        trunk = ranking_trunk(model, rows, **args)
        assert trunk.start == LAYERS - TOP
        scores = trunk_label_scores(model, trunk, rows, batch_size=4)
        full = torch.stack(score_rows_full(model, rows, 0)).numpy()
        assert scores.shape == (len(prompts), len(cands))
        np.testing.assert_allclose(scores, full, atol=1e-4, rtol=0)
        results.append(scores)
    assert len(builds) == 1
    assert np.abs(results[0] - results[1]).max() > 1e-3  # the adapters, not the trunk, differ
    ranking_trunk(top_lora_llama(1), rows[:-1], **args)  # other rows: another entry
    assert len(builds) == 2


def test_the_eval_stage_ranks_a_top_layer_student_on_one_trunk_per_base(make_cfg, tmp_path, monkeypatch):
    """With student.train_top_layers the test labels are ranked on a cached trunk: the scores of the
    KV-cache path, and one trunk for the untouched base (optim=none) and a student trained on it."""
    import mint.stages.evaluate as evaluate
    from mint.run import run

    builds, scores = [], {}
    real_write = mint.optim.trunk.write_trunk
    monkeypatch.setattr(
        "mint.eval.trunk_ranking.write_trunk", lambda *a, **k: builds.append(1) or real_write(*a, **k)
    )
    for name in ("label_scores", "trunk_label_scores"):
        real = getattr(evaluate, name)
        monkeypatch.setattr(
            evaluate, name, lambda *a, _r=real, _n=name, **k: scores.setdefault(_n, _r(*a, **k))
        )

    def run_with(*overrides: str, name: str) -> dict:
        cfg = make_cfg("task=rare_disease", "debug=smoke", *overrides, output_dir=tmp_path / name)
        cfg.paths.cache_dir = str(tmp_path / "cache")  # a cache of this test's own
        return run(cfg)

    full = run_with("optim=none", name="full")
    assert builds == [] and set(scores) == {"label_scores"}
    top = run_with("optim=none", "student.train_top_layers=1", name="top")
    assert builds == [1]
    np.testing.assert_allclose(scores["trunk_label_scores"], scores["label_scores"], atol=1e-4, rtol=0)
    assert top["test/rank_topk"] == full["test/rank_topk"]
    trained = ("student.train_top_layers=1", "student.lora.modules_to_save=[lm_head]", "trainer.max_steps=2")
    run_with("optim=orpo", *trained, name="orpo")
    assert builds == [1]  # the test split's trunk, reused


def test_val_ranking_logs_the_validation_splits_top1_along_training(make_cfg, tmp_path, monkeypatch):
    """task.eval.val_ranking: after every validation pass, val/rank_top1 and val/rank_topk of the
    labels' scores on the validation split (on the trunk for a top-N student)."""
    import mint.stages.evaluate as evaluate
    from mint.metrics import topk_hits
    from mint.run import run

    calls, made = [], []
    real_scores, real_callback = evaluate.trunk_label_scores, evaluate.ClosedSetValidation
    monkeypatch.setattr(
        evaluate, "trunk_label_scores", lambda *a, **k: calls.append(real_scores(*a, **k)) or calls[-1]
    )
    monkeypatch.setattr(
        evaluate, "ClosedSetValidation", lambda *a: made.append(real_callback(*a)) or made[-1]
    )
    cfg = make_cfg(
        "task=rare_disease",
        "debug=smoke",
        "optim=orpo",
        "student.train_top_layers=1",
        "student.lora.modules_to_save=[lm_head]",
        "trainer.max_steps=4",
        "+trainer.val_check_interval=2",
        "task.eval.val_ranking=true",
        "task.eval.max_samples=12",
        output_dir=tmp_path / "run",
    )
    results = run(cfg)
    # two passes in training on the validation split (the second, after the last step, is the
    # one reported), then the test split
    assert len(calls) == 3 and [len(scores) for scores in calls] == [12] * 3
    truths = made[0].truths
    assert results["val/rank_top1"] == pytest.approx(topk_hits(calls[1], truths, 1).mean())
    assert results["val/rank_topk"] == pytest.approx(topk_hits(calls[1], truths, 10).mean())
    assert not np.array_equal(calls[1], calls[2])  # other cases
    assert 0 <= results["val/rank_top1"] <= results["val/rank_topk"] <= 1
