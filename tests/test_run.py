"""End-to-end runs of the spine on the tiny student: what a user of `python -m mint.run` relies on."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from peft import PeftModel

import mint.optim.reference
from mint.config import Modality
from mint.data.example_prefs import make_example_prefs, write_jsonl
from mint.optim.module import PreferenceModule
from mint.pairs.rows import pairs_to_texts, read_preference_rows, split_rows
from mint.pairs.text import PreferenceCollator, tokenize_preference_rows
from mint.run import run
from mint.stages.student import student_job
from mint.student.kinds import KINDS

TRL_METRICS = [
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
]


@pytest.fixture(scope="module")
def prefs_path(tmp_path_factory) -> Path:
    return write_jsonl(make_example_prefs(n=200, seed=3), tmp_path_factory.mktemp("data") / "prefs.jsonl")


def with_own_cache(cfg, tmp_path: Path):
    """The run with a stage cache of this test's own: what it counts cannot come from an earlier test."""
    cfg.paths.cache_dir = str(tmp_path / "cache")
    return cfg


def _train_losses(run_dir: Path) -> list[float]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


@pytest.mark.parametrize("method", ["orpo", "dpo", "sft"])
def test_smoke_run_trains_saves_adapter_and_writes_results(make_cfg, prefs_path, method):
    cfg = make_cfg("task=custom", f"task.prefs_path={prefs_path}", f"optim={method}", "debug=smoke")
    results = run(cfg)
    run_dir = Path(cfg.paths.output_dir)

    on_disk = json.loads((run_dir / "results.json").read_text())
    assert on_disk == results
    assert results["train/steps"] == cfg.trainer.max_steps
    assert "train/loss" in results and "val/loss" in results
    assert (
        json.loads((run_dir / "student" / "metrics.json").read_text())["train/steps"] == cfg.trainer.max_steps
    )
    assert "| `val/loss` |" in (run_dir / "results.md").read_text()
    if method in ("orpo", "dpo"):
        assert all(f"train/{m}" in results for m in TRL_METRICS)
    if method == "orpo":
        assert {"train/log_odds_ratio", "train/log_odds_chosen", "train/nll_loss"} <= results.keys()

    adapter = run_dir / "student" / "adapter"
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    assert (adapter / "tokenizer_config.json").exists()
    # checkpoints keep the trainable weights only (LoRA + the tiny student's embeddings/head)
    ckpt = torch.load(
        run_dir / "student" / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu"
    )
    assert ckpt["state_dict"] and all("lora_" in k or "modules_to_save" in k for k in ckpt["state_dict"])
    assert "optimizer_states" in ckpt and ckpt["global_step"] == cfg.trainer.max_steps
    assert len(_train_losses(run_dir)) == cfg.trainer.max_steps


@pytest.mark.parametrize("method", ["orpo", "dpo", "sft"])
def test_alignment_learns_the_toy_preferences(make_cfg, tmp_path, prefs_path, method):
    """On a learnable set the loss falls and the chosen answer becomes the more likely one."""
    common = ["task=custom", f"task.prefs_path={prefs_path}", "logger=csv", "trainer.log_every_n_steps=1"]
    before = run(make_cfg(*common, "optim=none", output_dir=tmp_path / "base"))
    # pure DPO from the base here (init_from_sft: see test_dpo_starts_from_the_sft_adapter)
    extra = ["optim.init_from_sft=false"] if method == "dpo" else []
    cfg = make_cfg(*common, f"optim={method}", "trainer.max_steps=150", *extra, output_dir=tmp_path / method)
    after = run(cfg)

    losses = _train_losses(Path(cfg.paths.output_dir))
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10
    if method == "dpo":  # rewards are relative to the reference: 0 for all pairs before training
        # 20 validation pairs, pure DPO from a random base: the trajectory is chaotic at this size
        # (this run gave 1.0 before the answer-only forward and 0.75 after, with log-probs equal and
        # gradients within 1e-6 on the first step). The bar: well above chance (0.5), margins up.
        assert after["val/rewards/accuracies"] >= 0.7
        assert after["val/rewards/margins"] > 0
    else:
        assert after["val/rewards/accuracies"] >= before["val/rewards/accuracies"] + 0.3
        assert after["val/nll_loss"] < before["val/nll_loss"]


