"""Others can train on MINT's preference data: TRL's ORPO trainer runs on a pipeline's dataset as saved.

Slow (TRL is a test-only dependency: `make test-slow` installs it with the `bench` extra).
"""

from __future__ import annotations

import math
from pathlib import Path

import datasets
import pytest

from mint.run import run
from mint.student.tiny import build_tiny_llama

pytestmark = pytest.mark.slow


def test_trl_orpo_trains_on_the_pipeline_preference_dataset_unchanged(make_cfg, tmp_path, shared_cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    run(make_cfg("task=rare_disease", "debug=smoke", "stage=prefs", output_dir=tmp_path / "prefs"))
    entries = Path(shared_cache, "prefs").glob("*/prefs.jsonl")
    folder = next(e.parent for e in entries if "POTENTIAL_DISEASES" in e.read_text())
    dataset = datasets.load_from_disk(str(folder / "dataset"))
    assert {"prompt", "chosen", "rejected"} <= set(dataset.column_names)
    assert dataset[0]["chosen"][0]["role"] == "assistant"  # conversational: message lists

    texts = [m["content"] for row in dataset for m in row["prompt"] + row["chosen"] + row["rejected"]]
    model_dir = build_tiny_llama(tmp_path / "tiny", texts)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    args = ORPOConfig(
        output_dir=str(tmp_path / "trl"),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        bf16=False,
        max_length=1024,
    )
    trainer = ORPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


def _bench():
    """experiments/bench_preference.py: its MINT and TRL runners train on the same token ids."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "experiments" / "bench_preference.py"
    spec = importlib.util.spec_from_file_location("bench_preference", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_preference"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("loss", ["orpo", "dpo"])
def test_the_module_losses_equal_trls_trainers_on_the_same_tokens_and_weights(tmp_path, loss):
    """PreferenceModule's ORPO and DPO losses (packed and unpacked) equal TRL's ORPOTrainer and
    DPOTrainer (`compute_loss`) on the same pairs and weights, within 1e-5."""
    bench = _bench()
    settings = bench.Settings(pairs=8, batch_size=4, prompt_len=24, answer_len=6, rounds=1, steps_per_round=1)
    pairs = bench.make_pairs(settings)
    methods = [f"mint_packed_{loss}", f"mint_unpacked_{loss}", f"trl_{loss}"]
    runners = {m: bench.make_runner(m, settings, pairs, str(tmp_path / m)) for m in methods}
    for runner in runners.values():
        bench.perturb_lora(runner.model, settings.seed)  # a trained-looking adapter, the same in all
    for batch in ([0, 1, 2, 3], [4, 5, 6, 7]):
        trl = runners[f"trl_{loss}"].first_batch_loss(batch)
        for method in methods[:2]:
            assert runners[method].first_batch_loss(batch) == pytest.approx(trl, abs=1e-5), method
