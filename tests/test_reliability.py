"""Reliability and safety (issue 8): resume after kill -9, bad input, determinism, safe loading,
no secrets on disk, non-finite losses.

Complements tests/test_cache.py (atomic cache entries), tests/test_run.py (resume via ckpt_path,
same seed same numbers on the example task), tests/test_preference_data.py (malformed rows) and
tests/test_config.py (config typos), without repeating them.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import MissingConfigException
from omegaconf import open_dict
from omegaconf.errors import MissingMandatoryValue

import mint.stages.student
import mint.student.load as load_module
from mint.cache import cached, config_key, verify
from mint.config import ConfigError, Modality
from mint.data.task_data import Sample, TaskData
from mint.errors import exit_status
from mint.leakage import LeakageError
from mint.optim.module import PreferenceModule
from mint.pairs.rows import read_preference_rows
from mint.report import REDACTED, scrub, scrub_job_start, secret_values
from mint.resume import comparable_config, find_resume_checkpoint, start_checkpoint
from mint.run import run
from mint.stages.student import student_job
from mint.stages.trainer import build_loggers
from mint.student import load_student
from mint.student.kinds import KINDS
from mint.student.tiny import train_tokenizer
from mint.teacher.crossfit import load_state_dict
from tests.conftest import compose_cfg
from tests.test_run import recorded_steps

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = str(ROOT / "conf")
SMOKE = ("task=example", "debug=smoke")


def _env(**extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **extra,
    }


def _mint(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """`python -m mint.run ARGS`, stdout and stderr into `log` (a file: a pipe nobody reads
    while the run goes on could fill up and block it)."""
    with open(log, "w") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "mint.run", *args],
            cwd=ROOT,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )


class StallOnce(L.Callback):
    """Test helper: the first run waits at `at_step` (after a checkpoint exists) until it is killed
    or a SIGTERM has arrived (time.sleep would resume after the signal handler, so it polls);
    a rerun (the marker file exists) passes straight through."""

    def __init__(self, at_step: int, marker: str) -> None:
        self.at_step = at_step
        self.marker = Path(marker)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            deadline = time.time() + 600
            while not trainer.received_sigterm and time.time() < deadline:
                time.sleep(0.05)


class Notify(L.Callback):
    """Test helper: a callback configured with a token, as a chat-notification callback would be."""

    def __init__(self, token: str, channel: str = "") -> None:
        self.token = token
        self.channel = channel


def _stalling_run(run_dir: Path, log_dir: Path, cache: Path, marker: Path, every: int = 4) -> list[str]:
    """The command line of a 12-step ORPO run (checkpoints every `every` steps) that `StallOnce`
    holds at step 10, each finished step appended to log_dir/steps.txt (`RecordSteps`, across the
    run and its rerun); the cache is the session's, where the in-process reference run finds its
    student."""
    return [
        *SMOKE,
        "optim=orpo",
        "logger=csv",
        f"callbacks.model_checkpoint.every_n_train_steps={every}",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={run_dir}",
        f"paths.log_dir={log_dir}",
        f"paths.cache_dir={cache}",
        "+callbacks.stall._target_=tests.test_reliability.StallOnce",
        "+callbacks.stall.at_step=10",
        f"+callbacks.stall.marker={marker}",
        "+callbacks.record_steps._target_=tests.test_run.RecordSteps",
        f"+callbacks.record_steps.path={log_dir / 'steps.txt'}",
    ]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, shared_cache) -> dict:
    """The results of `_stalling_run`'s job run in-process and never stopped: what a resumed run
    must end like (shared by the kill -9 and the SIGTERM test)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    return run(compose_cfg([*SMOKE, "optim=orpo"], root=root, output_dir=root / "run", cache=shared_cache))


