"""Scale-out: the paper-scale experiment configs, multi-process training (DDP on CPU), Hydra
launchers, the Optuna sweep, and the GPU check's code path (its CPU dry run)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import hydra
import lightning as L
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import load_file

from mint.config import Stage
from mint.run import main, objective_value, run

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = str(ROOT / "conf")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


# --- paper-scale experiment configs ---------------------------------------------------
@pytest.mark.parametrize(
    ("experiment", "student_id", "source", "accumulate"),
    [
        ("paper_rare_disease", "meta-llama/Llama-3.2-3B-Instruct", "mint.data.gmdb.load_gmdb", 1),
        ("paper_tissue", "meta-llama/Llama-3.2-11B-Vision-Instruct", "mint.data.pannuke.load_pannuke", 8),
    ],
)
def test_paper_experiments_compose_with_the_paper_settings(
    make_cfg, experiment, student_id, source, accumulate
):
    cfg = make_cfg(f"experiment={experiment}")
    # everything resolves except the data path the user must give
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    assert OmegaConf.is_missing(cfg.task.source, "root")
    # the real loader replaces the simulator whole: none of the simulator's keys are left
    assert cfg.task.source._target_ == source
    assert not {"n_diseases", "patients_per_disease", "n_per_tissue"} & set(cfg.task.source)
    s = cfg.student
    assert (s.name_or_path, s.dtype, s.quantization, s.gradient_checkpointing) == (
        student_id,
        "bfloat16",
        None,
        True,
    )
    assert (s.lora.r, s.lora.lora_alpha, s.lora.lora_dropout, s.learning_rate) == (256, 128, 0.05, 5e-5)
    assert cfg.optim.optimizer.lr == 5e-5 and cfg.optim.warmup_ratio == 0.1 and cfg.optim.beta == 0.1
    assert "cosine" in cfg.optim.scheduler._target_
    assert (cfg.task.max_length, cfg.task.max_prompt_length) == (1400, 700)
    t = cfg.trainer
    assert (t.precision, t.gradient_clip_val, t.max_epochs, t.accumulate_grad_batches) == (
        "bf16-mixed",
        0.3,
        10,
        accumulate,
    )
    assert t.strategy._target_ == "lightning.pytorch.strategies.DDPStrategy" and t.accelerator == "gpu"
    # the objective is measured on the validation split's generated answers
    assert cfg.seed == 42 and cfg.objective == "val/topk" and cfg.task.eval.on_val is True


def test_paper_experiment_without_its_data_path_stops_naming_the_key(make_cfg):
    with pytest.raises(Exception, match=r"task\.source\.root"):
        run(make_cfg("experiment=paper_rare_disease", "logger=none"))


@pytest.mark.parametrize(
    ("trainer", "strategy"),
    [("ddp", "DDPStrategy"), ("fsdp", "FSDPStrategy")],
)
def test_distributed_trainer_configs_build_their_lightning_strategy(make_cfg, trainer, strategy):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    cfg = make_cfg("task=example", f"trainer={trainer}")
    built = instantiate(cfg.trainer.strategy)
    assert type(built).__name__ == strategy
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.gradient_clip_val == 0.3
    if trainer == "fsdp":
        # one FSDP unit per decoder layer; LoRA next to frozen weights needs use_orig_params
        assert built.kwargs["use_orig_params"] is True
        assert LlamaDecoderLayer in built.kwargs["auto_wrap_policy"]._module_classes


# --- DDP, 2 CPU processes -----------------------------------------------------------
class RecordWrites(L.Callback):
    """Test helper, configured as a callback so that every DDP process builds one: from then on,
    each file that process opens for writing or renames into place under `root` is appended
    (`<rank> <path>`) to `log` (Python audit events; opened once, so logging adds no events)."""

    def __init__(self, root: str, log: str) -> None:
        rank = os.environ.get("LOCAL_RANK", "0")  # set by Lightning in the processes it starts
        handle = open(log, "a", buffering=1)  # noqa: SIM115  (open for the life of the process)
        written = os.O_WRONLY | os.O_RDWR | os.O_CREAT

        def hook(event: str, args: tuple) -> None:
            if event == "open" and isinstance(args[0], str | bytes | os.PathLike):
                path, mode, flags = os.fsdecode(args[0]), args[1], args[2] or 0
                writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & written)
            elif event == "os.rename":
                path, writes = os.fsdecode(args[1]), True
            else:
                return
            if writes and path.startswith(root):
                handle.write(f"{rank} {os.path.relpath(path, root)}\n")

        sys.addaudithook(hook)


def test_ddp_on_two_cpu_processes_trains_and_rank_zero_writes_once(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mint.run",
            "task=example",
            "debug=smoke",
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "trainer.precision=32-true",
            "trainer.max_steps=4",
            "trainer.enable_progress_bar=false",
            f"hydra.run.dir={run_dir}",
            f"paths.log_dir={tmp_path}",
            "+callbacks.record_writes._target_=tests.test_scale_out.RecordWrites",
            f"+callbacks.record_writes.root={run_dir}",
            f"+callbacks.record_writes.log={tmp_path / 'writes.txt'}",
        ],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # From the student stage on, rank 1 writes nothing into the run folder; rank 0 puts each of
    # the run's files in place once.
    writes = [line.split(" ", 1) for line in (tmp_path / "writes.txt").read_text().splitlines()]
    assert {rank for rank, _ in writes} == {"0"}, [w for w in writes if w[0] != "0"]
    placed = [path for _, path in writes]
    for name in ("results.json", "results.md", "student/metrics.json", "student/adapter"):
        assert placed.count(name) == 1, (name, placed)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["train/processes"] == 2 and results["train/steps"] == 4
    assert 0.0 <= results["val/rewards/accuracies"] <= 1.0
    # the second process ran the same Hydra job into the same folder (Lightning re-ran the command)
    assert (run_dir / "train_ddp_process_1.log").exists()
    assert (run_dir / ".hydra" / "config.yaml").exists()
    adapter = load_file(run_dir / "student" / "adapter" / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # trained: LoRA B starts at zero
    assert json.loads((run_dir / "student" / "metrics.json").read_text())["train/processes"] == 2


def test_ddp_inside_a_local_multirun_is_refused_before_training(make_cfg):
    # Lightning would re-run the whole sweep in each extra process
    cfg = make_cfg(
        "task=example",
        "debug=smoke",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        "hydra.mode=MULTIRUN",
    )
    with pytest.raises(ValueError, match=r"trainer\.devices=2 inside a local multirun.*hydra/launcher=slurm"):
        run(cfg)
    assert not (Path(cfg.paths.output_dir) / "student" / "checkpoints").exists()


# --- the objective main() returns, and the Optuna sweep ---------------------------------
def test_a_validation_generation_objective_needs_on_val(make_cfg):
    from mint.run import check_objective_will_exist

    with pytest.raises(ValueError, match="task.eval.on_val=true"):
        check_objective_will_exist(make_cfg("task=rare_disease", "objective=val/topk"))
    check_objective_will_exist(make_cfg("task=rare_disease", "objective=val/topk", "task.eval.on_val=true"))
    check_objective_will_exist(make_cfg("task=example"))  # val/rewards/accuracies: always measured
    with pytest.raises(ValueError, match="task.eval.val_ranking=true"):
        check_objective_will_exist(make_cfg("task=rare_disease", "objective=val/rank_top1"))
    check_objective_will_exist(
        make_cfg("task=rare_disease", "objective=val/rank_top1", "task.eval.val_ranking=true")
    )


def test_a_misspelt_objective_fails_after_the_work_is_written(make_cfg):
    """Only the run's own keys can tell a misspelt objective; the hours it trained are kept."""
    cfg = make_cfg("task=example", "debug=smoke", "objective=val/rewards/accuracy")
    with pytest.raises(KeyError, match=r"objective='val/rewards/accuracy'.*'val/rewards/accuracies'"):
        run(cfg)
    results = json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())
    assert 0.0 <= results["val/rewards/accuracies"] <= 1.0