def test_saved_adapter_reproduces_the_evaluated_model(make_cfg, prefs_path, shared_cache):
    """Reloading the PEFT adapter onto the base gives the validation loss the run reported."""
    cfg = make_cfg("task=custom", f"task.prefs_path={prefs_path}", "optim=sft", "debug=smoke")
    results = run(cfg)

    rows = read_preference_rows(prefs_path)[: cfg.task.max_samples]
    split = split_rows(rows, cfg.task.val_fraction, cfg.seed)
    job = student_job(cfg, KINDS[Modality.text])
    base, tokenizer = job.kind.load(  # the base without a fresh adapter
        job.student, cache_dir=str(job.cache_dir), corpus=pairs_to_texts(split.train), with_adapter=False
    )
    model = PeftModel.from_pretrained(base, Path(cfg.paths.output_dir) / "student" / "adapter").eval()
    pairs, _ = tokenize_preference_rows(
        split.val, tokenizer, max_length=cfg.task.max_length, max_prompt_length=cfg.task.max_prompt_length
    )
    batch = PreferenceCollator(pad_token_id=tokenizer.pad_token_id)(pairs)
    module = PreferenceModule(model, method="sft").eval()
    with torch.no_grad():
        loss, _ = module.compute_loss(batch)
    assert loss.item() == pytest.approx(results["val/loss"], rel=1e-5)


class Probe4bit(L.Callback):
    """Test helper: writes to `path` what the trained model is made of (4-bit layers, layers in
    all, non-finite trainable weights after training)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_end(self, trainer, pl_module) -> None:
        import bitsandbytes as bnb

        model = pl_module.model
        self.path.write_text(
            json.dumps(
                {
                    "layers": model.config.num_hidden_layers,
                    "linear4bit": sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()),
                    "nf4": sorted(
                        {
                            m.weight.quant_state.quant_type
                            for m in model.modules()
                            if isinstance(m, bnb.nn.Linear4bit)
                        }
                    ),
                    "non_finite": [
                        n
                        for n, p in model.named_parameters()
                        if p.requires_grad and not torch.isfinite(p).all()
                    ],
                    "trainable": sum(p.requires_grad for p in model.parameters()),
                }
            )
        )


def test_qlora_4bit_run_on_cpu_trains_on_4bit_layers(make_cfg, tmp_path, prefs_path):
    """quant=nf4: every projection of every decoder layer is a bitsandbytes Linear4bit (NF4) while
    the run trains; losses and the trained weights are finite."""
    probe = tmp_path / "probe.json"
    results = run(
        make_cfg(
            "task=custom",
            f"task.prefs_path={prefs_path}",
            "optim=orpo",
            "quant=nf4",
            "debug=smoke",
            "trainer.max_steps=4",
            "+callbacks.probe._target_=tests.test_run.Probe4bit",
            f"+callbacks.probe.path={probe}",
        )
    )
    seen = json.loads(probe.read_text())
    assert seen["linear4bit"] == 7 * seen["layers"] > 0  # q, k, v, o, gate, up, down per layer
    assert seen["nf4"] == ["nf4"]
    assert seen["trainable"] > 0 and seen["non_finite"] == []
    assert results["train/steps"] == 4
    assert math.isfinite(results["train/loss"]) and math.isfinite(results["val/loss"])


def test_same_seed_same_numbers(make_cfg, tmp_path, prefs_path):
    args = (
        "task=custom",
        f"task.prefs_path={prefs_path}",
        "optim=orpo",
        "debug=smoke",
        "trainer.max_steps=6",
    )
    first = run(make_cfg(*args, output_dir=tmp_path / "a"))
    second = run(make_cfg(*args, output_dir=tmp_path / "b"))
    other = run(make_cfg(*args, "seed=7", output_dir=tmp_path / "c"))
    assert first["time/run_s"] > 0  # how long it took is recorded, and is all that may differ
    assert {k: v for k, v in first.items() if not k.startswith("time/")} == {
        k: v for k, v in second.items() if not k.startswith("time/")
    }
    assert first["val/loss"] != other["val/loss"]


def test_a_validation_right_after_the_last_step_is_reported_not_rerun(
    make_cfg, tmp_path, prefs_path, monkeypatch
):
    """When fit validated after its last step, the stage reports that pass instead of validating
    the same weights again; its numbers are what a second pass gives."""
    from mint.stages.trainer import LastValidation

    validations = []
    real_validate = L.Trainer.validate
    monkeypatch.setattr(
        L.Trainer, "validate", lambda self, *a, **k: validations.append(1) or real_validate(self, *a, **k)
    )
    args = ("task=custom", f"task.prefs_path={prefs_path}", "optim=orpo", "debug=smoke")
    every_2 = "+trainer.val_check_interval=2"
    reported = run(make_cfg(*args, "trainer.max_steps=4", every_2, output_dir=tmp_path / "reported"))
    assert validations == []
    monkeypatch.setattr(LastValidation, "on_validation_end", lambda *a: None)  # as if it had not
    rerun = run(make_cfg(*args, "trainer.max_steps=4", every_2, output_dir=tmp_path / "rerun"))
    assert validations == [1]
    val = {k: v for k, v in rerun.items() if k.startswith("val/")}
    assert {"val/loss", "val/rewards/accuracies"} <= val.keys()
    assert {k: v for k, v in reported.items() if k.startswith("val/")} == pytest.approx(val, abs=1e-6)
    monkeypatch.undo()
    monkeypatch.setattr(
        L.Trainer, "validate", lambda self, *a, **k: validations.append(1) or real_validate(self, *a, **k)
    )
    # stopped after step 3, between two validations: the stage validates the final weights
    run(make_cfg(*args, "trainer.max_steps=3", every_2, output_dir=tmp_path / "between"))
    assert validations == [1, 1]


def test_missing_dataset_is_a_clear_error_and_writes_nothing(make_cfg, tmp_path):
    cfg = make_cfg("task=custom", f"task.prefs_path={tmp_path}/nope.jsonl", "debug=smoke")
    with pytest.raises(FileNotFoundError, match=r"task\.prefs_path=.*nope\.jsonl"):
        run(cfg)
    assert not (Path(cfg.paths.output_dir) / "results.json").exists()


def test_cli_entry_point_runs_the_default_job(default_job):
    """`python -m mint.run` as a user types it: the main job (task=tissue, ORPO) at smoke size, in
    Hydra's run dir, every stage, the headline metrics printed."""
    run_dir = default_job.run_dir
    results = json.loads((run_dir / "results.json").read_text())
    assert results["train/steps"] == 12
    assert {"teacher/test/top1", "test/top1", "test/format_valid"} <= results.keys()
    # where the time went, for a user sizing a run
    assert all(results[f"time/{part}_s"] > 0 for part in ("student/fit", "test/generate", "test/rank"))
    assert results["time/run_s"] > results["time/student_s"] > results["time/student/fit_s"]
    assert (run_dir / ".hydra" / "config.yaml").exists()
    assert (run_dir / "eval" / "predictions.jsonl").exists()
    assert "results in" in default_job.printed and "test/top1" in default_job.printed