# --- 1. kill -9 during student training, then resume=true ----------------------------
def test_kill_9_during_training_then_resume_true_ends_like_an_uninterrupted_run(
    tmp_path, shared_cache, uninterrupted
):
    """SIGKILL after the step-8 checkpoint; the same command + resume=true finishes from it.

    Tolerance: val/loss within 1e-5 absolute (the reference run is in-process, possibly with
    another torch thread count), val/rewards/accuracies and the step count exact.
    """
    run_dir, marker = tmp_path / "run", tmp_path / "stalled"
    args = _stalling_run(run_dir, tmp_path, shared_cache, marker)
    first_log = tmp_path / "first.log"
    proc = _mint(args, _env(), first_log)
    try:
        deadline = time.time() + 240
        while not marker.exists():
            assert proc.poll() is None, f"the run ended before stalling:\n{first_log.read_text()[-3000:]}"
            assert time.time() < deadline, "the run never reached step 10"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()  # no-op once it is dead; ends it if an assertion above failed
    assert proc.returncode == -signal.SIGKILL
    checkpoints = run_dir / "student" / "checkpoints"
    assert (checkpoints / "last.ckpt").is_file() and not (run_dir / "results.json").exists()
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 8

    rerun = _mint([*args, "resume=true"], _env(), tmp_path / "rerun.log")
    rerun.wait(timeout=300)
    output = (tmp_path / "rerun.log").read_text()
    assert rerun.returncode == 0, output[-3000:]
    assert "resume=true: continuing from" in output and str(checkpoints / "last.ckpt") in output
    resumed = json.loads((run_dir / "results.json").read_text())
    # Steps 1-10 before the kill (9 and 10 lost with it), then 9-12 from the step-8 checkpoint:
    # a rerun that started over would train 1-12 again and, seeded, end the same.
    assert recorded_steps(tmp_path / "steps.txt") == [*range(1, 11), *range(9, 13)]
    assert resumed["train/steps"] == uninterrupted["train/steps"] == 12
    assert resumed["val/loss"] == pytest.approx(uninterrupted["val/loss"], abs=1e-5)
    assert resumed["val/rewards/accuracies"] == uninterrupted["val/rewards/accuracies"]


class _KilledHere(BaseException):
    """Stands for a kill: nothing after the point where it is raised happens."""


def test_a_kill_between_writing_a_checkpoint_and_renaming_it_leaves_the_previous_one_readable(
    make_cfg, monkeypatch
):
    """Checkpoints are written whole to a temp file beside `last.ckpt`, then renamed onto it. A
    kill after step 4's file is written and before its rename leaves step 2's `last.ckpt` whole.

    Beside it, in the same folder: a rename within one file system is atomic; from another
    (a node-local /tmp to shared storage) it is a copy, and a kill during it leaves half a file.
    """
    renames: list[tuple[Path, Path, int]] = []
    real_replace, real_rename = os.replace, os.rename

    def kill_at_the_second_rename_onto_last(real):
        def rename(src, dst, *args, **kwargs):
            if Path(dst).name == "last.ckpt":
                written = torch.load(src, weights_only=True)["global_step"]  # the new file, whole
                renames.append((Path(src), Path(dst), written))
                if len(renames) == 2:
                    raise _KilledHere
            return real(src, dst, *args, **kwargs)

        return rename

    monkeypatch.setattr(os, "replace", kill_at_the_second_rename_onto_last(real_replace))
    monkeypatch.setattr(os, "rename", kill_at_the_second_rename_onto_last(real_rename))
    cfg = make_cfg(*SMOKE, "trainer.max_steps=4", "callbacks.model_checkpoint.every_n_train_steps=2")
    with pytest.raises(_KilledHere):
        run(cfg)
    monkeypatch.undo()
    last = Path(cfg.paths.output_dir) / "student" / "checkpoints" / "last.ckpt"
    assert [written for *_, written in renames] == [2, 4]
    assert all(src.parent == dst.parent == last.parent for src, dst, _ in renames)
    assert torch.load(last, weights_only=True)["global_step"] == 2


def _fake_run(log_dir: Path, name: str, config: dict, age_s: float = 0) -> Path:
    folder = log_dir / "runs" / "2026-11-28" / name
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    last = folder / "student" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"ckpt")
    os.utime(last, (time.time() - age_s, time.time() - age_s))
    return last