def test_objective_value_names_the_missing_key():
    assert objective_value({"val/topk": 0.5}, "val/topk", Stage.all) == 0.5
    assert objective_value({"teacher/test/top1": 0.7}, "val/topk", Stage.teacher) is None
    with pytest.raises(KeyError, match=r"objective='val/topk'.*val/loss"):
        objective_value({"val/loss": 1.0, "note": "x"}, "val/topk", Stage.all)


def test_optuna_sweep_runs_two_trials_and_names_the_best_params(tmp_path, monkeypatch):
    sweep = tmp_path / "sweep"
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "mint.run",
            "-m",
            "hparams_search=orpo_optuna",
            "task=example",
            "debug=smoke",
            "trainer.max_steps=3",
            "trainer.enable_progress_bar=false",
            "objective=val/rewards/accuracies",
            "hydra.sweeper.n_trials=2",
            f"hydra.sweep.dir={sweep}",
            f"paths.log_dir={tmp_path}",
        ],
    )
    # mint.run's own main, composed from the conf/ folder by absolute path: in-process, so the
    # sweep costs no second interpreter start-up (Hydra reads the overrides from sys.argv).
    GlobalHydra.instance().clear()
    hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")(main.__wrapped__)()
    trials = sorted(p for p in sweep.iterdir() if p.is_dir() and (p / "results.json").exists())
    assert [p.name.split("_")[0] for p in trials] == ["0", "1"]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {
        "optim.beta",
        "student.learning_rate",
        "student.lora.r",
        "optim.answer_rank_decay",
    }

    values, params = [], []
    for trial in trials:
        results = json.loads((trial / "results.json").read_text())
        config = OmegaConf.load(trial / ".hydra" / "config.yaml")
        values.append(results["val/rewards/accuracies"])
        # the sampled values reached the run's config
        params.append(
            {
                "optim.beta": config.optim.beta,
                "student.learning_rate": config.student.learning_rate,
                "student.lora.r": config.student.lora.r,
                "optim.answer_rank_decay": config.optim.answer_rank_decay,
            }
        )
        assert config.optim.optimizer.lr == config.student.learning_rate
        assert 0.02 <= config.optim.beta <= 1.0 and config.student.lora.r in (16, 64, 256)
        assert config.optim.answer_rank_decay in (0.0, 1.0, 2.0)
    assert params[0] != params[1]
    assert best["best_value"] == pytest.approx(max(values))
    assert best["best_params"] in [p for p, v in zip(params, values, strict=True) if v == max(values)]


