"""experiments/bench_pretrained.py: its --tiny mode runs every method end to end (TRL's ORPOTrainer,
MINT on the cached trunk), the losses agree on the first batch, and the headline lines parse."""

from __future__ import annotations

import pytest
import torch

from mint.pairs.text import TokenizedPair
from tests.conftest import load_experiment

pytest.importorskip("trl")  # TRL is the `bench` extra only


def test_tiny_mode_compares_mint_and_trl_on_equal_losses(tmp_path, capsys):
    bench = load_experiment("bench_pretrained")
    # The current thread count: the benchmark sets it for the whole process.
    threads = str(torch.get_num_threads())
    results = bench.main(["--tiny", "--threads", threads, "--cache-dir", str(tmp_path / "cache")])
    lines = capsys.readouterr().out.strip().splitlines()

    flop_line, speed_line = lines[-2:]
    assert flop_line.startswith("FLOP ratio vs TRL ORPO: ")
    assert speed_line.startswith("speedup vs TRL ORPO: ")
    flop_ratio = float(flop_line.rsplit(" ", 1)[1])
    speedup = float(speed_line.rsplit(" ", 1)[1])
    assert flop_ratio > 1.0  # the trunk and answer-only logits save work even at 1 epoch
    assert speedup > 0.0

    assert set(results) == set(bench.METHODS)
    trl = results["trl_orpo"].losses["trl_nll"]
    for method in ("mint", "mint_trl_nll"):
        # MINT's loss on the cached trunk states, with TRL's NLL over prompt + chosen
        assert results[method].losses["trl_nll"] == pytest.approx(trl, abs=1e-4), method
    # MINT's default NLL (the chosen answer only) is another loss
    assert results["mint"].losses["answer_nll"] != pytest.approx(trl, abs=1e-4)
    for result in results.values():
        assert result.wall_s > 0 and result.peak_rss_mib > 0
    assert results["mint"].build_s > 0  # the trunk was built, in the timed part


def test_flop_model_at_the_rare_disease_shape():
    """SmolLM2-135M, prompt 200 and answers 110 tokens, LoRA on the top 4 layers: TRL about 239
    GFLOP per pair and epoch, MINT about 55 plus 88 once for the trunk: 2.82x over 3 epochs."""
    bench = load_experiment("bench_pretrained")
    dims = bench.Dims(
        layers=30, hidden=576, intermediate=1536, heads=9, kv_heads=3, head_dim=64, vocab=49152, lora_r=16
    )
    flops = bench.flop_model(dims, [TokenizedPair([0] * 200, [0] * 110, [0] * 110)], top=4)
    assert flops.trl == pytest.approx(238.66, abs=0.01)
    assert flops.mint == pytest.approx(55.21, abs=0.01)
    assert flops.trunk == pytest.approx(87.86, abs=0.01)
    assert flops.ratio(3, flops.mint) == pytest.approx(2.824, abs=1e-3)
    # TRL's NLL needs logits at the prompt positions too
    assert flops.mint < flops.mint_trl_nll < flops.trl < flops.trl_default