def test_resume_true_in_a_new_timestamped_folder_finds_the_newest_earlier_run_with_this_config(
    make_cfg, tmp_path
):
    cfg = make_cfg(*SMOKE, "resume=true", output_dir=tmp_path / "runs" / "2026-11-28" / "10-00-00_new")
    mine = json.loads(json.dumps(comparable_config(cfg)))  # what .hydra/config.yaml holds
    older = _fake_run(tmp_path, f"08-00-00_{cfg.run_name}", {**mine, "resume": False}, age_s=600)
    newer = _fake_run(tmp_path, f"09-00-00_{cfg.run_name}", mine, age_s=60)
    _fake_run(tmp_path, f"09-30-00_{cfg.run_name}", {**mine, "seed": 7})  # another config: never resumed
    _fake_run(tmp_path, "09-40-00_other-run", mine)  # another run_name
    assert find_resume_checkpoint(cfg) == newer
    assert older.is_file()

    fresh = make_cfg(*SMOKE, "resume=true", "seed=3", output_dir=tmp_path / "runs" / "x" / "y")
    assert start_checkpoint(fresh) is None  # nothing with this config: start from scratch

    both = make_cfg(*SMOKE, "resume=true", f"ckpt_path={newer}")
    with pytest.raises(ValueError, match="set only one"):
        start_checkpoint(both)
    with pytest.raises(FileNotFoundError, match=r"ckpt_path=.*nope\.ckpt"):
        start_checkpoint(make_cfg(*SMOKE, f"ckpt_path={tmp_path}/nope.ckpt"))


def test_resume_true_in_the_same_folder_refuses_a_checkpoint_of_other_settings(make_cfg, tmp_path, caplog):
    """A finished 4-step run, then reruns in its folder: with another learning rate resume=true
    stops before any step and names the key; with a setting that leaves the weights alone (how
    often to log) it goes on; an explicit ckpt_path= with another learning rate continues with a
    warning."""
    args = (*SMOKE, "optim=orpo", "trainer.max_steps=4")
    run_dir = tmp_path / "run"
    first = run(make_cfg(*args, output_dir=run_dir))
    last = run_dir / "student" / "checkpoints" / "last.ckpt"
    assert first["train/steps"] == 4 and last.is_file()
    before = last.read_bytes()

    other_lr = make_cfg(*args, "resume=true", "student.learning_rate=0.01", output_dir=run_dir)
    with pytest.raises(
        ValueError,
        match=r"resume=true: .*last\.ckpt was trained with other settings \(.*student\.learning_rate: 0\.002 -> 0\.01",
    ):
        run(other_lr)
    assert last.read_bytes() == before  # the checkpoint is untouched

    again = run(make_cfg(*args, "resume=true", "trainer.log_every_n_steps=2", output_dir=run_dir))
    assert again["train/steps"] == 4 and again["val/loss"] == pytest.approx(first["val/loss"], abs=1e-6)

    with caplog.at_level(logging.WARNING, logger="mint"):
        run(
            make_cfg(
                *args, f"ckpt_path={last}", "student.learning_rate=0.01", output_dir=tmp_path / "on_purpose"
            )
        )
    assert (
        "was trained with other settings (" in caplog.text
        and "student.learning_rate: 0.002 -> 0.01" in caplog.text
    )


def test_a_cache_build_killed_by_sigkill_leaves_a_temp_folder_that_is_never_read(tmp_path):
    """A SIGKILL skips every cleanup: what is left is a dot-folder beside the entry, never the entry."""
    config = {"k": 10}
    key = config_key(config)
    leftover = tmp_path / "prefs" / f".{key}.abc123"  # what `cached` was building when killed
    leftover.mkdir(parents=True)
    (leftover / "prefs.jsonl").write_text('{"half": ')
    entry = cached(tmp_path, "prefs", config, lambda f: (f / "prefs.jsonl").write_text("{}\n"))
    assert entry.name == key and verify(entry) and (entry / "prefs.jsonl").read_text() == "{}\n"


# --- 2. bad input: clear message, non-zero exit, nothing half-written --------------------
def test_unknown_task_name_is_named():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        with pytest.raises(MissingConfigException) as err:
            compose("config", overrides=["task=nope"])
    assert "task/nope" in str(err.value) or "'nope'" in str(err.value)


def test_a_vision_student_on_the_text_task_stops_before_any_work(make_cfg):
    """(The reverse, a text student on the image task, is in tests/test_pipeline.py; from the
    command line it is one line, `mint: error: ...`, and exit status 2.)"""
    cfg = make_cfg(*SMOKE, "student=tiny_mllama")
    with pytest.raises(ValueError, match="student=tiny_mllama is an image model.*student=tiny_llama"):
        run(cfg)
    run_dir = Path(cfg.paths.output_dir)
    assert not (run_dir / "results.json").exists() and not (run_dir / "student").exists()