def _optuna_session(tmp_path: Path, monkeypatch, sweep: Path, storage: str, *extra: str) -> None:
    """One `mint.run -m hparams_search=orpo_optuna` session of 2 smoke trials, in-process."""
    argv = [
        "mint.run",
        "-m",
        "hparams_search=orpo_optuna",
        "task=example",
        "debug=smoke",
        "trainer.max_steps=2",
        "trainer.enable_progress_bar=false",
        "objective=val/rewards/accuracies",
        "hydra.sweeper.n_trials=2",
        f"hydra.sweeper.storage={storage}",
        f"hydra.sweep.dir={sweep}",
        f"paths.log_dir={tmp_path}",
        *extra,
    ]
    monkeypatch.setattr(sys, "argv", argv)
    GlobalHydra.instance().clear()
    hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")(main.__wrapped__)()


def test_an_optuna_study_in_sqlite_resumes_where_it_stopped(tmp_path, monkeypatch):
    """2 trials, the sweep ends; the same command on the same sqlite storage adds 2 more to the study
    (the sweep extra keeps SQLAlchemy < 2: optuna 2.10, which the sweeper needs, loses its schema
    version on SQLAlchemy 2 and fails on the storage's second use)."""
    import optuna

    db = tmp_path / "optuna.db"
    storage = f"sqlite:///{db}"
    _optuna_session(tmp_path, monkeypatch, tmp_path / "first", storage)
    first = optuna.load_study(study_name="orpo-example", storage=storage).trials  # read now: it is live
    assert [t.state for t in first] == [optuna.trial.TrialState.COMPLETE] * 2
    # A new sampler seed for the second session: with the first one's, its random start-up trials
    # would repeat the first session's parameters.
    _optuna_session(tmp_path, monkeypatch, tmp_path / "second", storage, "hydra.sweeper.sampler.seed=43")
    study = optuna.load_study(study_name="orpo-example", storage=storage)
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    assert all(t.state is optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert [t.params for t in study.trials[:2]] == [t.params for t in first]
    assert study.trials[2].params not in [t.params for t in first]
    # The second session's best is over all four trials, as the study holds them.
    best = yaml.safe_load((tmp_path / "second" / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(max(t.value for t in study.trials))


# --- launchers ---------------------------------------------------------------------------
def test_a_failing_trial_is_marked_failed_and_the_optuna_sweep_goes_on(tmp_path, monkeypatch):
    """A trial that fails (here the first; say a non-finite loss) is the sweeper's to count, not
    the end of the sweep (conf/hparams_search/orpo_optuna.yaml). The runs are stubbed."""
    import optuna

    calls = []

    def one_trial(cfg):
        calls.append(cfg.student.learning_rate)
        if len(calls) == 1:
            raise FloatingPointError("the loss is nan at step 3")
        return {"val/rewards/accuracies": 0.75}

    monkeypatch.setattr("mint.run.run", one_trial)
    sweep, storage = tmp_path / "sweep", f"sqlite:///{tmp_path / 'study.db'}"
    _optuna_session(tmp_path, monkeypatch, sweep, storage)
    assert len(calls) == 2  # the second trial ran after the first failed
    study = optuna.load_study(study_name="orpo-example", storage=storage)
    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE]
    assert yaml.safe_load((sweep / "optimization_results.yaml").read_text())["best_value"] == 0.75


@pytest.mark.parametrize(
    ("launcher", "target"),
    [
        ("slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"),
        ("local_parallel", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"),
    ],
)
def test_launcher_configs_compose_on_the_published_plugins(launcher, target):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            "config", overrides=["task=example", f"hydra/launcher={launcher}"], return_hydra_config=True
        )
    assert cfg.hydra.launcher._target_ == target
    if launcher == "slurm":
        assert cfg.hydra.launcher.partition is None  # the cluster's default unless set
        assert cfg.hydra.launcher.tasks_per_node == cfg.hydra.launcher.gpus_per_node == 4
    else:
        assert cfg.hydra.launcher.n_jobs == 2


# --- the GPU check's code path -----------------------------------------------------------
def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "experiments" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_gpu_check_refuses_without_cuda(monkeypatch, capsys):
    gpu_check = _gpu_check()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_gpu_check_tiny_dry_run_trains_bf16_and_4bit_modes(tmp_path):
    out = tmp_path / "gpu_check.json"
    assert _gpu_check().main(["--tiny", "--steps", "2", "--json", str(out)]) == 0
    results = {r["mode"]: r for r in json.loads(out.read_text())}
    assert set(results) == {"bf16", "nf4"}
    assert results["nf4"]["linear4bit_layers"] > 0 and results["bf16"]["linear4bit_layers"] == 0
    for r in results.values():
        assert r["tokens_per_s"] > 0 and r["trainable"] > 0
        assert torch.isfinite(torch.tensor([r["first_loss"], r["last_loss"]])).all()