class RecordSteps(L.Callback):
    """Test helper: appends the global step after every training batch to `path`, one per line
    (a file, so that it also counts in another process and across runs)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_end(self, trainer, *args) -> None:
        with open(self.path, "a") as f:
            f.write(f"{trainer.global_step}\n")


def recorded_steps(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def test_resume_from_a_mid_run_checkpoint_trains_only_the_remaining_steps_and_matches(
    make_cfg, tmp_path, prefs_path
):
    """Resuming from step 6 of 12 trains steps 7..12 only, from the checkpoint's weights (a
    doctored checkpoint gives another result), and ends like the uninterrupted run; a finished
    run resumed with resume=true trains no step."""
    steps = tmp_path / "steps.txt"
    args = (
        "task=custom",
        f"task.prefs_path={prefs_path}",
        "optim=orpo",
        "debug=smoke",
        "callbacks.model_checkpoint.save_top_k=-1",
        "+callbacks.record_steps._target_=tests.test_run.RecordSteps",
        f"+callbacks.record_steps.path={steps}",
    )

    def counted(*extra: str, output_dir: Path) -> tuple[dict, list[int]]:
        steps.unlink(missing_ok=True)
        results = run(make_cfg(*args, *extra, output_dir=output_dir))
        return results, recorded_steps(steps)

    full, trained = counted(output_dir=tmp_path / "full")
    assert trained == list(range(1, 13))
    mid = tmp_path / "full" / "student" / "checkpoints" / "step6.ckpt"
    assert torch.load(mid, weights_only=True)["global_step"] == 6

    resumed, trained = counted(f"ckpt_path={mid}", output_dir=tmp_path / "resumed")
    assert trained == list(range(7, 13))  # the remaining steps only
    assert resumed["train/steps"] == full["train/steps"] == 12
    assert resumed["val/loss"] == pytest.approx(full["val/loss"], abs=1e-5)
    assert resumed["val/rewards/accuracies"] == full["val/rewards/accuracies"]

    # The same steps from other weights: the resumed run really starts from what the file holds.
    checkpoint = torch.load(mid, weights_only=True)
    generator = torch.Generator().manual_seed(0)
    checkpoint["state_dict"] = {
        k: v + 0.5 * torch.randn(v.shape, generator=generator) for k, v in checkpoint["state_dict"].items()
    }
    doctored = tmp_path / "doctored.ckpt"
    torch.save(checkpoint, doctored)
    other, trained = counted(f"ckpt_path={doctored}", output_dir=tmp_path / "doctored")
    assert trained == list(range(7, 13))
    assert abs(other["val/loss"] - full["val/loss"]) > 1e-3

    # A finished run "resumes" at its end: no step trained, the same validation.
    again, trained = counted("resume=true", output_dir=tmp_path / "full")
    assert trained == []
    assert again["train/steps"] == 12
    assert again["val/loss"] == pytest.approx(full["val/loss"], abs=1e-5)
    # Its time: this invocation's, and the run's total over both (what a comparison table reports).
    assert full["time/total_s"] == full["time/run_s"] and resumed["time/total_s"] == resumed["time/run_s"]
    assert again["time/total_s"] == pytest.approx(full["time/total_s"] + again["time/run_s"], abs=0.11)


def test_any_local_llama_folder_as_student(make_cfg, tmp_path, prefs_path):
    """`student.name_or_path=DIR` trains on a local HF-format Llama (here: one saved with save_pretrained)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mint.student.tiny import train_tokenizer

    folder = tmp_path / "my-llama"
    tokenizer = train_tokenizer(pairs_to_texts(read_preference_rows(prefs_path)), vocab_size=300)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)

    cfg = make_cfg(
        "task=custom",
        f"task.prefs_path={prefs_path}",
        f"student.name_or_path={folder}",
        "debug=smoke",
        "trainer.max_steps=3",
        output_dir=tmp_path / "run",
    )
    results = run(cfg)
    assert results["train/steps"] == 3
    adapter_config = json.loads(
        (tmp_path / "run" / "student" / "adapter" / "adapter_config.json").read_text()
    )
    assert adapter_config["base_model_name_or_path"] == str(folder)


