"""The config tree: every combination composes and resolves; mistakes fail loudly."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf, open_dict

from tests.conftest import CONF_DIR


def _options(group: str) -> list[str]:
    # task_<task>.yaml files only name another option of their group (tested below)
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml") if not p.stem.startswith("task_"))


def _compose_resolved(overrides: list[str]) -> dict:
    # the custom task needs a dataset path; pipeline tasks make their own data
    needs_path = any(o == "task=custom" for o in overrides)
    extra = ["task.prefs_path=/data/p.jsonl"] if needs_path else []
    cfg = compose(
        "config",
        overrides=[*overrides, *extra, "paths.root_dir=/r", "paths.output_dir=/r/run"],
        return_hydra_config=True,
    )
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg.hydra  # hydra's own node needs a live job to resolve
    return OmegaConf.to_container(cfg, resolve=True)


def test_every_config_combination_composes_and_resolves():
    # The method reads the student's learning rate and the quantisation writes into the student
    # node, so every (task, optim, student) and every (task, student, quant) combination is
    # composed; trainer/logger/teacher options and debug/experiment choices only add their own
    # keys, so each is composed once against the defaults.
    tasks, optims, students, quants = (_options(g) for g in ["task", "optim", "student", "quant"])
    interacting = [(t, o, s, "none") for t in tasks for o in optims for s in students]
    interacting += [(t, "orpo", s, q) for t in tasks for s in students for q in quants if q != "none"]
    independent = [[f"{g}={o}"] for g in ["trainer", "logger", "teacher"] for o in _options(g)]
    independent += [[], ["debug=smoke"], ["task=rare_disease", "debug=smoke"]]
    independent += [[f"experiment={e}"] for e in _options("experiment")]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for combo in interacting:
            groups = ["task", "optim", "student", "quant"]
            resolved = _compose_resolved([f"{g}={o}" for g, o in zip(groups, combo, strict=True)])
            assert (resolved["task"]["name"], resolved["optim"]["method"]) == (combo[0], combo[1])
            assert resolved["optim"]["optimizer"] is None or resolved["optim"]["optimizer"]["lr"] > 0
            assert (resolved["student"]["quantization"] is None) == (combo[3] == "none")
        for overrides in independent:
            trainer = _compose_resolved(overrides)["trainer"]
            assert trainer["max_steps"] > 0 or trainer["max_epochs"] > 0  # the paper's runs count epochs


@pytest.mark.parametrize(
    ("override", "exception", "needle"),
    [
        (["optim.bogus=1"], ConfigCompositionException, "optim.bogus"),
        (["trainer.max_steps=abc"], ConfigCompositionException, "trainer.max_steps"),
        (["task.on_error=maybe"], ConfigCompositionException, "task.on_error"),
        (["stage=nope"], ConfigCompositionException, "stage"),
        (["optim=foo"], MissingConfigException, "optim/foo"),
        (["student=gpt5"], MissingConfigException, "student/gpt5"),
    ],
)
def test_bad_config_fails_with_the_key_named(override, exception, needle):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        with pytest.raises(exception) as err:
            compose("config", overrides=override)
    text = str(err.value) + str(err.value.__cause__ or "")
    assert needle in text


def test_custom_task_requires_a_dataset_path():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["task=custom"])
    with pytest.raises(Exception, match="prefs_path"):
        _ = cfg.task.prefs_path


def test_paper_student_settings():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["student=llama32_3b_instruct", "quant=nf4"])
    lora = cfg.student.lora
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, lora.target_modules) == (256, 128, 0.05, "all-linear")
    assert cfg.student.quantization.bnb_4bit_quant_type == "nf4"
    assert cfg.student.quantization.bnb_4bit_use_double_quant is True


def test_debug_smoke_also_shrinks_the_pipeline_task():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        full = compose("config", overrides=["task=rare_disease"])
        smoke = compose("config", overrides=["task=rare_disease", "debug=smoke"])
    assert full.task.source.n_diseases == 30 and full.teacher.folds == 5
    assert smoke.task.source.n_diseases < full.task.source.n_diseases
    assert smoke.teacher.folds == 2 and smoke.trainer.max_steps == 12


@pytest.mark.parametrize(
    ("task", "teacher_target", "student"),
    [
        ("tissue", "mint.teacher.clip.clip_teacher", "tiny_mllama_tower128"),
        ("rare_disease", "mint.teacher.fusion.fusion_teacher", "tiny_llama"),
        ("example", None, "tiny_llama"),
    ],
)
def test_each_task_picks_its_own_teacher_and_student(task, teacher_target, student):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"task={task}"])
        swapped = compose("config", overrides=[f"task={task}", "student=smollm2_135m", "teacher=plip"])
    assert cfg.student.name == student
    assert (cfg.teacher.model._target_ if cfg.teacher else None) == teacher_target
    assert swapped.student.name == "smollm2_135m"
    assert swapped.teacher.model._target_ == "mint.teacher.clip.plip_teacher"


def test_the_main_job_is_the_tissue_task():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config")
    assert (cfg.task.name, cfg.optim.method, cfg.student.modality) == ("tissue", "orpo", "image")


@pytest.mark.parametrize(
    ("overrides", "decay"),
    [
        (["task=rare_disease"], 2.0),  # the task's own default (conf/optim_task/rare_disease.yaml)
        (["task=rare_disease", "optim=sft"], 2.0),  # whichever method
        (["task=rare_disease", "optim.answer_rank_decay=0"], 0.0),  # the command line wins
        (["task=tissue"], 0.0),
        (["task=example"], 0.0),
        (["experiment=paper_rare_disease"], 0.0),  # the paper's ORPO
        (["experiment=smollm2_rare_disease"], 0.0),  # as its recorded numbers were measured
    ],
)
def test_a_task_sets_its_own_optim_defaults_below_the_command_line(overrides, decay):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    assert cfg.optim.answer_rank_decay == decay


@pytest.mark.parametrize("native", [True, False])
def test_cpu_experiments_take_bf16_only_where_the_cpu_computes_it(monkeypatch, native):
    # Emulated bf16 (an AVX2 CPU) trained 37x slower than float32: the SmolLM2 CPU experiments
    # then train in float32, and in bf16 where AVX512-BF16 or AMX makes it the faster choice.
    monkeypatch.setattr("mint.config.cpu_computes_bf16", lambda: native)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for experiment in ("smollm2_tissue", "smollm2_rare_disease"):
            cfg = _compose_resolved([f"experiment={experiment}"])
            expected = ("bfloat16", "bf16-mixed") if native else ("float32", "32-true")
            assert (cfg["student"]["dtype"], cfg["trainer"]["precision"]) == expected