def test_the_old_spelling_of_the_image_modality_names_the_new_one(make_cfg):
    cfg = make_cfg("task=tissue", "debug=smoke", "student.modality=vision")
    with pytest.raises(ValueError, match="student.modality='vision' is now spelt student.modality=image"):
        run(cfg)
    assert not (Path(cfg.paths.output_dir) / "teacher").exists()


def test_4bit_without_a_usable_bitsandbytes_names_the_key_and_writes_no_results(make_cfg, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        load_module.importlib.util,
        "find_spec",
        lambda name, *args: None if name == "bitsandbytes" else find_spec(name, *args),
    )
    cfg = make_cfg(*SMOKE, "quant=nf4")
    with pytest.raises(ImportError, match=r"student\.quantization.*bitsandbytes"):
        run(cfg)
    assert not (Path(cfg.paths.output_dir) / "results.json").exists()


def test_a_label_outside_the_label_set_names_the_sample_and_the_range():
    with pytest.raises(ValueError, match=r"test sample 'p3': label 2 outside 0\.\.1"):
        TaskData(
            "toy",
            ["A", "B"],
            {
                "train": [Sample("p1", 0, "note one")],
                "val": [Sample("p2", 1, "note two")],
                "test": [Sample("p3", 2, "note three")],
            },
        )


# --- 3. determinism of the whole pipeline ---------------------------------------------------
def test_same_seed_gives_a_byte_identical_preference_set_and_identical_metrics(make_cfg, tmp_path):
    """rare_disease at smoke size, twice, each with its own empty cache; then another seed."""
    args = ("task=rare_disease", "debug=smoke", "optim=sft", "trainer.max_steps=3", "task.eval.max_samples=4")

    def pipeline(name: str, *extra: str) -> tuple[dict, bytes]:
        cfg = make_cfg(*args, *extra, output_dir=tmp_path / name)
        cfg.paths.cache_dir = str(tmp_path / f"cache_{name}")
        results = run(cfg)
        (prefs,) = (tmp_path / f"cache_{name}" / "prefs").glob("*/prefs.jsonl")
        return results, prefs.read_bytes()

    first, first_prefs = pipeline("a")
    second, second_prefs = pipeline("b")
    other, other_prefs = pipeline("c", "seed=7", "stage=prefs")
    assert first_prefs == second_prefs and len(first_prefs.splitlines()) > 10
    timings = [k for k in first if "time" in k or k.endswith("_per_s") or k.endswith("total_s")]
    assert {k: v for k, v in first.items() if k not in timings} == {
        k: v for k, v in second.items() if k not in timings
    }
    assert {"test/top1", "teacher/test/top1", "val/loss"} <= first.keys()
    assert other_prefs != first_prefs
    assert other["teacher/test/mrr"] != first["teacher/test/mrr"]


