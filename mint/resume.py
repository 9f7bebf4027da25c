"""Which Lightning checkpoint the student stage starts from: `ckpt_path=`, `resume=true`, or none.

`resume=true` continues an interrupted run from its `last.ckpt` (written whole to a temp
file beside it and renamed onto it, `AtomicCheckpointIO` in mint/stages/trainer.py, so a kill
never leaves half of one):

1. in this run's own folder, when it has one: a rerun with the same
   `hydra.run.dir=DIR` (a fixed folder is the simplest way to make reruns find
   their checkpoints);
2. otherwise in the newest earlier run of the same `run_name` under
   `paths.log_dir` (`runs/*/*_<run_name>/` and `multiruns/*/*/*_<run_name>/`, the
   folders conf/hydra/default.yaml makes) whose saved config (`.hydra/config.yaml`)
   equals this run's apart from `resume` and `ckpt_path`: a checkpoint from another
   configuration (another seed, lr, data) is never resumed.

With nothing to resume the run starts from scratch and says so, so a job script can
always pass `resume=true`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("mint")
LAST = "last.ckpt"
# Keys that may differ between an interrupted run and the run that resumes it.
RESUME_KEYS = ("resume", "ckpt_path")


def checkpoint_subdir(cfg: DictConfig) -> Path:
    """Where this run's checkpoints go, relative to its run folder (student/checkpoints by default)."""
    node = cfg.callbacks.get("model_checkpoint") if cfg.get("callbacks") else None
    default = Path("student") / "checkpoints"
    if node is None or node.get("dirpath") is None:
        return default
    try:
        return Path(str(node.dirpath)).relative_to(Path(str(cfg.paths.output_dir)))
    except ValueError:  # checkpoints outside the run folder: only this run's own folder is searched
        return Path(str(node.dirpath))


def comparable_config(config: Any) -> dict[str, Any]:
    """The unresolved config as plain data, without the keys a resumed run may change."""
    plain = OmegaConf.to_container(OmegaConf.create(OmegaConf.to_yaml(config)), resolve=False)
    return {k: v for k, v in plain.items() if k not in RESUME_KEYS}


def previous_run_dirs(log_dir: Path, run_name: str) -> list[Path]:
    """Earlier run folders of `run_name` (single runs and sweep jobs)."""
    patterns = (f"runs/*/*_{run_name}", f"multiruns/*/*/*_{run_name}")
    return [p for pattern in patterns for p in log_dir.glob(pattern) if p.is_dir()]


def find_resume_checkpoint(cfg: DictConfig) -> Path | None:
    """The `last.ckpt` that `resume=true` continues from (module docstring), or None."""
    run_dir = Path(str(cfg.paths.output_dir))
    subdir = checkpoint_subdir(cfg)
    own = run_dir / subdir / LAST
    if own.is_file():
        return own
    if subdir.is_absolute():
        return None
    wanted = comparable_config(cfg)
    candidates = []
    for folder in previous_run_dirs(Path(str(cfg.paths.log_dir)), str(cfg.run_name)):
        last, saved = folder / subdir / LAST, folder / ".hydra" / "config.yaml"
        if folder.resolve() == run_dir.resolve() or not (last.is_file() and saved.is_file()):
            continue
        if comparable_config(OmegaConf.load(saved)) == wanted:
            candidates.append(last)
        else:
            log.info("resume: %s has another configuration; not resuming from it", folder)
    return max(candidates, key=lambda p: p.stat().st_mtime, default=None)


def start_checkpoint(cfg: DictConfig) -> str | None:
    """What `trainer.fit(ckpt_path=...)` gets: the user's ckpt_path, the resume checkpoint, or None."""
    resume = bool(cfg.get("resume", False))
    if cfg.ckpt_path is not None:
        if resume:
            raise ValueError(
                f"ckpt_path={cfg.ckpt_path} and resume=true both name where to start: set only one"
            )
        if not Path(str(cfg.ckpt_path)).is_file():
            raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path}: no such checkpoint file")
        return str(cfg.ckpt_path)
    if not resume:
        return None
    found = find_resume_checkpoint(cfg)
    if found is None:
        log.warning(
            "resume=true: no %s of an earlier run with this configuration under %s; starting from scratch",
            LAST,
            cfg.paths.log_dir,
        )
        return None
    log.info("resume=true: continuing from %s", found)
    return str(found)
