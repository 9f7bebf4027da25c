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

Every checkpoint also records what determined its weights (`TrainingRecord`), and `resume=true`
refuses one whose record differs from this run's: a rerun in the same folder with another
learning rate, seed or teacher would otherwise continue the old weights under the new settings.
Settings that do not touch the weights (evaluation, decoding, logging, validation frequency) may
change, so a finished run can be evaluated again with `resume=true`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
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


def differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    """`key: old -> new` for each dotted key whose value differs between two plain configs."""
    if isinstance(saved, dict) and isinstance(current, dict):
        keys = sorted(set(saved) | set(current), key=str)
        return [d for k in keys for d in differences(saved.get(k), current.get(k), f"{prefix}{k}.")]
    if saved == current:
        return []

    def short(value: Any) -> str:
        text = repr(value)
        return text if len(text) <= 40 else text[:37] + "..."

    return [f"{prefix.rstrip('.')}: {short(saved)} -> {short(current)}"]


class TrainingRecord(L.Callback):
    """Keeps `record` (what determines the trained weights: the preference rows' digests, the
    student, the objective and its settings, the seed, the trainer keys that change the steps) in
    every checkpoint, and checks it when a fit starts from one. `strict` (resume=true) refuses a
    checkpoint trained under another record; an explicit `ckpt_path=` is the user's choice and gets
    a warning. A checkpoint written before records existed has none and is resumed as before."""

    def __init__(self, record: dict[str, Any], *, checkpoint: str | None, strict: bool) -> None:
        self.record = record
        self.checkpoint = checkpoint
        self.strict = strict

    def state_dict(self) -> dict[str, Any]:
        return {"record": self.record}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        changed = differences(state_dict.get("record", {}), self.record)
        if not changed:
            return
        shown = "; ".join(changed[:6]) + (f"; and {len(changed) - 6} more" if len(changed) > 6 else "")
        if not self.strict:
            log.warning("ckpt_path=%s was trained with other settings (%s)", self.checkpoint, shown)
            return
        folder = Path(str(self.checkpoint)).parent
        raise ValueError(
            f"resume=true: {self.checkpoint} was trained with other settings ({shown}); continuing "
            f"it would mix two runs. Start afresh in another folder (hydra.run.dir=...) or delete "
            f"{folder}, or pass ckpt_path={self.checkpoint} without resume=true to continue it under "
            "the new settings on purpose"
        )
