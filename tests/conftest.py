"""Shared fixtures: compose the real config tree in-process (no subprocess start-up cost)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402

from mint.config import register_configs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = str(ROOT / "conf")
register_configs()


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One stage cache for the session, so a tiny student is built once per corpus."""
    return tmp_path_factory.mktemp("cache")


@dataclass
class DefaultJob:
    run_dir: Path  # Hydra's run dir: results.json, .hydra/, student/, eval/, csv/
    printed: str  # what the command wrote to the terminal (stdout and stderr)


@pytest.fixture(scope="session")
def default_job(tmp_path_factory: pytest.TempPathFactory, shared_cache: Path) -> DefaultJob:
    """`python -m mint.run debug=smoke` as a user types it (task=tissue, ORPO: the main job at smoke
    size), run once for the session: the CLI, pipeline and export tests all read this one run."""
    out = tmp_path_factory.mktemp("default_job")
    proc = python_m_mint_run(
        "debug=smoke", f"hydra.run.dir={out}/run", f"paths.log_dir={out}", f"paths.cache_dir={shared_cache}"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return DefaultJob(out / "run", proc.stdout + proc.stderr)


def python_m_mint_run(*args: str, cwd: Path = ROOT, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m mint.run ARGS` in a fresh process from `cwd` (offline, W&B off), output captured."""
    return subprocess.run(
        [sys.executable, "-m", "mint.run", *args],
        cwd=cwd,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def compose_cfg(overrides: list[str], *, root: Path, output_dir: Path, cache: Path) -> DictConfig:
    """compose(overrides) with its folders under `root`, as `python -m mint.run` would build it."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.root_dir = str(root)
        cfg.paths.log_dir = str(root)
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.cache_dir = str(cache)
        del cfg.hydra
    return cfg


@pytest.fixture
def make_cfg(tmp_path: Path, shared_cache: Path) -> Callable[..., DictConfig]:
    """compose(overrides) with the run dir in tmp_path, as `python -m mint.run` would build it."""

    def _make(*overrides: str, output_dir: Path | None = None) -> DictConfig:
        return compose_cfg(
            list(overrides), root=tmp_path, output_dir=output_dir or tmp_path / "run", cache=shared_cache
        )

    return _make


def random_llama(vocab_size: int, max_positions: int, *, attn: str = "sdpa", seed: int = 0, layers: int = 2):
    """A seeded random Llama (2 layers unless told, hidden 32) in eval mode, pad id 0: for
    forward-equality tests."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        pad_token_id=0,
        attn_implementation=attn,
    )
    return LlamaForCausalLM(config).float().eval()


def load_experiment(name: str):
    """experiments/<name>.py as a module (experiments/ is scripts, not a package)."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "experiments" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module