# --- 5. safe loading, no secrets on disk -----------------------------------------------------
class _RunsCode:
    """Unpickling this touches a file: what a malicious checkpoint would do, harmlessly."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_teacher_checkpoints_load_weights_only_and_refuse_code(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "hyper_parameters": {"lr": 1e-3}}, good)
    assert torch.equal(load_state_dict(good)["w"], torch.ones(2))

    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "payload": _RunsCode(marker)}, evil)
    with pytest.raises(pickle.UnpicklingError, match="evil.ckpt: refusing"):
        load_state_dict(evil)
    assert not marker.exists()


def test_remote_code_in_a_model_folder_never_runs_unless_the_user_trusts_it(tmp_path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for student in sorted(p.stem for p in (Path(CONF_DIR) / "student").glob("*.yaml")):
            assert compose("config", overrides=[f"student={student}"]).student.trust_remote_code is False

    folder, marker = tmp_path / "remote-model", tmp_path / "remote_code_ran"
    train_tokenizer(["a note", "an answer"], vocab_size=300).save_pretrained(folder)  # loads fine
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": "evil",
                "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"},
            }
        )
    )
    (folder / "evil.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n")
    with pytest.raises(ValueError, match="(?s)custom code.*trust_remote_code=True"):
        load_student(str(folder), cache_dir=str(tmp_path))
    assert not marker.exists()


def test_secret_scrubbing_of_configs():
    secrets = secret_values(
        {"WANDB_API_KEY": "wandb-secret-123", "HF_TOKEN": "hf_abcdefgh", "TOKENIZERS_PARALLELISM": "false"}
    )
    assert secrets == {"wandb-secret-123", "hf_abcdefgh"}
    config = {
        "logger": {"api_key": "typed-in-literally", "name": "run-wandb-secret-123"},
        "student": {"pad_token_id": 0, "max_new_tokens": 5, "name": "tiny"},
        "tags": ["hf_abcdefgh", "orpo"],
    }
    assert scrub(config, secrets) == {
        "logger": {"api_key": REDACTED, "name": f"run-{REDACTED}"},
        "student": {"pad_token_id": 0, "max_new_tokens": 5, "name": "tiny"},
        "tags": [REDACTED, "orpo"],
    }


def test_a_secret_key_typed_on_the_command_line_is_redacted_from_dot_hydra_and_argv(tmp_path, monkeypatch):
    """What Hydra wrote before the job started, in its own formats; other values stay as they were."""
    typed = "+logger.wandb.api_key=typed-in-0123456789"
    hydra_dir = tmp_path / ".hydra"
    hydra_dir.mkdir()
    (hydra_dir / "overrides.yaml").write_text(f"- task=tissue\n- {typed}\n- seed=3\n")
    (hydra_dir / "config.yaml").write_text(
        "seed: 3\nlogger:\n  wandb:\n    project: mint\n    api_key: typed-in-0123456789\n"
    )
    (hydra_dir / "hydra.yaml").write_text(
        f"hydra:\n  job:\n    override_dirname: {typed[1:]},seed=3,task=tissue\n  overrides:\n    task:\n    - {typed}\n"
    )
    monkeypatch.setattr(sys, "argv", ["mint.run", "task=tissue", typed, "student.token_budget=9"])
    scrub_job_start(tmp_path)
    for path in hydra_dir.glob("*.yaml"):
        assert "typed-in-0123456789" not in path.read_text(), path.name
    assert yaml.safe_load((hydra_dir / "overrides.yaml").read_text()) == [
        "task=tissue",
        f"+logger.wandb.api_key={REDACTED}",
        "seed=3",
    ]
    assert yaml.safe_load((hydra_dir / "config.yaml").read_text()) == {
        "seed": 3,
        "logger": {"wandb": {"project": "mint", "api_key": REDACTED}},
    }
    assert "seed=3,task=tissue" in (hydra_dir / "hydra.yaml").read_text()
    assert sys.argv == [
        "mint.run",
        "task=tissue",
        f"+logger.wandb.api_key={REDACTED}",
        "student.token_budget=9",
    ]


def test_the_logged_config_has_env_secrets_redacted(make_cfg, monkeypatch):
    """build_loggers resolves the config (so ${oc.env:...} becomes the secret) before logging it."""
    monkeypatch.setenv("WANDB_API_KEY", "wandb-key-0123456789abcdef")
    cfg = make_cfg(*SMOKE, "logger=csv")
    with open_dict(cfg):
        cfg.callbacks.notify = {"_target_": "my.Notify", "token": "${oc.env:WANDB_API_KEY}"}
    job = student_job(cfg, KINDS[Modality.text])  # where the run's config is scrubbed for its loggers
    (csv_logger,) = build_loggers(job.loggers, job.hparams)
    csv_logger.save()
    files = [p for p in Path(cfg.paths.output_dir).rglob("*") if p.is_file()]
    assert [p.name for p in files] == ["hparams.yaml"]
    assert b"wandb-key-0123456789abcdef" not in files[0].read_bytes()
    assert yaml.safe_load(files[0].read_text())["callbacks"]["notify"]["token"] == REDACTED


@pytest.mark.slow  # two CLI start-ups' worth (about 25 s); the fast test above covers the logged config
def test_no_secret_reaches_any_file_of_the_run_folder(tmp_path):
    """WANDB_API_KEY interpolated into the config and HF_TOKEN typed on the command line: neither
    appears in .hydra/, the CSV and W&B loggers' files, results or logs."""
    wandb_key, hf_token = "wandb-key-0123456789abcdef", "hf_TOKEN0123456789"
    run_dir = tmp_path / "run"
    proc = _mint(
        [
            *SMOKE,
            "trainer.max_steps=2",
            "logger=wandb",
            "+logger.csv._target_=lightning.pytorch.loggers.CSVLogger",
            "+logger.csv.save_dir=${paths.output_dir}",
            "+logger.csv.name=csv",
            "+callbacks.notify._target_=tests.test_reliability.Notify",
            "+callbacks.notify.token=${oc.env:WANDB_API_KEY}",
            f"+callbacks.notify.channel={hf_token}",
            f"hydra.run.dir={run_dir}",
            f"paths.log_dir={tmp_path}",
        ],
        _env(WANDB_MODE="offline", WANDB_API_KEY=wandb_key, HF_TOKEN=hf_token),
        tmp_path / "cli.log",  # the terminal's output, outside the run folder
    )
    proc.wait(timeout=300)
    assert proc.returncode == 0, (tmp_path / "cli.log").read_text()[-3000:]
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    (hparams,) = [p for p in files if p.name == "hparams.yaml"]
    assert any(p.suffix == ".wandb" for p in files) and (run_dir / ".hydra" / "overrides.yaml").is_file()
    leaked = [str(p) for p in files for s in (wandb_key, hf_token) if s.encode() in p.read_bytes()]
    assert leaked == []
    notify = yaml.safe_load(hparams.read_text())["callbacks"]["notify"]
    assert notify["token"] == notify["channel"] == REDACTED  # the config was logged, scrubbed


