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
