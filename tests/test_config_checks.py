"""Every numeric and enumerated config value is checked before any stage runs (mint/config.py):
the error names the key, the value and the allowed range."""

from __future__ import annotations

import copy
import dataclasses
import re
import typing
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf, open_dict

from mint.config import (
    AnswerConfig,
    Bounds,
    ConfigError,
    CustomTaskConfig,
    EvalConfig,
    ExamplePrefsConfig,
    MintConfig,
    OptimConfig,
    PipelineTaskConfig,
    PrefsConfig,
    RagConfig,
    StudentConfig,
    TeacherConfig,
    TrainerConfig,
    check_config,
)
from mint.run import run
from tests.conftest import CONF_DIR

# Where each schema's fields sit in a composed config, and the overrides that compose them.
PLACES: dict[type, tuple[str, tuple[str, ...]]] = {
    MintConfig: ("", ()),
    CustomTaskConfig: ("task.", ("task=example",)),
    ExamplePrefsConfig: ("task.example.", ("task=example",)),
    PipelineTaskConfig: ("task.", ("task=rare_disease",)),
    AnswerConfig: ("task.answer.", ("task=rare_disease",)),
    PrefsConfig: ("task.prefs.", ("task=rare_disease",)),
    EvalConfig: ("task.eval.", ("task=rare_disease",)),
    TeacherConfig: ("teacher.", ("task=rare_disease",)),
    OptimConfig: ("optim.", ()),
    RagConfig: ("optim.rag.", ("task=rare_disease", "optim=rag")),
    StudentConfig: ("student.", ()),
    TrainerConfig: ("trainer.", ()),
}


@pytest.fixture(scope="module")
def composed(tmp_path_factory):
    """Each distinct set of overrides composed once (as `make_cfg` does): the tests copy it."""
    root = tmp_path_factory.mktemp("checks")
    configs: dict[tuple[str, ...], DictConfig] = {}

    def get(overrides: tuple[str, ...]) -> DictConfig:
        if overrides not in configs:
            GlobalHydra.instance().clear()
            with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
                cfg = compose("config", overrides=list(overrides))
            with open_dict(cfg):
                cfg.paths.root_dir = cfg.paths.log_dir = str(root)
                cfg.paths.output_dir, cfg.paths.cache_dir = str(root / "run"), str(root / "cache")
            configs[overrides] = cfg
        return configs[overrides]

    return get


def _numeric(hint: typing.Any) -> bool:
    return any(t in (int, float) for t in (hint, *typing.get_args(hint)))


def _checked_fields() -> list[tuple[type, dataclasses.Field]]:
    return [
        (schema, f)
        for schema in PLACES
        for f in dataclasses.fields(schema)
        if "bounds" in f.metadata or "choices" in f.metadata
    ]


def _outside(bounds: Bounds, integer: bool) -> float:
    """A value just outside `bounds`."""
    step = 1 if integer else 0.5
    if bounds.gt is not None:
        return bounds.gt
    if bounds.ge is not None:
        return bounds.ge - step
    if bounds.lt is not None:
        return bounds.lt
    return bounds.le + step


def test_every_numeric_schema_field_has_a_range():
    unchecked = [
        f"{schema.__name__}.{f.name}"
        for schema in PLACES
        for f in dataclasses.fields(schema)
        if _numeric(typing.get_type_hints(schema)[f.name]) and "bounds" not in f.metadata
    ]
    assert unchecked == []  # a new numeric key needs `bounded(...)` in mint/config.py
    assert len(_checked_fields()) >= 40


@pytest.mark.parametrize(
    "schema,field", _checked_fields(), ids=[f"{s.__name__}.{f.name}" for s, f in _checked_fields()]
)
def test_an_out_of_range_value_is_refused_with_its_key(composed, schema, field):
    prefix, overrides = PLACES[schema]
    cfg = copy.deepcopy(composed(overrides))
    check_config(cfg)  # the shipped config passes
    key = prefix + field.name
    if "bounds" in field.metadata:
        hint = typing.get_type_hints(schema)[field.name]
        integer = int in (hint, *typing.get_args(hint))
        bad = _outside(field.metadata["bounds"], integer)
        bad = int(bad) if integer else float(bad)
    else:
        bad = "no-such-choice"
    OmegaConf.update(cfg, key, bad)
    with pytest.raises(ConfigError, match=re.escape(f"{key}={bad!r}: expected ")):
        check_config(cfg)


def test_rules_between_keys_and_inside_target_nodes(make_cfg):
    cfg = make_cfg("task=example", "task.max_prompt_length=300", "task.max_length=256")
    with pytest.raises(
        ConfigError, match=r"task\.max_prompt_length=300: expected < task\.max_length \(256\)"
    ):
        check_config(cfg)
    cfg = make_cfg("task=rare_disease", "optim=rag", "optim.rag.chunk_overlap=64")
    with pytest.raises(
        ConfigError, match=r"optim\.rag\.chunk_overlap=64: expected < optim\.rag\.chunk_tokens"
    ):
        check_config(cfg)
    cfg = make_cfg("student.lora.r=0", "optim.optimizer.lr=0")
    with pytest.raises(ConfigError, match=r"student\.lora\.r=0: expected >= 1.*optim\.optimizer\.lr=0"):
        check_config(cfg)
    # Teacher fits run side by side in forked processes: CPU only, with a thread count each.
    cfg = make_cfg("task=rare_disease", "teacher.fit_workers=2", "teacher.trainer.accelerator=gpu")
    with pytest.raises(
        ConfigError, match=r"teacher\.fit_workers=2: expected 1 with teacher\.trainer\.accelerator=gpu"
    ):
        check_config(cfg)
    cfg = make_cfg("task=rare_disease", "teacher.fit_workers=2", "teacher.fit_threads=null")
    with pytest.raises(ConfigError, match=r"teacher\.fit_workers=2: expected 1 unless teacher\.fit_threads"):
        check_config(cfg)


def test_all_problems_are_named_at_once_and_nothing_runs(make_cfg, tmp_path: Path):
    cfg = make_cfg(
        "task=example", "debug=smoke", "optim.beta=-1", "optim.batch_size=0", "student.learning_rate=-0.1"
    )
    with pytest.raises(ConfigError) as err:
        run(cfg)
    message = str(err.value)
    for expected in (
        "optim.beta=-1.0: expected > 0",
        "optim.batch_size=0: expected >= 1",
        "student.learning_rate=-0.1",
    ):
        assert expected in message
    assert not any(Path(cfg.paths.output_dir).glob("*"))  # refused before any stage wrote a file