# --- 6. non-finite loss or gradient: a clear stop, the last good checkpoint kept ---------------
class _NaNGradient(torch.autograd.Function):
    """Adds 0 to the loss, sends NaN back as the gradient: an overflow inside backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.shape = x.shape
        return x.new_zeros(())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return torch.full(ctx.shape, float("nan"))


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_non_finite_training_stops_clearly_and_keeps_the_last_good_checkpoint(make_cfg, monkeypatch, where):
    class Broken(PreferenceModule):
        def compute_loss(self, batch):
            loss, metrics = super().compute_loss(batch)
            if self.training and self.global_step == 5:
                if where == "loss":
                    loss = loss * float("nan")
                else:  # a finite loss whose gradient overflows
                    param = next(p for p in self.parameters() if p.requires_grad)
                    loss = loss + _NaNGradient.apply(param)
            return loss, metrics

    monkeypatch.setattr(mint.stages.student, "PreferenceModule", Broken)
    cfg = make_cfg(*SMOKE, "callbacks.model_checkpoint.every_n_train_steps=2")
    with pytest.raises(
        FloatingPointError, match=rf"non-finite (training )?{where}.* at step 5.*checkpoint is kept"
    ):
        run(cfg)
    run_dir = Path(cfg.paths.output_dir)
    last = torch.load(run_dir / "student" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())
    assert not (run_dir / "results.json").exists()


def test_sigterm_during_training_writes_a_checkpoint_and_resume_true_ends_like_an_uninterrupted_run(
    tmp_path, shared_cache, uninterrupted
):
    """SIGTERM (SLURM's warning before preemption) during step 10 of 12, before any periodic
    checkpoint (every 12 steps): the run writes last.ckpt after that step and exits with status
    143, no results.json; resume=true finishes from it, and its step-12 checkpoint replaces
    last.ckpt (Lightning's version counter would write last-v1.ckpt beside it, and the next
    resume=true would go back to step 11)."""
    run_dir, marker = tmp_path / "run", tmp_path / "waiting"
    args = _stalling_run(run_dir, tmp_path, shared_cache, marker, every=12)
    proc = _mint(args, _env(), tmp_path / "first.log")
    try:
        deadline = time.time() + 240
        while not marker.exists():
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.time() < deadline, "the run never reached step 10"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        proc.kill()
    printed = (tmp_path / "first.log").read_text()
    assert proc.returncode == 143, printed[-3000:]
    last = run_dir / "student" / "checkpoints" / "last.ckpt"
    assert f"mint: error: SIGTERM: stopped after step 11, checkpoint {last}" in printed
    assert torch.load(last, weights_only=True)["global_step"] == 11  # the step in progress, finished
    assert not (run_dir / "results.json").exists()

    rerun = _mint([*args, "resume=true"], _env(), tmp_path / "rerun.log")
    assert rerun.wait(timeout=300) == 0, (tmp_path / "rerun.log").read_text()[-3000:]
    resumed = json.loads((run_dir / "results.json").read_text())
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt", "step12.ckpt"]
    assert torch.load(last, weights_only=True)["global_step"] == 12
    # Steps 1-11 before the stop, then only step 12: the rerun trained from the step-11 checkpoint.
    assert recorded_steps(tmp_path / "steps.txt") == list(range(1, 13))
    assert resumed["train/steps"] == uninterrupted["train/steps"] == 12
    assert resumed["val/loss"] == pytest.approx(uninterrupted["val/loss"], abs=1e-5)
    assert resumed["val/rewards/accuracies"] == uninterrupted["val/rewards/accuracies"]


# --- data too small, tasks that cannot serve the run, files that are not UTF-8 JSON lines -------
def _row(i: int) -> dict:
    prompt = [{"role": "user", "content": f"Patient {i}: tall, seizures. Which condition?"}]
    answer = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    return {"prompt": prompt, "chosen": answer("Velmora syndrome"), "rejected": answer("Ostrand disease")}


def _prefs_file(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps(_row(i)) + "\n" for i in range(n)))
    return path


@pytest.mark.parametrize(
    "rows,extra,message",
    [
        (
            1,
            ("optim.batch_size=1",),
            r"no validation pairs \(1 training pairs\), but objective=val/rewards/accuracies",
        ),
        (5, ("optim.batch_size=8",), r"4 training pairs, fewer than one batch \(optim.batch_size=8\)"),
    ],
)
def test_preference_data_too_small_is_refused_before_training(make_cfg, tmp_path, rows, extra, message):
    path = _prefs_file(tmp_path / "prefs.jsonl", rows)
    cfg = make_cfg("task=custom", f"task.prefs_path={path}", "debug=smoke", *extra)
    with pytest.raises(ValueError, match=message):
        run(cfg)
    run_dir = Path(cfg.paths.output_dir)
    assert not (run_dir / "results.json").exists() and not (run_dir / "student").exists()


def test_an_objective_the_run_cannot_measure_is_refused_before_any_work(tmp_path):
    run_dir = tmp_path / "run"
    process = _mint(
        ["task=example", "objective=test/top1", f"hydra.run.dir={run_dir}"], _env(), tmp_path / "out"
    )
    assert process.wait(timeout=300) == 2
    assert (
        "mint: error: objective=test/top1: task=example has no teacher and no test split"
        in (tmp_path / "out").read_text()
    )
    assert not (run_dir / "results.json").exists() and not (run_dir / "student").exists()


def empty_test_split() -> TaskData:
    """A task source whose test split is empty."""
    train = [Sample(f"t{i}", i % 2, text=f"note {i}") for i in range(8)]
    val = [Sample(f"v{i}", i % 2, text=f"val note {i}") for i in range(2)]
    return TaskData("rare_disease", ["A", "B"], {"train": train, "val": val, "test": []})


def test_a_task_that_cannot_serve_the_run_is_refused_before_the_teacher(make_cfg, tmp_path):
    cfg = make_cfg("task=rare_disease", "debug=smoke", output_dir=tmp_path / "run")
    cfg.task.source = {"_target_": f"{__name__}.empty_test_split"}
    with pytest.raises(
        ValueError,
        match=r"the test split\(s\) of task.source are empty \(\{'train': 8, 'val': 2, 'test': 0\}\)",
    ):
        run(cfg)
    # 10 names + 20 negatives + the truth do not fit in the smoke panel's 24 diseases
    cfg = make_cfg("task=rare_disease", "debug=smoke", "task.prefs.q=20", output_dir=tmp_path / "run")
    with pytest.raises(
        ValueError,
        match=r"task.answer.n=10 \+ task.prefs.q=20 \+ 1 \(the truth\) = 31 names, but task=rare_disease has 24 labels",
    ):
        run(cfg)
    assert not (tmp_path / "run" / "teacher").exists()


def test_files_that_are_not_utf8_json_lines_are_refused_naming_the_file_and_line(tmp_path):
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(
        (json.dumps(_row(0)) + "\n").encode()
        + json.dumps(_row(1)).replace("tall", "gro\xdf").encode("latin-1")
    )
    for on_error in ("strict", "skip"):  # the whole file is the wrong one: never skipped line by line
        with pytest.raises(ValueError, match=rf"{latin1}: line 2, column \d+: not UTF-8 text \(byte 0xdf\)"):
            read_preference_rows(latin1, on_error=on_error)
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"PK\x03\x04\x00\x00 a zip file, renamed")
    with pytest.raises(ValueError, match=rf"{binary}: line 1: a NUL byte: this looks like a binary file"):
        read_preference_rows(binary)
    with_bom = tmp_path / "bom.jsonl"
    with_bom.write_bytes(b"\xef\xbb\xbf" + (json.dumps(_row(0)) + "\n").encode())
    assert read_preference_rows(with_bom)[0]["chosen"][0]["content"] == "Velmora syndrome"


def test_a_config_error_from_the_command_line_is_one_line_and_exit_status_2(tmp_path):
    run_dir = tmp_path / "run"
    process = _mint(
        ["task=example", "optim.beta=-1", f"hydra.run.dir={run_dir}"], _env(), tmp_path / "out.txt"
    )
    assert process.wait(timeout=300) == 2
    printed = (tmp_path / "out.txt").read_text()
    assert "mint: error: optim.beta=-1.0: expected > 0" in printed
    assert f"the traceback is in {run_dir / 'run.log'}" in printed
    assert "Traceback" not in printed and "HYDRA_FULL_ERROR=1 for" not in printed
    assert "Traceback" in (run_dir / "run.log").read_text()
    assert not (run_dir / "results.json").exists()


class FailAtStep(L.Callback):
    """Test helper: a failure during the work (as an error inside torch would be) at `at_step`,
    after writing the process's command line (what W&B records with a run) to `argv_file`."""

    def __init__(self, at_step: int, argv_file: str, note: str = "") -> None:
        self.at_step, self.argv_file = at_step, Path(argv_file)

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == self.at_step:
            self.argv_file.write_text(json.dumps(sys.argv))
            raise RuntimeError(f"boom at step {self.at_step}")


def test_a_failure_during_the_work_is_exit_status_1_with_no_results_and_no_secret_in_dot_hydra(
    tmp_path, shared_cache
):
    """From the command line: an error while training is one line and exit status 1, no
    results.json; a secret typed on the command line is gone from `.hydra/*.yaml` (which Hydra
    writes before the job starts) and from the command line W&B would record."""
    token = "hf_TOKEN0123456789abc"
    run_dir, argv_file = tmp_path / "run", tmp_path / "argv.json"
    process = _mint(
        [
            *SMOKE,
            "trainer.max_steps=3",
            "trainer.enable_progress_bar=false",
            "+callbacks.fail._target_=tests.test_reliability.FailAtStep",
            "+callbacks.fail.at_step=1",
            f"+callbacks.fail.argv_file={argv_file}",
            f"+callbacks.fail.note={token}",
            f"hydra.run.dir={run_dir}",
            f"paths.log_dir={tmp_path}",
            f"paths.cache_dir={shared_cache}",
        ],
        _env(HF_TOKEN=token),
        tmp_path / "out.txt",
    )
    try:
        assert process.wait(timeout=300) == 1, (tmp_path / "out.txt").read_text()[-3000:]
    finally:
        process.kill()
    printed = (tmp_path / "out.txt").read_text()
    assert "mint: error: boom at step 1" in printed and "Traceback" not in printed
    assert not (run_dir / "results.json").exists()
    hydra_files = sorted(p.name for p in (run_dir / ".hydra").glob("*.yaml"))
    assert hydra_files == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    for name in hydra_files:
        text = (run_dir / ".hydra" / name).read_text()
        assert token not in text and REDACTED in text, name
    argv = json.loads(argv_file.read_text())
    assert f"+callbacks.fail.note={REDACTED}" in argv and not any(token in a for a in argv)


def test_exit_status_tells_input_errors_from_failures_of_the_work():
    assert exit_status(ConfigError("optim.beta=-1.0: expected > 0")) == 2
    assert exit_status(FileNotFoundError("task.prefs_path='x' does not exist")) == 2
    assert exit_status(LeakageError("preference dataset contains 1 test sample(s)")) == 2
    assert exit_status(FloatingPointError("non-finite training loss")) == 1
    assert exit_status(RuntimeError("CUDA out of memory")) == 1
    assert exit_status(KeyError("objective='val/x' is not among this run's results")) == 2
    assert exit_status(PermissionError(13, "Permission denied", "/data/gmdb")) == 2
    assert exit_status(MissingMandatoryValue("Missing mandatory value: task.prefs_path")) == 2
    # a bug or a full disk is not the user's input
    assert exit_status(IndexError("index 7 is out of bounds")) == 1
    assert exit_status(TypeError("forward() got an unexpected keyword argument")) == 1
    assert exit_status(OSError(errno.ENOSPC, "No space left on device")) == 1