def test_wandb_logger_writes_an_offline_run(make_cfg, tmp_path, prefs_path, monkeypatch):
    """The default logger of `make run`: W&B offline, files inside the run folder, no key needed."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = make_cfg(
        "task=custom",
        f"task.prefs_path={prefs_path}",
        "debug=smoke",
        "logger=wandb",
        "trainer.max_steps=2",
        output_dir=tmp_path / "run",
    )
    run(cfg)
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


def test_dpo_reference_logps_are_computed_once_and_reused(make_cfg, tmp_path, prefs_path, monkeypatch):
    calls = []
    real = mint.optim.reference.attach_reference_logps
    monkeypatch.setattr(
        mint.optim.reference, "attach_reference_logps", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    args = (
        "task=custom",
        f"task.prefs_path={prefs_path}",
        "optim=dpo",
        "debug=smoke",
        "trainer.max_steps=3",
        "task.max_samples=40",
    )
    first = run(with_own_cache(make_cfg(*args, output_dir=tmp_path / "a"), tmp_path))
    assert len(calls) == 2  # train + val pairs
    second = run(with_own_cache(make_cfg(*args, "optim.beta=0.5", output_dir=tmp_path / "b"), tmp_path))
    assert len(calls) == 2  # the second run (another beta) reused the cached reference
    assert first["train/steps"] == second["train/steps"] == 3

    # A reference adapter of the user's own (student.adapter_path) is known by its content too:
    # retrained in place, its reference log-probs are computed again.
    mine = tmp_path / "mine"
    shutil.copytree(tmp_path / "a" / "student" / "adapter", mine)
    again = (*args, f"student.adapter_path={mine}")
    run(with_own_cache(make_cfg(*again, output_dir=tmp_path / "c"), tmp_path))
    run(with_own_cache(make_cfg(*again, "optim.beta=0.5", output_dir=tmp_path / "d"), tmp_path))
    assert len(calls) == 4  # computed for this adapter once, then reused
    weights = "adapter_model.safetensors"
    shutil.copy(tmp_path / "b" / "student" / "adapter" / weights, mine / weights)  # retrained in place
    run(with_own_cache(make_cfg(*again, output_dir=tmp_path / "e"), tmp_path))
    assert len(calls) == 6


def test_dpo_starts_from_the_sft_adapter(make_cfg, tmp_path, prefs_path, monkeypatch):
    """optim=dpo first trains SFT on the same pairs (once, cached) and starts from that adapter."""
    from safetensors.torch import load_file

    common = ("task=custom", f"task.prefs_path={prefs_path}", "debug=smoke", "task.max_samples=40")
    dpo = run(with_own_cache(make_cfg(*common, "optim=dpo", output_dir=tmp_path / "dpo"), tmp_path))
    again = run(
        with_own_cache(
            make_cfg(*common, "optim=dpo", "optim.beta=0.5", output_dir=tmp_path / "dpo_beta"), tmp_path
        )
    )
    sft = run(with_own_cache(make_cfg(*common, "optim=sft", output_dir=tmp_path / "sft"), tmp_path))

    # The first DPO run trained its SFT start (logs and checkpoints in its sft_start/); the
    # second (another beta) found it in the cache and trained only DPO.
    assert (tmp_path / "dpo" / "sft_start" / "csv" / "metrics.csv").is_file()
    assert not (tmp_path / "dpo_beta" / "sft_start").exists()
    assert dpo["sft_start/adapter"] == again["sft_start/adapter"]
    weights = "adapter_model.safetensors"
    start = load_file(Path(dpo["sft_start/adapter"]) / weights)
    standalone = load_file(tmp_path / "sft" / "student" / "adapter" / weights)
    assert start.keys() == standalone.keys()
    assert all(torch.equal(start[k], standalone[k]) for k in start)  # the SFT start is the SFT method
    after_dpo = load_file(tmp_path / "dpo" / "student" / "adapter" / weights)
    assert any(not torch.equal(start[k], after_dpo[k]) for k in start)  # DPO trained on from it
    assert sft["train/steps"] == dpo["train/steps"] == 12


def test_a_dpo_run_stopped_in_its_sft_start_resumes_it_from_its_checkpoint(
    make_cfg, tmp_path, prefs_path, monkeypatch
):
    """resume=true continues the SFT start from its step-6 checkpoint, not from step 0."""
    import mint.stages.student

    common = (
        "task=custom",
        f"task.prefs_path={prefs_path}",
        "debug=smoke",
        "task.max_samples=40",
        "optim=dpo",
    )
    failing = ("+callbacks.fail._target_=tests.test_reliability.FailAtStep", "+callbacks.fail.at_step=8")
    argv = f"+callbacks.fail.argv_file={tmp_path / 'argv.json'}"
    with pytest.raises(RuntimeError, match="boom at step 8"):
        run(with_own_cache(make_cfg(*common, *failing, argv, output_dir=tmp_path / "dpo"), tmp_path))
    last = tmp_path / "dpo" / "sft_start" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 6
    assert not (tmp_path / "dpo" / "student").exists()  # stopped before DPO itself

    starts = []
    real_fit = mint.stages.student.fit_student
    monkeypatch.setattr(
        mint.stages.student,
        "fit_student",
        lambda job, *a, **k: starts.append((job.method.method, job.ckpt_path)) or real_fit(job, *a, **k),
    )
    resumed = run(with_own_cache(make_cfg(*common, "resume=true", output_dir=tmp_path / "dpo"), tmp_path))
    assert starts[0] == ("sft", str(last))  # the SFT start continued from its checkpoint
    assert resumed["train/steps"] == 12
    sft_steps = json.loads((Path(resumed["sft_start/adapter"]).parent / "metrics.json").read_text())
    assert sft_steps["train/steps"] == 12


def test_a_dpo_run_after_an_sft_run_starts_from_its_adapter(make_cfg, tmp_path, prefs_path):
    """A comparison runs optim=sft before optim=dpo on the same pairs: DPO's SFT start is that run's
    adapter, not a second SFT training. Other SFT settings train their own start."""
    from safetensors.torch import load_file

    common = ("task=custom", f"task.prefs_path={prefs_path}", "debug=smoke", "task.max_samples=40")
    run(with_own_cache(make_cfg(*common, "optim=sft", output_dir=tmp_path / "sft"), tmp_path))
    dpo = run(with_own_cache(make_cfg(*common, "optim=dpo", output_dir=tmp_path / "dpo"), tmp_path))

    assert not (tmp_path / "dpo" / "sft_start").exists()  # no SFT trained inside the DPO run
    weights = "adapter_model.safetensors"
    start = load_file(Path(dpo["sft_start/adapter"]) / weights)
    sft = load_file(tmp_path / "sft" / "student" / "adapter" / weights)
    assert start.keys() == sft.keys() and all(torch.equal(start[k], sft[k]) for k in start)
    after_dpo = load_file(tmp_path / "dpo" / "student" / "adapter" / weights)
    assert any(not torch.equal(start[k], after_dpo[k]) for k in start)
    assert dpo["train/steps"] == 12

    # Another learning rate is another SFT: the DPO run trains its own start.
    other = run(
        with_own_cache(
            make_cfg(*common, "optim=dpo", "student.learning_rate=1e-3", output_dir=tmp_path / "dpo_lr"),
            tmp_path,
        )
    )
    assert (tmp_path / "dpo_lr" / "sft_start" / "csv" / "metrics.csv").is_file()
    assert other["sft_start/adapter"] != dpo["sft_start/adapter"]
